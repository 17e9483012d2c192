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
            self.register_buffer("prefix_tokens", torch.as_tensor(sid.prefix_tokens, dtype=torch.long), persistent=False)
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

    def tokens(self, items: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., L) prefix token ids."""
        return self.prefix_tokens[items]

    def prefixes(self, items: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., L, d): s_1(v) .. s_L(v)."""
        tokens = self.prefix_tokens[items]  # (..., L)
        return torch.stack([emb(tokens[..., l]) for l, emb in enumerate(self.prefix)], dim=-2)


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


class TargetAttention(nn.Module):
    """Multi-head target attention: one query per row attends over that row's behaviours.

    query (..., d), keys/values (..., n, d), mask (..., n) -> (..., d).
    A row with no behaviour (all masked) returns zeros.
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
        """Per-head attention logits before the softmax: (..., d), (..., n, d) -> (..., n, h)."""
        *lead, n, _ = keys.shape
        h, hd = self.heads, self.head_dim
        q = self.q(query).view(*lead, 1, h, hd)  # (..., 1, h, hd)
        k = self.k(keys).view(*lead, n, h, hd)  # (..., n, h, hd)
        return (q * k).sum(-1) / math.sqrt(hd)  # (..., n, h)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        *lead, n, d = keys.shape
        h, hd = self.heads, self.head_dim
        scores = self.scores(query, keys)  # (..., n, h)
        v = self.v(values).view(*lead, n, h, hd)
        weights = masked_softmax(scores, mask.unsqueeze(-1), dim=-2)  # (..., n, h)
        pooled = (weights.unsqueeze(-1) * v).sum(-3)  # (..., h, hd)
        return self.out(pooled.reshape(*lead, d))


class DinAttention(nn.Module):
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

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(..., d), (..., n, d) -> (..., n) activation-unit logits.

        The first layer on ``[q, k, q-k, q*k]`` is computed as ``q (W_q + W_d) + k (W_k - W_d)
        + (q*k) W_p``: the same function, with the query's part once per row instead of once
        per behaviour and no (..., n, 4d) concatenation.
        """
        first = self.unit[0]
        w_q, w_k, w_d, w_p = first.weight.chunk(4, dim=1)  # each (h1, d)
        per_query = F.linear(query, w_q + w_d, first.bias).unsqueeze(-2)  # (..., 1, h1)
        hidden = per_query + F.linear(keys, w_k - w_d) + F.linear(query.unsqueeze(-2) * keys, w_p)  # (..., n, h1)
        return self.unit[1:](hidden).squeeze(-1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = masked_softmax(self.scores(query, keys), mask)  # (..., n)
        return (weights.unsqueeze(-1) * values).sum(-2)


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


class ItemTableCache:
    """A per-item value derived from an embedding table (SimHash signatures, hash codes).

    Recomputed at every call while training (the table moves every step); in eval mode kept
    until the table changes, as a server keeps it per item.
    """

    def __init__(self, fn):
        self.fn = fn
        self._key: tuple[int, int] | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, weight: torch.Tensor, training: bool) -> torch.Tensor:
        if training:
            return self.fn(weight)
        key = (weight.data_ptr(), weight._version)
        if self._key != key:
            self._key, self._value = key, self.fn(weight)
        return self._value


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
