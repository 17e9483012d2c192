"""R2LED: Multi-route Mixed Retrieval, then Bi-level Fusion Refinement (method.md).

Retrieval (no parameters of its own, no gradient):
    route l = 1..R takes k behaviours: up to ceil(rho k) whose level-l SID prefix matches the
    target's (semantic view), best SimHash similarity first, then the highest-similarity rest
    (collaborative view); ties go to the more recent behaviour. Plus the last n_s behaviours.
Refinement:
    SID-level fusion   e~(v) = sum_j g_j(v) [e(v); s_1(v); ...; s_L(v)]_j,  g = softmax(W_g x_v)
    per-route encoding r_l  = Attention(e~(t), e~(h) + side(h) over route l)  (DIN's unit, or multi-head)
    route-level fusion z    = softmax_l((W_q e~(t)) . (W_k r_l)) W_v r_l
    head               MLP([user; e~(t); z; r_s; e~(t) * z])

Every switch, with its default and range, is tabled in docs/method.md ("Every setting"),
generated from ``R2ledConfig`` by ``r2led docs settings``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from r2led.config import HashBits, ModelConfig
from r2led.data.batches import Batch
from r2led.models.base import CtrModel, short_window, state_history
from r2led.models.layers import (
    DinAttention,
    KeptValue,
    TargetAttention,
    gather_behaviours,
    masked_softmax,
    per_unique_item,
)
from r2led.models.retrieval import (
    batch_route_positions,
    disjoint_mixed_topk,
    mixed_topk,
    prefix_ranks,
    recency_keys,
    route_quota,
    topk_keys,
)
from r2led.models.simhash import SimHash
from r2led.models.user_state import SignatureIndex, UserState


class R2ledConfig(ModelConfig):
    """R2LED's settings (tabled in docs/method.md, generated from this class)."""

    name: Literal["r2led"] = "r2led"
    k: int = Field(20, ge=1, le=100_000, description="behaviours retrieved per route")
    rho: float = Field(0.75, ge=0.0, le=1.0, description="mix ratio: share of a route's slots for SID-prefix matches")
    routes: int | None = Field(
        None, ge=1, le=64, description="number of routes R (default: one per SID level); the finest R levels"
    )
    hash_bits: HashBits = Field(64, description="SimHash signature bits m (multiple of 64)")
    # on/off switches are booleans: YAML reads `--set model.gate=off` as false.
    gate: bool = Field(True, description="off: e~ = e + mean_l s_l")
    route_fusion: Literal["attention", "mean"] = Field("attention", description="mean: no cross-attention over routes")
    disjoint_routes: bool = Field(
        True,
        description="routes never share a behaviour: the finest route chooses first, coarser ones take what is left",
    )
    route_mass: bool = Field(
        True,
        description="route fusion adds each route's attention mass (log-sum-exp of its encoder's scores) to its logit",
    )
    sid_refine: bool = Field(True, description="off: SIDs in retrieval only; refinement sees ID embeddings (no gate)")
    sid: bool = Field(True, description="off: no SIDs anywhere (one collaborative route of R*k, ETA-like)")
    attention: Literal["mha", "din"] = Field(
        "din", description="per-route encoder: multi-head dot-product target attention, or DIN's activation unit"
    )
    unit: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [64, 32],
        min_length=1,
        max_length=4,
        description="hidden sizes of DIN's activation unit (attention=din), in the route and short encoders",
    )


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

    def forward(
        self, target: torch.Tensor, routes: torch.Tensor, present: torch.Tensor, mass: torch.Tensor | None = None
    ) -> torch.Tensor:
        # target (B, d), routes (B, R, d), present (B, R) bool: the route retrieved something
        if self.mode == "mean":
            w = present.float()
            return (routes * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        scores = (self.k(routes) @ self.q(target).unsqueeze(-1)).squeeze(-1) * self.scale  # (B, R)
        if mass is not None:
            scores = scores + mass.masked_fill(~present, 0.0)
        weights = masked_softmax(scores, present)  # (B, R)
        return (weights.unsqueeze(-1) * self.v(routes)).sum(1)  # (B, d)


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
            self.register_buffer(
                "route_tokens", self.items.prefix_tokens[:, self.route_levels].contiguous(), persistent=False
            )
            rank, span = prefix_ranks(self.route_tokens)  # (N+1,), (N+1, R, 2): SID buckets as rank ranges
            self.register_buffer("route_rank", rank, persistent=False)
            self.register_buffer("route_span", span, persistent=False)
        self.gate = SidGate(d, levels, enabled=cfg.gate) if self.use_sid and cfg.sid_refine else None
        unit = tuple(cfg.unit)
        encoder = (lambda: TargetAttention(d, cfg.heads)) if cfg.attention == "mha" else (lambda: DinAttention(d, unit))
        self.route_attention = encoder()
        self.short_attention = encoder()
        self.route_fusion = RouteFusion(d, cfg.route_fusion)
        self.head = self.make_head(4)
        self._signatures = KeptValue(lambda: self.simhash.signatures(self.items.id.weight))  # (N+1, W) int64
        self._signature_words = KeptValue(
            lambda: np.ascontiguousarray(self.item_signatures().cpu().numpy()).view(np.uint64)
        )
        self._rank = KeptValue(lambda: self.route_rank.cpu().numpy() if self.use_sid else None)
        self._span = KeptValue(lambda: self.route_span.cpu().numpy() if self.use_sid else None)
        self._tables = KeptValue(self._serving_tables)
        # Serving switch, not a trained setting: 0 scores every distinct item for the collaborative
        # view (exact, the batch path's result); b > 0 only the items sharing one of b signature
        # bands with the candidate, besides its semantic run (``SignatureBands``; approximate).
        self.collaborative_bands = 0

    @classmethod
    def wants_sid(cls, cfg: R2ledConfig) -> bool:
        return cfg.sid or cfg.sid_features

    # ---- Multi-route Mixed Retrieval ----------------------------------------------------
    def item_signatures(self) -> torch.Tensor:
        """(N+1, words) SimHash signatures of every item's ID embedding.

        Recomputed while training (embeddings move every step); kept in eval mode until
        ``invalidate_caches`` (``eval()``, ``load_state_dict``...), as a server keeps them per item.
        """
        return self._signatures(fresh=self.training)

    @torch.no_grad()
    def retrieve_routes(
        self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch path's retrieval: positions of each route's k behaviours (B, R, k) into
        each row's history ``hist`` (B, T), and whether a slot is filled."""
        return self._retrieve(target, hist, mask)

    def _retrieve(
        self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch path: score every behaviour of ``hist`` (B, T). Returns indices into T.

        On CPU the compiled kernel (``batch_route_positions``); elsewhere (a GPU) whole-batch
        tensor operations (``mixed_topk``, ``disjoint_mixed_topk``), the reference it is
        tested against."""
        if hist.device.type != "cpu":
            return self._retrieve_tensors(target, hist, mask)
        quota = route_quota(self.k, self.cfg.rho) if self.use_sid else 0
        tokens = self.route_tokens if self.use_sid else None
        disjoint = self.use_sid and self.cfg.disjoint_routes
        return batch_route_positions(
            hist, mask, target, self.item_signatures(), tokens, self.k, quota, self.n_routes, disjoint
        )

    def _retrieve_tensors(
        self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
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

    def build_request_index(self, state: UserState) -> SignatureIndex:
        """The user's history by distinct item (chains of positions), ranked by SID prefix so
        that a route's matches are one run, with the items' signatures (``SignatureIndex``)."""
        return SignatureIndex(state.items, self._rank())

    def request_routes(self, state: UserState, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The request path's retrieval: positions (C, R, k) into the state's history and
        taken (C, R, k), equal to ``retrieve_routes`` on C rows holding that history. Per
        candidate the work follows the history's distinct items U, not its length T."""
        index = state.index_for(self)
        words = self._signature_words(fresh=self.training)  # (N+1, W) uint64
        cands = candidates.cpu().numpy()
        quota = route_quota(self.k, self.cfg.rho) if self.use_sid else 0
        span = self._span()[cands] if self.use_sid else None  # (C, R, 2): the SID buckets, as rank ranges
        disjoint = self.use_sid and self.cfg.disjoint_routes
        gen = self.cache_generation if not self.training else -2
        out, n = index.routes(
            words[cands],
            words,
            gen,
            span,
            self.k,
            quota,
            self.n_routes,
            disjoint,
            state.start,
            self.collaborative_bands,
        )
        return torch.from_numpy(out), torch.from_numpy(np.arange(self.k) < n[..., None])

    # ---- Bi-level Fusion Refinement -----------------------------------------------------
    def fused_item(self, items: torch.Tensor) -> torch.Tensor:
        """SID-level fusion, then the item's side features: (...,) -> (..., d)."""
        return per_unique_item(self._fused_item, items)

    def _item_repr(self, items: torch.Tensor) -> torch.Tensor:
        """R2LED's item representation is its fused item, so ``CtrModel``'s per-item tables
        (``_item_table``, ``behaviour_rows``) keep fused items."""
        return self._fused_item(items)

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
        hist, signal, mask = batch.hist_items, batch.hist_signal, batch.hist_mask  # (B, T)
        index, taken = self.retrieve_routes(batch.target, hist, mask)  # (B, R, k)
        r_items = gather_behaviours(hist, index) * taken  # (B, R, k)
        r_signal = gather_behaviours(signal, index) * taken

        s_items, s_signal, s_mask = short_window(batch, self.cfg.short_len)  # (B, n_s)

        # SID-level fusion once over every item the batch reads (one pass per distinct item)
        items = torch.cat([batch.target, r_items.reshape(-1), s_items.reshape(-1)])  # (B + B R k + B n_s,)
        target, r_fused, s_fused = self.fused_item(items).split([len(batch.target), r_items.numel(), s_items.numel()])
        r_kv = r_fused.view(*r_items.shape, target.shape[-1]) + self.signal(r_signal)  # (B, R, k, d)
        # one query per row, shared by its R routes
        if self.cfg.route_mass:
            routes, mass = self.route_attention.forward_with_mass(target, r_kv, r_kv, taken)  # (B, R, d), (B, R)
        else:
            routes, mass = self.route_attention(target, r_kv, r_kv, taken), None
        z = self.route_fusion(target, routes, taken.any(-1), mass)  # (B, d)

        s_kv = s_fused.view(*s_items.shape, target.shape[-1]) + self.signal(s_signal)  # (B, n_s, d)
        r_short = self.short_attention(target, s_kv, s_kv, s_mask)  # (B, d)

        x = torch.cat([self.user_repr(batch), target, z, r_short, target * z], dim=-1)
        return self.head(x)

    # ---- the request path: one user state x C candidates ---------------------------------
    def serving_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-item tables a server keeps (SID-level fusion and side features depend on the
        item alone): (N+1, d+1) ``fused_item`` of every item and (S, d+1) the signal
        embeddings, with a trailing 1 and 0 (behaviour = item + signal ends in 1), the inputs
        of ``DinAttention.attend``. Kept in eval mode without autograd until
        ``invalidate_caches``; recomputed at every call otherwise."""
        return self._tables(fresh=self.training or torch.is_grad_enabled())

    def _serving_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        items = self._item_table(fresh=self.training or torch.is_grad_enabled())  # (N+1, d) fused items
        return torch.cat([items, items.new_ones(len(items), 1)], dim=1), F.pad(self.signal.weight, (0, 1))

    def request_behaviours(self, name: str, items: torch.Tensor, signals: torch.Tensor) -> torch.Tensor:
        """The rows the encoder ``name`` (``"route_attention"`` or ``"short_attention"``) reads
        for behaviours (items, signals) (n,), gathered from per-item and per-signal tables whose
        rows add up to the behaviour's: DIN's unit, the ``serving_tables`` (n, d+1); multi-head
        attention, their key and value projections (``CtrModel.behaviour_rows``, (n, 2d))."""
        if not isinstance(getattr(self, name), DinAttention):
            return self.behaviour_rows(name, items, signals)
        item_rows, signal_rows = self.serving_tables()
        return item_rows.index_select(0, items) + signal_rows.index_select(0, signals)

    def _score_request(self, state: UserState, index, candidates: torch.Tensor) -> torch.Tensor:
        """``forward`` for one user state x C candidates: the same function, within float
        rounding. Retrieval from the state's index (``request_routes``), items from
        ``serving_tables`` (and, for multi-head attention, their projections), only the slots'
        behaviours gathered, the short window's once for every row, each encoder as a few
        large products, the user part computed once."""
        index, taken = self.request_routes(state, candidates)  # (C, R, k) positions
        items, _ = self.serving_tables()
        target = items.index_select(0, candidates)  # (C, d+1)
        hist, signal = state_history(state)  # (T,) views
        flat = index.view(-1)
        r_rows = self.request_behaviours("route_attention", hist.index_select(0, flat), signal.index_select(0, flat))
        routes, mass = self._serve_attention(
            self.route_attention, target, r_rows.view(*index.shape, -1), taken, self.cfg.route_mass
        )  # (C, R, d), (C, R)
        s_items, s_signal = self.request_short(state, self.cfg.short_len)  # (n_s,)
        s_rows = self.request_behaviours("short_attention", s_items, s_signal)  # (n_s, .): shared by the rows
        r_short, _ = self._serve_attention(
            self.short_attention, target, s_rows, torch.ones(len(s_items), dtype=torch.bool)
        )  # (C, d)
        target = target[:, :-1]
        z = self.route_fusion(target, routes, taken.any(-1), mass)  # (C, d)
        x = torch.cat([self.request_user_repr(state, len(target)), target, z, r_short, target * z], dim=-1)
        return self.head(x)

    @staticmethod
    def _serve_attention(
        attention: nn.Module, target: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, mass: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention`` of each candidate over its behaviours' rows (``request_behaviours``):
        target (C, d+1) with its trailing 1; rows (C, ..., n, .) with mask (C, ..., n), or
        (n, .) with mask (n,) shared by every row -> (C, ..., d), and with ``mass`` the
        attention mass (C, ...) as ``forward_with_mass`` (else None)."""
        if isinstance(attention, DinAttention):
            if rows.dim() == 2:  # shared: DIN's unit is per (candidate, behaviour) pair anyway
                rows, mask = rows.expand(len(target), *rows.shape), mask.expand(len(target), *mask.shape)
            out = attention.attend(target, rows, mask, mass)
            return (out[0][..., :-1], out[1]) if mass else (out[..., :-1], None)
        return attention.attend(target[:, :-1], rows, mask, mass)
