"""Layers import downward only, and no package has an import cycle (docs/architecture.md).

The contracts are import-linter's, declared in pyproject.toml ([tool.importlinter]) and run by
`make test` as `lint-imports`; here they are checked on the tree, and shown to fail on a small
package that breaks them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = [
    "r2led.cli",
    "r2led.bench",
    "r2led.serve",
    "r2led.train",
    "r2led.models",
    "r2led.sid",
    "r2led.data",
    "r2led.config",
    "r2led.errors | r2led.atomic | r2led.terminal",
]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(config: Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_declare_the_layer_order_and_no_cycles():
    by_id = {c["id"]: c for c in _contracts()}
    assert by_id["layers"]["type"] == "layers" and by_id["layers"]["layers"] == LAYERS
    assert by_id["acyclic"]["type"] == "acyclic_siblings" and by_id["acyclic"]["ancestors"] == ["r2led"]


def test_the_package_keeps_its_layers_and_has_no_cycles():
    result = _lint(ROOT / "pyproject.toml", ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def _fake_package(root: Path, extra: dict[str, str]) -> None:
    """A package named r2led with one module per layer, plus ``extra`` (path -> source)."""
    modules = {
        "__init__.py": "",
        "errors.py": "",
        "atomic.py": "",
        "terminal.py": "",
        "config.py": "from r2led import errors\n",
        "data/__init__.py": "from r2led import config\n",
        "sid/__init__.py": "",
        "sid/quantizers.py": "from r2led import data\n",
        "sid/rq_vae.py": "from r2led.sid import quantizers\n",
        "models/__init__.py": "",
        "models/registry.py": "from r2led import config, sid\n",
        "train/__init__.py": "from r2led.models import registry\n",
        "bench/__init__.py": "from r2led import terminal, train\n",
        "serve/__init__.py": "from r2led import train\n",
        "bench/serve_load.py": "from r2led import serve\n",
        "cli/__init__.py": "from r2led import bench, serve\n",
        **extra,
    }
    for path, source in modules.items():
        (root / "r2led" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "r2led" / path).write_text(source)


def _ini(contracts: list[dict]) -> str:
    """The project's contracts, without their ignored imports, as an .importlinter file."""
    lines = ["[importlinter]", "root_packages =", "    r2led"]
    for contract in contracts:
        lines.append(f"[importlinter:contract:{contract['id']}]")
        for key, value in contract.items():
            if key in ("id", "ignore_imports"):
                continue
            if isinstance(value, list):
                lines += [f"{key} =", *(f"    {v}" for v in value)]
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "extra, broken",
    [
        ({}, None),
        ({"config.py": "from r2led.models import registry\n"}, "r2led.config is not allowed to import r2led.models"),
        ({"bench/__init__.py": "from r2led import cli\n"}, "r2led.bench is not allowed to import r2led.cli"),
        ({"serve/__init__.py": "from r2led import bench\n"}, "r2led.serve is not allowed to import r2led.bench"),
        ({"sid/quantizers.py": "from r2led.sid import rq_vae\n"}, "No cycles are allowed in r2led.sid"),
    ],
    ids=["clean", "config-imports-models", "bench-imports-cli", "serve-imports-bench", "sid-cycle"],
)
def test_an_upward_import_or_a_cycle_breaks_a_contract(tmp_path, extra, broken):
    _fake_package(tmp_path, extra)
    (tmp_path / ".importlinter").write_text(_ini(_contracts()))
    result = _lint(tmp_path / ".importlinter", tmp_path, pythonpath=tmp_path)
    if broken is None:
        assert result.returncode == 0, result.stdout[-3000:]
    else:
        assert result.returncode == 1 and broken in result.stdout, result.stdout[-3000:]
