"""DIN (Zhou et al., KDD 2018): target attention with a local activation unit.

``din`` attends over the last ``short_len`` behaviours (default 30, the published setting);
``din-long`` over the whole history up to T_max: the accuracy upper bound whose cost grows
with T, since every behaviour's embedding is built and scored.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.base import CtrModel, short_window
from r2led.models.layers import DinAttention
from r2led.models.user_state import UserState


class DinConfig(ModelConfig):
    name: Literal["din"] = "din"
    short_len: int = Field(30, ge=1, le=1_000_000, description="behaviours attended (the last ones)")


class DinLongConfig(ModelConfig):
    name: Literal["din-long"] = "din-long"


class DIN(CtrModel):
    config_class = DinConfig

    def __init__(self, cfg, spec, sid=None):
        super().__init__(cfg, spec, sid)
        self.attention = DinAttention(cfg.dim)
        self.head = self.make_head(3)

    def window(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return short_window(batch, self.cfg.short_len)

    def forward(self, batch: Batch) -> torch.Tensor:
        items, signal, mask = self.window(batch)  # (B, n)
        target = self.item_repr(batch.target)  # (B, d)
        behaviours = self.behaviour_repr(items, signal)  # (B, n, d)
        interest = self.attention(target, behaviours, behaviours, mask)  # (B, d)
        return self.head(torch.cat([self.user_repr(batch), target, interest, target * interest], dim=-1))

    # ---- the request path -------------------------------------------------------------------
    def request_window(self, state: UserState) -> tuple[torch.Tensor, torch.Tensor]:
        return self.request_short(state, self.cfg.short_len)

    def _score_request(self, state: UserState, index, candidates: torch.Tensor) -> torch.Tensor:
        """The window's behaviours embedded once (n, d), shared by the C rows; the activation
        unit as a few large products (``DinAttention.attend``, as R2LED's request path)."""
        items, signal = self.request_window(state)  # (n,)
        target = self.item_repr(candidates)  # (C, d)
        c = len(target)
        ones = lambda x: F.pad(x, (0, 1), value=1.0)  # noqa: E731 - attend's inputs end in 1
        behaviours = ones(self.behaviour_repr(items, signal)).expand(c, -1, -1)  # (C, n, d+1)
        mask = torch.ones(behaviours.shape[:2], dtype=torch.bool)
        interest = self.attention.attend(ones(target), behaviours, mask)[..., :-1]  # (C, d)
        return self.head(torch.cat([self.request_user_repr(state, c), target, interest, target * interest], dim=-1))


class DINLong(DIN):
    config_class = DinLongConfig

    def window(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch.hist_items, batch.hist_signal, batch.hist_mask

    def request_window(self, state: UserState) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(state.items), torch.from_numpy(state.signals)
