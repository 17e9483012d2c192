"""Model behaviour on the tiny store: shapes, ablation switches, what retrieval may see."""

import numpy as np
import pytest
import torch

from r2led.bench.speed import FloatTensorSizes
from r2led.config import load_config
from r2led.data.batches import make_batch
from r2led.models.registry import build_model
from r2led.models.spec import DataSpec
from r2led.sid.table import SidTable


def build(store, name="r2led", **overrides):
    cfg = load_config(None, [f"model.name={name}", *[f"model.{k}={v}" for k, v in overrides.items()]])
    torch.manual_seed(0)
    return build_model(cfg.model, DataSpec.from_store(store), SidTable.load(store.root / "sid"))


@pytest.fixture(scope="module")
def batch(tiny_store):
    idx = np.arange(0, len(tiny_store.samples), 7)[:64]
    return make_batch(tiny_store, idx, t_max=64)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("r2led", {}),
        ("r2led", {"rho": 0}),
        ("r2led", {"rho": 1}),
        ("r2led", {"routes": 1}),
        ("r2led", {"gate": "off"}),
        ("r2led", {"route_fusion": "mean"}),
        ("r2led", {"sid": "off"}),
        ("r2led", {"disjoint_routes": "off"}),
        ("r2led", {"route_mass": "off"}),
        ("r2led", {"sid_refine": "off"}),
        ("r2led", {"attention": "mha"}),
        ("din", {}),
        ("din-long", {}),
        ("din", {"sid_features": True}),
    ],
)
def test_every_model_and_switch_gives_finite_logits_and_gradients(tiny_store, batch, name, overrides):
    model = build(tiny_store, name, **overrides)
    logits = model(batch)
    assert logits.shape == (len(batch),)
    assert torch.isfinite(logits).all()
    model.loss(batch, logits).backward()
    assert model.items.id.weight.grad is not None and model.items.id.weight.grad.abs().sum() > 0


def test_routes_follow_sid_levels(tiny_store):
    assert build(tiny_store).route_levels == [0, 1, 2]
    assert build(tiny_store, routes=1).route_levels == [2]  # a single route uses the finest level
    off = build(tiny_store, sid="off")
    assert off.items.levels == 0 and off.k == 60  # no SIDs; one route with the R*k budget


def test_retrieval_never_looks_at_or_past_the_sample(tiny_store, batch):
    model = build(tiny_store, k=5).eval()
    index, taken = model.retrieve_routes(batch.target, batch.hist_items, batch.hist_mask)
    assert index.shape == (len(batch), 3, 5)
    s = tiny_store.sample_arrays
    idx = np.arange(0, len(tiny_store.samples), 7)[:64]
    rank = np.load(tiny_store.root / "seq_rank.npy")
    width = batch.hist_items.shape[1]
    for b, sample in enumerate(idx):
        user, pos = s["user"][sample], s["pos"][sample]
        end = tiny_store.offsets[user] + pos
        for r in range(3):
            for slot in index[b, r][taken[b, r]].tolist():
                assert batch.hist_mask[b, slot]
                row = end - width + slot  # left padding: the last column is row end - 1
                assert row < end and rank[row] < s["rank"][sample]
                assert tiny_store.seq_items[row] == batch.hist_items[b, slot]


@pytest.mark.parametrize("disjoint", [True, False])
def test_semantic_view_takes_prefix_matches_first(tiny_store, batch, disjoint):
    model = build(tiny_store, k=4, rho=1.0, disjoint_routes=disjoint).eval()
    index, taken = model.retrieve_routes(batch.target, batch.hist_items, batch.hist_mask)
    tokens = model.items.prefix_tokens.__getitem__
    for b in range(len(batch)):
        t_tok = tokens(batch.target[b])
        free = batch.hist_mask[b].clone()  # disjoint routes: what the finer routes left
        for r in reversed(range(len(model.route_levels))):
            level = model.route_levels[r]
            positions = index[b, r][taken[b, r]]
            chosen = batch.hist_items[b, positions]
            n_match = int(((tokens(batch.hist_items[b])[:, level] == t_tok[level]) & free).sum())
            matched = tokens(chosen)[:, level] == t_tok[level]
            expect = min(n_match, 4)
            assert matched[:expect].all() and not matched[expect:].any()
            if disjoint:
                assert free[positions].all()  # never a behaviour a finer route took
                free[positions] = False


