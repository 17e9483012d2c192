"""LifelongStore: every user's sequence stored once, in CSR arrays, plus the sample table.

On disk (one folder)::

    manifest.json        counts, protocol, statistics, versions
    vocab.json           categorical vocabularies (user features, categories, tags)
    seq_offsets.npy      (U+1,) int64   user u's rows are [offsets[u], offsets[u+1])
    seq_items.npy        (I,)   int32   item id (1..N; 0 is padding)
    seq_ts.npy           (I,)   int64   timestamp
    seq_signal.npy       (I,)   int8    behaviour signal (>= 1; 0 is padding)
    seq_rank.npy         (I,)   int64   position of the row in the global order
    samples.parquet      user, pos, target, label, split, rank (one row per sample)
    items.parquet        item, key, text, category, tags
    users.parquet        user, key, one int column per user feature

A sample is ``(user, pos)``: its history is the user's rows ``[offsets[u], offsets[u] + pos)``;
batches slice the last ``T_max`` of them (see ``r2led.data.batches``). Sequences are memory-
mapped, so memory grows with interactions, never with interactions x history length.
The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from r2led import __version__
from r2led.atomic import publish_folder
from r2led.data.protocol import SPLITS, Protocol, global_order, split_ids
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError

MANIFEST = "manifest.json"
STORE_FILES = ("samples.parquet", "items.parquet", "users.parquet", "vocab.json")  # besides seq_*.npy
FORMAT_VERSION = 1


def _encode(values: pl.Series) -> tuple[np.ndarray, list[str]]:
    """Categorical strings -> ints 1..V in sorted order (0 = unknown / empty)."""
    vocab = sorted(v for v in values.unique().to_list() if v not in (None, ""))
    codes = values.replace_strict(vocab, range(1, len(vocab) + 1), default=0, return_dtype=pl.Int64)
    return codes.to_numpy(), vocab


def _key_rank(keys: pl.Series) -> np.ndarray:
    """Sort rank of source keys: numeric order when every key is an integer, else string order."""
    numeric = keys.cast(pl.Int64, strict=False)
    values = numeric if numeric.null_count() == 0 else keys
    return values.rank(method="dense").to_numpy().astype(np.int64)


def _dense_ids(keys: pl.Series, table_keys: pl.Series) -> np.ndarray:
    """(n,) int32 row of each key in its (unique-keyed) table; an Enum cast, fast for 10^7+ rows."""
    try:
        return keys.cast(pl.Enum(table_keys)).to_physical().to_numpy().astype(np.int32)
    except Exception:  # e.g. categories polars cannot hold in an Enum: the slower exact path
        index = dict(zip(table_keys.to_list(), range(len(table_keys))))
        return keys.replace_strict(index, return_dtype=pl.Int32).to_numpy()


def _used_key_rank(table_keys: pl.Series, ids: np.ndarray) -> np.ndarray:
    """``_key_rank`` of the interactions' keys, computed once per distinct key.

    Ranks are taken over the table keys that interactions use (so whether keys count as
    numeric, and the dense ranks themselves, match ranking every interaction row), then
    gathered per row: the same values as ``_key_rank(interactions[key])``.
    """
    used = np.bincount(ids, minlength=len(table_keys)) > 0
    per_key = np.zeros(len(table_keys), dtype=np.int64)
    per_key[used] = _key_rank(table_keys.filter(pl.Series(used)))
    return per_key[ids]


def _stable_group(order: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``order`` stably regrouped by ``group[order]`` (ints in [0, 2**32)): LSD radix sort.

    Equals ``np.lexsort((rank, group))`` when ``order`` sorts by ``rank``, at a fraction of the
    time (numpy's stable sort of 16-bit keys is a radix sort).
    """
    keys = group[order]
    perm = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if int(keys.max(initial=0)) >= 1 << 16:
        perm = perm[np.argsort((keys[perm] >> 16).astype(np.uint16), kind="stable")]
    return order[perm]


def _history_stats(pos: np.ndarray) -> dict:
    if len(pos) == 0:
        return {"mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    return {
        "mean": round(float(pos.mean()), 2),
        "p50": int(np.percentile(pos, 50)),
        "p90": int(np.percentile(pos, 90)),
        "max": int(pos.max()),
    }


