"""Average pooling: the whole history's mean behaviour, no target awareness in the long part.

    long-term   u = mean_t (e(h_t) + side(h_t) + signal(h_t))  over every present behaviour
    short-term  r_s = TargetAttention(e(t), last n_s behaviours)   (as R2LED's short route)
    head        MLP([user; e(t); u; r_s; e(t) * u])

The mean is an ``embedding_bag`` over the batch's distinct items (``weighted_sum_by_item``), so
no (B, T, d) tensor is built: its cost is O(B T) indices plus one embedding per distinct item.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.base import CtrModel, short_route_head, short_window
from r2led.models.layers import TargetAttention, weighted_sum_by_item
from r2led.models.user_state import BucketIndex, UserState


class AvgPoolConfig(ModelConfig):
    name: Literal["avgpool"] = "avgpool"


def pooled_behaviours(
    model: CtrModel, items: torch.Tensor, signal: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_t weights[b, t] * behaviour_repr(items[b, t], signal[b, t])`` -> (B, d).

    ``behaviour_repr`` is item + signal embedding, so the sum splits into one bag over distinct
    items and one over signal values; neither builds a (B, T, d) tensor.
    """
    return weighted_sum_by_item(model._item_repr, items, weights) + weighted_sum_by_item(model.signal, signal, weights)


class AvgPool(CtrModel):
    config_class = AvgPoolConfig

    def __init__(self, cfg: AvgPoolConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        self.short_attention = TargetAttention(cfg.dim, cfg.heads)
        self.head = self.make_head(4)

    def long_interest(self, batch: Batch) -> torch.Tensor:
        """Mask-aware mean of every behaviour (B, d); an empty history gives zeros."""
        mask = batch.hist_mask.float()  # (B, T)
        weights = mask / mask.sum(-1, keepdim=True).clamp_min(1.0)
        return pooled_behaviours(self, batch.hist_items, batch.hist_signal, weights)

    def forward(self, batch: Batch) -> torch.Tensor:
        target = self.item_repr(batch.target)  # (B, d)
        u = self.long_interest(batch)  # (B, d)

        s_items, s_signal, s_mask = short_window(batch, self.cfg.short_len)  # (B, n_s)
        s_kv = self.behaviour_repr(s_items, s_signal)  # (B, n_s, d)
        r_short = self.short_attention(target, s_kv, s_kv, s_mask)  # (B, d)

        x = torch.cat([self.user_repr(batch), target, u, r_short, target * u], dim=-1)
        return self.head(x)

    # ---- the request path -------------------------------------------------------------------
    def build_request_index(self, state: UserState) -> BucketIndex:
        """One bucket: the count and the embedding sum of every behaviour."""

        def embed(items: np.ndarray, signals: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                i, s = (torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in (items, signals))
                return self.behaviour_repr(i, s).double().numpy()

        return BucketIndex(state, lambda items: np.zeros((len(items), 1), np.int64), embed, 1, 1, self.cache_generation)

    def _score_request(self, state: UserState, index: BucketIndex, candidates: torch.Tensor) -> torch.Tensor:

        target = self.item_repr(candidates)  # (C, d)
        count, sums = index.current(self.cache_generation)
        u = torch.from_numpy(sums[0, 0] / max(count[0, 0], 1)).float().expand(len(target), -1)  # (C, d)
        return short_route_head(self, state, target, u)
