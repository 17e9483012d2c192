"""The compiled serving retrieval (route_kernels): history index, popcount, and the routes
against the batch path's mixed_topk / disjoint_mixed_topk on random keys with many ties."""

import numpy as np
import pytest
import torch

from r2led.models import route_kernels
from r2led.models.retrieval import disjoint_mixed_topk, index_history, mixed_topk, prefix_ranks, recency_keys, route_positions, route_quota
from r2led.models.simhash import SimHash, popcount64


def test_index_history_keeps_each_items_most_recent_positions_in_rank_order():
    hist = torch.tensor([0, 5, 3, 5, 5, 3, 9])
    mask = hist > 0
    index = index_history(hist, mask)
    assert index.items.tolist() == [3, 5, 9] and index.count.tolist() == [2, 3, 1]
    assert [index.positions[s : s + c].tolist() for s, c in zip(index.start, index.count)] == [[5, 2], [4, 3, 1], [6]]
    assert index.last.tolist() == [5, 4, 6]
    ranked = index_history(hist, mask, rank=torch.tensor([0, 0, 0, 9, 0, 5, 0, 0, 0, 1]))
    assert ranked.items.tolist() == [9, 5, 3] and ranked.rank.tolist() == [1, 5, 9]
    assert [ranked.positions[s : s + c].tolist() for s, c in zip(ranked.start, ranked.count)] == [[6], [4, 3, 1], [5, 2]]
    empty = index_history(hist, torch.zeros_like(mask))
    assert len(empty.items) == 0 and len(empty.positions) == 0


def test_index_history_names_an_item_outside_the_table():
    with pytest.raises(ValueError, match="outside 0..9"):
        index_history(torch.tensor([1, 12]), torch.tensor([True, True]), rank=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        index_history(torch.tensor([1, -3]), torch.tensor([True, True]))


def test_compiled_popcount_matches_popcount64_including_the_sign_bit():
    words = np.array([0, -1, 7, -(2**63), 2**62 + 1, 0x5555555555555555], dtype=np.int64)
    got = [int(route_kernels._popcount(w)) for w in words.view(np.uint64)]
    assert got == popcount64(torch.from_numpy(words)).tolist() == [0, 64, 3, 1, 2, 32]


@pytest.mark.parametrize("disjoint", [True, False])
@pytest.mark.parametrize("k,rho", [(5, 0.6), (4, 1.0), (6, 0.0), (1, 0.5)])
def test_route_positions_equal_the_batch_path_on_random_signatures_and_tokens(disjoint, k, rho):
    rng = np.random.default_rng(k)
    n_items, t, c = 60, 400, 25
    sigs = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, (n_items + 1, 1)))
    sigs[1::2] = sigs[0]  # many items at equal similarity to each candidate
    coarse = rng.integers(0, 3, n_items + 1)
    tokens = torch.from_numpy(np.stack([coarse, coarse * 10 + rng.integers(0, 2, n_items + 1), np.arange(n_items + 1)], 1))
    rank, span = prefix_ranks(tokens)
    hist = torch.from_numpy(rng.integers(1, n_items + 1, t))
    target = torch.from_numpy(rng.integers(1, n_items + 1, c))
    index = index_history(hist, torch.ones(t, dtype=torch.bool), rank)
    items = torch.from_numpy(index.items)
    got, got_taken = route_positions(sigs[target], sigs[items], index, t, k, route_quota(k, rho), 3, span[target], disjoint)

    similarity = 64 - SimHash.hamming(sigs[hist].unsqueeze(0), sigs[target].unsqueeze(1))  # (C, T)
    keys = recency_keys(similarity, torch.ones(c, t, dtype=torch.bool))
    match = (tokens[hist].T.unsqueeze(0) == tokens[target].unsqueeze(-1))  # (C, R, T)
    want, want_taken = (disjoint_mixed_topk if disjoint else mixed_topk)(keys, match, k, rho)
    assert torch.equal(got_taken, want_taken)
    assert torch.equal(got[got_taken], want[want_taken])
    assert got_taken.any(-1).all()


SWITCHES = [{}, {"disjoint_routes": "off"}, {"rho": 0}, {"rho": 1}, {"sid": "off"}, {"routes": 1}, {"k": 3, "rho": 0.5}, {"hash_bits": 128}]


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
