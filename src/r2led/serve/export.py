"""Exported models: a self-contained folder written from a run, read back as a ScoringModel.

An export folder (``r2led export RUN --out DIR``)::

    manifest.json    model name, r2led version, t_max, created, source run, the run's metrics
    config.yaml      the run's configuration (model + train; ``sid: sid`` points inside DIR)
    spec.json        DataSpec.to_dict(): item count, per-item category/tags, feature sizes
    model.pt         the best checkpoint's state dict (tensors only)
    sid/             the SID table (only when the model uses one)
    items.parquet    item (id 1..N), key (the source's item key)
    users.parquet    user (row), key, one int column per user feature (0 = unknown)
    vocab.json       vocabularies: user feature value strings in code order (code = index + 1)

It needs nothing from the store it was trained on: ``load_exported(DIR)`` rebuilds the model
from config.yaml + spec.json + sid/ and loads model.pt. The folder is written under a
temporary name and renamed when complete; ``manifest.json`` is written last.

A ``ScoringModel`` holds the model (eval mode), the item key -> id map, the users' features
and one history per user (item ids and signals, the most recent ``t_max``, most recent last),
and scores a user's candidates in one batch: the user's history broadcast to every candidate.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from r2led import __version__
from r2led.atomic import publish_folder
from r2led.config import RunConfig, validate_config
from r2led.data.batches import Batch
from r2led.data.store import LifelongStore
from r2led.errors import CheckpointError, ConfigError, DataError, R2ledError
from r2led.models.registry import build_model, model_class
from r2led.models.spec import DataSpec
from r2led.sid.table import SidTable

MANIFEST = "manifest.json"
EXPORT_FILES = (MANIFEST, "config.yaml", "spec.json", "model.pt", "items.parquet", "users.parquet", "vocab.json")
EXPORT_FORMAT = 1
DEFAULT_MAX_CANDIDATES = 1000


# ---- errors -------------------------------------------------------------------------------
class ScoringInputError(R2ledError, ValueError):
    """A scoring request is not usable (bad signal, empty or oversize candidate list, ...)."""


class UnknownItemError(ScoringInputError):
    """An item key that the exported model does not know."""

    def __init__(self, key: object, count: int = 1):
        self.key = key
        more = f" (and {count - 1} more unknown item keys)" if count > 1 else ""
        super().__init__(f"unknown item key {str(key)!r}{more}")


class UnknownUserError(ScoringInputError):
    """A user with no history here and no row in the exported user table."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(
            f"unknown user {key!r}: not in the exported user table and no history set; "
            f"PUT /users/{key}/history (or POST an event) first"
        )


