"""The request API (one user state x many candidates, ``r2led.models.user_state``): for every
model the same retrieved behaviours and the same logits as the batch path, states updated on
append, caches invalidated explicitly, bad requests refused."""

import numpy as np
import pytest
import torch

from r2led.bench.speed import FloatTensorSizes, draw_candidates, request_batch, synthetic_catalogue, synthetic_histories
from r2led.config import load_config
from r2led.errors import R2ledError
from r2led.models.base import history_profile
from r2led.models.layers import DinAttention
from r2led.models.registry import MODELS, build_model
from r2led.models.user_state import RequestError


@pytest.fixture(scope="module")
def cat():
    return synthetic_catalogue(300, seed=0)


def make(cat, name="r2led", **overrides):
    cfg = load_config(None, [f"model.name={name}", *[f"model.{k}={v}" for k, v in overrides.items()]]).model
    torch.manual_seed(0)
    return build_model(cfg, cat.spec, cat.sid).eval()


def user(cat, t, seed, candidates=30):
    rng = np.random.default_rng(seed)
    hist, signal, feats, interests = synthetic_histories(cat, 1, max(t, 1), rng)
    return hist[0][:t], signal[0][:t], feats[0], draw_candidates(cat, interests[0], candidates, rng)


def batch_logits(model, hist, signal, feats, cands, pad=0):
    """The batch path on C copies of the history, left-padded with ``pad`` absent behaviours."""
    h, s = np.concatenate([np.zeros(pad, np.int64), hist]), np.concatenate([np.zeros(pad, np.int64), signal])
    if len(h) == 0:
        h = s = np.zeros(1, np.int64)
    batch = request_batch(h, s, feats, cands, user=0, shared=False)
    batch.hist_mask = torch.from_numpy(h > 0).repeat(len(cands), 1)
    with torch.no_grad():
        return model(batch)


