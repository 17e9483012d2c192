"""Multi-route mixed retrieval and SimHash, pinned on hand-built histories."""

import math

import numpy as np
import pytest
import torch

from r2led.models.retrieval import disjoint_mixed_topk, mixed_topk, recency_keys, topk_keys
from r2led.models.simhash import SimHash, popcount64


def keys_of(sim, mask=None):
    sim = torch.tensor([sim], dtype=torch.int64)
    mask = torch.ones_like(sim, dtype=torch.bool) if mask is None else torch.tensor([mask])
    return recency_keys(sim, mask)


def retrieve(sim, match, k, rho, mask=None):
    keys = keys_of(sim, mask)
    index, taken = mixed_topk(keys, torch.tensor([[match]]), k, rho)
    return index[0, 0][taken[0, 0]].tolist(), taken[0, 0].tolist()


def test_matches_first_up_to_quota_then_fill_by_similarity():
    # positions:   0  1  2  3  4  5
    sim = [5, 1, 3, 2, 4, 0]
    match = [False, True, True, False, False, True]
    # quota ceil(0.5 * 4) = 2: the two best matches (2, then 1), then best of the rest (0, 4)
    assert retrieve(sim, match, k=4, rho=0.5)[0] == [2, 1, 0, 4]


def test_fill_never_repeats_a_taken_match():
    sim = [9, 8, 7, 6]
    match = [True, False, False, False]
    assert retrieve(sim, match, k=3, rho=0.75)[0] == [0, 1, 2]


def test_rho_one_takes_every_match_before_any_fill():
    sim = [9, 8, 1, 0, 7]
    match = [False, False, True, True, False]
    assert retrieve(sim, match, k=4, rho=1.0)[0] == [2, 3, 0, 1]


def test_rho_zero_is_pure_collaborative_topk():
    sim = [1, 9, 3, 7, 5]
    match = [True, False, True, False, True]
    assert retrieve(sim, match, k=3, rho=0.0)[0] == [1, 3, 4]


def test_recency_breaks_ties():
    sim = [4, 4, 4, 4, 4]
    match = [True, True, False, True, False]
    # quota 2 among matches (0, 1, 3): most recent first -> 3, 1; then fill most recent: 4, 2
    assert retrieve(sim, match, k=4, rho=0.5)[0] == [3, 1, 4, 2]


def test_history_shorter_than_k_is_padded_not_crashed():
    got, taken = retrieve([3, 1, 2], [True, False, False], k=5, rho=0.75)
    assert got == [0, 2, 1]
    assert taken == [True, True, True, False, False]


def test_no_matching_prefix_still_fills_k_slots():
    got, taken = retrieve([3, 1, 2, 0], [False] * 4, k=3, rho=0.75)
    assert got == [0, 2, 1] and all(taken)


def test_empty_history_takes_nothing():
    # one padded slot, nothing present
    got, taken = retrieve([0], [False], k=4, rho=0.75, mask=[False])
    assert got == [] and taken == [False] * 4


def test_padding_is_never_taken():
    # left-padded: positions 0, 1 are padding with high similarity and a "match"
    got, _ = retrieve([9, 9, 1, 2], [True, True, False, True], k=4, rho=0.5, mask=[False, False, True, True])
    assert got == [3, 2]


def test_routes_are_independent():
    keys = keys_of([5, 4, 3, 2, 1, 0])
    match = torch.tensor([[[True, True, True, True, True, True], [False, False, False, False, True, True]]])
    index, taken = mixed_topk(keys, match, k=2, rho=1.0)
    assert index[0, 0].tolist() == [0, 1]
    assert index[0, 1].tolist() == [4, 5]
    assert taken.all()


def disjoint(sim, match, k, rho, mask=None):
    index, taken = disjoint_mixed_topk(keys_of(sim, mask), torch.tensor([match]), k, rho)
    return [index[0, r][taken[0, r]].tolist() for r in range(index.shape[1])]


def test_disjoint_routes_finest_chooses_first_and_coarser_take_the_rest():
    # positions:  0  1  2  3  4  5  6  7
    sim = [7, 6, 5, 4, 3, 2, 1, 0]
    coarse = [True, True, False, True, False, True, True, False]
    fine = [False, True, False, False, False, True, False, False]  # nested in coarse
    # fine route (k=3, quota 2): its matches 1, 5, then the best left: 0
    # coarse route: matches not taken (3, 6), then the best left: 2
    assert disjoint(sim, [coarse, fine], k=3, rho=0.5) == [[3, 6, 2], [1, 5, 0]]
    # shared routes (mixed_topk) would give the coarse route 0 and 1 again
    index, taken = mixed_topk(keys_of(sim), torch.tensor([[coarse, fine]]), 3, 0.5)
    assert index[0, 0][taken[0, 0]].tolist() == [0, 1, 2]


def test_disjoint_routes_without_semantic_view_are_bands_of_the_ranking():
    sim = [3, 9, 4, 8, 5, 7, 6, 0, 1]
    routes = disjoint(sim, [[False] * 9] * 3, k=2, rho=0.0)
    assert routes == [[4, 2], [5, 6], [1, 3]]  # finest route: the top 2 (1, 3), then the next bands


def test_disjoint_routes_run_out_before_padding():
    sim, mask = [5, 4, 3, 2, 1], [False, True, True, True, True]
    routes = disjoint(sim, [[True, True, True, True, True]] * 2, k=3, rho=1.0, mask=mask)
    assert routes == [[4], [1, 2, 3]]  # 4 present behaviours, each taken once, padding never
    flat = sum(routes, [])
    assert len(flat) == len(set(flat))


def test_topk_keys_pads_short_rows():
    index, taken = topk_keys(keys_of([1, 2]), 4)
    assert index[0, :2].tolist() == [1, 0] and taken[0].tolist() == [True, True, False, False]


