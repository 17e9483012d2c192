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

``build_store`` writes a store; the streaming writer itself is ``r2led.data.store_writer``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from r2led.data.protocol import SPLITS, Protocol
from r2led.data.store_writer import FORMAT_VERSION, MANIFEST, write_store
from r2led.errors import DataError

if TYPE_CHECKING:
    from r2led.data.tables import CanonicalTables

_GATHER_TOKENS = 1 << 20  # history tokens gathered per block in LifelongStore.history
STORE_FILES = ("samples.parquet", "items.parquet", "users.parquet", "vocab.json")  # besides seq_*.npy
# Manifest keys every reader relies on (a manifest without them is refused on load).
MANIFEST_KEYS = (
    "name",
    "users",
    "items",
    "interactions",
    "samples",
    "split_users",
    "positive_rate",
    "history",
    "user_features",
    "categories",
    "tags",
    "max_tags",
    "signal_max",
)


def build_store(
    tables: CanonicalTables,
    out: str | Path,
    protocol: Protocol | None = None,
    force: bool = False,
    chunk_rows: int = 1 << 22,
) -> LifelongStore:
    """Encode canonical tables, apply the protocol and write a store folder atomically.

    Streaming and out of core (``r2led.data.store_writer.write_store``): the interactions may
    be a ``pl.DataFrame`` or a ``pl.LazyFrame``; about ``chunk_rows`` rows are held in memory
    at a time and the result does not depend on it.
    """
    return LifelongStore(write_store(tables, out, protocol, force=force, chunk_rows=chunk_rows))


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
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"{path} is corrupt: {exc}") from exc
        if not isinstance(self.manifest, dict):
            raise DataError(f"{path} is corrupt: expected a JSON object")
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DataError(f"{path}: store format {self.manifest.get('format')} != supported {FORMAT_VERSION}")
        missing = [key for key in MANIFEST_KEYS if key not in self.manifest]
        if missing:
            raise DataError(f"{path} is corrupt: no {', '.join(missing)}")
        for name in STORE_FILES:
            if not (self.root / name).is_file():
                raise DataError(f"{self.root} is incomplete: {name} is missing")
        for name, columns in self._table_columns().items():  # footers only: a garbage file fails now, not mid-run
            self._check_table(name, columns)
        self.offsets = self._load("seq_offsets")
        self.seq_items = self._load("seq_items")
        self.seq_ts = self._load("seq_ts")
        self.seq_signal = self._load("seq_signal")
        self._check_sequences()

    def _check_sequences(self) -> None:
        """The CSR arrays agree with each other and the manifest (O(users), not O(rows))."""
        rows = len(self.seq_items)
        users = self.manifest["users"]
        problem = None
        if any(a.ndim != 1 for a in (self.offsets, self.seq_items, self.seq_ts, self.seq_signal)):
            problem = "sequence arrays must be one-dimensional"
        elif len(self.seq_ts) != rows or len(self.seq_signal) != rows:
            lengths = f"{rows}, {len(self.seq_ts)}, {len(self.seq_signal)}"
            problem = f"seq_items, seq_ts and seq_signal differ in length ({lengths})"
        elif not isinstance(users, int) or self.offsets.shape != (users + 1,):
            problem = f"seq_offsets has {len(self.offsets)} entries, the manifest's {users!r} users need users + 1"
        elif self.offsets.dtype.kind not in "iu" or int(self.offsets[0]) != 0 or int(self.offsets[-1]) != rows:
            problem = f"seq_offsets must run from 0 to the {rows} rows of seq_items"
        elif users and bool((np.diff(self.offsets) < 0).any()):
            problem = "seq_offsets is not non-decreasing"
        if problem is not None:
            raise DataError(f"{self.root} is corrupt: {problem}")

    def _load(self, name: str) -> np.ndarray:
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{self.root} is incomplete: {path.name} is missing")
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DataError(f"{path} is corrupt: {exc}") from exc

    # ---- tables -------------------------------------------------------------------------
    def _table_columns(self) -> dict[str, tuple[str, ...]]:
        """The Parquet tables of the store and the columns readers rely on."""
        return {
            "samples.parquet": ("user", "pos", "target", "label", "split"),
            "items.parquet": ("item", "category", "tags"),
            "users.parquet": ("user", *self.manifest["user_features"]),
        }

    def _check_table(self, name: str, columns: tuple[str, ...]) -> None:
        """A table's footer reads and names the columns (cheap: the data pages are not read)."""
        path = self.root / name
        try:
            present = pq.read_schema(path).names
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{path} is corrupt: {exc}") from exc
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"{path} is corrupt: no column {', '.join(missing)}")

    def _read_table(self, name: str) -> pl.DataFrame:
        """A Parquet table of the store; an unreadable file -> one-line DataError."""
        path = self.root / name
        try:
            return pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
            raise DataError(f"{path} is corrupt: {exc}") from exc

    @cached_property
    def seq_rank(self) -> np.ndarray:
        """(I,) int64, memory-mapped: each row's position in the global order (read on first use)."""
        return self._load("seq_rank")

    @cached_property
    def samples(self) -> pl.DataFrame:
        return self._read_table("samples.parquet")

    @cached_property
    def items(self) -> pl.DataFrame:
        return self._read_table("items.parquet")

    @cached_property
    def users(self) -> pl.DataFrame:
        return self._read_table("users.parquet")

    @cached_property
    def vocab(self) -> dict:
        path = self.root / "vocab.json"
        try:
            vocab = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise DataError(f"{path} is corrupt: {exc}") from exc
        if not isinstance(vocab, dict):
            raise DataError(f"{path} is corrupt: expected a JSON object")
        return vocab

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
        """Sample columns as numpy arrays (user, pos, target, label, split, rank).

        Read row group by row group into preallocated arrays: peak memory is the arrays plus
        one row group (a sample is 22 bytes), never a second copy of the table.
        """
        if "samples" in self.__dict__:  # the table is loaded already (or this is a view)
            return {c: self.samples[c].to_numpy() for c in self.samples.columns}
        return self._read_sample_rows(None)

    def _read_sample_rows(self, ranges: list[tuple[int, int]] | None) -> dict[str, np.ndarray]:
        """Rows ``[lo, hi)`` of each range of ``samples.parquet`` (all rows for ``None``), in
        order, reading only the row groups that overlap them."""
        path = self.root / "samples.parquet"
        try:
            pf = pq.ParquetFile(path)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            ranges = [(0, int(bounds[-1]))] if ranges is None else [(int(lo), int(hi)) for lo, hi in ranges if hi > lo]
            schema = pf.schema_arrow
            out = {f.name: np.empty(sum(hi - lo for lo, hi in ranges), dtype=f.type.to_pandas_dtype()) for f in schema}
            at = 0
            for lo, hi in ranges:
                first = int(np.searchsorted(bounds, lo, side="right")) - 1
                for g in range(first, int(np.searchsorted(bounds, hi, side="left"))):
                    a, b = max(lo, int(bounds[g])), min(hi, int(bounds[g + 1]))
                    table = pf.read_row_group(g).slice(a - int(bounds[g]), b - a)
                    for name in out:
                        out[name][at : at + b - a] = table.column(name).to_numpy()
                    at += b - a
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{path} is corrupt: {exc}") from exc
        return out

    def sample_view(self, ranges: list[tuple[int, int]]) -> LifelongStore:
        """This store with a sample table of only rows ``[lo, hi)`` of each range, in order.

        Reads just the parquet row groups that overlap the ranges (a rank's shard, see
        ``r2led.train.distributed``); the memory-mapped sequences are shared.
        """
        arrays = self._read_sample_rows(ranges)
        view = copy.copy(self)
        view.__dict__["sample_arrays"] = arrays
        view.__dict__["samples"] = pl.DataFrame(arrays)
        return view

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
        """Slice ``[pos - t_max, pos)`` of each user's sequence, vectorised, left-padded.

        The outputs are filled in row blocks of about ``_GATHER_TOKENS`` tokens, so that the
        gather's temporaries stay bounded however long ``B x L`` is.
        """
        user = np.asarray(user, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int64)
        length = np.minimum(pos, t_max)
        width = max(int(length.max(initial=0)), 1)
        end = self.offsets[user] + pos  # (B,) one past the last history row
        col = np.arange(width, dtype=np.int64)
        mask = col[None, :] >= (width - length)[:, None]  # (B, L)
        items = np.zeros(mask.shape, dtype=np.int64)  # (B, L)
        signal = np.zeros(mask.shape, dtype=np.int64)  # (B, L)
        rows = max(1, _GATHER_TOKENS // width)
        for a in range(0, len(user), rows):
            m = mask[a : a + rows]
            idx = np.where(m, end[a : a + rows, None] - width + col[None, :], 0)  # (b, L)
            np.copyto(items[a : a + rows], self.seq_items[idx], where=m)
            np.copyto(signal[a : a + rows], self.seq_signal[idx], where=m)
        return HistoryWindow(items, signal, mask, length)

    def history_lengths(self, sample_idx: np.ndarray, t_max: int) -> np.ndarray:
        return np.minimum(self.sample_arrays["pos"][sample_idx], t_max)
