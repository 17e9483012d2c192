"""The compiled retrieval (route_kernels): the user state's chains, popcount, and the routes
against the batch path's mixed_topk / disjoint_mixed_topk on random keys with many ties."""

import numpy as np
import pytest
import torch

from r2led.models import route_kernels
from r2led.models.retrieval import disjoint_mixed_topk, mixed_topk, prefix_ranks, recency_keys, route_quota
from r2led.models.simhash import SimHash, popcount64
from r2led.models.user_state import SignatureIndex


def test_chain_items_lists_each_items_positions_most_recent_first():
    hist = np.array([5, 3, 5, 5, 3, 9], np.int64)
    slot_of = np.full(10, -1, np.int64)
    slot_item, slot_last, prev = (np.empty(6, np.int64) for _ in range(3))
    u = route_kernels.chain_items(hist, slot_of, slot_item, slot_last, prev)
    assert u == 3 and slot_item[:u].tolist() == [5, 3, 9] and slot_last[:u].tolist() == [3, 4, 5]
    chains = []
    for s in range(u):
        p, chain = slot_last[s], []
        while p >= 0:
            chain.append(int(p))
            p = prev[p]
        chains.append(chain)
    assert chains == [[3, 2, 0], [4, 1], [5]]
    assert (slot_of == -1).all()  # left as it was given, for reuse


def test_signature_index_appends_like_a_fresh_build():
    rank = np.array([0, 7, 3, 3, 1, 9], np.int64)
    hist = np.array([1, 2, 1, 4], np.int64)
    grown = SignatureIndex(hist[:1], rank)
    for pos, item in enumerate(hist[1:].tolist(), start=1):
        grown.append(pos, item, 1)
    fresh = SignatureIndex(hist, rank)
    for index in (grown, fresh):
        items = index.slot_item.view()[index.order]
        assert items.tolist() == [4, 2, 1] and index.order_rank.tolist() == [1, 3, 7]
        assert index.slot_last.view()[index.order].tolist() == [3, 1, 2] and index.prev.view().tolist() == [
            -1,
            -1,
            0,
            -1,
        ]


def test_chain_keys_walk_the_most_recent_positions_per_key():
    keys = np.array([2, 1, 2, 2, 0, 1], np.int64)
    last_of, prev = np.full(3, -1, np.int64), np.empty(6, np.int64)
    route_kernels.chain_keys(keys, last_of, prev)
    out, n = np.zeros((3, 2), np.int64), np.empty(3, np.int64)
    route_kernels.walk_chains(last_of, prev, np.array([2, 1, 0], np.int64), 2, 0, out, n)
    assert n.tolist() == [2, 2, 0] and out[:2].tolist() == [[3, 2], [5, 1]]  # key 0 never matches
    route_kernels.walk_chains(last_of, prev, np.array([2, 1], np.int64), 5, 2, out, n)  # the window from position 2
    assert n.tolist()[:2] == [2, 1] and out[0, :2].tolist() == [1, 0] and out[1, 0] == 3


def test_compiled_popcount_matches_popcount64_including_the_sign_bit():
    words = np.array([0, -1, 7, -(2**63), 2**62 + 1, 0x5555555555555555], dtype=np.int64)
    got = [int(route_kernels._popcount(w)) for w in words.view(np.uint64)]
    assert got == popcount64(torch.from_numpy(words)).tolist() == [0, 64, 3, 1, 2, 32]


@pytest.mark.parametrize("disjoint", [True, False])
@pytest.mark.parametrize("k,rho", [(5, 0.6), (4, 1.0), (6, 0.0), (1, 0.5)])
@pytest.mark.parametrize(
    "n_items,t,words,start",
    [(60, 400, 1, 0), (1500, 4000, 1, 0), (1500, 4000, 2, 0), (1500, 4000, 1, 700), (60, 400, 2, 150)],
)
def test_state_routes_equal_the_batch_path_on_random_signatures_and_tokens(disjoint, k, rho, n_items, t, words, start):
    """Many items at equal similarity (ties go to recency); 1,500 items take the long-range
    path (vectorised similarity and cuts); two words the general one; ``start`` a window
    whose dropped behaviours left the index."""
    rng = np.random.default_rng(k)
    c = 25
    sigs = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, (n_items + 1, words)))
    sigs[1::2] = sigs[0]  # many items at equal similarity to each candidate
    sigs[2::7, 0] ^= 1  # and some one bit away
    coarse = rng.integers(0, 3, n_items + 1)
    tokens = torch.from_numpy(
        np.stack([coarse, coarse * 10 + rng.integers(0, 2, n_items + 1), np.arange(n_items + 1)], 1)
    )
    rank, span = prefix_ranks(tokens)
    hist = torch.from_numpy(rng.integers(1, n_items + 1, t))
    target = torch.from_numpy(rng.integers(1, n_items + 1, c))
    index = SignatureIndex(hist.numpy(), rank.numpy())
    for pos in range(start):  # as UserState does when the oldest leave a bounded window
        index.drop(pos, int(hist[pos]), 1)
    table = sigs.numpy().view(np.uint64)
    for _ in range(2):  # the stamps kept between requests must not leak into the next one
        out, n = index.routes(
            table[target.numpy()], table, 0, span[target].numpy(), k, route_quota(k, rho), 3, disjoint, start
        )
    got, got_taken = torch.from_numpy(out), torch.from_numpy(np.arange(k) < n[..., None])

    window = hist[start:]
    similarity = 64 * words - SimHash.hamming(sigs[window].unsqueeze(0), sigs[target].unsqueeze(1))  # (C, T')
    keys = recency_keys(similarity, torch.ones(c, len(window), dtype=torch.bool))
    match = tokens[window].T.unsqueeze(0) == tokens[target].unsqueeze(-1)  # (C, R, T')
    want, want_taken = (disjoint_mixed_topk if disjoint else mixed_topk)(keys, match, k, rho)
    assert torch.equal(got_taken, want_taken)
    assert torch.equal(got[got_taken], want[want_taken])
    assert got_taken.any(-1).all()


