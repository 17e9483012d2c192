"""ETA (Chen et al., 2021): end-to-end target attention with SimHash retrieval.

GSU: every item's ID embedding gets an m-bit SimHash signature ``sign(W_hash e(v))`` (fixed
random hyperplanes). A behaviour's relevance to the target is ``m - Hamming(b(h), b(t))``,
computed with XOR + popcount on packed integers, so the whole history is scored without any
float tensor per behaviour; the k closest are kept, ties going to the more recent behaviour.
The signatures come from the embeddings the ESU trains (end to end), recomputed every training
step and kept per item in eval mode, as a server would. Serving keeps per user the history by
distinct item with packed signatures (``SignatureIndex``) and scans it with R2LED's compiled
kernel: the same top-k, its cost following the distinct items.
ESU and head: SIM's (``TwoStageModel``): target attention over the k, plus the short route.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from r2led.config import HashBits
from r2led.data.batches import Batch
from r2led.models.layers import KeptValue
from r2led.models.retrieval import recency_keys, topk_keys
from r2led.models.sim import TwoStageConfig, TwoStageModel
from r2led.models.simhash import SimHash
from r2led.models.user_state import SignatureIndex, UserState


class EtaConfig(TwoStageConfig):
    name: Literal["eta"] = "eta"
    hash_bits: HashBits = Field(64, description="SimHash signature bits m (multiple of 64)")


class ETA(TwoStageModel):
    config_class = EtaConfig

    def __init__(self, cfg: EtaConfig, spec, sid=None):
        super().__init__(cfg, spec, sid)
        self.simhash = SimHash(cfg.dim, cfg.hash_bits)
        self._signatures = KeptValue(lambda: self.simhash.signatures(self.items.id.weight))
        self._signature_words = KeptValue(
            lambda: np.ascontiguousarray(self.item_signatures().cpu().numpy()).view(np.uint64)
        )

    def item_signatures(self) -> torch.Tensor:
        """(N+1, words) signatures of every item's ID embedding (kept in eval mode)."""
        return self._signatures(fresh=self.training)

    @torch.no_grad()
    def search(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigs = self.item_signatures()
        hamming = SimHash.hamming(sigs[batch.hist_items], sigs[batch.target].unsqueeze(1))  # (B, T) int64
        keys = recency_keys(self.simhash.bits - hamming, batch.hist_mask)  # (B, T)
        return topk_keys(keys, self.cfg.k)

    def build_request_index(self, state: UserState) -> SignatureIndex:
        """The user's history by distinct item (chains of positions) with their packed
        signatures: the same index and compiled scan as R2LED's, with no semantic view."""
        return SignatureIndex(state.items, None)

    def request_search(self, state, index, candidates, target):
        words = self._signature_words()  # (N+1, W) uint64
        out, n = index.routes(
            words[candidates.numpy()], words, self.cache_generation, None, self.cfg.k, 0, 1, False, state.start
        )
        return torch.from_numpy(out[:, 0]), torch.arange(self.cfg.k) < torch.from_numpy(n[:, :1])
