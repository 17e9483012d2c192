"""Run folders: what a run records about itself, and the checks before anything reads or writes one.

A run folder's ``config.yaml`` is its identity card::

    data: /abs/path/to/store          the data folder it was trained on
    fingerprints:                     what that data was when training started
      data: <sha256 of DATA/manifest.json>
      sid: <sha256 of the SID table's files>   (null when the model uses no SID table)
    sid: sid                          the validated RunConfig (sid, model, train)
    model: {...}
    train: {...}

It is written once, when training starts, after every check has passed: a run folder is never
left half-valid. Every reader (``evaluate``, ``train --resume``, ``export``, ``serve``) goes
through :func:`verify_run` (or :func:`check_run_folder` before training), which refuses, in one
line, a corrupt ``config.yaml``, a missing checkpoint, or data and SID tables that changed since.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from r2led.atomic import write_text_atomic
from r2led.config import RunConfig, validate_config
from r2led.errors import CheckpointError, ConfigError, DataError, R2ledError, one_line

RUN_CONFIG = "config.yaml"
# Settings that may change on --resume: how long to train and how a run is computed, not what.
RESUMABLE_CHANGES = frozenset({"train.epochs", "train.threads"})


# ---- fingerprints -------------------------------------------------------------------------
def _short(sha: str | None) -> str:
    return "none" if sha is None else sha[:12] + "…"


def fingerprint_data(store_root: str | Path) -> str:
    """sha256 of a prepared store's ``manifest.json`` (re-preparing the store changes it)."""
    path = Path(store_root) / "manifest.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise DataError(f"{store_root} is not a prepared store (no manifest.json)") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def fingerprint_sid(sid_dir: str | Path) -> str:
    """sha256 over a SID table's files: each relative name and its bytes, in sorted name order."""
    root = Path(sid_dir)
    if not root.is_dir():
        raise DataError(f"no SID table at {root}; build one with `r2led sid build {root.parent}`")
    digest = hashlib.sha256()
    try:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    except OSError as exc:
        raise DataError(f"cannot read the SID table {root}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def fingerprints(store_root: str | Path, cfg: RunConfig) -> dict[str, str | None]:
    """{"data": manifest sha, "sid": SID table sha or None when ``cfg``'s model uses none}."""
    from r2led.models.registry import model_class

    uses_sid = model_class(cfg.model.name).wants_sid(cfg.model)
    return {
        "data": fingerprint_data(store_root),
        "sid": fingerprint_sid(Path(store_root) / cfg.sid) if uses_sid else None,
    }


# ---- config.yaml --------------------------------------------------------------------------
def is_run_folder(path: str | Path) -> bool:
    """A folder that ``r2led train`` wrote (it has a ``config.yaml``, readable or not)."""
    return (Path(path) / RUN_CONFIG).is_file()


def _read_tree(run: str | Path) -> dict:
    path = Path(run) / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run} is not a run folder (no {RUN_CONFIG})")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path} is corrupt: {one_line(exc, 120)}") from exc
    if not isinstance(tree, dict) or not isinstance(tree.get("data"), str):
        raise CheckpointError(f"{path} is corrupt: expected a mapping with the run's data folder")
    return tree


def _read_run(run: str | Path) -> tuple[str, RunConfig, object]:
    """A run folder's data folder, validated configuration and recorded fingerprints (unchecked),
    from one reading of its ``config.yaml``."""
    tree = _read_tree(run)
    data = tree.pop("data")
    recorded = tree.pop("fingerprints", None)
    try:
        return data, validate_config(tree), recorded
    except ConfigError as exc:
        raise CheckpointError(f"{Path(run) / RUN_CONFIG} is corrupt: {one_line(exc, 160)}") from exc


def _checked_fingerprints(run: str | Path, recorded: object) -> dict[str, str | None]:
    if not isinstance(recorded, dict) or not isinstance(recorded.get("data"), str):
        raise CheckpointError(f"{run} records no data fingerprints (written by an older r2led or edited); retrain it")
    return {"data": recorded["data"], "sid": recorded.get("sid")}


def read_run_config(run: str | Path) -> tuple[str, RunConfig]:
    """A run folder's data folder and validated configuration, from its ``config.yaml``."""
    data, cfg, _ = _read_run(run)
    return data, cfg


def run_fingerprints(run: str | Path) -> dict[str, str | None]:
    """The fingerprints a run recorded when it started (see :func:`fingerprints`)."""
    return _checked_fingerprints(run, _read_tree(run).get("fingerprints"))


