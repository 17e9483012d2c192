"""Shared building blocks: item and user embeddings, target attention, MLP head.

Every model uses these, so that a comparison differs only in what a model file does with them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from r2led.models.spec import DataSpec
from r2led.sid.table import SidTable


class KeptValue:
    """A value a server keeps (per-item signatures, per-item tables, serving matrices): computed
    on first use, kept until ``clear()``. Invalidation is explicit: ``CachingModule`` clears its
    kept values whenever its parameters may change through the module's API.

    ``value(fresh=True)`` computes without keeping (training, or autograd recording).
    """

    def __init__(self, fn):
        self.fn = fn
        self._value = None

    def __call__(self, fresh: bool = False):
        if fresh:
            return self.fn()
        value = self._value
        if value is None:
            value = self._value = self.fn()  # one assignment: a concurrent reader sees old or new
        return value

    def clear(self) -> None:
        self._value = None


class CachingModule(nn.Module):
    """A module whose ``KeptValue`` attributes (its own and its submodules') are cleared by
    ``invalidate_caches()``, which ``train(mode)`` / ``eval()``, ``load_state_dict`` and
    ``_apply`` (``.to()``, ``.float()``, ...) call. Every training step happens in train mode,
    where nothing is kept, so an optimizer step is covered by the ``eval()`` that follows it.
    An in-place write to a parameter in eval mode outside these (``with torch.no_grad():
    w.mul_(2)``) must call ``invalidate_caches()`` itself.

    ``cache_generation`` counts invalidations: per-user request state that derives data from
    the parameters (``r2led.models.user_state``) compares it to rebuild that data.
    """

    cache_generation: int = 0

    def invalidate_caches(self) -> None:
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, KeptValue):
                    value.clear()
            if isinstance(module, CachingModule):
                module.__dict__["cache_generation"] = module.cache_generation + 1

    def train(self, mode: bool = True):
        out = super().train(mode)
        self.invalidate_caches()
        return out

    def load_state_dict(self, *args, **kwargs):
        out = super().load_state_dict(*args, **kwargs)
        self.invalidate_caches()
        return out

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.invalidate_caches()
        return out


class ItemEmbeddings(nn.Module):
    """Per-item embeddings: collaborative ID ``e(v)``, item features, SID prefixes ``s_l(v)``.

    ``features(v)`` = category + mean of tag embeddings (the item's side features, e.g. genres).
    ``prefixes(v)`` = ``P_l[p_l(v)]`` for each SID level l (only when a SID table is given).
    """

    def __init__(self, spec: DataSpec, dim: int, sid: SidTable | None = None):
        super().__init__()
        self.dim = dim
        self.id = nn.Embedding(spec.n_items + 1, dim, padding_idx=0)
        self.category = nn.Embedding(spec.n_categories, dim, padding_idx=0)
        self.tags = nn.Embedding(spec.n_tags, dim, padding_idx=0)
        self.register_buffer("item_category", torch.as_tensor(spec.item_category, dtype=torch.long), persistent=False)
        self.register_buffer("item_tags", torch.as_tensor(spec.item_tags, dtype=torch.long), persistent=False)
        self.levels = 0
        if sid is not None:
            if sid.n_items != spec.n_items:
                raise ValueError(f"SID table covers {sid.n_items} items but the dataset has {spec.n_items}")
            self.levels = sid.levels
            self.register_buffer(
                "prefix_tokens", torch.as_tensor(sid.prefix_tokens, dtype=torch.long), persistent=False
            )
            self.prefix = nn.ModuleList(nn.Embedding(v, dim, padding_idx=0) for v in sid.vocab_sizes)
        for emb in self.embeddings():
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()

    def embeddings(self) -> list[nn.Embedding]:
        out = [self.id, self.category, self.tags]
        if self.levels:
            out.extend(self.prefix)
        return out

    def features(self, items: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., d): category + mean tag embedding."""
        tags = self.item_tags[items]  # (..., G)
        tag_mask = (tags > 0).unsqueeze(-1).float()
        tag_mean = (self.tags(tags) * tag_mask).sum(-2) / tag_mask.sum(-2).clamp_min(1.0)
        return self.category(self.item_category[items]) + tag_mean

    def prefixes(self, items: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., L, d): s_1(v) .. s_L(v)."""
        tokens = self.prefix_tokens[items]  # (..., L)
        return torch.stack([emb(tokens[..., level]) for level, emb in enumerate(self.prefix)], dim=-2)


class UserEmbeddings(nn.Module):
    """Categorical user features -> concatenated embeddings (B, F*d)."""

    def __init__(self, spec: DataSpec, dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in spec.user_feature_sizes)
        for emb in self.tables:
            nn.init.normal_(emb.weight, std=0.05)
        self.out_dim = dim * len(self.tables)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if not self.tables:
            return feats.new_zeros((feats.shape[0], 0), dtype=torch.float)
        return torch.cat([emb(feats[:, i]) for i, emb in enumerate(self.tables)], dim=-1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` ignoring masked positions; an all-masked row gives all zeros."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(weights, nan=0.0)


def attention_mass(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The log-sum-exp of attention logits over the present positions (-inf when none): how
    much attention a set of behaviours draws before the softmax normalises it away."""
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=dim)


def softmax_and_mass(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_softmax`` and ``attention_mass`` over the last dim from one pass of
    exponentials (the request path's encoders): weights (..., n) (all zeros where nothing is
    present) and the mass (...) (-inf there). The row's maximum is subtracted first (0 for a
    row with nothing present), without autograd: softmax and log-sum-exp do not depend on the
    shift, nor do their gradients. In place where nothing is recorded for autograd (measured
    20 % faster than ``logsumexp`` then ``exp`` on (100, 3, 20))."""
    masked = scores.masked_fill(~mask, float("-inf"))
    if masked.shape[-1] == 0:  # no behaviour at all
        return masked, scores.new_full(scores.shape[:-1], float("-inf"))
    top = masked.detach().amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # (..., 1)
    e = masked.sub_(top).exp_()  # 0 where masked
    total = e.sum(-1, keepdim=True)  # >= 1 where something is present (the maximum gives 1)
    scale = total.clamp_min(1e-30)
    weights = e.div_(scale) if not torch.is_grad_enabled() else e / scale
    return weights, (total.log() + top).squeeze(-1)


class TargetAttention(nn.Module):
    """Multi-head target attention: one query per row attends over that row's behaviours.

    query (..., d), keys/values (..., n, d), mask (..., n) -> (..., d); or one query per row
    shared by several sets of behaviours: query (B, d), keys/values (B, ..., n, d), mask
    (B, ..., n) -> (B, ..., d). A row with no behaviour (all masked) returns zeros.

    The projections are linear without bias, so they are applied on the query's side: the
    logits are ``k . (W_k^T W_q q)`` per head and the pooled value ``W_v (sum_n w_n v_n)``;
    the same function as projecting every behaviour, with products per row instead of per
    behaviour (``project`` / ``attend`` project behaviours, which a server keeps per item).
    """

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Per-head attention logits before the softmax: (..., d), (..., n, d) -> (..., n, h)
        (or a query (B, d) shared over keys (B, ..., n, d))."""
        h, hd = self.heads, self.head_dim
        d = keys.shape[-1]
        q = self.q(query.reshape(-1, d))  # (M, d): one per query row
        slots = math.prod(keys.shape[query.dim() - 1 : -1])  # S: behaviours per query row
        # u_h = W_k,h^T q_h / sqrt(hd): each head's query mapped back onto the behaviours' space
        u = torch.bmm(q.view(-1, h, hd).transpose(0, 1), self.k.weight.view(h, hd, d)).transpose(0, 1)  # (M, h, d)
        logits = torch.bmm(keys.reshape(len(q), slots, d), u.transpose(1, 2))  # (M, S, h)
        return logits.view(*keys.shape[:-1], h) / math.sqrt(hd)  # (..., n, h)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self._pool(masked_softmax(self.scores(query, keys), mask.unsqueeze(-1), dim=-2), values)

    def forward_with_mass(self, query, keys, values, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and its ``attention_mass`` (the mean over heads): (..., d), (...)."""
        scores = self.scores(query, keys)  # (..., n, h)
        weights = masked_softmax(scores, mask.unsqueeze(-1), dim=-2)
        return self._pool(weights, values), attention_mass(scores, mask.unsqueeze(-1), dim=-2).mean(-1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``[W_k x, W_v x]`` (..., 2d): the behaviour side, linear, so a server keeps it per
        item (and per signal value) and adds the parts (``attend``)."""
        return torch.cat([self.k(x), self.v(x)], dim=-1)

    def attend(
        self, query: torch.Tensor, projected: torch.Tensor, mask: torch.Tensor, mass: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` (and with ``mass`` the mass of ``forward_with_mass``, else None) for one
        query per row on behaviours already projected (``project``): query (C, d); projected
        (C, ..., n, 2d), or (n, 2d) shared by every row; mask (C, ..., n) or (n,)
        -> (C, ..., d), (C, ...). The same function, float rounding aside."""
        h, hd = self.heads, self.head_dim
        d = h * hd
        c = len(query)
        q = self.q(query).view(c, h, hd) / math.sqrt(hd)  # (C, h, hd)
        keys, values = projected[..., :d], projected[..., d:]  # views
        if projected.dim() == 2:  # shared behaviours: (n, 2d)
            n, lead = len(projected), ()
            scores = torch.einsum("chx,nhx->chn", q, keys.view(n, h, hd))  # (C, h, n)
            mask = mask.expand(c, n)
        else:
            *lead, n, _ = projected.shape[1:]
            lead_ones = (1,) * len(lead)
            scores = (keys.view(c, *lead, n, h, hd) * q.view(c, *lead_ones, 1, h, hd)).sum(-1)  # (C, ..., n, h)
            scores = scores.transpose(-1, -2).contiguous()  # (C, ..., h, n): softmax over contiguous rows
        present = mask.unsqueeze(-2)  # (C, ..., 1, n)
        weights, lse = softmax_and_mass(scores, present)  # (C, ..., h, n), (C, ..., h)
        if projected.dim() == 2:
            pooled = torch.einsum("chn,nhx->chx", weights, values.view(n, h, hd))  # (C, h, hd)
        else:  # all heads against all value columns in one product, then each head's own block
            pooled = torch.bmm(weights.view(-1, h, n), values.reshape(-1, n, d)).view(-1, h, h, hd)
            pooled = pooled.diagonal(dim1=1, dim2=2).transpose(1, 2)  # (C ..., h, hd)
        out = self.out(pooled.reshape(c, *lead, d))
        return out, (lse.mean(-1) if mass else None)

    def _pool(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """weights (..., n, h), values (..., n, d) -> (..., d): per head W_v,h (sum_n w_n v_n)."""
        *lead, n, d = values.shape
        h, hd = self.heads, self.head_dim
        mixed = torch.bmm(weights.reshape(-1, n, h).transpose(1, 2), values.reshape(-1, n, d))  # (G, h, d)
        w_v = self.v.weight.view(h, hd, d)
        pooled = torch.bmm(mixed.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1)  # (G, h, hd)
        return self.out(pooled.reshape(*lead, d))


class _PReLU(torch.autograd.Function):
    """PReLU with one shared slope, as leaky ReLU kernels: the same values as ``F.prelu``,
    with a backward pass several times cheaper than torch's CPU ``prelu`` backward (which
    builds a full-size tensor for the slope's gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        slope = float(weight)  # (1,) parameter -> its value
        ctx.save_for_backward(x)
        ctx.slope = slope
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (x,) = ctx.saved_tensors
        grad_x = torch.ops.aten.leaky_relu_backward(grad, x, ctx.slope, False)
        grad_slope = torch.dot(grad.reshape(-1), x.clamp_max(0).reshape(-1)).reshape(1)  # sum over x <= 0 of g x
        return grad_x, grad_slope


def run_unit(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, with every single-slope ``nn.PReLU`` through ``_PReLU`` (same values)."""
    for layer in layers:
        x = _PReLU.apply(x, layer.weight) if isinstance(layer, nn.PReLU) and layer.num_parameters == 1 else layer(x)
    return x


class DinAttention(CachingModule):
    """DIN's local activation unit: an MLP scores ``[q, k, q-k, q*k]`` per behaviour.

    Weights are softmax-normalised over the behaviours (DIN's paper leaves them unnormalised;
    over lifelong lengths unnormalised sums grow with T, so every model here normalises).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32)):
        super().__init__()
        layers: list[nn.Module] = []
        width = 4 * dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.PReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.unit = nn.Sequential(*layers)
        self._serving = KeptValue(self.serving_weights)
        self._slopes = KeptValue(lambda: [float(m.weight) for m in self.unit if isinstance(m, nn.PReLU)])

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(..., d), (..., n, d) -> (..., n) activation-unit logits (or a query (B, d) shared
        over keys (B, ..., n, d)).

        The first layer on ``[q, k, q-k, q*k]`` is ``q (W_q + W_d) + b + k A(q)`` with the
        row's matrix ``A(q) = (W_k - W_d)^T + diag(q) W_p^T`` (d, h1): the same function as
        one batched product per query row, with no (..., n, 4d) concatenation and no q * k.
        """
        first = self.unit[0]
        w_q, w_k, w_d, w_p = first.weight.chunk(4, dim=1)  # each (h1, d)
        d = keys.shape[-1]
        q = query.reshape(-1, d)  # (M, d): one per query row
        slots = math.prod(keys.shape[query.dim() - 1 : -1])  # S: behaviours per query row
        a = torch.addcmul((w_k - w_d).t(), q.unsqueeze(-1), w_p.t())  # (M, d, h1)
        per_query = F.linear(q, w_q + w_d, first.bias).unsqueeze(1)  # (M, 1, h1)
        hidden = torch.baddbmm(per_query, keys.reshape(len(q), slots, d), a)  # (M, S, h1)
        return run_unit(self.unit[1:], hidden).view(keys.shape[:-1])  # (..., n)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        weights = masked_softmax(self.scores(query, keys), mask)  # (..., n)
        return (weights.unsqueeze(-1) * values).sum(-2)

    def forward_with_mass(self, query, keys, values, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and its ``attention_mass``: (..., d), (...)."""
        scores = self.scores(query, keys)  # (..., n)
        return (masked_softmax(scores, mask).unsqueeze(-1) * values).sum(-2), attention_mass(scores, mask)

    def serving_weights(self) -> list[torch.Tensor]:
        """The unit as plain matrix products, for inputs with a trailing 1 (see ``attend``).

        Returns [W_p^T, B, Q, W_2^T, b_2, ..., W_L^T, b_L]. A row's first layer is the
        (d+1, h_1) matrix ``A(q)``: row j < d is ``q_j W_p^T[j] + B[j]`` (the (q * k) W_p
        term, and k (W_k - W_d) from B), row d (the key's trailing 1) is ``[q, 1] @ Q``:
        q (W_q + W_d) plus the bias, so that ``[k, 1] @ A(q)`` = the first layer on
        ``[q, k, q-k, q*k]``. Built per row from these pieces in O(d h_1), with no
        (d+1) x (d+1) h_1 product; the further layers are ``addmm`` on their own widths.
        """
        linears = [m for m in self.unit if isinstance(m, nn.Linear)]
        first = linears[0]
        h, d = first.out_features, first.in_features // 4
        w_q, w_k, w_d, w_p = first.weight.chunk(4, dim=1)  # each (h, d)
        w_pt = first.weight.new_zeros(d + 1, h)  # row d zero: A(q) puts [q, 1] @ Q there
        w_pt[:d] = w_p.t()
        keys = first.weight.new_zeros(d + 1, h)
        keys[:d] = (w_k - w_d).t()  # k (W_k - W_d)
        query = torch.cat([(w_q + w_d).t(), first.bias.unsqueeze(0)])  # (d+1, h): [q, 1] @ it, row d of A(q)
        mats = [w_pt, keys, query]
        for layer in linears[1:]:
            mats += [layer.weight.t().contiguous(), layer.bias]
        return mats

    def first_layers(self, query: torch.Tensor) -> torch.Tensor:
        """``A(q)`` (C, d+1, h_1) for queries with a trailing 1 (C, d+1) (``serving_weights``)."""
        w_pt, keys, q_part, *_ = self._serving(fresh=self.training or torch.is_grad_enabled())
        a = torch.addcmul(keys, query.unsqueeze(-1), w_pt)  # (C, d+1, h1); row d: 0 so far
        a[:, -1] = query @ q_part  # (C, h1)
        return a

    def attend(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, mass: bool = False):
        """``forward(query, keys, keys, mask)`` for one query per row, broadcast over the middle
        dims, on inputs with a trailing 1: query (C, d+1), keys (C, ..., n, d+1), also the
        values; mask (C, ..., n) -> (C, ..., d+1), the trailing column the weights' sum.
        ``mass``: also the log-sum-exp of the logits over the present behaviours (C, ...),
        -inf where none is.

        The same function (float rounding aside) as one matrix product per layer, with the
        matrices of ``serving_weights`` (kept in eval mode without autograd until
        ``invalidate_caches``): ``A(q)`` for every row at once, then one batched product for
        the whole first layer, one product for each further layer; few and large operations.
        """
        c, *lead, n, d1 = keys.shape
        if n == 0:  # no behaviour: as an all-masked row
            out = query.new_zeros(c, *lead, d1)
            return (out, query.new_full((c, *lead), float("-inf"))) if mass else out
        recorded = self.training or torch.is_grad_enabled()
        rest = self._serving(fresh=recorded)[3:]
        x = torch.bmm(keys.reshape(c, -1, d1), self.first_layers(query))  # (C, S, h1)
        x = x.view(-1, x.shape[-1])  # (C S, h1)
        acts = [m for m in self.unit if isinstance(m, nn.PReLU)]
        for act, slope, w, b in zip(acts, self._slopes(fresh=recorded), rest[::2], rest[1::2], strict=True):
            # each layer's output is this call's own: the activation in place unless autograd records
            x = torch.addmm(b, act(x) if recorded else F.leaky_relu_(x, slope), w)  # (C S, h_next)
        weights, lse = softmax_and_mass(x.view(mask.shape), mask)  # (C, ..., n), (C, ...)
        groups = len(x) // n
        out = torch.bmm(weights.view(groups, 1, n), keys.reshape(groups, n, d1)).view(c, *lead, d1)
        return (out, lse) if mass else out


class MLP(nn.Module):
    """The prediction head: hidden layers with ReLU (and dropout), then one logit."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = size
        layers.append(nn.Linear(in_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def per_unique_item(fn, items: torch.Tensor) -> torch.Tensor:
    """Apply an item-wise embedding function once per distinct item, then gather.

    A batch names far fewer distinct items than behaviour slots (B x k x R), so the gate,
    side features and SID prefixes are computed per item, not per slot; gradients still flow.
    items (...,) -> (..., d)
    """
    uniq, inverse = torch.unique(items, return_inverse=True)
    table = fn(uniq)  # (U, ...)
    return table.index_select(0, inverse.reshape(-1)).reshape(*inverse.shape, *table.shape[1:])


def weighted_sum_by_item(fn, items: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t weights[b, t] * fn(items[b, t])`` without building the (B, T, d) tensor.

    ``fn`` runs once per distinct item (as in ``per_unique_item``); the weighted sum is an
    ``embedding_bag`` over those rows, so memory is O(B T + U d) rather than O(B T d).
    Gradients flow to ``fn``'s parameters and to ``weights``.
    items (B, T) long, weights (B, T) float -> (B, d)
    """
    uniq, inverse = torch.unique(items, return_inverse=True)
    table = fn(uniq)  # (U, d)
    if items.shape[-1] == 0:  # every history in the batch is empty
        return table.new_zeros(items.shape[0], table.shape[-1])
    return F.embedding_bag(inverse, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def gather_behaviours(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, T) gathered at index (B, ...) -> (B, ...)."""
    b = values.shape[0]
    return torch.gather(values, 1, index.reshape(b, -1)).reshape(index.shape)


def seeded_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A fixed random matrix that does not depend on (or disturb) the global torch RNG."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