FLOAT_SEARCH = ("sim-soft", "twin")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("t,pad", [(0, 0), (1, 3), (57, 0), (700, 40)])
def test_every_models_request_path_gives_the_batch_paths_logits(cat, name, t, pad):
    model = make(cat, name)
    hist, signal, feats, cands = user(cat, t, seed=t)
    if name in FLOAT_SEARCH:  # top-k of float scores breaks exact ties arbitrarily (the batch
        signal = hist % 5 + 1  # path too): tied behaviours (same item) are made identical
    state = model.new_user_state(hist[: t // 2], signal[: t // 2], feats)
    model.score_request(state, cands)  # the index is built here, then updated by every append
    state.extend(hist[t // 2 :], signal[t // 2 :])
    want = batch_logits(model, hist, signal, feats, cands, pad)
    for _ in range(2):  # a second request on the same state (stamps, kept values) gives the same
        got = model.score_request(state, cands)
        assert got.shape == (len(cands),) and torch.allclose(got, want, atol=1e-5), (
            name,
            float((got - want).abs().max()),
        )
    cold = model.score_request(model.new_user_state(hist, signal, feats), cands)
    assert torch.allclose(cold, got, atol=1e-6)


SWITCHES = [
    {}, {"disjoint_routes": "off"}, {"route_mass": "off"}, {"attention": "mha"}, {"gate": "off"}, {"sid_refine": "off"},
    {"sid": "off"}, {"rho": 0}, {"rho": 1}, {"routes": 1}, {"route_fusion": "mean"}, {"short_len": 0}, {"k": 3},
    {"hash_bits": 128}, {"history_profile": "off"}, {"unit": "[16]"}, {"unit": "[24,8,4]"},
]  # fmt: skip


def test_the_unit_setting_sizes_both_din_encoders(cat):
    model = make(cat, unit="[24,8]")
    for encoder in (model.route_attention, model.short_attention):
        widths = [(m.in_features, m.out_features) for m in encoder.unit if isinstance(m, torch.nn.Linear)]
        assert widths == [(4 * 32, 24), (24, 8), (8, 1)]


@pytest.mark.parametrize("overrides", SWITCHES)
@pytest.mark.parametrize("t", [1, 300, 1500])
def test_r2led_request_path_gives_the_batch_paths_logits_for_every_switch(cat, overrides, t):
    model = make(cat, **overrides)
    hist, signal, feats, cands = user(cat, t, seed=t)
    state = model.new_user_state(hist, signal, feats)
    assert torch.allclose(
        model.score_request(state, cands), batch_logits(model, hist, signal, feats, cands, pad=5), atol=1e-5
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"disjoint_routes": "off"},
        {"disjoint_routes": "off", "rho": 0.5, "k": 7},
        {"k": 2},
        {"hash_bits": 128},
        {"rho": 1},
        {"sid": "off"},
        {"routes": 2},
    ],
)
@pytest.mark.parametrize("t", [40, 321, 1500])
def test_r2led_request_retrieval_is_the_batch_retrieval(cat, overrides, t):
    """Mostly distinct items and heavy repeats (many ties of similarity and of item); the
    state built in two halves (the second by appends) and at once."""
    model = make(cat, **overrides)
    rng = np.random.default_rng(t)
    for pool in (300, 12):
        hist = rng.integers(1, pool + 1, t)
        target = torch.from_numpy(rng.integers(1, 301, 50))
        index, taken = model.retrieve_routes(
            target, torch.from_numpy(hist).repeat(50, 1), torch.ones(50, t, dtype=torch.bool)
        )
        grown = model.new_user_state(hist[:7], np.ones(7, np.int64))
        model.request_routes(grown, target)
        grown.extend(hist[7:], np.ones(t - 7, np.int64))
        for state in (grown, model.new_user_state(hist, np.ones(t, np.int64))):
            s_index, s_taken = model.request_routes(state, target)
            assert torch.equal(taken, s_taken) and torch.equal(index[taken], s_index[s_taken])


def searched(model, state, cands):
    with torch.inference_mode():
        target = model.item_repr(torch.from_numpy(cands))
        return model.request_search(state, state.index_for(model), torch.from_numpy(cands), target)


@pytest.mark.parametrize("name", ["sim-hard", "eta"])
def test_integer_search_units_retrieve_the_batch_paths_positions(cat, name):
    model = make(cat, name)
    for t, pool in ((500, 300), (800, 9), (3, 300)):
        rng = np.random.default_rng(t)
        hist, cands = rng.integers(1, pool + 1, t), rng.integers(1, 301, 40)
        batch = request_batch(hist, np.ones(t, np.int64), np.zeros(3, np.int64), cands, user=0, shared=False)
        with torch.no_grad():
            index, taken = model.search(batch, model.item_repr(batch.target))
        state = model.new_user_state(hist[: t // 3], np.ones(t // 3, np.int64))
        searched(model, state, cands)
        state.extend(hist[t // 3 :], np.ones(t - t // 3, np.int64))
        s_index, s_taken = searched(model, state, cands)
        assert torch.equal(taken, s_taken) and torch.equal(index[taken], s_index[s_taken])


@pytest.mark.parametrize("name", ["twin", "sim-soft"])
def test_embedding_search_units_retrieve_the_batch_paths_behaviours(cat, name):
    """Float scores: a repeated (item, signal) ties with itself, so positions may differ among
    equal behaviours; the behaviours (item, signal) retrieved are the same."""
    model = make(cat, name)
    hist, signal, feats, cands = user(cat, 900, seed=1, candidates=25)
    batch = request_batch(hist, signal, feats, cands, user=0, shared=False)
    with torch.no_grad():
        index, taken = model.search(batch, model.item_repr(batch.target))
    s_index, s_taken = searched(model, model.new_user_state(hist, signal, feats), cands)
    assert torch.equal(taken, s_taken)
    for c in range(len(cands)):
        pairs = lambda i: sorted(zip(hist[i].tolist(), signal[i].tolist(), strict=False))  # noqa: E731
        assert pairs(index[c][taken[c]].numpy()) == pairs(s_index[c][s_taken[c]].numpy())


def test_state_keeps_the_profile_counts_and_its_memory(cat):
    model = make(cat)
    state = model.new_user_state([5, 6, 5], [1, 3, 3])
    state.append(7, 5)
    assert state.items.tolist() == [5, 6, 5, 7] and state.signals.tolist() == [1, 3, 3, 5]
    assert state.counts.tolist() == [0, 1, 0, 2, 0, 1]
    profile = history_profile(torch.from_numpy(state.counts).float().unsqueeze(0))[0]
    assert np.allclose(profile, [0.25, 0, 0.5, 0, 0.25, np.log1p(4) / 8])
    before = state.nbytes()
    model.score_request(state, [1, 2])
    assert state.nbytes() > before  # the model's index is kept with the state


def test_parameter_derived_state_follows_explicit_invalidation(cat):
    model = make(cat, "twin")
    hist, signal, feats, cands = user(cat, 400, seed=3)
    state = model.new_user_state(hist, signal, feats)
    before = model.score_request(state, cands)
    kept = state.index_for(model).current(model.cache_generation).copy()  # (T, d) W_k x_h
    with torch.no_grad():
        model.attention.k.weight.mul_(-1.5)
    assert np.array_equal(state.index_for(model).current(model.cache_generation), kept)  # not watched: explicit
    model.invalidate_caches()
    after = model.score_request(state, cands)
    assert np.allclose(state.index_for(model).current(model.cache_generation), -1.5 * kept, atol=1e-5)
    assert not torch.allclose(after, before) and torch.allclose(
        after, batch_logits(model, hist, signal, feats, cands), atol=1e-5
    )


def test_caches_follow_an_optimizer_step_and_load_state_dict(cat):
    model = make(cat)
    hist, signal, feats, cands = user(cat, 400, seed=4)
    state = model.new_user_state(hist, signal, feats)
    before = model.score_request(state, cands)
    with torch.no_grad():
        first = model.serving_tables()
        assert model.serving_tables()[0] is first[0]  # kept while nothing changes
    model.train()
    h = torch.from_numpy(hist).repeat(len(cands), 1)
    batch = request_batch(hist, signal, feats, cands, user=0, shared=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.loss(batch, model(batch)).backward()
    optimizer.step()
    with pytest.raises(RequestError, match="eval mode"):
        model.score_request(state, cands)
    model.eval()
    after = model.score_request(state, cands)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, batch_logits(model, hist, signal, feats, cands), atol=1e-5)  # nothing stale
    assert torch.equal(model.item_signatures(), model.simhash.signatures(model.items.id.weight))
    other = make(cat, k=20)
    o_state = other.new_user_state(hist, signal, feats)
    other.score_request(o_state, cands)  # its caches and the state's signatures filled
    other.load_state_dict(model.state_dict())
    assert torch.allclose(other.score_request(o_state, cands), after, atol=1e-6)
    model.train()  # while training the tables are recomputed, with gradients
    items, _ = model.serving_tables()
    assert items.requires_grad and items is not model.serving_tables()[0]
    assert h.shape == (len(cands), 400)


def test_bad_requests_are_refused_with_one_line(cat):
    model = make(cat)
    state = model.new_user_state([1, 2], [1, 2])
    for bad, match in (([0], "candidate id 0"), ([301], "candidate id 301"), ([], "empty")):
        with pytest.raises(RequestError, match=match):
            model.score_request(state, bad)
    with pytest.raises(RequestError, match="signal 9"):
        state.append(3, 9)
    with pytest.raises(RequestError, match="history item id 400"):
        model.new_user_state([400], [1])
    with pytest.raises(RequestError, match="differ in length"):
        model.new_user_state([1, 2], [1])
    with pytest.raises(RequestError, match="feature codes"):
        model.new_user_state([1], [1], [1, 2])
    assert issubclass(RequestError, R2ledError) and len(state) == 2


def test_request_retrieval_builds_no_history_sized_float_tensor(cat):
    model = make(cat)
    hist, signal, feats, cands = user(cat, 640, seed=0, candidates=40)
    state = model.new_user_state(hist, signal, feats)
    model.score_request(state, cands)
    with torch.inference_mode(), FloatTensorSizes() as sizes:
        model.request_routes(state, torch.from_numpy(cands))
    assert sizes.largest < len(cands) * len(hist)  # not even one float per (candidate, behaviour)


def test_din_attend_is_forward_with_one_query_per_row():
    torch.manual_seed(0)
    unit = DinAttention(8).eval()
    with torch.no_grad():
        for layer in unit.unit:  # PReLU slopes away from their default
            if isinstance(layer, torch.nn.PReLU):
                layer.weight.uniform_(-0.5, 1.5)
        q, kv = torch.randn(5, 8), torch.randn(5, 3, 4, 8)
        mask = torch.rand(5, 3, 4) > 0.3
        mask[0, 0] = False  # a route with nothing
        ones = lambda x: torch.cat([x, torch.ones(*x.shape[:-1], 1)], dim=-1)  # noqa: E731
        out, mass = unit.attend(ones(q), ones(kv), mask, mass=True)
        query = q.unsqueeze(1).expand(-1, 3, -1)
        assert torch.allclose(out[..., :-1], unit(query, kv, kv, mask), atol=1e-5)
        assert torch.allclose(out[..., -1], mask.any(-1).float())  # the weights' sum
        scores = unit.scores(query, kv).masked_fill(~mask, float("-inf"))
        assert torch.allclose(mass, torch.logsumexp(scores, -1), atol=1e-5)
        first = unit._serving()
        assert unit._serving()[0] is first[0]
        unit.unit[0].weight.mul_(0.5)
        unit.invalidate_caches()
        assert unit._serving()[0] is not first[0]
        assert torch.allclose(unit.attend(ones(q), ones(kv), mask)[..., :-1], unit(query, kv, kv, mask), atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_bounded_state_scores_the_last_max_length_behaviours(cat, name):
    """Appends past ``max_length`` drop the oldest from the window and every index (and
    compact the arrays now and then): each request equals the batch path on the last W."""
    model = make(cat, name)
    w, t = 40, 150
    hist, signal, feats, cands = user(cat, t, seed=11)
    if name in FLOAT_SEARCH:
        signal = hist % 5 + 1
    state = model.new_user_state(hist[:30], signal[:30], feats, max_length=w)
    model.score_request(state, cands)
    for end in range(31, t + 1):
        state.append(hist[end - 1], signal[end - 1])
        if end % 13 == 0 or end == t:
            assert len(state) == min(end, w) and state.items.tolist() == hist[max(end - w, 0) : end].tolist()
            assert state.counts.sum() == len(state)
            want = batch_logits(model, hist[max(end - w, 0) : end], signal[max(end - w, 0) : end], feats, cands)
            assert torch.allclose(model.score_request(state, cands), want, atol=1e-5), (name, end)
    short = model.new_user_state(hist, signal, feats, max_length=w)
    assert short.items.tolist() == hist[-w:].tolist()
