"""The service against its own OpenAPI schema: a bounded schemathesis run (its CLI, `st run`)
with every check and the stateful phase, against a live `r2led serve` with API keys."""

from __future__ import annotations

import subprocess

import pytest

from r2led.serve import export_run
from serving_helpers import BIN, serve_process
from test_serve import train

KEY = "contract-key-0123456789abcdef"


@pytest.fixture(scope="module")
def bundle(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    train(tiny_store, root / "run", "r2led")
    return export_run(root / "run", root / "bundle")


def test_schemathesis_all_checks_and_stateful_phase_find_no_failure(bundle, tmp_path):
    if not (BIN / "st").is_file():
        pytest.skip("schemathesis is not installed (dev extra)")
    (tmp_path / "keys").write_text(KEY + "\n")
    with serve_process(
        bundle, str(tmp_path / "h.db"), "--api-key-file", str(tmp_path / "keys"), "--max-events", "50"
    ) as (url, _):
        res = subprocess.run(
            [
                str(BIN / "st"),
                "run",
                url + "/openapi.json",
                "--checks",
                "all",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "-H",
                f"X-API-Key: {KEY}",
                "--max-examples",
                "100",
                "--seed",
                "7",
                "--no-color",
                "--report-dir",
                str(tmp_path / "report"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in out, out[-3000:]
    assert " passed" in out and "failures" not in out.split("SUMMARY")[-1]
