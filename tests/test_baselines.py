"""Baselines on the tiny store: shapes, gradients, what each search unit selects, training."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from r2led.bench.speed import FloatTensorSizes
from r2led.config import load_config
from r2led.data.batches import Batch, make_batch
from r2led.models.avgpool import pooled_behaviours
from r2led.models.registry import MODELS, build_model
from r2led.models.simhash import SimHash
from r2led.models.spec import DataSpec
from r2led.sid.table import SidTable
from r2led.train.trainer import Trainer

BASELINES = ["avgpool", "sim-hard", "sim-soft", "eta", "sdim", "twin"]


def build(store, name, **overrides):
    cfg = load_config(None, [f"model.name={name}", *[f"model.{k}={v}" for k, v in overrides.items()]])
    torch.manual_seed(0)
    return build_model(cfg.model, DataSpec.from_store(store), SidTable.load(store.root / "sid"))


def hand_batch(target: list[int], hist: list[list[int]], signal: list[list[int]] | None = None) -> Batch:
    """Left-padded histories from lists (most recent last); item 0 = padding."""
    b, t = len(hist), max(len(h) for h in hist)
    items = torch.zeros(b, t, dtype=torch.long)
    sig = torch.zeros(b, t, dtype=torch.long)
    for i, h in enumerate(hist):
        if h:
            items[i, t - len(h) :] = torch.tensor(h)
            sig[i, t - len(h) :] = torch.tensor(signal[i] if signal else [3] * len(h))
    return Batch(
        user=torch.arange(b),
        user_feats=torch.ones(b, 1, dtype=torch.long),
        target=torch.tensor(target),
        hist_items=items,
        hist_signal=sig,
        hist_mask=items > 0,
        label=torch.ones(b),
    )


@pytest.fixture(scope="module")
def batch(tiny_store):
    idx = np.arange(0, len(tiny_store.samples), 7)[:64]
    return make_batch(tiny_store, idx, t_max=64)


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(MODELS)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("sid_features", [False, True])
def test_finite_logits_and_gradients(tiny_store, batch, name, sid_features):
    model = build(tiny_store, name, sid_features=sid_features)
    logits = model(batch)
    assert logits.shape == (len(batch),)
    assert torch.isfinite(logits).all()
    model.loss(batch, logits).backward()
    assert model.items.id.weight.grad.abs().sum() > 0
    if sid_features:  # the fairness control reaches every model through item_repr
        assert model.items.levels == 3
        assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in model.items.prefix)
    else:
        assert model.items.levels == 0


@pytest.mark.parametrize("name", BASELINES)
def test_empty_and_very_short_histories_give_predictions(tiny_store, name):
    model = build(tiny_store, name)
    # an empty history, a history of one behaviour, and one shorter than k = 60
    b = hand_batch([1, 2, 3], [[], [5], [4, 8, 12, 16, 5]])
    logits = model(b)
    assert torch.isfinite(logits).all()
    model.loss(b, logits).backward()
    model.eval()
    empty = make_batch(tiny_store, np.arange(3), t_max=64)
    empty.hist_mask[:] = False
    empty.hist_items[:] = 0
    empty.hist_signal[:] = 0
    with torch.no_grad():
        assert torch.isfinite(model(empty)).all()


def test_retrieval_baselines_expose_the_budget(tiny_store):
    for name in ["sim-hard", "sim-soft", "eta", "twin"]:
        assert build(tiny_store, name).cfg.k == 60  # R2LED's 3 routes x 20
        assert build(tiny_store, name, k=7).cfg.k == 7


# ---- what each search unit selects ------------------------------------------------------
def selected(index, taken, row=0):
    return index[row][taken[row]].tolist()


def test_sim_hard_keeps_same_category_behaviours_most_recent_first(tiny_store):
    model = build(tiny_store, "sim-hard", k=3).eval()
    cat = model.items.item_category
    target = 1
    same = [v for v in range(2, tiny_store.n_items + 1) if cat[v] == cat[target]]
    other = [v for v in range(2, tiny_store.n_items + 1) if cat[v] != cat[target]]
    # positions:  0        1         2        3         4        5
    hist = [same[0], other[0], same[1], other[1], same[2], other[2]]
    b = hand_batch([target, target], [hist, [other[3], same[3], other[4]]])
    index, taken = model.search(b, model.item_repr(b.target))
    assert selected(index, taken, 0) == [4, 2, 0]  # every match, the most recent first
    assert selected(index, taken, 1) == [4]  # left-padded to 6: one match, at position 4
    # the other two slots stay empty (SIM-hard does not fill with non-matching behaviours)
    assert taken[1].tolist() == [True, False, False]


def test_eta_keeps_the_smallest_hamming_distances(tiny_store, batch):
    model = build(tiny_store, "eta", k=5).eval()
    index, taken = model.search(batch, None)
    sigs = model.item_signatures()
    hamming = SimHash.hamming(sigs[batch.hist_items], sigs[batch.target].unsqueeze(1))  # (B, T)
    for r in range(len(batch)):
        present = batch.hist_mask[r]
        dist = hamming[r][present].sort().values
        chosen = index[r][taken[r]]
        assert taken[r].sum() == min(5, int(present.sum()))
        got = hamming[r, chosen]
        assert got.tolist() == dist[: len(chosen)].tolist()  # the k closest, closest first
        # ties go to the more recent behaviour
        for a, c in zip(chosen[:-1].tolist(), chosen[1:].tolist(), strict=False):
            assert hamming[r, a] < hamming[r, c] or a > c


def test_eta_signature_cache_is_kept_until_invalidated(tiny_store):
    model = build(tiny_store, "eta").eval()
    first = model.item_signatures()
    assert model.item_signatures() is first  # kept while nothing changes
    with torch.no_grad():
        model.items.id.weight.mul_(-1)
    assert model.item_signatures() is first  # an in-place write is not watched: invalidation is explicit
    model.invalidate_caches()
    assert torch.equal(model.item_signatures()[1:], ~first[1:])  # flipped signs -> complemented bits
    kept = model.item_signatures()
    model.train()
    model.eval()  # a training phase ends in eval(): the next call recomputes
    assert model.item_signatures() is not kept and torch.equal(model.item_signatures(), kept)


def test_twin_selects_the_top_k_of_its_own_attention_scores(tiny_store, batch):
    model = build(tiny_store, "twin", k=6).eval()
    with torch.no_grad():
        target = model.item_repr(batch.target)
        index, taken = model.search(batch, target)
        kv = model.behaviour_repr(batch.hist_items, batch.hist_signal)  # (B, T, d)
        scores = model.attention.scores(target, kv).mean(-1)  # (B, T): the ESU's logits
    assert torch.allclose(model.gsu_scores(batch, target), scores, atol=1e-5)
    for r in range(len(batch)):
        n = min(6, int(batch.hist_mask[r].sum()))
        expect = scores[r].masked_fill(~batch.hist_mask[r], -math.inf).topk(n).indices
        assert set(selected(index, taken, r)) == set(expect.tolist())
        assert taken[r].sum() == n


def test_twin_gsu_carries_no_gradient_but_the_esu_trains_the_shared_projections(tiny_store, batch):
    model = build(tiny_store, "twin", k=6)
    assert not model.gsu_scores(batch, model.item_repr(batch.target)).requires_grad
    model.loss(batch, model(batch)).backward()
    assert model.attention.k.weight.grad.abs().sum() > 0 and model.attention.q.weight.grad.abs().sum() > 0


def test_sdim_collision_pooling_equals_a_loop(tiny_store, batch):
    model = build(tiny_store, "sdim", rounds=3, bits_per_round=2).eval()
    small = make_batch(tiny_store, np.arange(0, len(tiny_store.samples), 97)[:6], t_max=30)
    with torch.no_grad():
        got = pooled_behaviours(
            model,
            small.hist_items,
            small.hist_signal,
            model.collision_weights(small.target, small.hist_items, small.hist_mask),
        )
        emb = model.items.id.weight
        n_collisions = 0
        for r in range(len(small)):
            t_bits = emb[small.target[r]] @ model.planes > 0  # (rounds * bits,)
            rounds = []
            for j in range(3):
                bits = slice(2 * j, 2 * j + 2)
                pooled = []
                for t in range(small.hist_items.shape[1]):
                    v = small.hist_items[r, t]
                    if small.hist_mask[r, t] and torch.equal(emb[v] @ model.planes[:, bits] > 0, t_bits[bits]):
                        pooled.append(model.behaviour_repr(v, small.hist_signal[r, t]))
                n_collisions += len(pooled)
                rounds.append(torch.stack(pooled).mean(0) if pooled else torch.zeros(model.cfg.dim))
            assert torch.allclose(got[r], torch.stack(rounds).mean(0), atol=1e-5)
    assert n_collisions > 0


def test_avgpool_is_the_mean_of_every_behaviour(tiny_store, batch):
    model = build(tiny_store, "avgpool")
    with torch.no_grad():
        got = model.long_interest(batch)
        kv = model.behaviour_repr(batch.hist_items, batch.hist_signal)  # (B, T, d)
        m = batch.hist_mask.unsqueeze(-1).float()
        expect = (kv * m).sum(1) / m.sum(1).clamp_min(1)
    assert torch.allclose(got, expect, atol=1e-5)


def test_sim_soft_adds_its_auxiliary_loss(tiny_store, batch):
    model = build(tiny_store, "sim-soft", aux_weight=0.5)
    logits = model(batch)
    bce = F.binary_cross_entropy_with_logits(logits, batch.label)
    loss = model.loss(batch, logits)
    assert loss > bce + 0.1  # 0.5 x a BCE near log 2
    loss.backward()
    assert model.retrieval.weight.grad.abs().sum() > 0  # the retrieval table learns from it
    # the same loss when loss() has to rebuild the auxiliary prediction
    model.eval()
    with torch.no_grad():
        rebuilt = model.loss(batch, logits)
    assert rebuilt == pytest.approx(loss.item(), rel=1e-5)
    plain = build(tiny_store, "sim-soft", aux_weight=0)
    logits = plain(batch)
    assert plain.loss(batch, logits).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, batch.label).item()
    )


def test_sim_soft_keeps_the_highest_inner_products(tiny_store, batch):
    model = build(tiny_store, "sim-soft", k=4).eval()
    with torch.no_grad():
        index, taken = model.search(batch, None)
        scores = torch.einsum("btd,bd->bt", model.retrieval(batch.hist_items), model.retrieval(batch.target))
    for r in range(len(batch)):
        n = min(4, int(batch.hist_mask[r].sum()))
        expect = scores[r].masked_fill(~batch.hist_mask[r], -math.inf).topk(n).indices
        assert set(selected(index, taken, r)) == set(expect.tolist())


# ---- cost: what the cheap search units never build --------------------------------------
def long_batch(store, b=8, t=4000):
    gen = torch.Generator().manual_seed(0)
    hist = torch.randint(1, store.n_items + 1, (b, t), generator=gen)
    target = torch.randint(1, store.n_items + 1, (b,), generator=gen)
    out = hand_batch(target.tolist(), [[1]] * b)
    out.hist_items, out.hist_signal = hist, torch.randint(1, 6, (b, t), generator=gen)
    out.hist_mask = torch.ones(b, t, dtype=torch.bool)
    return out


@pytest.mark.parametrize("name", ["sim-hard", "eta"])
def test_integer_search_units_build_no_history_sized_float_tensor(tiny_store, name):
    model = build(tiny_store, name).eval()
    b = long_batch(tiny_store)
    if name == "eta":
        model.item_signatures()  # the per-item cache a server keeps
    with FloatTensorSizes() as sizes:
        model.search(b, None)
    assert sizes.largest < b.hist_items.numel()  # not one float per behaviour


@pytest.mark.parametrize("name", ["avgpool", "sdim"])
def test_pooling_models_build_no_history_by_dim_tensor(tiny_store, name):
    model = build(tiny_store, name).eval()
    b = long_batch(tiny_store)
    if name == "sdim":
        model.item_codes()
    with FloatTensorSizes() as sizes, torch.no_grad():
        model(b)
    assert sizes.largest < b.hist_items.numel() * model.cfg.dim // 4


def test_twin_gsu_builds_at_most_one_history_by_dim_tensor(tiny_store):
    model = build(tiny_store, "twin").eval()
    b = long_batch(tiny_store)

    class BigStorages(TorchDispatchMode):
        def __init__(self, limit):
            super().__init__()
            self.limit, self.storages = limit, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.limit:
                    self.storages.add(t.untyped_storage().data_ptr())
            return out

    with torch.no_grad():
        target = model.item_repr(b.target)
    with BigStorages(b.hist_items.numel() * model.cfg.dim // 4) as big:
        model.gsu_scores(b, target)
    assert len(big.storages) == 1  # the gathered projected item keys; the signal part is (B, T, h)


# ---- training: each baseline learns the tiny task ---------------------------------------
# batch 16: ~78 steps in the one epoch (at 64, ~20 steps leave valid AUC at 0.6-0.9 by seed)
FAST = [
    "train.lr=0.01",
    "train.batch_size=16",
    "train.eval_batch_size=256",
    "train.t_max=64",
    "model.dim=16",
    "train.threads=1",
]


@pytest.mark.parametrize("name", BASELINES)
def test_one_epoch_learns_the_tiny_task(tiny_store, tmp_path, name):
    extra = ["model.k=10"] if name in ("sim-hard", "sim-soft", "eta", "twin") else []
    cfg = load_config(None, [*FAST, "train.epochs=2", f"model.name={name}", *extra])
    metrics = Trainer(tiny_store.root, cfg, tmp_path / name, show_progress=False).fit()
    # measured over seeds 0-2 (2 epochs, with the history profile): valid and test AUC 0.96-1.0
    assert metrics["valid"]["auc"] > 0.9 and metrics["test"]["auc"] > 0.9, metrics