def build_store(tables: CanonicalTables, out: str | Path, protocol: Protocol | None = None, force: bool = False) -> "LifelongStore":
    """Encode canonical tables, apply the protocol and write a store folder atomically."""
    protocol = protocol or Protocol()
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise DataError(f"{out} already holds a prepared store; pass force=True (--force) to replace it")
    if out.exists() and not (out / MANIFEST).exists() and (not out.is_dir() or any(out.iterdir())):
        # Replacing `out` deletes it: never do that to a file or folder that is not a store.
        raise DataError(f"{out} exists and is not a prepared store (no {MANIFEST}); choose another --out folder")
    t0 = time.perf_counter()
    tables.validate()

    # Dense ids: users 0..U-1 and items 1..N in the order of their tables; 0 is item padding.
    users_tbl, items_tbl = tables.users, tables.items
    inter = tables.interactions
    n_users, n_items = users_tbl.height, items_tbl.height
    u = _dense_ids(inter["user"], users_tbl["user"])
    it = _dense_ids(inter["item"], items_tbl["item"])
    ts = inter["ts"].to_numpy().astype(np.int64, copy=False)
    signal = inter["signal"].to_numpy()
    if signal.max() > 127:
        raise DataError(f"signal values must fit in int8 (<= 127); found {signal.max()}")

    # Global order (ts, user, item) on the source's own keys, stable; then each user's rows
    # in that order (CSR).
    order = global_order(ts, _used_key_rank(users_tbl["user"], u), _used_key_rank(items_tbl["item"], it))
    it += 1
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    csr = _stable_group(order, u)  # by user, then global rank
    del order
    counts = np.bincount(u, minlength=n_users)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    seq_user = u[csr]
    del u
    pos_in_user = np.arange(len(csr), dtype=np.int64) - offsets[seq_user]
    seq_items = it[csr]
    seq_ts = ts[csr]
    seq_signal = signal[csr].astype(np.int8)
    seq_rank = rank[csr]
    del it, ts, signal, rank

    # Samples: rows with enough history, in global order, split by position.
    keep = pos_in_user >= protocol.min_history
    if protocol.samples_last_n is not None:
        keep &= pos_in_user >= counts[seq_user] - protocol.samples_last_n
    s_idx = np.nonzero(keep)[0]
    del keep
    s_idx = s_idx[np.argsort(seq_rank[s_idx], kind="stable")]
    if len(s_idx) == 0:
        raise DataError(f"{tables.name}: no user has more than min_history={protocol.min_history} interactions")
    split = split_ids(len(s_idx), protocol)
    samples = pl.DataFrame(
        {
            "user": seq_user[s_idx].astype(np.int32),
            "pos": pos_in_user[s_idx].astype(np.int32),
            "target": seq_items[s_idx],
            "label": (seq_signal[s_idx] > protocol.label_threshold).astype(np.int8),
            "split": split,
            "rank": seq_rank[s_idx],
        }
    )
    del seq_user, pos_in_user

    # Item and user tables with encoded categoricals.
    cat_codes, categories = _encode(items_tbl["category"].fill_null(""))
    tag_vocab = sorted({t for ts_ in items_tbl["tags"].to_list() for t in (ts_ or []) if t})
    tag_index = {t: i + 1 for i, t in enumerate(tag_vocab)}
    items_out = pl.DataFrame(
        {
            "item": np.arange(1, n_items + 1, dtype=np.int32),
            "key": items_tbl["item"],
            "text": items_tbl["text"].fill_null(""),
            "category": cat_codes.astype(np.int32),
            "tags": [[tag_index[t] for t in (ts_ or []) if t] for ts_ in items_tbl["tags"].to_list()],
        },
        schema_overrides={"tags": pl.List(pl.Int32)},
    )
    user_cols = {"user": np.arange(n_users, dtype=np.int32), "key": users_tbl["user"]}
    user_vocab = {}
    for name in tables.user_feature_names:
        codes, vocab = _encode(users_tbl[name].cast(pl.String).fill_null(""))
        user_cols[name] = codes.astype(np.int32)
        user_vocab[name] = vocab
    users_out = pl.DataFrame(user_cols)

    stats = {s: {} for s in SPLITS}
    for code, name in enumerate(SPLITS):
        m = split == code
        stats[name] = {
            "samples": int(m.sum()),
            "positive_rate": round(float(samples["label"].to_numpy()[m].mean()), 4) if m.any() else 0.0,
            "users": int(np.unique(samples["user"].to_numpy()[m]).size),
            "history": _history_stats(samples["pos"].to_numpy()[m]),
        }
    manifest = {
        "format": FORMAT_VERSION,
        "name": tables.name,
        "users": n_users,
        "items": n_items,
        "interactions": int(len(csr)),
        "samples": {s: stats[s]["samples"] for s in SPLITS},
        "positive_rate": {s: stats[s]["positive_rate"] for s in SPLITS},
        "split_users": {s: stats[s]["users"] for s in SPLITS},
        "history": {s: stats[s]["history"] for s in SPLITS},
        "protocol": protocol.model_dump(),
        "user_features": {k: len(v) + 1 for k, v in user_vocab.items()},
        "categories": len(categories) + 1,
        "tags": len(tag_vocab) + 1,
        "max_tags": int(max((len(t) for t in items_out["tags"].to_list()), default=0)),
        "signal_max": int(seq_signal.max()),
        "source": tables.source_info,
        "versions": {"r2led": __version__, "polars": pl.__version__, "numpy": np.__version__},
        "prepare_seconds": None,
    }
    vocab = {"user_features": user_vocab, "categories": categories, "tags": tag_vocab}

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "seq_offsets.npy", offsets)
        np.save(tmp / "seq_items.npy", seq_items)
        np.save(tmp / "seq_ts.npy", seq_ts)
        np.save(tmp / "seq_signal.npy", seq_signal)
        np.save(tmp / "seq_rank.npy", seq_rank)
        samples.write_parquet(tmp / "samples.parquet")
        items_out.write_parquet(tmp / "items.parquet")
        users_out.write_parquet(tmp / "users.parquet")
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        manifest["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        # The manifest is written last: a folder without one is never taken for a store.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LifelongStore(out)


@dataclass(frozen=True)
class HistoryWindow:
    """Histories of a batch of samples, left-padded: the most recent behaviour is last.

    items, signal: (B, L) with 0 at padding; mask: (B, L) bool; length: (B,).
    L is the batch's own longest (capped) history, not T_max.
    """

    items: np.ndarray
    signal: np.ndarray
    mask: np.ndarray
    length: np.ndarray


class LifelongStore:
    """Read access to a prepared store folder (memory-mapped sequences)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise DataError(
                f"{self.root} is not a prepared store (no {MANIFEST}); run `r2led data prepare NAME --out {self.root}`"
            )
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is corrupt: {exc}") from exc
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DataError(f"{path}: store format {self.manifest.get('format')} != supported {FORMAT_VERSION}")
        if not isinstance(self.manifest, dict):
            raise DataError(f"{path} is corrupt: expected a JSON object")
        for name in STORE_FILES:
            if not (self.root / name).is_file():
                raise DataError(f"{self.root} is incomplete: {name} is missing")
        self.offsets = self._load("seq_offsets")
        self.seq_items = self._load("seq_items")
        self.seq_ts = self._load("seq_ts")
        self.seq_signal = self._load("seq_signal")

    def _load(self, name: str) -> np.ndarray:
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{self.root} is incomplete: {path.name} is missing")
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DataError(f"{path} is corrupt: {exc}") from exc

    # ---- tables -------------------------------------------------------------------------
    @cached_property
    def samples(self) -> pl.DataFrame:
        return pl.read_parquet(self.root / "samples.parquet")

    @cached_property
    def items(self) -> pl.DataFrame:
        return pl.read_parquet(self.root / "items.parquet")

    @cached_property
    def users(self) -> pl.DataFrame:
        return pl.read_parquet(self.root / "users.parquet")

    @cached_property
    def vocab(self) -> dict:
        return json.loads((self.root / "vocab.json").read_text())

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def n_items(self) -> int:
        return int(self.manifest["items"])

    @property
    def n_users(self) -> int:
        return int(self.manifest["users"])

    @cached_property
    def sample_arrays(self) -> dict[str, np.ndarray]:
        """Sample columns as numpy arrays (user, pos, target, label, split, rank)."""
        return {c: self.samples[c].to_numpy() for c in self.samples.columns}

    def split_indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.nonzero(self.sample_arrays["split"] == SPLITS.index(split))[0]

    @cached_property
    def user_features(self) -> np.ndarray:
        """(U, F) int64 codes, one column per user feature (0 = unknown)."""
        names = list(self.manifest["user_features"])
        if not names:
            return np.zeros((self.n_users, 0), dtype=np.int64)
        return self.users.select(names).to_numpy().astype(np.int64)

    @cached_property
    def item_category(self) -> np.ndarray:
        """(N+1,) int64 category code per item id (row 0 = padding)."""
        out = np.zeros(self.n_items + 1, dtype=np.int64)
        out[1:] = self.items["category"].to_numpy()
        return out

    @cached_property
    def item_tags(self) -> np.ndarray:
        """(N+1, G) int64 tag codes per item, right-padded with 0."""
        g = max(1, int(self.manifest["max_tags"]))
        out = np.zeros((self.n_items + 1, g), dtype=np.int64)
        for i, tags in enumerate(self.items["tags"].to_list(), start=1):
            out[i, : len(tags)] = tags
        return out

    # ---- histories ----------------------------------------------------------------------
    def user_sequence(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.offsets[user]), int(self.offsets[user + 1])
        return self.seq_items[a:b], self.seq_signal[a:b], self.seq_ts[a:b]

    def history(self, user: np.ndarray, pos: np.ndarray, t_max: int) -> HistoryWindow:
        """Slice ``[pos - t_max, pos)`` of each user's sequence, vectorised, left-padded."""
        user = np.asarray(user, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int64)
        length = np.minimum(pos, t_max)
        width = max(int(length.max(initial=0)), 1)
        end = self.offsets[user] + pos  # (B,) one past the last history row
        col = np.arange(width, dtype=np.int64)
        mask = col[None, :] >= (width - length)[:, None]  # (B, L)
        idx = np.where(mask, end[:, None] - width + col[None, :], 0)  # (B, L)
        items = np.where(mask, self.seq_items[idx], 0).astype(np.int64)
        signal = np.where(mask, self.seq_signal[idx], 0).astype(np.int64)
        return HistoryWindow(items, signal, mask, length)

    def history_lengths(self, sample_idx: np.ndarray, t_max: int) -> np.ndarray:
        return np.minimum(self.sample_arrays["pos"][sample_idx], t_max)