# ---- export -------------------------------------------------------------------------------
def export_run(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write a run's best model and everything needed to score with it to ``out_dir``.

    ``force`` replaces an existing export; a folder that is not an export is never replaced.
    """
    from r2led.train.trainer import load_run  # the trainer is only needed to export

    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists():
        if (out / MANIFEST).is_file():
            if not force:
                raise CheckpointError(f"{out} already holds an exported model; pass force=True (--force) to replace it")
        elif not out.is_dir() or any(out.iterdir()):
            raise CheckpointError(f"{out} exists and is not an exported model (no {MANIFEST}); choose another --out folder")
    model, store, cfg = load_run(run_dir)
    metrics_path = run_dir / "metrics.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    uses_sid = model_class(cfg.model.name).wants_sid(cfg.model)
    spec = DataSpec.from_store(store)
    feature_names = list(store.manifest["user_features"])
    manifest = {
        "format": EXPORT_FORMAT,
        "model": cfg.model.name,
        "r2led": __version__,
        "torch": torch.__version__,
        "t_max": cfg.train.t_max,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run_dir.resolve()),
        "source_data": str(store.root.resolve()),
        "dataset": store.name,
        "items": store.n_items,
        "users": store.n_users,
        "user_features": feature_names,
        "signal_max": spec.signal_size - 1,
        "sid": uses_sid,
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": {split: metrics[split] for split in ("valid", "test") if split in metrics},
    }

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save(model.state_dict(), tmp / "model.pt")
        tree = {**cfg.model_dump(), "sid": "sid"}
        (tmp / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        (tmp / "spec.json").write_text(json.dumps(spec.to_dict()))
        if uses_sid:
            shutil.copytree(store.root / cfg.sid, tmp / "sid")
        store.items.select("item", "key").write_parquet(tmp / "items.parquet")
        store.users.select("user", "key", *feature_names).write_parquet(tmp / "users.parquet")
        (tmp / "vocab.json").write_text(json.dumps(store.vocab))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the folder complete
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_exported(path: str | Path, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> "ScoringModel":
    """Rebuild an exported model (no store needed); a missing or corrupt file raises
    ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not an exported model folder (run `r2led export RUN --out {path}`)")
    for name in EXPORT_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
    manifest = _read_json(path / MANIFEST)
    cfg = _read_config(path / "config.yaml")
    spec = _read_spec(path / "spec.json")
    sid = None
    if model_class(cfg.model.name).wants_sid(cfg.model):
        try:
            sid = SidTable.load(path / "sid")
        except (DataError, OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path / 'sid'}: {exc}") from exc
    try:
        model = build_model(cfg.model, spec, sid)
    except ValueError as exc:  # e.g. the SID table does not cover the items in spec.json
        raise CheckpointError(f"{path}: config.yaml, spec.json and sid/ do not agree: {exc}") from exc
    state = _read_state_dict(path / "model.pt")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path / 'model.pt'} does not fit the model that config.yaml describes: {exc}") from exc

    feature_names = list(manifest.get("user_features", []))
    items = _read_parquet(path / "items.parquet", ["item", "key"]).sort("item")
    users = _read_parquet(path / "users.parquet", ["user", "key", *feature_names]).sort("user")
    if not np.array_equal(items["item"].to_numpy(), np.arange(1, spec.n_items + 1)):
        raise CheckpointError(f"{path / 'items.parquet'}: expected item ids 1..{spec.n_items} (spec.json), got {items.height} rows")
    vocab = _read_json(path / "vocab.json")
    try:
        feature_vocab = {name: list(vocab["user_features"][name]) for name in feature_names}
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'vocab.json'}: no vocabulary for user feature {exc}") from exc
    user_features = users.select(feature_names).to_numpy().astype(np.int64) if feature_names else np.zeros((users.height, 0), np.int64)
    scoring = ScoringModel(
        model,
        item_keys=items["key"].to_list(),
        user_keys=users["key"].to_list(),
        user_features=user_features,
        feature_vocab=feature_vocab,
        t_max=int(manifest.get("t_max", cfg.train.t_max)),
        max_candidates=max_candidates,
        info=manifest,
    )
    scoring.warm_up()
    return scoring


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> RunConfig:
    try:
        tree = yaml.safe_load(path.read_text())
        if not isinstance(tree, dict):
            raise ConfigError(f"expected a mapping with model/train sections, got {type(tree).__name__}")
        return validate_config(tree)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc


def _read_spec(path: Path) -> DataSpec:
    try:
        return DataSpec.from_dict(_read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc!r}") from exc


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is corrupt or not a state dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (name -> tensor)")
    return dict(state)


def _read_parquet(path: Path, columns: list[str]) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises its own error types for damaged files
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CheckpointError(f"{path} is missing column(s) {missing}")
    return frame


# ---- scoring ------------------------------------------------------------------------------
_EMPTY = np.zeros(0, dtype=np.int64)