def test_retrieval_builds_no_history_sized_float_tensor(tiny_store):
    model = build(tiny_store).eval()
    b, t = 8, 4000
    gen = torch.Generator().manual_seed(0)
    hist = torch.randint(1, tiny_store.n_items + 1, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.bool)
    target = torch.randint(1, tiny_store.n_items + 1, (b,), generator=gen)
    model.item_signatures()  # the per-item signature cache a server keeps
    with FloatTensorSizes() as sizes:
        model.retrieve_routes(target, hist, mask)
    assert sizes.largest < b * t  # not even one float per behaviour, let alone (B, T, d)


def test_gate_is_a_distribution_over_id_and_levels(tiny_store):
    model = build(tiny_store)
    g = model.gate_weights(torch.arange(1, 11))
    assert g.shape == (10, 4)
    assert torch.allclose(g.sum(-1), torch.ones(10))
    assert build(tiny_store, gate="off").gate_weights(torch.arange(1, 3)) is None


def test_empty_history_gives_a_prediction(tiny_store):
    model = build(tiny_store).eval()
    batch = make_batch(tiny_store, np.arange(3), t_max=64)
    batch.hist_mask[:] = False
    batch.hist_items[:] = 0
    batch.hist_signal[:] = 0
    assert torch.isfinite(model(batch)).all()


def test_din_activation_unit_equals_the_concatenated_form():
    from r2led.models.layers import DinAttention

    torch.manual_seed(0)
    unit = DinAttention(8)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 2, 5, 8)
    qe = q.unsqueeze(-2).expand_as(k)
    reference = unit.unit(torch.cat([qe, k, qe - k, qe * k], dim=-1)).squeeze(-1)
    assert torch.allclose(unit.scores(q, k), reference, atol=1e-5)


def test_history_profile_is_the_same_for_a_shared_history(tiny_store, batch):
    model = build(tiny_store).eval()
    one = batch.hist_signal[:1]
    shared = type(batch)(
        **{**batch.__dict__, "hist_signal": one.expand(5, -1), "user_feats": batch.user_feats[:1].expand(5, -1)}
    )
    copied = type(batch)(
        **{**batch.__dict__, "hist_signal": one.repeat(5, 1), "user_feats": batch.user_feats[:1].repeat(5, 1)}
    )
    assert torch.equal(model.user_repr(shared), model.user_repr(copied))
    shares = model.user_repr(copied)[0, -model.spec.signal_size : -1]
    counts = torch.bincount(one[0][one[0] > 0], minlength=model.spec.signal_size)[1:].float()
    assert torch.allclose(shares, counts / counts.sum())


@pytest.mark.parametrize("encoder", ["din", "mha"])
def test_forward_with_mass_is_the_encoder_plus_its_log_partition(encoder):
    from r2led.models.layers import DinAttention, TargetAttention

    torch.manual_seed(0)
    enc = DinAttention(8) if encoder == "din" else TargetAttention(8, 2)
    query, kv = torch.randn(5, 3, 8), torch.randn(5, 3, 6, 8)
    mask = torch.rand(5, 3, 6) > 0.3
    mask[0, 1] = False  # an empty route
    pooled, mass = enc.forward_with_mass(query, kv, kv, mask)
    assert torch.allclose(pooled, enc(query, kv, kv, mask), atol=1e-6)
    scores = enc.scores(query, kv)
    if encoder == "mha":
        expected = torch.logsumexp(scores.masked_fill(~mask.unsqueeze(-1), float("-inf")), -2).mean(-1)
    else:
        expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    assert torch.allclose(mass[mask.any(-1)], expected[mask.any(-1)], atol=1e-5)
    assert mass[0, 1] == float("-inf")


def test_route_fusion_with_mass_can_be_one_softmax_over_every_route():
    """With the cross-attention's query/key part at zero and identity values, fusing the
    routes by their mass is exactly one softmax over all their behaviours."""
    from r2led.models.layers import DinAttention
    from r2led.models.r2led import RouteFusion

    torch.manual_seed(1)
    enc, fusion = DinAttention(8), RouteFusion(8)
    with torch.no_grad():
        fusion.q.weight.zero_()
        fusion.v.weight.copy_(torch.eye(8))
    target, kv = torch.randn(4, 8), torch.randn(4, 3, 5, 8)
    mask = torch.rand(4, 3, 5) > 0.2
    mask[2, 0] = False
    query = target.unsqueeze(1).expand(-1, 3, -1)
    routes, mass = enc.forward_with_mass(query, kv, kv, mask)
    z = fusion(target, routes, mask.any(-1), mass)
    joint = enc(target, kv.reshape(4, 15, 8), kv.reshape(4, 15, 8), mask.reshape(4, 15))
    assert torch.allclose(z, joint, atol=1e-5)
    assert not torch.allclose(fusion(target, routes, mask.any(-1)), joint, atol=1e-3)  # without the mass: not
