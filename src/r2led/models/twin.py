"""TWIN (Chang et al., KDD 2023): two-stage interest network with consistent scoring.

One multi-head target attention (``self.attention``: Q, K, V, out) serves both stages, so the
retrieval ranks behaviours exactly as the refinement would weigh them:
    GSU   score(h) = mean over heads of  (W_q e(t))_h . (W_k x_h)_h / sqrt(d_h)  over all T,
          top-k, no gradient through the choice (the GSU trains only through the shared ESU)
    ESU   the same TargetAttention over the k kept behaviours (same logits + values)
    head  MLP([user; e(t); u; r_s; e(t) * u])   (as every model here)

TWIN's split of behaviour features keeps the whole-history score cheap: the key of a
behaviour, ``x_h = item(h) + signal(h)``, is linear (no bias), so
    W_k x_h = W_k item(h)   [inherent: one projection per distinct item, cacheable]
            + W_k signal(h) [user-item cross feature: S signal values, scored per query]
Cost of the GSU per batch: U item projections (U distinct items, U x d), one (B, T, d) gather
of those projected keys (what the paper reads from its cache) and a (B, T, h) score; no (B, T, d)
tensor for the signal part, none kept for backward (the GSU runs without gradient).
Serving keeps ``W_k x_h`` per behaviour in the user's state (``KeyIndex``), so a request's GSU
is one (C, d) x (d, T) product in chunks and a top-k.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from r2led.data.batches import Batch
from r2led.models.layers import per_unique_item
from r2led.models.retrieval import topk_scores
from r2led.models.sim import TwoStageConfig, TwoStageModel
from r2led.models.user_state import KeyIndex, UserState, topk_rows


class TwinConfig(TwoStageConfig):
    name: Literal["twin"] = "twin"


class TWIN(TwoStageModel):
    config_class = TwinConfig

    def __init__(self, cfg: TwinConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        assert self.attention.k.bias is None  # the inherent / cross split needs a linear key map

    @torch.no_grad()
    def gsu_scores(self, batch: Batch, target: torch.Tensor) -> torch.Tensor:
        """The ESU's own attention logits for every behaviour, averaged over heads (B, T)."""
        att = self.attention
        hist, signal = batch.hist_items, batch.hist_signal  # (B, T)
        b, t = hist.shape
        h, hd = att.heads, att.head_dim
        q = att.q(target).view(b, h, hd, 1)  # (B, h, hd, 1)
        # Query as a block-diagonal (d, h) matrix per row: keys (B, T, d) @ it -> per-head logits.
        q_heads = (q * torch.eye(h, device=q.device).view(1, h, 1, h)).reshape(b, h * hd, h)  # (B, d, h)
        k_item = per_unique_item(lambda v: att.k(self._item_repr(v)), hist)  # (B, T, d) cached keys
        s_item = torch.bmm(k_item, q_heads)  # (B, T, h)
        s_signal = att.k(self.signal.weight) @ q_heads  # (B, S, h): cross-feature keys, per query
        s_signal = torch.gather(s_signal, 1, signal.unsqueeze(-1).expand(b, t, h))  # (B, T, h)
        return ((s_item + s_signal) / math.sqrt(hd)).mean(-1)

    def search(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_scores(self.gsu_scores(batch, target), batch.hist_mask, self.cfg.k)

    def build_request_index(self, state: UserState) -> KeyIndex:
        """The behaviour side of the GSU computed once per behaviour: ``W_k x_h`` (T, d)."""
        att = self.attention

        def keys(items: np.ndarray, signals: np.ndarray) -> np.ndarray:  # (n, d)
            with torch.no_grad():
                items, signals = (
                    torch.from_numpy(np.asarray(items, dtype=np.int64)),
                    torch.from_numpy(np.asarray(signals, dtype=np.int64)),
                )
                return (
                    per_unique_item(lambda v: att.k(self._item_repr(v)), items) + att.k(self.signal.weight)[signals]
                ).numpy()

        return KeyIndex(state, keys, self.cache_generation)

    def request_search(self, state, index, candidates, target):
        """The GSU against the kept keys: the mean over heads of the per-head logits is the
        full dot product over (heads sqrt(d_h)), one product per chunk of behaviours."""
        att = self.attention
        keys = torch.from_numpy(index.current(self.cache_generation))  # (T, d)
        return topk_rows(keys, att.q(target), self.cfg.k, scale=1.0 / (att.heads * math.sqrt(att.head_dim)))
