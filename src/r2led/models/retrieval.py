"""Top-k retrieval over a lifelong history, on integer keys only.

The collaborative score of a behaviour is its SimHash similarity to the target; the semantic
view is a SID-prefix match. Both are integers, so a history of any length is scored without
building a (B, T, d) float tensor: only the k winners' embeddings are gathered afterwards.
"""

from __future__ import annotations

import math

import torch

NEG = -1  # key of a slot that can never be taken (padding)


def recency_keys(similarity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Integer ranking keys: higher similarity first, then the more recent behaviour.

    similarity: (B, T) int64 in [0, S) (e.g. ``m - hamming``); mask: (B, T) bool, histories
    left-padded so a larger position is more recent. Returns (B, T) int64, NEG at padding.
    """
    t = similarity.shape[-1]
    position = torch.arange(t, device=similarity.device)
    return torch.where(mask, similarity * t + position, torch.full_like(similarity, NEG))


def topk_keys(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest keys along the last dim: (index (..., k), taken (..., k) bool).

    Short rows are padded: when fewer than k keys are valid the extra slots are not taken.
    """
    t = keys.shape[-1]
    kk = min(k, t)
    values, index = torch.topk(keys, kk, dim=-1)
    taken = values > NEG
    if kk < k:
        pad = k - kk
        index = torch.cat([index, index.new_zeros(*index.shape[:-1], pad)], dim=-1)
        taken = torch.cat([taken, taken.new_zeros(*taken.shape[:-1], pad)], dim=-1)
    return index, taken & (index >= 0)


def mixed_topk(keys: torch.Tensor, match: torch.Tensor, k: int, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-route mixed retrieval for R routes at once.

    keys:  (B, T) int64 collaborative ranking keys (``recency_keys``), NEG at padding.
    match: (B, R, T) bool, the semantic view: behaviour's level-l prefix == target's.
    Route r takes up to ``ceil(rho * k)`` matching behaviours, best key first, then fills the
    remaining slots with the best-keyed behaviours not yet taken.
    Returns index (B, R, k) into T and taken (B, R, k) bool; taken slots come first.
    """
    b, r, t = match.shape
    keys_r = keys.unsqueeze(1).expand(b, r, t)  # (B, R, T)
    quota = min(math.ceil(rho * k - 1e-9), k)
    if quota == 0:
        return topk_keys(keys_r, k)
    m_index, m_taken = topk_keys(torch.where(match, keys_r, NEG), quota)  # (B, R, q)
    # Mark the matches taken; untaken slots write into a spare column t (indices may repeat).
    taken_t = torch.zeros(b, r, t + 1, dtype=torch.bool, device=keys.device)
    taken_t.scatter_(2, torch.where(m_taken, m_index, t), True)
    taken_t = taken_t[..., :t]
    # Fill: the best behaviours not already taken, at most k (the first k - #matches are used).
    f_index, f_taken = topk_keys(torch.where(taken_t, NEG, keys_r), k)  # (B, R, k)
    index = torch.cat([m_index, f_index], dim=-1)  # (B, R, q + k)
    taken = torch.cat([m_taken, f_taken], dim=-1)
    # Keep the first k taken slots in order (matches, then fills): order key = slot rank.
    slots = index.shape[-1]
    order = torch.where(taken, slots - torch.arange(slots, device=keys.device), torch.zeros_like(index))
    pick = torch.topk(order, k, dim=-1).indices  # (B, R, k): taken slots first, in slot order
    return torch.gather(index, -1, pick), torch.gather(taken, -1, pick)
