"""ETA (Chen et al., 2021): end-to-end target attention with SimHash retrieval.

GSU: every item's ID embedding gets an m-bit SimHash signature ``sign(W_hash e(v))`` (fixed
random hyperplanes). A behaviour's relevance to the target is ``m - Hamming(b(h), b(t))``,
computed with XOR + popcount on packed integers, so the whole history is scored without any
float tensor per behaviour; the k closest are kept, ties going to the more recent behaviour.
The signatures come from the embeddings the ESU trains (end to end), recomputed every training
step and cached per item in eval mode, as a server would.
ESU and head: SIM's (``TwoStageModel``): target attention over the k, plus the short route.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from r2led.data.batches import Batch
from r2led.models.layers import ItemTableCache
from r2led.models.retrieval import recency_keys, topk_keys
from r2led.models.sim import TwoStageConfig, TwoStageModel
from r2led.models.simhash import SimHash


class EtaConfig(TwoStageConfig):
    name: Literal["eta"] = "eta"
    hash_bits: int = Field(64, ge=64, description="SimHash signature bits m (multiple of 64)")

    @model_validator(mode="after")
    def _hash_bits(self) -> "EtaConfig":
        if self.hash_bits % 64:
            raise ValueError(f"hash_bits must be a multiple of 64, got {self.hash_bits}")
        return self


class ETA(TwoStageModel):
    config_class = EtaConfig

    def __init__(self, cfg: EtaConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        self.simhash = SimHash(cfg.dim, cfg.hash_bits)
        self._table_cache = ItemTableCache(self.simhash.signatures)

    def item_signatures(self) -> torch.Tensor:
        """(N+1, words) signatures of every item's ID embedding (cached in eval mode)."""
        return self._table_cache(self.items.id.weight, self.training)

    @torch.no_grad()
    def search(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigs = self.item_signatures()
        hamming = SimHash.hamming(sigs[batch.hist_items], sigs[batch.target].unsqueeze(1))  # (B, T) int64
        keys = recency_keys(self.simhash.bits - hamming, batch.hist_mask)  # (B, T)
        return topk_keys(keys, self.cfg.k)
