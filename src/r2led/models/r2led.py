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
from torch.nn import functional as F

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.base import CtrModel, short_window
from r2led.models.layers import DinAttention, ItemTableCache, ModuleCache, TargetAttention, gather_behaviours, masked_softmax, per_unique_item
from r2led.models.retrieval import (
    batch_route_positions,
    disjoint_mixed_topk,
    index_history,
    mixed_topk,
    prefix_ranks,
    recency_keys,
    route_positions,
    route_quota,
    topk_keys,
)
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
    disjoint_routes: bool = Field(
        True, description="routes never share a behaviour: the finest route chooses first, coarser ones take what is left"
    )
    route_mass: bool = Field(
        True, description="route fusion adds each route's attention mass (log-sum-exp of its encoder's scores) to its logit"
    )
    sid_refine: bool = Field(True, description="off: SIDs in retrieval only; refinement sees ID embeddings (no gate)")
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

    def forward(self, target: torch.Tensor, routes: torch.Tensor, present: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
        # target (B, d), routes (B, R, d), present (B, R) bool: the route retrieved something
        if self.mode == "mean":
            w = present.float()
            return (routes * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        scores = (self.k(routes) @ self.q(target).unsqueeze(-1)).squeeze(-1) * self.scale  # (B, R)
        if mass is not None:
            scores = scores + mass.masked_fill(~present, 0.0)
        weights = masked_softmax(scores, present)  # (B, R)
        return (weights.unsqueeze(-1) * self.v(routes)).sum(1)  # (B, d)


def one_history(hist: torch.Tensor, mask: torch.Tensor) -> bool:
    """Every row is the same memory (an ``expand``-ed history): one request, many candidates."""
    return hist.shape[0] > 1 and hist.stride(0) == 0 and mask.stride(0) == 0


class R2LED(CtrModel):
    config_class = R2ledConfig
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
            rank, span = prefix_ranks(self.route_tokens)  # (N+1,), (N+1, R, 2): SID buckets as rank ranges
            self.register_buffer("route_rank", rank, persistent=False)
            self.register_buffer("route_span", span, persistent=False)
        # item ids in the order the serving index lists them: by SID-prefix rank, else by id
        order = torch.argsort(self.route_rank, stable=True) if self.use_sid else torch.arange(spec.n_items + 1)
        self.register_buffer("route_order", order, persistent=False)
        self.gate = SidGate(d, levels, enabled=cfg.gate) if self.use_sid and cfg.sid_refine else None
        encoder = (lambda: TargetAttention(d, cfg.heads)) if cfg.attention == "mha" else (lambda: DinAttention(d))
        self.route_attention = encoder()
        self.short_attention = encoder()
        self.route_fusion = RouteFusion(d, cfg.route_fusion)
        self.head = self.make_head(4)
        self._table_cache = ItemTableCache(self.simhash.signatures)
        self._tables_cache = ModuleCache(self._serving_tables, self.items, self.gate, self.signal)

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
        if one_history(hist, mask):
            return self.retrieve_routes_shared(target, hist[0], mask[0])
        return self._retrieve(target, hist, mask)

    def _retrieve(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch path: score every behaviour of ``hist`` (B, T). Returns indices into T.

        On CPU the compiled kernel (``batch_route_positions``); elsewhere (a GPU) whole-batch
        tensor operations (``mixed_topk``, ``disjoint_mixed_topk``), the reference it is
        tested against."""
        if hist.device.type != "cpu":
            return self._retrieve_tensors(target, hist, mask)
        quota = route_quota(self.k, self.cfg.rho) if self.use_sid else 0
        tokens = self.route_tokens if self.use_sid else None
        disjoint = self.use_sid and self.cfg.disjoint_routes
        return batch_route_positions(hist, mask, target, self.item_signatures(), tokens, self.k, quota, self.n_routes, disjoint)

    def _retrieve_tensors(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_retrieve`` in whole-batch tensor operations (any device)."""
        b, m = hist.shape
        sigs = self.item_signatures()
        flat = hist.reshape(-1)  # row gathers by index_select: several times faster than [...]
        hamming = SimHash.hamming(sigs.index_select(0, flat).view(b, m, -1), sigs[target].unsqueeze(1))  # (B, M)
        keys = recency_keys(self.simhash.bits - hamming, mask)  # (B, M) int64
        if not self.use_sid:
            return topk_keys(keys.unsqueeze(1), self.k)  # one collaborative route
        t_tok = self.route_tokens.index_select(0, target)  # (B, R)
        h_tok = self.route_tokens.index_select(0, flat).view(b, m, -1)  # (B, M, R)
        match = (h_tok == t_tok.unsqueeze(1)).transpose(1, 2) & mask.unsqueeze(1)  # (B, R, M)
        return (disjoint_mixed_topk if self.cfg.disjoint_routes else mixed_topk)(keys, match, self.k, self.cfg.rho)

    @torch.no_grad()
    def retrieve_routes_shared(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving path: C candidates ``target`` (C,) against ONE history ``hist``/``mask`` (T,).

        Equal to the batch path on C copies of the history (the same taken slots, holding the
        same positions). The history is indexed once by distinct item (U of them, ranked by SID
        prefix so that a route's matches are one run of them), each candidate scores the U
        items, and the routes are filled from the items' behaviours in key order
        (``route_positions``): per-candidate work follows U, not T.
        """
        t = hist.shape[-1]
        k, quota = self.k, route_quota(self.k, self.cfg.rho) if self.use_sid else 0
        index = index_history(hist, mask, self.route_rank if self.use_sid else None, self.route_order.cpu().numpy())  # U distinct items
        sigs = self.item_signatures()  # (N+1, words), per item
        items = torch.from_numpy(index.items).to(target.device)
        span = self.route_span.index_select(0, target) if self.use_sid else None  # (C, R, 2): the SID buckets, as rank ranges
        disjoint = self.use_sid and self.cfg.disjoint_routes
        return route_positions(sigs.index_select(0, target), sigs.index_select(0, items), index, t, k, quota, self.n_routes, span, disjoint)

    # ---- Bi-level Fusion Refinement -----------------------------------------------------
    def fused_item(self, items: torch.Tensor) -> torch.Tensor:
        """SID-level fusion, then the item's side features: (...,) -> (..., d)."""
        return per_unique_item(self._fused_item, items)

    def _fused_item(self, items: torch.Tensor) -> torch.Tensor:
        e = self.items.id(items)
        if self.gate is not None:
            e, _ = self.gate(e, self.items.prefixes(items))
        elif self.cfg.sid_features and self.items.levels:
            e = e + self.items.prefixes(items).mean(-2)
        return e + self.items.features(items)

    def gate_weights(self, items: torch.Tensor) -> torch.Tensor | None:
        """(..., L+1) gate weights over [ID, level 1..L] (None when the gate is off)."""
        if self.gate is None or self.gate.proj is None:
            return None
        return self.gate(self.items.id(items), self.items.prefixes(items))[1]

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.serving(batch):  # same function, per-item caches and per-request sharing
            return self.serve(batch)
        hist, signal, mask = batch.hist_items, batch.hist_signal, batch.hist_mask  # (B, T)
        index, taken = self.retrieve_routes(batch.target, hist, mask)  # (B, R, k)
        r_items = gather_behaviours(hist, index) * taken  # (B, R, k)
        r_signal = gather_behaviours(signal, index) * taken

        target = self.fused_item(batch.target)  # (B, d)
        r_kv = self.fused_item(r_items) + self.signal(r_signal)  # (B, R, k, d)
        n_routes = r_items.shape[1]
        query = target.unsqueeze(1).expand(-1, n_routes, -1)
        if self.cfg.route_mass:
            routes, mass = self.route_attention.forward_with_mass(query, r_kv, r_kv, taken)  # (B, R, d), (B, R)
        else:
            routes, mass = self.route_attention(query, r_kv, r_kv, taken), None
        z = self.route_fusion(target, routes, taken.any(-1), mass)  # (B, d)

        s_items, s_signal, s_mask = short_window(batch, self.cfg.short_len)  # (B, n_s)
        s_kv = self.fused_item(s_items) + self.signal(s_signal)  # (B, n_s, d)
        r_short = self.short_attention(target, s_kv, s_kv, s_mask)  # (B, d)

        x = torch.cat([self.user_repr(batch), target, z, r_short, target * z], dim=-1)
        return self.head(x)

    # ---- serving: one request = C candidates x ONE history ------------------------------
    def serving(self, batch: Batch) -> bool:
        """A serving request: eval mode, no gradient, every row the same history (a view)."""
        shared = one_history(batch.hist_items, batch.hist_mask) and batch.hist_signal.stride(0) == 0
        return shared and not self.training and not torch.is_grad_enabled()

    def serving_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-item cache a server keeps (SID-level fusion and side features depend on the
        item alone): (N+1, d+1) ``fused_item`` of every item and (S, d+1) the signal
        embeddings, with a trailing 1 and 0 (behaviour = item + signal ends in 1), the inputs
        of ``DinAttention.attend``. Kept in eval mode without autograd until a parameter or
        buffer they read changes; recomputed at every call otherwise."""
        return self._tables_cache(self.training)

    def _serving_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        items = self._fused_item(torch.arange(self.spec.n_items + 1, device=self.signal.weight.device))
        return torch.cat([items, items.new_ones(len(items), 1)], dim=1), F.pad(self.signal.weight, (0, 1))

    @torch.no_grad()
    def serve(self, batch: Batch) -> torch.Tensor:
        """``forward`` for a serving request (see ``serving``): the same function, within float
        rounding. Items come from ``serving_tables``, the history is read from its one row, and
        DIN's unit runs as a few large products (``DinAttention.attend``)."""
        hist, signal, mask = batch.hist_items[0], batch.hist_signal[0], batch.hist_mask[0]  # (T,)
        index, taken = self.retrieve_routes(batch.target, batch.hist_items, batch.hist_mask)  # (C, R, k) positions
        items, signals = self.serving_tables()
        target = items.index_select(0, batch.target)  # (C, d+1)
        t, flat = hist.shape[0], index.view(-1)
        start = max(t - self.cfg.short_len, 0)  # the last short_len behaviours, as short_window
        if t <= len(flat):  # every behaviour once, then the slots
            kv = items.index_select(0, hist) + signals.index_select(0, signal)  # (T, d+1)
            r_kv, s_kv = kv.index_select(0, flat), kv[start:]
        else:  # the slots' behaviours only
            r_kv = items.index_select(0, hist.index_select(0, flat)) + signals.index_select(0, signal.index_select(0, flat))
            s_kv = items.index_select(0, hist[start:]) + signals.index_select(0, signal[start:])  # (n_s, d+1)
        routes, mass = self._serve_attention(self.route_attention, target, r_kv.view(*index.shape, -1), taken, self.cfg.route_mass)
        rows = (len(target), *s_kv.shape)  # the short window: the same behaviours for every row
        r_short, _ = self._serve_attention(self.short_attention, target, s_kv.expand(rows), mask[start:].expand(rows[:2]))  # (C, d)
        target = target[:, :-1]
        z = self.route_fusion(target, routes, taken.any(-1), mass)  # (C, d)
        x = torch.cat([self.user_repr(batch), target, z, r_short, target * z], dim=-1)
        return self.head(x)

    @staticmethod
    def _serve_attention(
        attention: nn.Module, target: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, mass: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention`` of each candidate over its behaviours: target (C, d+1), kv (C, ..., n, d+1)
        with trailing 1s -> (C, ..., d), and with ``mass`` the attention mass (C, ...) as
        ``forward_with_mass`` (else None)."""
        if isinstance(attention, DinAttention):
            out = attention.attend(target, kv, mask, mass)
            return (out[0][..., :-1], out[1]) if mass else (out[..., :-1], None)
        query = target[:, :-1].reshape(len(target), *(1 for _ in kv.shape[2:-1]), -1).expand(*kv.shape[:-2], -1)
        if mass:
            return attention.forward_with_mass(query, kv[..., :-1], kv[..., :-1], mask)
        return attention(query, kv[..., :-1], kv[..., :-1], mask), None