def test_popcount_matches_python_on_signed_words():
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**63), 2**63 - 1, size=1000, dtype=np.int64)
    words[:3] = [0, -1, -(2**63)]
    expected = [bin(int(w) & (2**64 - 1)).count("1") for w in words]
    assert popcount64(torch.from_numpy(words)).tolist() == expected


def test_simhash_hamming_estimates_the_angle():
    torch.manual_seed(0)
    hasher = SimHash(32, bits=1024, seed=7)
    a = torch.randn(200, 32)
    b = a + 0.8 * torch.randn(200, 32)
    true_cos = torch.nn.functional.cosine_similarity(a, b)
    est = hasher.cosine(SimHash.hamming(hasher.signatures(a), hasher.signatures(b)))
    assert (est - true_cos).abs().mean() < 0.06
    assert SimHash.hamming(hasher.signatures(a), hasher.signatures(a)).eq(0).all()
    assert SimHash.hamming(hasher.signatures(a), hasher.signatures(-a)).eq(1024).all()


def test_simhash_rejects_bits_not_multiple_of_64():
    with pytest.raises(ValueError, match="multiple of 64"):
        SimHash(8, bits=48)


def test_ceil_quota():
    # k=20, rho=0.75 -> 15 match slots (method.md's default)
    sim = list(range(40))
    match = [True] * 40
    got, _ = retrieve(sim, match, k=20, rho=0.75)
    assert got == list(range(39, 19, -1))
    assert math.ceil(0.75 * 20) == 15


# ---- the approximate collaborative index (banded LSH over the signatures) ----------------------
def _random_index(seed, n_items=80, t=600, c=30):
    from r2led.models.retrieval import prefix_ranks
    from r2led.models.user_state import SignatureIndex

    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**63, (n_items + 1, 1)).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    coarse = rng.integers(0, 3, n_items + 1)
    tokens = torch.from_numpy(np.stack([coarse, coarse * 10 + rng.integers(0, 2, n_items + 1)], 1))
    rank, span = prefix_ranks(tokens)
    hist = rng.integers(1, n_items + 1, t)
    target = rng.integers(1, n_items + 1, c)
    return SignatureIndex(hist, rank.numpy()), words, target, span.numpy()[target]


def test_band_values_cut_each_word_into_its_bit_fields():
    from r2led.models.signature_bands import band_values

    sig = np.array([[0x0123456789ABCDEF, 0xFEDCBA9876543210]], dtype=np.uint64)
    assert band_values(sig, 4)[:, 0].tolist() == [0x89ABCDEF, 0x01234567, 0x76543210, 0xFEDCBA98]
    assert band_values(sig[:, :1], 8)[:, 0].tolist() == [0xEF, 0xCD, 0xAB, 0x89, 0x67, 0x45, 0x23, 0x01]
    with pytest.raises(ValueError, match="equal bands"):
        band_values(sig, 3)


def test_signature_bands_grown_by_inserts_hold_the_buckets_of_a_fresh_build():
    from r2led.models.signature_bands import SignatureBands

    rng = np.random.default_rng(0)
    sig = rng.integers(0, 16, (50, 1)).astype(np.uint64)  # few distinct band values: big buckets
    grown = SignatureBands(sig[:5], 16)
    for s in range(5, 50):
        grown.insert(s, sig[s])
    fresh = SignatureBands(sig, 16)
    assert np.array_equal(grown.values, fresh.values)
    targets = sig[rng.integers(0, 50, 7)]
    for (lo_a, hi_a), (lo_b, hi_b) in zip(
        zip(*grown.queries(targets), strict=True), zip(*fresh.queries(targets), strict=True), strict=True
    ):
        for b in range(16):
            assert sorted(grown.slots[b, lo_a[b] : hi_a[b]]) == sorted(fresh.slots[b, lo_b[b] : hi_b[b]])
            assert hi_a[b] > lo_a[b]  # every target is one of the items: its own bucket is never empty


@pytest.mark.parametrize("disjoint", [True, False])
def test_banded_routes_are_the_exact_routes_when_every_item_shares_a_band(disjoint):
    """64 bands of 1 bit: an item misses every band only if it is the candidate's complement
    (none here: every signature has its lowest bit set), so the banded search scores every
    item and must give exactly the exact search's routes."""
    index, words, target, span = _random_index(1)
    exact = index.routes(words[target], words, 0, span, 5, 4, 2, disjoint)
    banded = index.routes(words[target], words, 0, span, 5, 4, 2, disjoint, bands=64)
    assert np.array_equal(exact[1], banded[1]) and np.array_equal(exact[0], banded[0])


def test_banded_routes_keep_the_exact_semantic_matches_and_measure_their_recall():
    """Few bands: approximate. Without disjoint routes each route's matches (the semantic view)
    are exact; the collaborative fills come from fewer items, so the recall is below 1 and
    every slot taken is a real behaviour of the history."""
    from r2led.bench.speed_measure import route_recall

    index, words, target, span = _random_index(2, n_items=400, t=3000, c=40)
    k, quota = 6, 3
    exact, n_exact = index.routes(words[target], words, 0, span, k, quota, 2, False)
    banded, n_banded = index.routes(words[target], words, 0, span, k, quota, 2, False, bands=4)
    taken = np.arange(k) < n_banded[..., None]
    assert np.array_equal(banded[..., :quota][taken[..., :quota]], exact[..., :quota][taken[..., :quota]])
    assert (n_banded <= n_exact).all() and (banded[taken] < 3000).all()
    recall = route_recall(exact, n_exact, banded, n_banded)
    assert 0.5 < recall < 1.0
    assert route_recall(exact, n_exact, exact, n_exact) == 1.0
