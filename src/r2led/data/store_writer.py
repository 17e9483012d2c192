"""The streaming store writer: canonical tables -> a ``LifelongStore`` folder, out of core.

It reads the interactions (a ``pl.DataFrame`` or a ``pl.LazyFrame``) in batches and sorts them
out of core in chunks of about ``chunk_rows`` rows (work files beside the output, removed
afterwards), so its peak memory is flat in the number of rows; the sample index is written to
parquet in row groups, never built as Python objects. It checks free disk space before the
heavy passes; the folder is staged (``r2led.atomic.staged_folder``) and renamed when complete,
the manifest written last. ``docs/scale.md`` has the measured rate and memory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from r2led import __version__
from r2led.atomic import staged_folder
from r2led.data.protocol import SPLITS, Protocol
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError

MANIFEST = "manifest.json"  # written last: a folder without one is never taken for a store
FORMAT_VERSION = 1  # of the store folder; LifelongStore refuses another


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
        index = dict(zip(table_keys.to_list(), range(len(table_keys)), strict=False))
        return keys.replace_strict(index, return_dtype=pl.Int32).to_numpy()


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


def _history_stats(hist: np.ndarray) -> dict:
    """mean / p50 / p90 / max of history lengths given as a histogram (``hist[p]`` samples
    with ``p`` earlier rows); the percentiles are numpy's linear interpolation, truncated."""
    n = int(hist.sum())
    if n == 0:
        return {"mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    values = np.arange(len(hist), dtype=np.float64)
    cum = np.cumsum(hist)

    def value_at(k: int) -> int:  # the k-th smallest (0-based)
        return int(np.searchsorted(cum, k, side="right"))

    def percentile(q: float) -> int:
        h = (n - 1) * q / 100.0
        lo = int(np.floor(h))
        a, b = value_at(lo), value_at(min(lo + 1, n - 1))
        return int(a + (h - lo) * (b - a))

    return {
        "mean": round(float((values * hist).sum() / n), 2),
        "p50": percentile(50),
        "p90": percentile(90),
        "max": int(np.nonzero(hist)[0][-1]),
    }


# ---- the streaming writer -----------------------------------------------------------------
#
# Four passes over the interactions, each holding at most about ``chunk_rows`` rows in memory:
#   1. encode: source batches -> dense ids, appended to raw work files in source order
#      (per-user counts, used keys, a sample of timestamps);
#   2. partition by time: rows into time buckets of about ``chunk_rows`` rows (boundaries from
#      timestamp quantiles), still in source order inside each bucket;
#   3. per bucket, in time order: sort by (ts, user key, item key), stable -> global rank; the
#      position in the user's sequence from running per-user counts; samples are written in
#      global order as they appear; rows are routed to user-chunk work files with their CSR slot;
#   4. per user chunk, in user order: scatter into the chunk's slice of the CSR arrays and
#      append it to the .npy files.
# Nothing of size "rows" lives in memory at once; the sample index is written straight to
# parquet in row groups.

WORK_BYTES_PER_ROW = 64  # peak work files + output per interaction (see _passes below)
_RAW = {"u": np.int32, "i": np.int32, "ts": np.int64, "sig": np.int8}
_ROUTED = {"dest": np.int64, "i": np.int32, "ts": np.int64, "sig": np.int8, "rank": np.int64}
_TS_SAMPLE_EVERY = 64
SAMPLES_SCHEMA = pa.schema(
    [
        ("user", pa.int32()),
        ("pos", pa.int32()),
        ("target", pa.int32()),
        ("label", pa.int8()),
        ("split", pa.int8()),
        ("rank", pa.int64()),
    ]
)


class _Columns:
    """A set of append-only raw column files (one per name) in a work folder."""

    def __init__(self, folder: Path, dtypes: dict[str, type]):
        self.folder, self.dtypes = folder, dtypes
        folder.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        # kept open across appends, closed by close() / remove()
        self._files = {name: open(folder / f"{name}.bin", "ab") for name in dtypes}  # noqa: SIM115

    def append(self, **cols: np.ndarray) -> None:
        for name, fh in self._files.items():
            np.ascontiguousarray(cols[name], dtype=self.dtypes[name]).tofile(fh)
        self.rows += len(next(iter(cols.values())))

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()

    def read(self, start: int = 0, count: int = -1) -> dict[str, np.ndarray]:
        out = {}
        for name, dtype in self.dtypes.items():
            size = np.dtype(dtype).itemsize
            out[name] = np.fromfile(self.folder / f"{name}.bin", dtype=dtype, count=count, offset=start * size)
        return out

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _NpyAppender:
    """A 1-D ``.npy`` file of known length written front to back in pieces (never in memory)."""

    def __init__(self, path: Path, dtype: type, length: int):
        self.dtype, self.length, self.written = np.dtype(dtype), length, 0
        self.fh = open(path, "wb")  # noqa: SIM115 - written piece by piece, closed by close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (length,)}
        np.lib.format.write_array_header_1_0(self.fh, header)

    def append(self, values: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.written += len(values)

    def close(self) -> None:
        self.fh.close()
        if self.written != self.length:
            raise RuntimeError(f"{self.fh.name}: wrote {self.written} of {self.length} values")


def check_disk_space(folder: Path, rows: int, what: str = "the store") -> None:
    """Refuse (``DataError``) when ``folder``'s file system cannot hold ``rows`` interactions."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    need = rows * WORK_BYTES_PER_ROW
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DataError(
            f"not enough free disk space in {folder} for {what}: {rows:,} interactions need about "
            f"{need / 1e9:.2f} GB of work and output files, {free / 1e9:.2f} GB are free"
        )


def _row_batches(inter: pl.DataFrame | pl.LazyFrame, chunk_rows: int) -> Iterator[pl.DataFrame]:
    cols = ["user", "item", "ts", "signal"]
    if isinstance(inter, pl.LazyFrame):
        yield from inter.select(cols).collect_batches(chunk_size=chunk_rows)
    else:
        yield from inter.select(cols).iter_slices(chunk_rows)


def _check_batch(name: str, batch: pl.DataFrame) -> None:
    """The per-row checks of ``CanonicalTables.validate`` on one batch (lazy sources)."""
    for col in ("user", "item", "ts", "signal"):
        nulls = batch[col].null_count()
        if nulls:
            raise DataError(f"{name}: interactions column '{col}' has null/NaN values ({nulls} in one batch)")
    for col in ("ts", "signal"):
        if not batch[col].dtype.is_numeric():
            raise DataError(f"{name}: interactions column '{col}' must be numeric; it is {batch[col].dtype}")
        if batch[col].dtype.is_float() and batch[col].is_nan().any():
            raise DataError(f"{name}: interactions column '{col}' has NaN values")
    if (batch["signal"] < 1).any():
        bad = batch.filter(pl.col("signal") < 1).head(1).row(0, named=True)
        raise DataError(f"{name}: interaction signal must be >= 1 (0 is padding); first bad row: {bad}")


def _encode_keys(name: str, keys: pl.Series, table_keys: pl.Series, dtype: pl.DataType | None, what: str) -> np.ndarray:
    """(n,) int32 row of each key in its table; ``DataError`` naming an unknown key."""
    try:
        if dtype is not None:
            return keys.cast(dtype).to_physical().to_numpy().astype(np.int32)
        return _dense_ids(keys, table_keys)
    except pl.exceptions.PolarsError:
        unknown = keys.filter(~keys.is_in(table_keys.implode()))
        if len(unknown) == 0:
            raise
        raise DataError(
            f"{name}: interactions name {what}s missing from the {what} table, e.g. {what} {unknown[0]!r}"
        ) from None


def _enum_dtype(table_keys: pl.Series) -> pl.DataType | None:
    try:
        dtype = pl.Enum(table_keys)
        table_keys.head(1).cast(dtype)
        return dtype
    except Exception:  # keys polars cannot hold in an Enum: the exact dictionary path
        return None


def _validate_key_tables(tables: CanonicalTables) -> None:
    """``validate`` for the item and user tables when the interactions are lazy."""
    schema = tables.interactions.collect_schema()
    missing = [c for c in ("user", "item", "ts", "signal") if c not in schema]
    if missing:
        raise DataError(f"interactions table lacks column(s) {missing}; it has {list(schema)}")
    for table, df, cols in (
        ("items", tables.items, ["item", "text", "category", "tags"]),
        ("users", tables.users, ["user"]),
    ):
        lacking = [c for c in cols if c not in df.columns]
        if lacking:
            raise DataError(f"{table} table lacks column(s) {lacking}; it has {df.columns}")
        if df.height == 0:
            raise DataError(f"{tables.name}: the {table} table is empty")
        key = cols[0]
        dup = df[key].is_duplicated()
        if dup.any():
            raise DataError(f"{tables.name}: {table}.{key} is not unique, e.g. {df.filter(dup)[key][0]!r}")


@dataclass
class _Encoded:
    raw: _Columns
    counts: np.ndarray  # (U,) rows per user
    item_used: np.ndarray  # (N,) bool
    ts_min: int
    ts_max: int
    ts_sample: np.ndarray
    signal_max: int


def _encode_pass(tables: CanonicalTables, work: Path, chunk_rows: int) -> _Encoded:
    users_tbl, items_tbl = tables.users, tables.items
    user_dtype, item_dtype = _enum_dtype(users_tbl["user"]), _enum_dtype(items_tbl["item"])
    raw = _Columns(work / "raw", _RAW)
    counts = np.zeros(users_tbl.height, dtype=np.int64)
    item_used = np.zeros(items_tbl.height, dtype=bool)
    ts_min, ts_max, signal_max, samples = None, None, 0, []
    lazy = isinstance(tables.interactions, pl.LazyFrame)
    for batch in _row_batches(tables.interactions, chunk_rows):
        if batch.height == 0:
            continue
        if lazy:
            _check_batch(tables.name, batch)
        u = _encode_keys(tables.name, batch["user"], users_tbl["user"], user_dtype, "user")
        i = _encode_keys(tables.name, batch["item"], items_tbl["item"], item_dtype, "item")
        ts = batch["ts"].to_numpy().astype(np.int64, copy=False)
        sig = batch["signal"].to_numpy()
        signal_max = max(signal_max, int(sig.max()))
        if signal_max > 127:
            raise DataError(f"signal values must fit in int8 (<= 127); found {signal_max}")
        raw.append(u=u, i=i, ts=ts, sig=sig)
        counts += np.bincount(u, minlength=len(counts))
        item_used |= np.bincount(i, minlength=len(item_used)) > 0
        lo, hi = int(ts.min()), int(ts.max())
        ts_min = lo if ts_min is None else min(ts_min, lo)
        ts_max = hi if ts_max is None else max(ts_max, hi)
        samples.append(ts[::_TS_SAMPLE_EVERY].copy())
    raw.close()
    if raw.rows == 0:
        raise DataError(f"{tables.name}: the interactions table is empty")
    return _Encoded(raw, counts, item_used, ts_min, ts_max, np.concatenate(samples), signal_max)


def _time_buckets(enc: _Encoded, work: Path, chunk_rows: int) -> list[_Columns]:
    """Pass 2: rows into time buckets of about ``chunk_rows`` rows, source order kept inside."""
    n_buckets = -(-enc.raw.rows // chunk_rows)
    if n_buckets <= 1:
        return [enc.raw]
    qs = np.quantile(enc.ts_sample, np.arange(1, n_buckets) / n_buckets, method="lower")
    bounds = np.unique(qs.astype(np.int64))
    buckets = [_Columns(work / f"t{k:05d}", _RAW) for k in range(len(bounds) + 1)]
    for start in range(0, enc.raw.rows, chunk_rows):
        part = enc.raw.read(start, chunk_rows)
        b = np.searchsorted(bounds, part["ts"], side="right")
        order = np.argsort(b, kind="stable")
        cuts = np.searchsorted(b[order], np.arange(len(buckets) + 1))
        for k in range(len(buckets)):
            sel = order[cuts[k] : cuts[k + 1]]
            if len(sel):
                buckets[k].append(**{c: v[sel] for c, v in part.items()})
    for bucket in buckets:
        bucket.close()
    enc.raw.remove()
    return buckets


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """(n,) index of the first element of each element's run in a grouped ``keys``."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    return np.maximum.accumulate(np.where(new, np.arange(n), 0))


class _SampleWriter:
    """Writes ``samples.parquet`` in row groups, in global order, and keeps split statistics."""

    def __init__(self, path: Path, n_samples: int, n_users: int, max_len: int, protocol: Protocol):
        self.writer = pq.ParquetWriter(path, SAMPLES_SCHEMA, compression="snappy", use_dictionary=False)
        self.n_train = int(protocol.train_fraction * n_samples)
        self.n_valid = int(protocol.valid_fraction * n_samples)
        self.written = 0
        self.count = np.zeros(3, dtype=np.int64)
        self.positives = np.zeros(3, dtype=np.int64)
        self.users = np.zeros((3, n_users), dtype=bool)
        self.hist = np.zeros((3, max_len + 1), dtype=np.int64)

    def write(self, user, pos, target, label, rank) -> None:
        idx = self.written + np.arange(len(user))
        split = np.full(len(user), 2, dtype=np.int8)
        split[idx < self.n_train + self.n_valid] = 1
        split[idx < self.n_train] = 0
        self.writer.write_table(
            pa.table(
                {
                    "user": user.astype(np.int32),
                    "pos": pos.astype(np.int32),
                    "target": target.astype(np.int32),
                    "label": label.astype(np.int8),
                    "split": split,
                    "rank": rank.astype(np.int64),
                },
                schema=SAMPLES_SCHEMA,
            )
        )
        self.written += len(user)
        for code in range(3):
            m = split == code
            if m.any():
                self.count[code] += int(m.sum())
                self.positives[code] += int(label[m].sum())
                self.users[code, user[m]] = True
                self.hist[code] += np.bincount(pos[m], minlength=self.hist.shape[1])

    def close(self) -> dict:
        self.writer.close()
        return {
            name: {
                "samples": int(self.count[code]),
                "positive_rate": round(float(self.positives[code] / self.count[code]), 4) if self.count[code] else 0.0,
                "users": int(self.users[code].sum()),
                "history": _history_stats(self.hist[code]),
            }
            for code, name in enumerate(SPLITS)
        }


def _n_samples(counts: np.ndarray, protocol: Protocol) -> int:
    first = np.full_like(counts, protocol.min_history)
    if protocol.samples_last_n is not None:
        first = np.maximum(first, counts - protocol.samples_last_n)
    return int(np.maximum(counts - first, 0).sum())


def _order_pass(
    buckets: list[_Columns],
    enc: _Encoded,
    urank: np.ndarray,
    irank: np.ndarray,
    offsets: np.ndarray,
    user_chunk: np.ndarray,
    work: Path,
    samples: _SampleWriter,
    protocol: Protocol,
) -> list[_Columns]:
    """Pass 3: global order per time bucket; samples out; rows routed to user chunks."""
    counts = enc.counts
    n_chunks = int(user_chunk.max(initial=0)) + 1
    routed = [_Columns(work / f"u{c:05d}", _ROUTED) for c in range(n_chunks)]
    seen = np.zeros(len(counts), dtype=np.int64)
    spans = [enc.ts_max - enc.ts_min + 1, int(urank.max(initial=0)) + 1, int(irank.max(initial=0)) + 1]
    packable = spans[0] * spans[1] * spans[2] < 2**63
    base = 0
    for bucket in buckets:
        part = bucket.read()
        bucket.remove()
        u, i = part["u"], part["i"]
        ur, ir = urank[u], irank[i]
        if packable:  # one stable argsort of an exact, order-preserving packed key
            key = (part["ts"] - enc.ts_min) * spans[1]
            key += ur
            key *= spans[2]
            key += ir
            order = np.argsort(key, kind="stable")
            del key
        else:
            order = np.lexsort((ir, ur, part["ts"]))
        del ur, ir
        u, i, ts, sig = u[order], i[order], part["ts"][order], part["sig"][order]
        del part, order
        m = len(u)
        rank = base + np.arange(m, dtype=np.int64)
        base += m
        by_user = _stable_group(np.arange(m, dtype=np.int64), u)  # rank order inside each user
        pos = np.empty(m, dtype=np.int64)
        pos[by_user] = seen[u[by_user]] + (np.arange(m) - _group_starts(u[by_user]))
        del by_user
        seen += np.bincount(u, minlength=len(seen))

        keep = pos >= protocol.min_history
        if protocol.samples_last_n is not None:
            keep &= pos >= counts[u] - protocol.samples_last_n
        s = np.nonzero(keep)[0]
        del keep
        samples.write(u[s], pos[s], i[s] + 1, sig[s] > protocol.label_threshold, rank[s])
        del s

        chunk = user_chunk[u]
        order = np.argsort(chunk, kind="stable")
        cuts = np.searchsorted(chunk[order], np.arange(n_chunks + 1))
        dest = offsets[u] + pos
        for c in range(n_chunks):
            sel = order[cuts[c] : cuts[c + 1]]
            if len(sel):
                routed[c].append(dest=dest[sel], i=i[sel] + 1, ts=ts[sel], sig=sig[sel], rank=rank[sel])
    for r in routed:
        r.close()
    return routed


def _csr_pass(routed: list[_Columns], chunk_bounds: np.ndarray, n_rows: int, tmp: Path) -> None:
    """Pass 4: each user chunk's rows scattered to their CSR slots, appended to the .npy files."""
    out = {
        "i": _NpyAppender(tmp / "seq_items.npy", np.int32, n_rows),
        "ts": _NpyAppender(tmp / "seq_ts.npy", np.int64, n_rows),
        "sig": _NpyAppender(tmp / "seq_signal.npy", np.int8, n_rows),
        "rank": _NpyAppender(tmp / "seq_rank.npy", np.int64, n_rows),
    }
    try:
        for c, r in enumerate(routed):
            lo, hi = int(chunk_bounds[c]), int(chunk_bounds[c + 1])
            part = r.read()
            r.remove()
            slot = part.pop("dest") - lo
            for name, appender in out.items():
                values = np.empty(hi - lo, dtype=appender.dtype)
                values[slot] = part[name]
                appender.append(values)
    finally:
        for appender in out.values():
            appender.fh.close()
    for appender in out.values():
        appender.close()


def write_store(
    tables: CanonicalTables,
    out: str | Path,
    protocol: Protocol | None = None,
    force: bool = False,
    chunk_rows: int = 1 << 22,
) -> Path:
    """Encode canonical tables, apply the protocol and write a store folder atomically; returns it.

    Streaming: ``tables.interactions`` may be a ``pl.DataFrame`` or a ``pl.LazyFrame``; at
    most about ``chunk_rows`` interactions are held in memory at a time (work files go beside
    ``out`` and are removed), so peak memory does not grow with the number of rows. The result
    does not depend on ``chunk_rows``. Free disk space is checked before the heavy passes.
    """
    protocol = protocol or Protocol()
    out = Path(out)
    if chunk_rows < 1:
        raise DataError(f"chunk_rows must be >= 1; got {chunk_rows}")
    if (out / MANIFEST).exists() and not force:
        raise DataError(f"{out} already holds a prepared store; pass force=True (--force) to replace it")
    if out.exists() and not (out / MANIFEST).exists() and (not out.is_dir() or any(out.iterdir())):
        # Replacing `out` deletes it: never do that to a file or folder that is not a store.
        raise DataError(f"{out} exists and is not a prepared store (no {MANIFEST}); choose another --out folder")
    t0 = time.perf_counter()
    if isinstance(tables.interactions, pl.DataFrame):
        tables.validate()
        check_disk_space(out.parent, tables.interactions.height)
    else:
        _validate_key_tables(tables)
    users_tbl, items_tbl = tables.users, tables.items
    n_users, n_items = users_tbl.height, items_tbl.height
    out.parent.mkdir(parents=True, exist_ok=True)

    with (
        tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work_dir,
        staged_folder(out) as tmp,
    ):
        work = Path(work_dir)
        enc = _encode_pass(tables, work, chunk_rows)
        n_rows = enc.raw.rows
        check_disk_space(out.parent, n_rows)
        # Global order (ts, user, item) on the source's own keys, stable (ties keep source order).
        urank = np.zeros(n_users, dtype=np.int64)
        used_users = enc.counts > 0
        urank[used_users] = _key_rank(users_tbl["user"].filter(pl.Series(used_users)))
        irank = np.zeros(n_items, dtype=np.int64)
        irank[enc.item_used] = _key_rank(items_tbl["item"].filter(pl.Series(enc.item_used)))
        offsets = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(enc.counts, out=offsets[1:])
        # User chunks: consecutive users holding about chunk_rows rows each.
        _, user_chunk = np.unique(offsets[:-1] // chunk_rows, return_inverse=True)
        chunk_bounds = offsets[
            np.searchsorted(user_chunk, np.arange(int(user_chunk.max()) + 2), side="left").clip(max=n_users)
        ]
        chunk_bounds[-1] = n_rows

        n_samples = _n_samples(enc.counts, protocol)
        if n_samples == 0:
            raise DataError(f"{tables.name}: no user has more than min_history={protocol.min_history} interactions")
        sample_writer = _SampleWriter(tmp / "samples.parquet", n_samples, n_users, int(enc.counts.max()), protocol)
        buckets = _time_buckets(enc, work, chunk_rows)
        try:
            routed = _order_pass(buckets, enc, urank, irank, offsets, user_chunk, work, sample_writer, protocol)
        finally:
            stats = sample_writer.close()
        _csr_pass(routed, chunk_bounds, n_rows, tmp)
        np.save(tmp / "seq_offsets.npy", offsets)

        items_out, users_out, vocab, user_vocab, n_tags = _encode_tables(tables)
        items_out.write_parquet(tmp / "items.parquet")
        users_out.write_parquet(tmp / "users.parquet")
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        manifest = {
            "format": FORMAT_VERSION,
            "name": tables.name,
            "users": n_users,
            "items": n_items,
            "interactions": n_rows,
            "duplicates_dropped": int(getattr(tables, "duplicates_dropped", 0)),  # same (user, item, ts)
            "samples": {s: stats[s]["samples"] for s in SPLITS},
            "positive_rate": {s: stats[s]["positive_rate"] for s in SPLITS},
            "split_users": {s: stats[s]["users"] for s in SPLITS},
            "history": {s: stats[s]["history"] for s in SPLITS},
            "protocol": protocol.model_dump(),
            "user_features": {k: len(v) + 1 for k, v in user_vocab.items()},
            "categories": len(vocab["categories"]) + 1,
            "tags": n_tags + 1,
            "max_tags": int(max((len(t) for t in items_out["tags"].to_list()), default=0)),
            "signal_max": enc.signal_max,
            "source": tables.source_info,
            "versions": {"r2led": __version__, "polars": pl.__version__, "numpy": np.__version__},
            "prepare_seconds": round(time.perf_counter() - t0, 2),
        }
        # The manifest is written last: a folder without one is never taken for a store.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _encode_tables(tables: CanonicalTables) -> tuple[pl.DataFrame, pl.DataFrame, dict, dict, int]:
    """Item and user tables with encoded categoricals, and the vocabularies."""
    items_tbl, users_tbl = tables.items, tables.users
    n_items, n_users = items_tbl.height, users_tbl.height
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
    vocab = {"user_features": user_vocab, "categories": categories, "tags": tag_vocab}
    return items_out, pl.DataFrame(user_cols), vocab, user_vocab, len(tag_vocab)
