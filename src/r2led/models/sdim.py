"""SDIM (Cao et al., CIKM 2022): "Sampling is all you need" for long-sequence user interest.

No retrieval and no attention: behaviours are *sampled* by hash collision with the target.
    hashing     ``rounds`` hash functions, each ``bits_per_round`` random hyperplanes on the
                item ID embeddings: code_r(v) = the sign bits of v in round r, an integer
    collision   behaviour h collides with target t in round r iff code_r(h) == code_r(t)
                (all its bits agree: probability (1 - angle(h, t) / pi) ** bits_per_round,
                which makes the sampling an implicit, target-aware attention)
    interest    u = W ( mean_r  mean_{h collides in r} x_h ),  x_h = item(h) + signal(h)
                a round without a collision contributes zeros
    head        MLP([user; e(t); u; r_s; e(t) * u]), r_s the short route as in R2LED

Cost: the collisions are (B, T, rounds) integer comparisons. The pooled mean is a (B, T)
weight matrix ``w[b, t] = mean_r c[b, t, r] / n[b, r]`` applied with an ``embedding_bag``
over the batch's distinct items (``pooled_behaviours``), so no (B, T, d) tensor is built even
though every colliding behaviour's embedding enters the sum; gathering only the colliders
instead would need ragged per-row lists. Codes are kept per item in eval mode.
Serving keeps, per user, each round's buckets: the count and the embedding sum of the
behaviours with each code (``BucketIndex``), so a request reads one bucket per round.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.avgpool import pooled_behaviours
from r2led.models.base import CtrModel, short_route_head, short_window
from r2led.models.layers import KeptValue, TargetAttention, seeded_normal
from r2led.models.user_state import BucketIndex, UserState


class SdimConfig(ModelConfig):
    name: Literal["sdim"] = "sdim"
    rounds: int = Field(4, ge=1, le=1024, description="hash rounds (independent hash functions)")
    bits_per_round: int = Field(3, ge=1, le=62, description="random hyperplanes per round (bits of a code)")


class SDIM(CtrModel):
    config_class = SdimConfig

    def __init__(self, cfg: SdimConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        d = cfg.dim
        self.register_buffer("planes", seeded_normal((d, cfg.rounds * cfg.bits_per_round), seed=2022))
        self.register_buffer("powers", 2 ** torch.arange(cfg.bits_per_round, dtype=torch.int64), persistent=False)
        self.proj = nn.Linear(d, d)
        self.short_attention = TargetAttention(d, cfg.heads)
        self.head = self.make_head(4)
        self._codes = KeptValue(lambda: self.codes(self.items.id.weight))

    # ---- hash-based sampling ------------------------------------------------------------
    @torch.no_grad()
    def codes(self, emb: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., rounds) int64: each round's sign bits read as one integer."""
        bits = (emb.detach() @ self.planes > 0).long()  # (..., rounds * bits)
        bits = bits.view(*bits.shape[:-1], self.cfg.rounds, self.cfg.bits_per_round)
        return (bits * self.powers).sum(-1)

    def item_codes(self) -> torch.Tensor:
        """(N+1, rounds) codes of every item's ID embedding (kept in eval mode)."""
        return self._codes(fresh=self.training)

    @torch.no_grad()
    def collision_weights(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """w (B, T): behaviour t's share of the interest, mean over rounds of 1 / colliders."""
        codes = self.item_codes()
        collide = (codes[hist] == codes[target].unsqueeze(1)) & mask.unsqueeze(-1)  # (B, T, rounds)
        c = collide.float()
        per_round = c / c.sum(1, keepdim=True).clamp_min(1.0)  # (B, T, rounds): mean within a round
        return per_round.mean(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        target = self.item_repr(batch.target)  # (B, d)
        w = self.collision_weights(batch.target, batch.hist_items, batch.hist_mask)  # (B, T)
        u = self.proj(pooled_behaviours(self, batch.hist_items, batch.hist_signal, w))  # (B, d)

        s_items, s_signal, s_mask = short_window(batch, self.cfg.short_len)  # (B, n_s)
        s_kv = self.behaviour_repr(s_items, s_signal)  # (B, n_s, d)
        r_short = self.short_attention(target, s_kv, s_kv, s_mask)  # (B, d)

        x = torch.cat([self.user_repr(batch), target, u, r_short, target * u], dim=-1)
        return self.head(x)

    # ---- the request path -------------------------------------------------------------------
    def build_request_index(self, state: UserState) -> BucketIndex:
        """Per round and code: the colliding behaviours' count and embedding sum."""
        n_codes = 2**self.cfg.bits_per_round

        def codes(items: np.ndarray) -> np.ndarray:
            return self.item_codes()[torch.from_numpy(np.asarray(items, dtype=np.int64))].numpy()

        def embed(items: np.ndarray, signals: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                i, s = (torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in (items, signals))
                return self.behaviour_repr(i, s).double().numpy()

        return BucketIndex(state, codes, embed, self.cfg.rounds, n_codes, self.cache_generation)

    def _score_request(self, state: UserState, index: BucketIndex, candidates: torch.Tensor) -> torch.Tensor:
        target = self.item_repr(candidates)  # (C, d)
        count, sums = index.current(self.cache_generation)  # (rounds, codes), (rounds, codes, d)
        codes = self.item_codes()[candidates].numpy()  # (C, rounds)
        rounds = np.arange(self.cfg.rounds)
        per_round = sums[rounds, codes] / np.maximum(count[rounds, codes], 1)[..., None]  # (C, rounds, d)
        u = self.proj(torch.from_numpy(per_round.mean(1)).float())  # (C, d)
        return short_route_head(self, state, target, u)
