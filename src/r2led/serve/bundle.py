"""Writing an export bundle: a self-contained folder from a finished run (``r2led export``).

A bundle (``r2led export RUN --out DIR``)::

    manifest.json    format, model, r2led/torch versions, t_max, source run and data, the run's
                     metrics, the data and SID fingerprints the run was trained on, and
                     ``files``: the sha256 of every other file in the folder
    config.yaml      the run's configuration (model + train; ``sid: sid`` points inside DIR)
    spec.json        DataSpec.to_dict(): item count, per-item category/tags, feature sizes
    model.pt         the best checkpoint's state dict (tensors only)
    sid/             the SID table (only when the model uses one)
    items.parquet    item (id 1..N), key (the source's item key)
    users.parquet    user (row), key, one int column per user feature (0 = unknown)
    vocab.json       vocabularies: user feature value strings in code order (code = index + 1)

The run is checked first (``verify_run``): its data and SID table must still have the
fingerprints recorded at training, and it must be finished (``best.pt`` and ``metrics.json``)
unless ``allow_unfinished``. The folder is written through ``r2led.atomic.staged_folder``: it
appears complete or not at all. ``r2led.serve.bundle_load`` reads it back, checking every hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from r2led import __version__
from r2led.atomic import staged_folder
from r2led.serve.errors import BundleError

MANIFEST = "manifest.json"
BUNDLE_FORMAT = 2  # 2: manifest lists file hashes and the run's fingerprints


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` except the manifest, sorted."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def export_run(run_dir: str | Path, out_dir: str | Path, force: bool = False, allow_unfinished: bool = False) -> Path:
    """Write a run's best model and everything needed to score with it to ``out_dir``.

    ``force`` replaces an existing bundle; a folder that is not a bundle is never replaced.
    ``allow_unfinished`` exports a run without final metrics (its best checkpoint so far).
    """
    from r2led.models.registry import model_class
    from r2led.models.spec import DataSpec
    from r2led.train.run_folder import run_fingerprints, verify_run
    from r2led.train.trainer import load_run

    run_dir, out = Path(run_dir), Path(out_dir)
    data, cfg = verify_run(run_dir, require_finished=False)  # best.pt, unchanged data and SID table
    if not allow_unfinished and not (run_dir / "metrics.json").is_file():
        raise BundleError(
            f"{run_dir} is unfinished (no metrics.json): finish it with `r2led train {data} --model {cfg.model.name} "
            f"--out {run_dir} --resume`, or export its best checkpoint so far with --allow-unfinished"
        )
    if out.exists():
        if (out / MANIFEST).is_file():
            if not force:
                raise BundleError(f"{out} already holds an exported model; pass --force to replace it")
        elif not out.is_dir() or any(out.iterdir()):
            raise BundleError(f"{out} exists and is not an exported model (no {MANIFEST}); choose another --out folder")
    model, store, cfg = load_run(run_dir)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    uses_sid = model_class(cfg.model.name).wants_sid(cfg.model)
    spec = DataSpec.from_store(store)
    feature_names = list(store.manifest["user_features"])
    manifest = {
        "format": BUNDLE_FORMAT,
        "model": cfg.model.name,
        "r2led": __version__,
        "torch": torch.__version__,
        "t_max": cfg.train.t_max,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_run": str(run_dir.resolve()),
        "source_data": str(store.root.resolve()),
        "fingerprints": run_fingerprints(run_dir),
        "finished": metrics_path.is_file(),
        "dataset": store.name,
        "items": store.n_items,
        "users": store.n_users,
        "user_features": feature_names,
        "signal_max": spec.signal_size - 1,
        "sid": uses_sid,
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": {split: metrics[split] for split in ("valid", "test") if split in metrics},
    }
    with staged_folder(out) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump({**cfg.model_dump(), "sid": "sid"}, sort_keys=False))
        (tmp / "spec.json").write_text(json.dumps(spec.to_dict()))
        if uses_sid:
            shutil.copytree(store.root / cfg.sid, tmp / "sid")
        store.items.select("item", "key").write_parquet(tmp / "items.parquet")
        store.users.select("user", "key", *feature_names).write_parquet(tmp / "users.parquet")
        (tmp / "vocab.json").write_text(json.dumps(store.vocab))
        manifest["files"] = file_hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
