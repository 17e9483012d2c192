"""The streaming store writer: results independent of the chunk size, lazy input, disk checks."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from r2led.data.protocol import Protocol
from r2led.data.sources.synthetic import load_synthetic
from r2led.data.store import build_store
from r2led.data.store_writer import _history_stats
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError

ARRAYS = ("seq_offsets", "seq_items", "seq_ts", "seq_signal", "seq_rank")


def assert_same_store(a, b) -> None:
    for name in ARRAYS:
        x, y = np.load(a.root / f"{name}.npy"), np.load(b.root / f"{name}.npy")
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.samples.equals(b.samples)
    assert a.items.equals(b.items) and a.users.equals(b.users)
    ma, mb = dict(a.manifest), dict(b.manifest)
    ma.pop("prepare_seconds"), mb.pop("prepare_seconds")
    assert ma == mb


def ties_tables(n=600, seed=1) -> CanonicalTables:
    rng = np.random.default_rng(seed)
    users = [str(i) for i in rng.permutation(30)]
    items = [f"it{i}" for i in rng.permutation(40)]
    inter = pl.DataFrame(
        {
            "user": rng.choice(users, n),
            "item": rng.choice(items, n),
            "ts": rng.integers(0, 25, n),
            "signal": rng.integers(1, 6, n),
        }
    )
    return CanonicalTables(
        "ties",
        inter,
        pl.DataFrame({"item": items, "text": items, "category": ["c"] * 40, "tags": [["t"]] * 40}),
        pl.DataFrame({"user": users}),
    )


def reference_csr(tables: CanonicalTables) -> tuple[np.ndarray, np.ndarray]:
    """(csr row order, global rank per row), computed independently with one lexsort."""
    inter = tables.interactions
    users = tables.users["user"].to_list()
    order = np.lexsort((inter["item"].to_numpy(), inter["user"].cast(pl.Int64).to_numpy(), inter["ts"].to_numpy()))
    uid = np.array([users.index(k) for k in inter["user"]])
    csr = order[np.argsort(uid[order], kind="stable")]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return csr, rank


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 599, 600])
def test_every_chunk_size_writes_the_reference_order(tmp_path, chunk_rows):
    # Chunk sizes from one row (every user split over many chunks, ties of one timestamp
    # spread over batches) to the whole table in one chunk.
    tables = ties_tables()
    store = build_store(tables, tmp_path / "s", Protocol(min_history=2, samples_last_n=15), chunk_rows=chunk_rows)
    csr, rank = reference_csr(tables)
    items = tables.items["item"].to_list()
    iid = np.array([items.index(k) + 1 for k in tables.interactions["item"]])
    assert store.seq_items.tolist() == iid[csr].tolist()
    assert store.seq_ts.tolist() == tables.interactions["ts"].to_numpy()[csr].tolist()
    assert np.load(store.root / "seq_rank.npy").tolist() == rank[csr].tolist()
    # samples: every row with 2..(count-1) earlier rows within the user's last 15, in global order
    s = store.samples
    assert s["rank"].to_list() == sorted(s["rank"].to_list())
    counts = np.diff(store.offsets)
    expected = sum(max(0, int(c) - max(2, int(c) - 15)) for c in counts)
    assert s.height == expected
    seq_rank = np.load(store.root / "seq_rank.npy")
    assert np.array_equal(seq_rank[store.offsets[s["user"].to_numpy()] + s["pos"].to_numpy()], s["rank"].to_numpy())


def test_a_user_split_across_chunks_gets_the_same_store(tmp_path):
    # one heavy user holds most rows, so user chunks and time buckets both cut through it
    rng = np.random.default_rng(4)
    n = 900
    user = np.where(rng.random(n) < 0.8, "heavy", rng.choice(["a", "b", "c"], n))
    tables = CanonicalTables(
        "heavy",
        pl.DataFrame(
            {
                "user": user,
                "item": rng.choice(["x", "y", "z"], n),
                "ts": rng.integers(0, 300, n),
                "signal": rng.integers(1, 6, n),
            }
        ),
        pl.DataFrame(
            {"item": ["x", "y", "z"], "text": ["x", "y", "z"], "category": ["", "", ""], "tags": [[], [], []]}
        ),
        pl.DataFrame({"user": ["a", "heavy", "b", "c"]}),
    )
    whole = build_store(tables, tmp_path / "whole", chunk_rows=10_000)
    for chunk_rows in (5, 100, 333):
        assert_same_store(build_store(tables, tmp_path / f"c{chunk_rows}", chunk_rows=chunk_rows), whole)
    heavy = 1
    assert whole.offsets[heavy + 1] - whole.offsets[heavy] > 700


def test_lazy_and_eager_interactions_give_identical_stores(tmp_path):
    tables = load_synthetic(users=60, length=80, items=300, seed=2)
    eager = build_store(tables, tmp_path / "eager", Protocol(min_history=3))
    lazy_tables = CanonicalTables(
        tables.name, tables.interactions.lazy(), tables.items, tables.users, tables.source_info
    )
    lazy = build_store(lazy_tables, tmp_path / "lazy", Protocol(min_history=3), chunk_rows=500)
    assert_same_store(lazy, eager)


def test_history_statistics_from_a_histogram_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 100, 1001):
        pos = rng.integers(0, 50, n)
        got = _history_stats(np.bincount(pos))
        assert got == {
            "mean": round(float(pos.mean()), 2),
            "p50": int(np.percentile(pos, 50)),
            "p90": int(np.percentile(pos, 90)),
            "max": int(pos.max()),
        }


def test_split_statistics_match_the_sample_table(tmp_path):
    store = build_store(ties_tables(), tmp_path / "s", Protocol(min_history=1), chunk_rows=50)
    s = store.samples
    for code, name in enumerate(("train", "valid", "test")):
        part = s.filter(pl.col("split") == code)
        assert store.manifest["samples"][name] == part.height
        assert store.manifest["split_users"][name] == part["user"].n_unique()
        assert store.manifest["positive_rate"][name] == round(float(part["label"].mean()), 4)
        assert store.manifest["history"][name]["p90"] == int(np.percentile(part["pos"].to_numpy(), 90))


def test_short_disk_is_refused_with_the_estimate_and_leaves_nothing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(DataError, match=r"not enough free disk space .* 600 interactions need about 0\.00 GB"):
        build_store(ties_tables(), tmp_path / "s")
    lazy = ties_tables()
    lazy.interactions = lazy.interactions.lazy()
    with pytest.raises(DataError, match="not enough free disk space"):
        build_store(lazy, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_lazy_input_errors_name_the_problem(tmp_path):
    base = ties_tables()
    bad_user = base.interactions.with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("ghost")).otherwise(pl.col("user")).alias("user")
    )
    with pytest.raises(DataError, match="users missing from the user table, e.g. user 'ghost'"):
        build_store(CanonicalTables("t", bad_user.lazy(), base.items, base.users), tmp_path / "a", chunk_rows=100)
    bad_signal = base.interactions.with_columns(pl.lit(0).alias("signal"))
    with pytest.raises(DataError, match="signal must be >= 1"):
        build_store(CanonicalTables("t", bad_signal.lazy(), base.items, base.users), tmp_path / "b")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['signal'\]"):
        build_store(
            CanonicalTables("t", base.interactions.drop("signal").lazy(), base.items, base.users), tmp_path / "c"
        )
    assert list(tmp_path.iterdir()) == []


def test_lazy_synthetic_generates_the_same_rows_block_by_block(tmp_path, monkeypatch):
    import r2led.data.sources.synthetic as synthetic

    monkeypatch.setattr(synthetic, "_BLOCK_ROWS", 1000)  # ~ 8 blocks of users
    eager = load_synthetic(users=90, length=100, items=300, seed=7)
    lazy = load_synthetic(users=90, length=100, items=300, seed=7, lazy=True)
    assert isinstance(lazy.interactions, pl.LazyFrame)
    assert len(synthetic._user_blocks(eager.users["user"].len() * [100])) > 5
    assert lazy.interactions.collect().equals(eager.interactions)
    assert lazy.items.equals(eager.items) and lazy.users.equals(eager.users)
    assert lazy.source_info["rows"] == eager.interactions.height
    a = build_store(eager, tmp_path / "a", chunk_rows=10**6)
    b = build_store(lazy, tmp_path / "b", chunk_rows=777)
    assert_same_store(a, b)
