"""R2LED's serving path (one history x many candidates): same scores as the batch path, and
per-item / per-parameter caches that are never stale."""

import numpy as np
import pytest
import torch

from r2led.bench.speed import draw_candidates, request_batch, synthetic_catalogue, synthetic_histories
from r2led.config import load_config
from r2led.models.layers import DinAttention
from r2led.models.registry import build_model
from r2led.models.simhash import SimHash


@pytest.fixture(scope="module")
def cat():
    return synthetic_catalogue(300, seed=0)


def r2led(cat, **overrides):
    cfg = load_config(None, ["model.name=r2led", *[f"model.{k}={v}" for k, v in overrides.items()]]).model
    torch.manual_seed(0)
    return build_model(cfg, cat.spec, cat.sid).eval()


def requests(cat, t, seed=0, candidates=30, absent=0):
    """The same request with the history shared by the rows (a view) and copied per row."""
    rng = np.random.default_rng(seed)
    hist, signal, feats, interests = synthetic_histories(cat, 1, t, rng)
    hist[0, :absent], signal[0, :absent] = 0, 0
    target = draw_candidates(cat, interests[0], candidates, rng)
    shared = request_batch(hist[0], signal[0], feats[0], target, user=0, shared=True)
    copied = request_batch(hist[0], signal[0], feats[0], target, user=0, shared=False)
    mask = torch.arange(t) >= absent  # left padding
    shared.hist_mask, copied.hist_mask = mask.expand(candidates, t), mask.repeat(candidates, 1)
    return shared, copied


SWITCHES = [
    {}, {"disjoint_routes": "off"}, {"route_mass": "off"}, {"disjoint_routes": "off", "route_mass": "off"},
    {"attention": "mha"}, {"gate": "off"}, {"sid_refine": "off"}, {"sid": "off"}, {"rho": 0}, {"routes": 1},
    {"route_fusion": "mean"}, {"short_len": 0}, {"k": 3},
]  # fmt: skip


@pytest.mark.parametrize("overrides", SWITCHES)
@pytest.mark.parametrize("t,absent", [(1, 0), (60, 20), (300, 0), (700, 100)])
def test_serving_path_gives_the_batch_paths_scores(cat, overrides, t, absent):
    model = r2led(cat, **overrides)
    shared, copied = requests(cat, t, seed=t, absent=absent)
    with torch.no_grad():
        assert model.serving(shared) and not model.serving(copied)
        assert torch.allclose(model(shared), model(copied), atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"disjoint_routes": "off"}, {"disjoint_routes": "off", "rho": 0.5, "k": 7}, {"k": 2}, {"hash_bits": 128}, {"rho": 1}, {"sid": "off"}],
)
@pytest.mark.parametrize("t", [40, 321, 1500])
def test_serving_retrieval_is_the_batch_retrieval_on_random_histories(cat, overrides, t):
    """Mostly distinct items and heavy repeats (many ties of similarity and of item)."""
    model = r2led(cat, **overrides)
    rng = np.random.default_rng(t)
    for pool in (300, 12):
        hist = torch.from_numpy(rng.integers(1, pool + 1, t))
        mask = torch.from_numpy(rng.random(t) > 0.1)
        target = torch.from_numpy(rng.integers(1, 301, 50))
        index, taken = model.retrieve_routes(target, hist.repeat(50, 1), mask.repeat(50, 1))  # batch path
        s_index, s_taken = model.retrieve_routes_shared(target, hist, mask)
        assert torch.equal(taken, s_taken) and torch.equal(index[taken], s_index[s_taken])


def test_serving_is_only_for_eval_without_autograd(cat):
    model = r2led(cat)
    shared, _ = requests(cat, 50)
    with torch.no_grad():
        assert model.serving(shared)
    assert not model.serving(shared)  # gradients wanted: the batch path
    model.train()
    with torch.no_grad():
        assert not model.serving(shared)


def fresh_tables(model):
    with torch.no_grad():
        return model._serving_tables()


def assert_tables_fresh(model):
    with torch.no_grad():
        cached = model.serving_tables()
    for a, b in zip(cached, fresh_tables(model)):
        assert torch.equal(a, b)


def test_serving_tables_are_kept_until_a_parameter_changes(cat):
    model = r2led(cat)
    with torch.no_grad():
        first = model.serving_tables()
        assert model.serving_tables()[0] is first[0]  # kept while nothing changes
        items, signals = first
        assert torch.equal(items[:, :-1], model.fused_item(torch.arange(len(items))))
        assert torch.equal(items[:, -1], torch.ones(len(items))) and torch.equal(signals[:, -1], torch.zeros(len(signals)))
        model.gate.proj.weight.mul_(2.0)  # any in-place write
    assert_tables_fresh(model)
    with torch.no_grad():
        model.signal.weight.add_(1.0)
    assert_tables_fresh(model)


def test_caches_follow_an_optimizer_step_load_state_dict_and_training(cat):
    model = r2led(cat)
    shared, copied = requests(cat, 400)
    with torch.no_grad():
        model(shared)  # every cache filled
        before = model(shared)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss = model.loss(copied, model(copied))
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(shared)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, model(copied), atol=1e-5)  # nothing stale after the step
    assert_tables_fresh(model)
    with torch.no_grad():
        cached, fresh = model.item_signatures(), model.simhash.signatures(model.items.id.weight)
    assert torch.equal(cached, fresh)

    other = r2led(cat, k=20)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
        other(shared)  # its caches filled before its parameters are replaced
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(other(shared), after, atol=1e-6)

    model.train()  # while training the tables are recomputed, with gradients
    items, _ = model.serving_tables()
    assert items.requires_grad and items is not model.serving_tables()[0]


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
        first = unit._serving(False)
        assert unit._serving(False)[0] is first[0]
        unit.unit[0].weight.mul_(0.5)
        assert unit._serving(False)[0] is not first[0]
        assert torch.allclose(unit.attend(ones(q), ones(kv), mask)[..., :-1], unit(query, kv, kv, mask), atol=1e-5)