class ScoringModel:
    """A model ready to score: item keys, user features and per-user histories in memory.

    Users: a user is *known* when it has a row in the exported user table or a history set
    here. Scoring an unknown user raises ``UnknownUserError`` (HTTP 404) rather than silently
    scoring a typo; a new user is registered by ``set_history`` (an empty list is fine) or
    ``append``, and gets the "unknown" code 0 for every feature it does not give. A known user
    with no history is scored with an empty history.

    Histories keep the most recent ``t_max`` behaviours (the model was trained on that window),
    most recent last. All methods are safe to call from several threads.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        item_keys: Sequence,
        user_keys: Sequence,
        user_features: np.ndarray,
        feature_vocab: dict[str, list[str]],
        t_max: int,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        info: dict | None = None,
    ):
        if max_candidates < 1:
            raise ScoringInputError(f"max_candidates must be >= 1, got {max_candidates}")
        self.model = model.eval()
        self.name = model.cfg.name
        self.t_max, self.max_candidates = int(t_max), int(max_candidates)
        self.info = dict(info or {})
        self.signal_max = int(model.spec.signal_size) - 1  # signals are 1..signal_max; 0 is padding
        self.item_keys = [str(k) for k in item_keys]  # id i has key item_keys[i - 1]
        self._item_id = {k: i for i, k in enumerate(self.item_keys, start=1)}
        self._user_row = {str(k): r for r, k in enumerate(user_keys)}
        self._table_features = np.asarray(user_features, dtype=np.int64).reshape(len(self._user_row), -1)  # (U, F)
        self.feature_names = list(feature_vocab)
        self._feature_codes = {n: {str(v): c for c, v in enumerate(vals, start=1)} for n, vals in feature_vocab.items()}
        self._histories: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # user -> (item ids, signals)
        self._features: dict[str, np.ndarray] = {}  # features set here, over the table's
        self._lock = threading.Lock()

    # ---- what is known --------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_keys)

    @property
    def users_with_history(self) -> int:
        return len(self._histories)

    def is_known(self, user_key: str) -> bool:
        return user_key in self._user_row or user_key in self._histories

    def history(self, user_key: str) -> tuple[list[str], list[int]]:
        """The user's stored history as (item keys, signals), most recent last."""
        items, signals = self._histories.get(user_key, (_EMPTY, _EMPTY))
        return [self.item_keys[i - 1] for i in items.tolist()], signals.tolist()

    def history_length(self, user_key: str) -> int:
        return len(self._histories.get(user_key, (_EMPTY, _EMPTY))[0])

    def item_ids(self, keys: Sequence) -> np.ndarray:
        """(n,) int64 item ids of ``keys``; ``UnknownItemError`` names the first unknown key."""
        ids = np.fromiter((self._item_id.get(str(k), 0) for k in keys), dtype=np.int64, count=len(keys))
        bad = np.flatnonzero(ids == 0)
        if len(bad):
            raise UnknownItemError(keys[bad[0]], len(bad))
        return ids

    def _signals(self, signals: Sequence[int] | np.ndarray) -> np.ndarray:
        sig = np.asarray(signals)
        if sig.size == 0:
            return _EMPTY
        if sig.dtype.kind not in "iu":
            raise ScoringInputError(f"signals must be integers 1..{self.signal_max}, got {sig.reshape(-1)[0]!r} ({sig.dtype})")
        sig = sig.reshape(-1)
        bad = np.flatnonzero((sig < 1) | (sig > self.signal_max))
        if len(bad):
            where = f" (position {bad[0]})" if len(sig) > 1 else ""
            raise ScoringInputError(f"signal {int(sig[bad[0]])}{where} is out of range: expected 1..{self.signal_max}")
        return sig.astype(np.int64)

    def _user_features(self, user_key: str) -> np.ndarray:
        if user_key in self._features:
            return self._features[user_key]
        row = self._user_row.get(user_key)
        return self._table_features[row] if row is not None else np.zeros(len(self.feature_names), dtype=np.int64)

    def _encode_features(self, user_key: str, features: Mapping[str, object]) -> tuple[np.ndarray, dict]:
        """The user's feature codes with ``features`` (name -> value) applied; values outside
        the vocabulary get code 0 ("unknown") and are returned so a response can say so."""
        codes = self._user_features(user_key).copy()
        unknown = {}
        for name, value in features.items():
            if name not in self._feature_codes:
                raise ScoringInputError(f"unknown user feature {name!r}; known: {', '.join(self.feature_names) or 'none'}")
            code = self._feature_codes[name].get(str(value), 0)
            if code == 0:
                unknown[name] = value
            codes[self.feature_names.index(name)] = code
        return codes, unknown

    # ---- histories ------------------------------------------------------------------------
    def set_history(
        self, user_key: str, items: Sequence, signals: Sequence[int], features: Mapping[str, object] | None = None
    ) -> dict:
        """Replace the user's history (oldest first) and optionally set some of its features.

        A history longer than ``t_max`` keeps its most recent ``t_max``; the returned dict says
        how many were dropped (``dropped``, ``note``) and which feature values were unknown.
        """
        if len(items) != len(signals):
            raise ScoringInputError(f"items and signals differ in length: {len(items)} items, {len(signals)} signals")
        ids, sig = self.item_ids(items), self._signals(signals)
        dropped = max(len(ids) - self.t_max, 0)
        ids, sig = ids[dropped:].copy(), sig[dropped:].copy()
        codes, unknown = self._encode_features(user_key, features) if features else (None, {})
        with self._lock:
            self._histories[user_key] = (ids, sig)
            if codes is not None:
                self._features[user_key] = codes
        out = {"user": user_key, "length": len(ids), "dropped": dropped}
        if dropped:
            out["note"] = f"history of {len(ids) + dropped} is longer than t_max={self.t_max}: kept the most recent {self.t_max}"
        if unknown:
            out["unknown_features"] = unknown  # scored as code 0 ("unknown")
        return out

    def append(self, user_key: str, item_key, signal: int) -> dict:
        """Add one behaviour as the user's most recent (dropping the oldest beyond ``t_max``)."""
        item = self.item_ids([item_key])
        sig = self._signals([signal])
        with self._lock:
            items, signals = self._histories.get(user_key, (_EMPTY, _EMPTY))
            # new arrays, never in place: a concurrent score() keeps a consistent snapshot
            self._histories[user_key] = (np.concatenate([items, item])[-self.t_max :], np.concatenate([signals, sig])[-self.t_max :])
            length = len(self._histories[user_key][0])
        return {"user": user_key, "length": length}

    def load_histories(self, store: LifelongStore) -> int:
        """Preload every user's sequence from a store (its most recent ``t_max``); returns the
        number of users loaded. Items are matched by key, so the store may number them
        differently from the export."""
        remap = np.zeros(store.n_items + 1, dtype=np.int64)  # store item id -> export item id
        keys = store.items.sort("item")["key"].to_list()
        remap[1:] = [self._item_id.get(str(k), 0) for k in keys]
        missing = np.flatnonzero(remap[1:] == 0)
        if len(missing):
            raise DataError(f"{store.root}: item key {str(keys[missing[0]])!r} is not in the exported model ({len(missing)} unknown items)")
        if int(store.manifest["signal_max"]) > self.signal_max:
            raise DataError(f"{store.root}: signals up to {store.manifest['signal_max']} but the model takes 1..{self.signal_max}")
        offsets = np.asarray(store.offsets)
        loaded = {}
        for u, key in enumerate(store.users.sort("user")["key"].to_list()):
            end = int(offsets[u + 1])
            start = max(int(offsets[u]), end - self.t_max)
            if end > start:
                loaded[str(key)] = (remap[store.seq_items[start:end]], store.seq_signal[start:end].astype(np.int64))
        with self._lock:
            self._histories.update(loaded)
        return len(loaded)

    # ---- scoring --------------------------------------------------------------------------
    def warm_up(self) -> float:
        """One throw-away request (a one-behaviour history, two candidates, no user) so that the
        first real request does not pay for compiling R2LED's retrieval kernels (seconds on a
        machine without numba's on-disk cache) or filling the per-item caches. Returns its
        seconds, also kept in ``info["warm_up_s"]``."""
        start = time.perf_counter()
        one = np.ones(1, np.int64)
        batch = _request(-1, np.zeros(self._table_features.shape[1], np.int64), torch.ones(2, dtype=torch.long), one, one, one.astype(bool))
        with torch.no_grad():
            self.model(batch)
        self.info["warm_up_s"] = round(time.perf_counter() - start, 3)
        return self.info["warm_up_s"]

    @torch.no_grad()
    def score(self, user_key: str, candidate_keys: Sequence) -> np.ndarray:
        """Click probabilities (C,) float64 of the candidates, in order, for the user's history.

        One forward pass: the history (1, T) is ``expand``-ed to (C, T), no copy, so a model
        can see that every row is the same request (R2LED then retrieves once per request).
        """
        n = len(candidate_keys)
        if n == 0:
            raise ScoringInputError("candidates is empty: give at least one item key")
        if n > self.max_candidates:
            raise ScoringInputError(f"{n} candidates exceed the limit of {self.max_candidates} per request; split the request")
        target = torch.from_numpy(self.item_ids(candidate_keys))  # (C,)
        with self._lock:
            history = self._histories.get(user_key)
            if history is None and user_key not in self._user_row:
                raise UnknownUserError(user_key)
            items, signals = history or (_EMPTY, _EMPTY)
            feats = self._user_features(user_key)
        if len(items) == 0:  # one padding column, as a batch pads an empty history
            items, signals, mask = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, bool)
        else:
            mask = np.ones(len(items), dtype=bool)
        batch = _request(self._user_row.get(user_key, -1), feats, target, items, signals, mask)  # -1: outside the table
        return torch.sigmoid(self.model(batch)).double().numpy()


def _request(user_row: int, feats: np.ndarray, target: torch.Tensor, items: np.ndarray, signals: np.ndarray, mask: np.ndarray) -> Batch:
    """One scoring request: ``len(target)`` candidate rows over ONE history (T,), which is
    ``expand``-ed to (C, T) with no copy, so a model can see that every row is the same request
    (R2LED then retrieves once per request)."""
    n = len(target)
    return Batch(
        user=torch.full((n,), user_row, dtype=torch.long),
        user_feats=torch.from_numpy(feats).unsqueeze(0).expand(n, -1),  # (C, F)
        target=target,
        hist_items=torch.from_numpy(items).unsqueeze(0).expand(n, -1),  # (C, T), stride 0 over C
        hist_signal=torch.from_numpy(signals).unsqueeze(0).expand(n, -1),
        hist_mask=torch.from_numpy(mask).unsqueeze(0).expand(n, -1),
        label=torch.zeros(n),
    )
