"""CtrModel: what every model shares (item/user embeddings, behaviour inputs, head, loss).

A model file subclasses ``CtrModel`` and writes ``forward`` so that it reads like its paper:
select behaviours (retrieval), model them (refinement), then the head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.layers import MLP, ItemEmbeddings, UserEmbeddings, per_unique_item
from r2led.models.spec import DataSpec
from r2led.sid.table import SidTable


class CtrModel(nn.Module):
    """Base class. ``forward(batch) -> logits (B,)``; ``loss(batch, logits) -> scalar``."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    uses_sid: ClassVar[bool] = False  # True when the model needs a SID table regardless of sid_features

    def __init__(self, cfg: ModelConfig, spec: DataSpec, sid: SidTable | None = None):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        d = cfg.dim
        self.items = ItemEmbeddings(spec, d, sid if self.wants_sid(cfg) else None)
        self.users = UserEmbeddings(spec, d)
        self.signal = nn.Embedding(spec.signal_size, d, padding_idx=0)
        nn.init.normal_(self.signal.weight, std=0.05)

    @classmethod
    def wants_sid(cls, cfg: ModelConfig) -> bool:
        return cls.uses_sid or cfg.sid_features

    # ---- item and behaviour representations ---------------------------------------------
    def item_repr(self, items: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., d): ID embedding + side features (+ SID prefixes, fairness control)."""
        return per_unique_item(self._item_repr, items)

    def _item_repr(self, items: torch.Tensor) -> torch.Tensor:
        x = self.items.id(items) + self.items.features(items)
        if self.cfg.sid_features and self.items.levels:
            x = x + self.items.prefixes(items).mean(-2)
        return x

    def behaviour_repr(self, items: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """Keys/values of behaviours: the item plus the behaviour's own signal (e.g. rating)."""
        return self.item_repr(items) + self.signal(signal)

    def user_repr(self, batch: Batch) -> torch.Tensor:
        """(B, F*d [+ S]): profile feature embeddings, and the history profile when enabled.

        The history profile is the share of each signal value (e.g. each rating) among the
        user's behaviours plus log(1 + length): integer counting over (B, T), no embeddings,
        so it costs every model the same and stays cheap at lifelong lengths.
        """
        users = self.users(batch.user_feats)
        if not self.cfg.history_profile:
            return users
        signal = batch.hist_signal  # (B, T), 0 = padding
        shared = signal.shape[0] > 1 and signal.stride(0) == 0  # one history for many candidates
        rows = signal[:1] if shared else signal
        counts = torch.zeros(rows.shape[0], self.spec.signal_size, device=signal.device)
        counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=counts.dtype))
        length = counts[:, 1:].sum(1, keepdim=True)  # (B, 1)
        profile = torch.cat([counts[:, 1:] / length.clamp_min(1.0), torch.log1p(length) / 8.0], dim=-1)  # (B, S)
        if shared:
            profile = profile.expand(signal.shape[0], -1)
        return torch.cat([users, profile], dim=-1)

    def head_input_dim(self, n_vectors: int) -> int:
        profile = self.spec.signal_size if self.cfg.history_profile else 0
        return self.users.out_dim + profile + n_vectors * self.cfg.dim

    def make_head(self, n_vectors: int) -> MLP:
        return MLP(self.head_input_dim(n_vectors), self.cfg.mlp, self.cfg.dropout)

    # ---- training -----------------------------------------------------------------------
    def loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, batch.label)


def short_window(batch: Batch, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last ``n`` behaviours of each history: items, signal, mask, each (B, min(n, L))."""
    start = max(batch.hist_items.shape[1] - n, 0)  # n = 0 gives an empty window, not the whole
    return batch.hist_items[:, start:], batch.hist_signal[:, start:], batch.hist_mask[:, start:]