def write_run_config(run: str | Path, data: str | Path, cfg: RunConfig, prints: dict[str, str | None]) -> None:
    """Write ``config.yaml`` (atomically): the data folder, its fingerprints and the config."""
    tree = {"data": str(Path(data).resolve()), "fingerprints": dict(prints), **cfg.model_dump()}
    write_text_atomic(Path(run) / RUN_CONFIG, yaml.safe_dump(tree, sort_keys=False))


# ---- checks -------------------------------------------------------------------------------
def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(saved: RunConfig, wanted: RunConfig, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Settings that differ, as ``"model.dim: 32 → 64"`` (saved → wanted), in a stable order."""
    old, new = _flatten(saved.model_dump()), _flatten(wanted.model_dump())
    return [
        f"{key}: {old.get(key, '(unset)')} → {new.get(key, '(unset)')}"
        for key in sorted(old.keys() | new.keys())
        if key not in ignore and old.get(key) != new.get(key)
    ]


def check_fingerprints(run: str | Path, data: str | Path, sid_dir: str | Path, recorded: dict, now: dict) -> None:
    """Refuse, in one line, data or a SID table that differ from what ``run`` was trained on."""
    if recorded["data"] != now["data"]:
        raise DataError(
            f"the data {data} is not what {run} was trained on (manifest sha {_short(recorded['data'])} → "
            f"{_short(now['data'])}); retrain, or use the old store"
        )
    if recorded.get("sid") != now.get("sid"):
        raise DataError(
            f"the SID table {sid_dir} was rebuilt after {run} was trained (sha {_short(recorded.get('sid'))} → "
            f"{_short(now.get('sid'))}); retrain, or rebuild the old table"
        )


def _train_command(run: Path, data: str, cfg: RunConfig) -> str:
    return f"r2led train {data} --model {cfg.model.name} --out {run} --resume"


def verify_run(run: str | Path, *, require_finished: bool) -> tuple[str, RunConfig]:
    """Check that a run can be used as trained; returns its data folder and configuration.

    The folder's ``config.yaml`` is readable, ``best.pt`` exists (and ``metrics.json`` when
    ``require_finished``), and the data manifest and SID table still have the fingerprints
    recorded when training started. Raises a one-line :class:`R2ledError` otherwise.
    """
    run = Path(run)
    data, cfg, recorded = _read_run(run)
    if not (run / "best.pt").is_file():
        raise CheckpointError(
            "no best.pt yet (training stopped before its first evaluation); "
            f"finish the run: {_train_command(run, data, cfg)}"
        )
    if require_finished and not (run / "metrics.json").is_file():
        raise CheckpointError(f"the run is unfinished (no metrics.json); finish it: {_train_command(run, data, cfg)}")
    recorded = _checked_fingerprints(run, recorded)
    if not Path(data).is_dir():
        raise DataError(f"{run} was trained on {data}, which no longer exists; prepare it again or retrain")
    check_fingerprints(run, data, Path(data) / cfg.sid, recorded, fingerprints(data, cfg))
    return data, cfg


def check_run_folder(
    out: str | Path, data: str | Path, cfg: RunConfig, prints: dict[str, str | None], *, resume: bool, force: bool
) -> str:
    """Decide what training into ``out`` means, before anything is written; returns the action.

    - ``"new"``: ``out`` is missing or empty;
    - ``"resume"``: ``resume`` and ``out`` is a run of the same settings on the same data;
    - ``"replace"``: ``force`` and ``out`` is a run folder (cleared when training starts).

    Anything else is refused in one line: a non-empty folder that is not a run folder (even with
    ``force``), a resume with other settings (naming the keys) or other data, and training into an
    existing run without ``--resume`` or ``--force``.
    """
    out = Path(out)
    if resume and force:
        raise ConfigError("--resume continues a run and --force replaces it: pass one of them")
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return "new"
    if not is_run_folder(out):
        raise ConfigError(f"--out {out} is not empty and is not a run folder (no {RUN_CONFIG}); choose another --out")
    if force:
        return "replace"
    _, saved, recorded = _read_run(out)
    if not resume:
        raise ConfigError(
            f"{out} already holds a run ({saved.model.name}); pass --resume to continue it, --force to start it again, "
            "or choose another --out"
        )
    diff = config_differences(saved, cfg, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"cannot resume {out} with other settings ({'; '.join(diff)}); use --force to start again")
    check_fingerprints(out, data, Path(data) / cfg.sid, _checked_fingerprints(out, recorded), prints)
    return "resume"


def clear_run_folder(out: str | Path) -> None:
    """Remove a run folder's contents (``--force``); refuses a folder that is not a run folder."""
    out = Path(out)
    if not out.exists():
        return
    if not is_run_folder(out):
        raise R2ledError(f"refusing to clear {out}: it is not a run folder (no {RUN_CONFIG})")
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