SWITCHES = [
    {},
    {"disjoint_routes": "off"},
    {"rho": 0},
    {"rho": 1},
    {"sid": "off"},
    {"routes": 1},
    {"k": 3, "rho": 0.5},
    {"hash_bits": 128},
]


@pytest.mark.parametrize("overrides", SWITCHES)
def test_compiled_batch_retrieval_is_the_tensor_retrieval(overrides):
    """R2LED's training/eval retrieval on CPU (compiled, row by row) against the whole-batch
    tensor code a GPU runs: the same slots, on histories with padding, repeats and ties."""
    from r2led.bench.speed import synthetic_catalogue
    from r2led.config import load_config
    from r2led.models.registry import build_model

    cat = synthetic_catalogue(300, seed=0)
    cfg = load_config(None, ["model.name=r2led", *[f"model.{k}={v}" for k, v in overrides.items()]]).model
    model = build_model(cfg, cat.spec, cat.sid)
    rng = np.random.default_rng(len(overrides))
    for pool, t in ((300, 200), (10, 90), (300, 5)):
        hist = torch.from_numpy(rng.integers(1, pool + 1, (24, t)))
        mask = torch.from_numpy(rng.random((24, t)) > 0.2)
        mask[0], mask[1, :-2], mask[1, -2:] = False, False, True  # an empty history, a two-behaviour one
        target = torch.from_numpy(rng.integers(1, 301, 24))
        got, got_taken = model._retrieve(target, hist, mask)
        want, want_taken = model._retrieve_tensors(target, hist, mask)
        assert torch.equal(got_taken, want_taken) and torch.equal(got[got_taken], want[want_taken])
        assert not got_taken[0].any() and got_taken[1].sum() >= 2


def test_rank_ordered_signatures_and_counts_follow_appends_and_drops():
    """Built on a request, the signatures in rank order, each slot's rank and each item's
    behaviours in the window are kept in step by every append (of a new item or not) and by
    every drop of the oldest behaviour: the same as building them afresh on the window."""
    rng = np.random.default_rng(3)
    rank = rng.permutation(40).astype(np.int64)
    table = rng.integers(0, 2**63, (40, 2)).astype(np.uint64)
    hist = rng.integers(1, 40, 300)
    grown = SignatureIndex(hist[:5], rank)
    grown.rank_signatures(table, 0)
    for pos, item in enumerate(hist[5:].tolist(), start=5):
        grown.append(pos, item, 1)
    kept_sig, kept_rank, kept_count = grown._rank_sig, grown._rank_of_slot, grown._rank_count
    fresh = SignatureIndex(hist, rank)
    want_sig, want_rank, want_count = fresh.rank_signatures(table, 0)
    assert np.array_equal(kept_sig, want_sig)  # rows by rank: the same items in the same order
    assert np.array_equal(grown.slot_item.view()[grown.order], fresh.slot_item.view()[fresh.order])
    assert np.array_equal(kept_rank[grown.order], np.arange(len(grown.order)))  # the inverse of order
    assert np.array_equal(kept_count, want_count) and kept_count.sum() == 300
    assert grown.rank_signatures(table, 0)[0] is kept_sig  # in step: not rebuilt
    for pos in range(120):  # the 120 oldest leave the window
        grown.drop(pos, int(hist[pos]), 1)
    window = np.bincount(hist[120:], minlength=40)
    items_by_rank = grown.slot_item.view()[grown.order]
    assert np.array_equal(grown.rank_signatures(table, 0)[2], window[items_by_rank])
    assert np.array_equal(grown.slot_count.view(), window[grown.slot_item.view()])
