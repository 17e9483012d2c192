"""Reading an export bundle back as a ``ScoringModel``, every file checked against its hash.

``load_bundle(DIR)`` needs nothing from the store the model was trained on: it verifies the
sha256 of every file the manifest lists, rebuilds the model from config.yaml + spec.json + sid/
and loads model.pt (tensors only). A missing, altered or corrupt file raises ``BundleError``
naming it. ``check_data_fingerprint`` refuses a data folder that is not the one the bundle's
run was trained on (used before preloading histories from it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from r2led.config import RunConfig, validate_config
from r2led.errors import ConfigError, DataError
from r2led.serve.bundle import BUNDLE_FORMAT, MANIFEST, sha256_file
from r2led.serve.errors import BundleError
from r2led.serve.scoring import ScoringModel

REQUIRED = ("config.yaml", "spec.json", "model.pt", "items.parquet", "users.parquet", "vocab.json")


def read_manifest(path: str | Path) -> dict:
    """A bundle's manifest, checked to be of this format."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path} is not an exported model folder (run `r2led export RUN --out {path}`)")
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is incomplete: {MANIFEST} is missing")
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format") != BUNDLE_FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleError(
            f"{path} is a format {manifest.get('format')} export without file hashes; "
            "export the run again with this r2led"
        )
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists is present with its recorded sha256."""
    for name in REQUIRED:
        if name not in manifest["files"]:
            raise BundleError(f"{path / MANIFEST} does not list {name}; export the run again")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path} is incomplete: {name} is missing")
        if sha256_file(file) != expected:
            raise BundleError(
                f"{file} does not match its sha256 in {MANIFEST} (changed or damaged after export); "
                "export the run again"
            )


def load_bundle(path: str | Path) -> ScoringModel:
    """Rebuild an exported model (no store needed), after checking every file's hash."""
    from r2led.models.registry import build_model, model_class
    from r2led.sid.table import SidTable

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    cfg = _read_config(path / "config.yaml")
    spec = _read_spec(path / "spec.json")
    sid = None
    if model_class(cfg.model.name).wants_sid(cfg.model):
        try:
            sid = SidTable.load(path / "sid")
        except (DataError, OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{path / 'sid'}: {exc}") from exc
    try:
        model = build_model(cfg.model, spec, sid)
    except ValueError as exc:  # e.g. the SID table does not cover the items in spec.json
        raise BundleError(f"{path}: config.yaml, spec.json and sid/ do not agree: {exc}") from exc
    try:
        model.load_state_dict(_read_state_dict(path / "model.pt"))
    except RuntimeError as exc:
        raise BundleError(f"{path / 'model.pt'} does not fit the model that config.yaml describes: {exc}") from exc

    feature_names = list(manifest.get("user_features", []))
    items = _read_parquet(path / "items.parquet", ["item", "key"]).sort("item")
    users = _read_parquet(path / "users.parquet", ["user", "key", *feature_names]).sort("user")
    if not np.array_equal(items["item"].to_numpy(), np.arange(1, spec.n_items + 1)):
        raise BundleError(
            f"{path / 'items.parquet'}: expected item ids 1..{spec.n_items} (spec.json), got {items.height} rows"
        )
    vocab = _read_json(path / "vocab.json")
    try:
        feature_vocab = {name: list(vocab["user_features"][name]) for name in feature_names}
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{path / 'vocab.json'}: no vocabulary for user feature {exc}") from exc
    user_features = (
        users.select(feature_names).to_numpy().astype(np.int64)
        if feature_names
        else np.zeros((users.height, 0), np.int64)
    )
    scoring = ScoringModel(
        model,
        item_keys=items["key"].cast(str).to_list(),
        user_keys=users["key"].cast(str).to_list(),
        user_features=user_features,
        feature_vocab=feature_vocab,
        t_max=int(manifest.get("t_max", cfg.train.t_max)),
        info=manifest,
    )
    scoring.warm_up()
    return scoring


def check_data_fingerprint(manifest: dict, data: str | Path) -> None:
    """Refuse, in one line, a data folder other than the one the bundle's run was trained on."""
    from r2led.train.run_folder import fingerprint_data

    recorded = (manifest.get("fingerprints") or {}).get("data")
    now = fingerprint_data(data)
    if recorded != now:
        raise DataError(
            f"the data {data} is not what this model was trained on "
            f"(manifest sha {str(recorded)[:12]}… → {now[:12]}…); "
            "preload from the data folder the run used, or export a run trained on this one"
        )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} is corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> RunConfig:
    try:
        tree = yaml.safe_load(path.read_text())
        if not isinstance(tree, dict):
            raise ConfigError(f"expected a mapping with model/train sections, got {type(tree).__name__}")
        return validate_config(tree)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as exc:
        raise BundleError(f"{path} is corrupt: {exc}") from exc


def _read_spec(path: Path):
    from r2led.models.spec import DataSpec

    try:
        return DataSpec.from_dict(_read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path} is corrupt: {exc!r}") from exc


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise BundleError(f"{path} is corrupt or not a state dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{path} is not a state dict (name -> tensor)")
    return dict(state)


def _read_parquet(path: Path, columns: list[str]) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises its own error types for damaged files
        raise BundleError(f"{path} is corrupt: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise BundleError(f"{path} is missing column(s) {missing}")
    return frame
