"""The training path's encoders (models.layers) and R2LED.forward against reference
implementations written out here the direct way: the fast forms compute the same function."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from r2led.config import load_config
from r2led.data.batches import make_batch
from r2led.models.base import short_window
from r2led.models.layers import DinAttention, TargetAttention, _PReLU, gather_behaviours, run_unit
from r2led.models.registry import build_model
from r2led.models.spec import DataSpec
from r2led.sid.table import SidTable

D = 16


def target_attention_reference(att: TargetAttention, query, keys, values, mask):
    """Every behaviour projected, per-head dot products, softmax over the present ones:
    query (..., d), keys/values (..., n, d), mask (..., n) -> (..., d), mass (...)."""
    *lead, n, d = keys.shape
    h, hd = att.heads, att.head_dim
    q = att.q(query).view(*lead, 1, h, hd)
    k = att.k(keys).view(*lead, n, h, hd)
    v = att.v(values).view(*lead, n, h, hd)
    scores = (q * k).sum(-1) / math.sqrt(hd)  # (..., n, h)
    scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=-2), nan=0.0)
    pooled = (weights.unsqueeze(-1) * v).sum(-3).reshape(*lead, d)
    return att.out(pooled), torch.logsumexp(scores, dim=-2).mean(-1)


def din_reference(att: DinAttention, query, keys, values, mask):
    """DIN's unit on the concatenation [q, k, q - k, q * k] of every behaviour, torch's PReLU."""
    q = query.unsqueeze(-2).expand_as(keys)
    scores = att.unit(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)  # (..., n)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return (weights.unsqueeze(-1) * values).sum(-2), torch.logsumexp(scores, dim=-1)


def inputs(*lead, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(*lead, n, D, generator=g, dtype=torch.float64)
    values = torch.randn(*lead, n, D, generator=g, dtype=torch.float64)
    mask = torch.rand(*lead, n, generator=g) > 0.3
    mask[0] = False  # a row with no behaviour at all
    return keys.requires_grad_(), values.requires_grad_(), mask


def grads(outputs, tensors):
    total = sum((o.masked_fill(~torch.isfinite(o), 0.0) * (i + 1)).sum() for i, o in enumerate(outputs))
    return torch.autograd.grad(total, tensors)


@pytest.mark.parametrize("encoder", ["mha", "din"])
@pytest.mark.parametrize("shared", [False, True])
def test_encoders_equal_the_direct_formulas_values_and_gradients(encoder, shared):
    torch.manual_seed(0)
    att = (TargetAttention(D, heads=2) if encoder == "mha" else DinAttention(D)).double()
    if encoder == "din":  # a slope away from its initial value, so that the negative side matters
        for layer in att.unit:
            if isinstance(layer, torch.nn.PReLU):
                layer.weight.data.fill_(-0.3)
    b, r = 5, 3
    keys, values, mask = inputs(b, r)
    target = torch.randn(b, D, dtype=torch.float64, requires_grad=True)
    # shared: one query per row over its r sets of behaviours; else the query repeated per set
    query = target if shared else target.unsqueeze(1).expand(-1, r, -1)
    reference = target_attention_reference if encoder == "mha" else din_reference
    expected = reference(att, target.unsqueeze(1).expand(-1, r, -1), keys, values, mask)
    out, mass = att.forward_with_mass(query, keys, values, mask)
    assert out.shape == (b, r, D) and mass.shape == (b, r)
    torch.testing.assert_close(out, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mass, expected[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0], att(query, keys, values, mask)[0]) and torch.isneginf(mass[0]).all()
    params = [p for p in att.parameters()]
    got = grads((out, mass), [target, keys, values, *params])
    want = grads(expected, [target, keys, values, *params])
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_prelu_function_has_torch_prelu_values_and_gradients():
    x = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    assert torch.equal(_PReLU.apply(x, w), F.prelu(x, w))
    assert torch.autograd.gradcheck(_PReLU.apply, (x, w))
    g = torch.randn_like(x)
    mine, theirs = torch.autograd.grad(_PReLU.apply(x, w), (x, w), g), torch.autograd.grad(F.prelu(x, w), (x, w), g)
    assert torch.equal(mine[0], theirs[0])
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-12, atol=1e-12)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.PReLU(), torch.nn.Linear(5, 1))
    assert torch.equal(run_unit(layers, x.float().detach()), layers(x.float().detach()))


def reference_forward(model, batch):
    """R2LED.forward as first written: the query repeated per route, each item set through
    SID-level fusion on its own, the encoders' direct formulas."""
    encode = target_attention_reference if model.cfg.attention == "mha" else din_reference
    hist, signal, mask = batch.hist_items, batch.hist_signal, batch.hist_mask
    index, taken = model.retrieve_routes(batch.target, hist, mask)
    r_items = gather_behaviours(hist, index) * taken
    r_signal = gather_behaviours(signal, index) * taken
    target = model.fused_item(batch.target)
    r_kv = model.fused_item(r_items) + model.signal(r_signal)
    query = target.unsqueeze(1).expand(-1, r_items.shape[1], -1)
    routes, mass = encode(model.route_attention, query, r_kv, r_kv, taken)
    mass = mass if model.cfg.route_mass else None
    z = model.route_fusion(target, routes, taken.any(-1), mass)
    s_items, s_signal, s_mask = short_window(batch, model.cfg.short_len)
    s_kv = model.fused_item(s_items) + model.signal(s_signal)
    r_short = encode(model.short_attention, target, s_kv, s_kv, s_mask)[0]
    x = torch.cat([model.user_repr(batch), target, z, r_short, target * z], dim=-1)
    return model.head(x)


@pytest.mark.parametrize(
    "switches",
    [
        ["model.attention=din"],
        ["model.attention=mha"],
        ["model.attention=din", "model.short_len=0", "model.route_mass=off"],
        ["model.attention=mha", "model.sid=off"],
        ["model.attention=din", "model.routes=1", "model.gate=off"],
    ],
)
def test_r2led_forward_equals_the_reference_forward_and_its_gradients(tiny_store, switches):
    cfg = load_config(None, ["model.name=r2led", "model.k=5", "model.dim=16", *switches])
    torch.manual_seed(0)
    model = build_model(cfg.model, DataSpec.from_store(tiny_store), SidTable.load(tiny_store.root / "sid")).double()
    model.train()
    batch = make_batch(tiny_store, np.arange(0, len(tiny_store.samples), 5)[:96], t_max=64)
    out, expected = model(batch), reference_forward(model, batch)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.sum(), params, allow_unused=True)
    want = torch.autograd.grad(expected.sum(), params, allow_unused=True)
    for (name, _), g_got, g_want in zip(model.named_parameters(), got, want, strict=True):
        assert (g_got is None) == (g_want is None), name
        if g_got is not None:
            torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-13, msg=name)
