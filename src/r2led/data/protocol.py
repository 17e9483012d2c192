"""The benchmark protocol, in one place: label rule, history order, sample filter, split.

Default (``ml-1m`` in docs/data.md): every interaction is a sample, ``y = signal > 3``; all
interactions are sorted globally and stably by ``(ts, user, item)``; a sample's history is the
same user's earlier rows in that order; samples with fewer than ``min_history`` earlier rows
are dropped; the remaining samples are split by their position in the global order.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

SPLITS = ("train", "valid", "test")


class Protocol(BaseModel):
    """How samples, labels and splits are derived from a store's sequences."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label_threshold: float = Field(3.0, description="y = 1 if signal > label_threshold")
    min_history: int = Field(5, ge=0, description="drop samples with fewer earlier rows")
    train_fraction: float = Field(0.8, gt=0, lt=1)
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    samples_last_n: int | None = Field(
        None, ge=1, description="only each user's last n rows become samples (long synthetic sequences)"
    )

    @model_validator(mode="after")
    def _fractions(self) -> Protocol:
        if self.train_fraction + self.valid_fraction >= 1:
            raise ValueError("train_fraction + valid_fraction must be < 1 (test gets the rest)")
        return self


def global_order(ts: np.ndarray, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Indices that sort rows by ``(ts, user, item)``, stable: ties keep the original row order."""
    keys = [np.asarray(k) for k in (ts, user, item)]
    if len(keys[0]) and all(k.dtype.kind in "iu" for k in keys):
        # One stable argsort of a packed int64 key is ~3x faster than a 3-key lexsort and gives
        # the same order (the packing is exact and order-preserving) when the spans fit.
        lows = [int(k.min()) for k in keys]
        spans = [int(k.max()) - low + 1 for k, low in zip(keys, lows, strict=False)]
        if spans[0] * spans[1] * spans[2] < 2**63:
            packed = keys[0].astype(np.int64) - lows[0]
            for k, low, span in zip(keys[1:], lows[1:], spans[1:], strict=False):
                packed *= span
                packed += k.astype(np.int64) - low
            return np.argsort(packed, kind="stable")
    return np.lexsort((item, user, ts))
