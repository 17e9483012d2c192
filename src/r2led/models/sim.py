"""SIM (Pi et al., CIKM 2020): search-based user interest modelling, in two stages.

General Search Unit (GSU): pick ``k`` behaviours of the lifelong history that are relevant to
the target, cheaply and without gradient through the choice.
    hard search  behaviours whose category equals the target's, the most recent k first; if
                 fewer than k match, the rest of the slots stay empty (padding).
    soft search  inner product between the target's and every behaviour's *retrieval*
                 embedding (a table of its own), top-k. The retrieval table learns from SIM's
                 auxiliary task: a CTR prediction from the softmax(score)-weighted pooling of
                 the whole history's retrieval embeddings, added to the loss with
                 ``aux_weight``. Scoring every behaviour with a d-dimensional embedding is its
                 cost: a (B, T, d) gather per batch (with gradient while training).
Exact Search Unit (ESU): multi-head target attention over the k selected behaviours with the
main embeddings (item + side features + signal), then the same short route and head as R2LED:
    MLP([user; e(t); u; r_s; e(t) * u])

``TwoStageModel`` is that GSU -> ESU skeleton; ETA and TWIN change only the GSU.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.base import CtrModel, short_route_head, short_window, state_history
from r2led.models.layers import MLP, TargetAttention, gather_behaviours, masked_softmax
from r2led.models.retrieval import recency_keys, topk_keys, topk_scores
from r2led.models.user_state import ChainIndex, KeyIndex, RequestIndex, UserState, topk_rows


class TwoStageConfig(ModelConfig):
    """Settings of a search-then-attend model: the attention budget ``k``."""

    k: int = Field(60, ge=1, le=100_000, description="behaviours the search unit keeps (R2LED's 3 routes x 20)")


class TwoStageModel(CtrModel):
    """GSU (``search``, subclass) -> ESU (target attention over the k found) + short route."""

    config_class = TwoStageConfig

    def __init__(self, cfg: TwoStageConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        self.attention = TargetAttention(cfg.dim, cfg.heads)  # the ESU
        self.short_attention = TargetAttention(cfg.dim, cfg.heads)
        self.head = self.make_head(4)

    def search(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, k) into the history of the behaviours kept, and taken (B, k) bool."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        target = self.item_repr(batch.target)  # (B, d)
        index, taken = self.search(batch, target)  # (B, k)
        r_items = gather_behaviours(batch.hist_items, index) * taken  # (B, k)
        r_signal = gather_behaviours(batch.hist_signal, index) * taken
        r_kv = self.behaviour_repr(r_items, r_signal)  # (B, k, d)
        u = self.attention(target, r_kv, r_kv, taken)  # (B, d)

        s_items, s_signal, s_mask = short_window(batch, self.cfg.short_len)  # (B, n_s)
        s_kv = self.behaviour_repr(s_items, s_signal)  # (B, n_s, d)
        r_short = self.short_attention(target, s_kv, s_kv, s_mask)  # (B, d)

        x = torch.cat([self.user_repr(batch), target, u, r_short, target * u], dim=-1)
        return self.head(x)

    # ---- the request path -------------------------------------------------------------------
    def request_search(
        self, state: UserState, index: RequestIndex | None, candidates: torch.Tensor, target: torch.Tensor
    ):
        """``search`` from the user's kept index: positions (C, k) into the state's history and
        taken (C, k); None: this model has no request search (the batch path is used)."""
        return None

    def _score_request(self, state: UserState, index: RequestIndex | None, candidates: torch.Tensor) -> torch.Tensor:
        target = self.item_repr(candidates)  # (C, d)
        found = self.request_search(state, index, candidates, target)
        if found is None:
            return super()._score_request(state, index, candidates)
        pos, taken = found  # (C, k)
        hist, signal = state_history(state)
        flat = pos.reshape(-1)
        rows = self.behaviour_rows("attention", hist.index_select(0, flat), signal.index_select(0, flat))  # (C k, 2d)
        u, _ = self.attention.attend(target, rows.view(*pos.shape, -1), taken)  # (C, d)
        return short_route_head(self, state, target, u)


# ---- hard search ------------------------------------------------------------------------
class SimHardConfig(TwoStageConfig):
    name: Literal["sim-hard"] = "sim-hard"


class SimHard(TwoStageModel):
    config_class = SimHardConfig

    @torch.no_grad()
    def search(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        category = self.items.item_category
        t_cat = category[batch.target].unsqueeze(1)  # (B, 1); 0 = unknown category, never a match
        match = (category[batch.hist_items] == t_cat) & (t_cat > 0) & batch.hist_mask  # (B, T)
        # Only matches get a key (their position: most recent first); the rest are never taken.
        keys = recency_keys(torch.zeros_like(batch.hist_items), match)  # (B, T) int64
        return topk_keys(keys, self.cfg.k)

    def build_request_index(self, state: UserState) -> ChainIndex:
        """SIM's user behaviour tree: category -> the user's positions, most recent first."""
        category = self.items.item_category.cpu().numpy()
        return ChainIndex(state.items, category, int(category.max(initial=0)) + 1)

    def request_search(self, state, index, candidates, target):
        pos, n = index.most_recent(
            self.items.item_category[candidates].numpy(), self.cfg.k, state.start
        )  # (C, k), (C,)
        return torch.from_numpy(pos), torch.arange(self.cfg.k) < torch.from_numpy(n).unsqueeze(1)


# ---- soft search ------------------------------------------------------------------------
class SimSoftConfig(TwoStageConfig):
    name: Literal["sim-soft"] = "sim-soft"
    aux_weight: float = Field(0.1, ge=0.0, le=100.0, description="weight of the soft-search auxiliary CTR loss")


class SimSoft(TwoStageModel):
    config_class = SimSoftConfig

    def __init__(self, cfg: SimSoftConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        d = cfg.dim
        self.retrieval = nn.Embedding(spec.n_items + 1, d, padding_idx=0)  # soft-search embeddings
        nn.init.normal_(self.retrieval.weight, std=0.05)
        self.aux_head = MLP(2 * d, [2 * d])  # auxiliary CTR task: [r(t); pooled history]
        self._aux: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch.target, aux logits)

    def soft_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inner product of the target's and every behaviour's retrieval embedding (B, T)."""
        r_t = self.retrieval(batch.target)  # (B, d)
        r_h = self.retrieval(batch.hist_items)  # (B, T, d): soft search reads every behaviour
        return torch.einsum("btd,bd->bt", r_h, r_t), r_t, r_h

    def auxiliary_logits(
        self, scores: torch.Tensor, r_t: torch.Tensor, r_h: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """SIM's auxiliary task: predict the click from the score-weighted history (B,)."""
        w = masked_softmax(scores, mask)  # (B, T)
        pooled = torch.einsum("bt,btd->bd", w, r_h)  # (B, d)
        return self.aux_head(torch.cat([r_t, pooled], dim=-1))

    def search(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with_aux = self.training and self.cfg.aux_weight > 0
        with torch.set_grad_enabled(with_aux and torch.is_grad_enabled()):
            scores, r_t, r_h = self.soft_scores(batch)
            if with_aux:  # kept for loss(): the scores are already built for the search
                self._aux = (batch.target, self.auxiliary_logits(scores, r_t, r_h, batch.hist_mask))
        return topk_scores(scores, batch.hist_mask, self.cfg.k)  # selection carries no gradient

    def build_request_index(self, state: UserState) -> KeyIndex:
        """Every behaviour's retrieval embedding, kept (T, d)."""

        def keys(items: np.ndarray, signals: np.ndarray) -> np.ndarray:  # (n, d)
            with torch.no_grad():
                return self.retrieval.weight[torch.from_numpy(np.asarray(items, dtype=np.int64))].numpy()

        return KeyIndex(state, keys, self.cache_generation)

    def request_search(self, state, index, candidates, target):
        keys = torch.from_numpy(index.current(self.cache_generation))  # (T, d)
        return topk_rows(keys, self.retrieval(candidates), self.cfg.k)

    def loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        main = super().loss(batch, logits)
        if self.cfg.aux_weight == 0:
            return main
        if self._aux is not None and self._aux[0] is batch.target:
            aux = self._aux[1]
        else:  # loss of a batch this model did not just search in training mode
            scores, r_t, r_h = self.soft_scores(batch)
            aux = self.auxiliary_logits(scores, r_t, r_h, batch.hist_mask)
        self._aux = None
        return main + self.cfg.aux_weight * F.binary_cross_entropy_with_logits(aux, batch.label)
