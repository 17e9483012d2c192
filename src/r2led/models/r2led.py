"""R2LED: Multi-route Mixed Retrieval, then Bi-level Fusion Refinement (method.md).

Retrieval (no parameters of its own, no gradient):
    route l = 1..R takes k behaviours: up to ceil(rho k) whose level-l SID prefix matches the
    target's (semantic view), best SimHash similarity first, then the highest-similarity rest
    (collaborative view); ties go to the more recent behaviour. Plus the last n_s behaviours.
Refinement:
    SID-level fusion   e~(v) = sum_j g_j(v) [e(v); s_1(v); ...; s_L(v)]_j,  g = softmax(W_g x_v)
    per-route encoding r_l  = TargetAttention(e~(t), e~(h) + side(h) over route l)
    route-level fusion z    = softmax_l((W_q e~(t)) . (W_k r_l)) W_v r_l
    head               MLP([user; e~(t); z; r_s; e~(t) * z])
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.base import CtrModel, short_window
from r2led.models.layers import DinAttention, ItemTableCache, TargetAttention, gather_behaviours, masked_softmax, per_unique_item
from r2led.models.retrieval import index_history, mixed_topk, recency_keys, route_quota, shortlist, topk_keys
from r2led.models.simhash import SimHash


class R2ledConfig(ModelConfig):
    name: Literal["r2led"] = "r2led"
    k: int = Field(20, ge=1, description="behaviours retrieved per route")
    rho: float = Field(0.75, ge=0.0, le=1.0, description="mix ratio: share of a route's slots for SID-prefix matches")
    routes: int | None = Field(None, ge=1, description="number of routes R (default: one per SID level); the finest R levels")
    hash_bits: int = Field(64, ge=64, description="SimHash signature bits m (multiple of 64)")
    # on/off switches are booleans: YAML reads `--set model.gate=off` as false.
    gate: bool = Field(True, description="off: e~ = e + mean_l s_l")
    route_fusion: Literal["attention", "mean"] = Field("attention", description="mean: no cross-attention over routes")
    sid: bool = Field(True, description="off: no SIDs anywhere (one collaborative route of R*k, ETA-like)")
    attention: Literal["mha", "din"] = Field(
        "din", description="per-route encoder: multi-head dot-product target attention, or DIN's activation unit"
    )

    @model_validator(mode="after")
    def _hash_bits(self) -> "R2ledConfig":
        if self.hash_bits % 64:
            raise ValueError(f"hash_bits must be a multiple of 64, got {self.hash_bits}")
        return self


class SidGate(nn.Module):
    """SID-level fusion: an item-wise softmax gate over [e; s_1; ...; s_L] -> (..., d)."""

    def __init__(self, dim: int, levels: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.proj = nn.Linear((levels + 1) * dim, levels + 1) if enabled else None

    def forward(self, e: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # e: (..., d), s: (..., L, d)
        if not self.enabled:
            return e + s.mean(-2), None
        views = torch.cat([e.unsqueeze(-2), s], dim=-2)  # (..., L+1, d)
        gate = torch.softmax(self.proj(views.flatten(-2)), dim=-1)  # (..., L+1)
        return (gate.unsqueeze(-1) * views).sum(-2), gate


class RouteFusion(nn.Module):
    """Route-level fusion: target-aware cross-attention over the R route vectors."""

    def __init__(self, dim: int, mode: str = "attention"):
        super().__init__()
        self.mode = mode
        if mode == "attention":
            self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.scale = dim**-0.5

    def forward(self, target: torch.Tensor, routes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        # target (B, d), routes (B, R, d), present (B, R) bool: the route retrieved something
        if self.mode == "mean":
            w = present.float()
            return (routes * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        scores = (self.k(routes) @ self.q(target).unsqueeze(-1)).squeeze(-1) * self.scale  # (B, R)
        weights = masked_softmax(scores, present)  # (B, R)
        return (weights.unsqueeze(-1) * self.v(routes)).sum(1)  # (B, d)


def one_history(hist: torch.Tensor, mask: torch.Tensor) -> bool:
    """Every row is the same memory (an ``expand``-ed history): one request, many candidates."""
    return hist.shape[0] > 1 and hist.stride(0) == 0 and mask.stride(0) == 0


class R2LED(CtrModel):
    config_class = R2ledConfig
    # A shared history takes the serving path when the batch path would score more than this
    # many (route, behaviour) pairs per candidate: the crossover measured on CPU, where the
    # serving path's fixed cost (~4 ms for 100 candidates) equals the batch path's (T ~ 500).
    SHARED_PATH_WORK = 1536

    def __init__(self, cfg: R2ledConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        d = cfg.dim
        self.use_sid = cfg.sid
        if self.use_sid and not self.items.levels:
            raise ValueError("R2LED with sid=on needs a SID table (build one with `r2led sid build`)")
        levels = self.items.levels if self.use_sid else 0
        self.n_routes = min(cfg.routes or levels, levels) if self.use_sid else 1
        # Route l matches on SID level route_levels[l] (0-based): the finest n_routes levels.
        self.route_levels = list(range(levels - self.n_routes, levels)) if self.use_sid else []
        # sid=off keeps the attention budget: one collaborative route of R*k (R defaults to 3).
        self.k = cfg.k if self.use_sid else cfg.k * (cfg.routes or 3)
        self.simhash = SimHash(d, cfg.hash_bits)
        if self.use_sid:  # (N+1, R): each item's prefix token at each route's level
            self.register_buffer("route_tokens", self.items.prefix_tokens[:, self.route_levels].contiguous(), persistent=False)
        self.gate = SidGate(d, levels, enabled=cfg.gate) if self.use_sid else None
        encoder = (lambda: TargetAttention(d, cfg.heads)) if cfg.attention == "mha" else (lambda: DinAttention(d))
        self.route_attention = encoder()
        self.short_attention = encoder()
        self.route_fusion = RouteFusion(d, cfg.route_fusion)
        self.head = self.make_head(4)
        self._table_cache = ItemTableCache(self.simhash.signatures)

    @classmethod
    def wants_sid(cls, cfg: R2ledConfig) -> bool:
        return cfg.sid or cfg.sid_features

    # ---- Multi-route Mixed Retrieval ----------------------------------------------------
    def item_signatures(self) -> torch.Tensor:
        """(N+1, words) SimHash signatures of every item's ID embedding.

        Recomputed while training (embeddings move every step); cached in eval mode until the
        embedding table changes, as a server caches them per item.
        """
        return self._table_cache(self.items.id.weight, self.training)

    @torch.no_grad()
    def retrieve_routes(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of each route's k behaviours (B, R, k) and whether a slot is filled.

        A serving request (B candidates, one history passed as an ``expand``-ed view, so every
        row is the same memory) takes ``retrieve_routes_shared``: same result, and the cost
        per candidate follows the history's distinct items, not its length.
        """
        if one_history(hist, mask) and hist.shape[1] * self.n_routes > self.SHARED_PATH_WORK:
            return self.retrieve_routes_shared(target, hist[0], mask[0])
        return self._retrieve(target, hist, mask)

    def _retrieve(
        self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor, position: torch.Tensor | None = None, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every column of ``hist`` (B, M); ``position``/``length`` place a shortlist's
        columns in the whole history (see ``recency_keys``). Returns indices into M."""
        b, m = hist.shape
        flat = hist.reshape(-1)  # row gathers by index_select: several times faster than [...]
        sigs = self.item_signatures()
        hamming = SimHash.hamming(sigs.index_select(0, flat).view(b, m, -1), sigs[target].unsqueeze(1))  # (B, M)
        keys = recency_keys(self.simhash.bits - hamming, mask, position, length)  # (B, M) int64
        if not self.use_sid:
            return topk_keys(keys.unsqueeze(1), self.k)  # one collaborative route
        t_tok = self.route_tokens.index_select(0, target)  # (B, R)
        h_tok = self.route_tokens.index_select(0, flat).view(b, m, -1)  # (B, M, R)
        match = (h_tok == t_tok.unsqueeze(1)).transpose(1, 2) & mask.unsqueeze(1)  # (B, R, M)
        return mixed_topk(keys, match, self.k, self.cfg.rho)

    @torch.no_grad()
    def retrieve_routes_shared(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving path: C candidates ``target`` (C,) against ONE history ``hist``/``mask`` (T,).

        Equal to the batch path on C copies of the history (the same taken slots, holding the
        same positions): the history is indexed once by distinct item (U of them), each
        candidate scores the U items, and the batch retrieval then runs on the short list of
        positions that can win (``shortlist``), with the keys they have in the whole history.
        """
        t = hist.shape[-1]
        quota = route_quota(self.k, self.cfg.rho) if self.use_sid else 0
        index = index_history(hist, mask, self.k + quota)  # U distinct items
        sigs = self.item_signatures()
        hamming = SimHash.pairwise_hamming(sigs[target], sigs[index.items])  # (C, U)
        # recency_keys at each item's most recent position, in place: (m - hamming) t + last
        item_keys = hamming.neg_().add_(self.simhash.bits).mul_(t).add_(index.last)  # (C, U)
        tokens = None, None
        if self.use_sid:  # the semantic view: each route's prefix tokens
            tokens = self.route_tokens.index_select(0, index.items), self.route_tokens.index_select(0, target)  # (U, R), (C, R)
        position = shortlist(item_keys, index, t, self.k, quota, *tokens)  # (C, M), -1 = none
        listed = position >= 0
        position = position.clamp_min(0)
        slot, taken = self._retrieve(target, hist[position], listed, position, t)  # (C, R, k) into M
        return gather_behaviours(position, slot), taken

    # ---- Bi-level Fusion Refinement -----------------------------------------------------
    def fused_item(self, items: torch.Tensor) -> torch.Tensor:
        """SID-level fusion, then the item's side features: (...,) -> (..., d)."""
        return per_unique_item(self._fused_item, items)

    def _fused_item(self, items: torch.Tensor) -> torch.Tensor:
        e = self.items.id(items)
        if self.use_sid:
            e, _ = self.gate(e, self.items.prefixes(items))
        elif self.cfg.sid_features and self.items.levels:
            e = e + self.items.prefixes(items).mean(-2)
        return e + self.items.features(items)

    def gate_weights(self, items: torch.Tensor) -> torch.Tensor | None:
        """(..., L+1) gate weights over [ID, level 1..L] (None when the gate is off)."""
        if not self.use_sid or self.gate.proj is None:
            return None
        return self.gate(self.items.id(items), self.items.prefixes(items))[1]

    def forward(self, batch: Batch) -> torch.Tensor:
        hist, signal, mask = batch.hist_items, batch.hist_signal, batch.hist_mask  # (B, T)
        index, taken = self.retrieve_routes(batch.target, hist, mask)  # (B, R, k)
        r_items = gather_behaviours(hist, index) * taken  # (B, R, k)
        r_signal = gather_behaviours(signal, index) * taken

        target = self.fused_item(batch.target)  # (B, d)
        r_kv = self.fused_item(r_items) + self.signal(r_signal)  # (B, R, k, d)
        n_routes = r_items.shape[1]
        routes = self.route_attention(target.unsqueeze(1).expand(-1, n_routes, -1), r_kv, r_kv, taken)  # (B, R, d)
        z = self.route_fusion(target, routes, taken.any(-1))  # (B, d)

        s_items, s_signal, s_mask = short_window(batch, self.cfg.short_len)  # (B, n_s)
        s_kv = self.fused_item(s_items) + self.signal(s_signal)  # (B, n_s, d)
        r_short = self.short_attention(target, s_kv, s_kv, s_mask)  # (B, d)

        x = torch.cat([self.user_repr(batch), target, z, r_short, target * z], dim=-1)
        return self.head(x)
