"""Top-k retrieval over a lifelong history, on integer keys only.

The collaborative score of a behaviour is its SimHash similarity to the target; the semantic
view is a SID-prefix match. Both are integers, so a history of any length is scored without
building a (B, T, d) float tensor: only the k winners' embeddings are gathered afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NEG = -1  # key of a slot that can never be taken (padding)
_LAST = torch.iinfo(torch.long).max  # sorts after every real key


def recency_keys(
    similarity: torch.Tensor, mask: torch.Tensor, position: torch.Tensor | None = None, length: int | None = None
) -> torch.Tensor:
    """Integer ranking keys: higher similarity first, then the more recent behaviour.

    similarity: (B, T) int64 in [0, S) (e.g. ``m - hamming``); mask: (B, T) bool, histories
    left-padded so a larger position is more recent. Returns (B, T) int64, NEG at padding.
    ``position`` (B, T) and ``length``: the behaviours' positions in a history of ``length``
    when scoring a shortlist of it (default: the columns 0..T-1 of a history of length T), so
    a shortlisted behaviour keeps the key it has in the whole history.
    """
    t = similarity.shape[-1] if length is None else length
    if position is None:
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


def route_quota(k: int, rho: float) -> int:
    """Slots of a route reserved for semantic matches: ceil(rho k), at most k."""
    return min(math.ceil(rho * k - 1e-9), k)


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
    quota = route_quota(k, rho)
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


def topk_scores(scores: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of float scores (B, T) over the present behaviours: (index (B, k), taken (B, k)).

    For retrieval by embedding inner products (SIM-soft, TWIN); rows with fewer than k
    present behaviours are padded with untaken slots, as in ``topk_keys``. No gradient.
    """
    t = scores.shape[-1]
    kk = min(k, t)
    index = torch.topk(scores.detach().masked_fill(~mask, float("-inf")), kk, dim=-1).indices  # (B, kk)
    taken = torch.gather(mask, -1, index)
    if kk < k:
        pad = k - kk
        index = torch.cat([index, index.new_zeros(*index.shape[:-1], pad)], dim=-1)
        taken = torch.cat([taken, taken.new_zeros(*taken.shape[:-1], pad)], dim=-1)
    return index, taken


# ---- serving: many candidates against ONE history -------------------------------------------
# A request scores C candidates against one user's history. Keys depend on the behaviour only
# through its item (similarity, prefix match) and its position (recency), so the history is
# indexed once per request by distinct item, and each candidate scores distinct items instead
# of behaviours. The winners can only come from a short list of positions (``shortlist``);
# running the batch retrieval on that list gives exactly the batch path's result.


@dataclass
class HistoryIndex:
    """One history's distinct items and, per item, its most recent positions."""

    items: torch.Tensor  # (U,) distinct item ids among the present behaviours
    recent: torch.Tensor  # (U, depth) positions, most recent first; -1 past the item's count

    @property
    def last(self) -> torch.Tensor:
        """(U,) each item's most recent position."""
        return self.recent[:, 0]


def index_history(hist: torch.Tensor, mask: torch.Tensor, depth: int) -> HistoryIndex:
    """Index one history (T,) by item, keeping each item's ``depth`` most recent positions.

    One sort of T packed integers (item, then most recent first); no Python loop. Past the
    sort, the work is per distinct item (U x depth), not per behaviour.
    """
    t = hist.shape[-1]
    shift = max(t - 1, 1).bit_length()  # key = item << shift | (t - 1 - position)
    recency = torch.arange(t - 1, -1, -1, device=hist.device)  # t - 1 - position
    key = torch.where(mask, (hist << shift) | recency, _LAST)  # absent behaviours sort last
    key = sort_int64(key)[: int(mask.sum())]  # (n,) by item, then most recent first
    n = len(key)
    if n == 0:
        return HistoryIndex(hist.new_zeros(0), hist.new_full((0, depth), -1))
    items = key >> shift
    first = torch.ones_like(items, dtype=torch.bool)
    torch.ne(items[1:], items[:-1], out=first[1:])
    start = torch.nonzero(first).squeeze(1)  # (U,) where each item's run begins
    end = torch.cat([start[1:], start.new_full((1,), n)])  # (U,)
    slot = start.unsqueeze(1) + torch.arange(depth, device=hist.device)  # (U, depth)
    recent = key.index_select(0, slot.clamp_max(n - 1).view(-1)).view(slot.shape)
    recent = (t - 1) - (recent & ((1 << shift) - 1))  # positions, most recent first
    return HistoryIndex(items[start], recent.masked_fill_(slot >= end.unsqueeze(1), -1))


def sort_int64(x: torch.Tensor) -> torch.Tensor:
    """Ascending sort of a 1-d int64 tensor; numpy's vectorised sort on CPU (several times
    faster than ``torch.sort`` there), torch's elsewhere."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy()))
    return torch.sort(x).values


def shortlist(
    item_keys: torch.Tensor,
    index: HistoryIndex,
    length: int,
    k: int,
    quota: int,
    item_tokens: torch.Tensor | None = None,
    target_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions (C, M) holding every behaviour ``mixed_topk`` can take; -1 = none.

    item_keys: (C, U) each distinct item's best key for each candidate (``recency_keys`` of its
    similarity at its most recent position, in a history of ``length``). The semantic view:
    item_tokens (U, R) and target_tokens (C, R), the prefix tokens each route matches on (None:
    no semantic view). ``index`` must keep at least k + quota recent positions per item.

    A route takes its top ``quota`` matching behaviours, then fills from the top k behaviours
    not taken, which are among the top k + quota overall. So the list is the exact top k +
    quota behaviours plus each route's exact top ``quota`` matching ones: M <= k + (1 + R)
    quota. Positions are distinct within a row.
    """
    cand = [best_positions(item_keys, index, length, k + quota)]  # (C, k+q)
    if quota and item_tokens is not None:
        for r in range(item_tokens.shape[1]):  # a loop over routes, not behaviours
            cand.append(matched_positions(item_keys, index, length, quota, item_tokens[:, r], target_tokens[:, r]))
    cand = torch.cat(cand, dim=1).sort(dim=1).values  # (C, M), -1 first
    repeat = torch.zeros_like(cand, dtype=torch.bool)
    repeat[:, 1:] = cand[:, 1:] == cand[:, :-1]
    return cand.masked_fill(repeat, -1)


def matched_positions(
    item_keys: torch.Tensor, index: HistoryIndex, length: int, n: int, item_token: torch.Tensor, target_token: torch.Tensor
) -> torch.Tensor:
    """The n best-keyed behaviours (C, n) whose item's token equals the candidate's; -1 = none.

    Items are bucketed by token (one sort of U), so a candidate reads only its own bucket,
    padded to the largest bucket any candidate reads: (C, S) rather than (C, U).
    """
    token, order = torch.sort(item_token)  # (U,)
    target_token = target_token.contiguous()
    lo = torch.searchsorted(token, target_token)  # (C,)
    hi = torch.searchsorted(token, target_token, right=True)
    width = int((hi - lo).max()) if len(lo) else 0
    if width == 0:
        return item_keys.new_full((item_keys.shape[0], n), -1)
    col = lo.unsqueeze(1) + torch.arange(width, device=lo.device)  # (C, S)
    inside = col < hi.unsqueeze(1)
    item = order[col.clamp_max(len(order) - 1)]  # (C, S) item index per column
    keys = torch.where(inside, torch.gather(item_keys, 1, item), NEG)  # (C, S)
    return best_positions(keys, index, length, n, item)


def best_positions(item_keys: torch.Tensor, index: HistoryIndex, length: int, n: int, item: torch.Tensor | None = None) -> torch.Tensor:
    """The n best-keyed behaviours (C, n) of items keyed (C, S) (NEG: excluded); -1 = none.

    ``item`` (C, S): the item index of each column (default: column s is item s).
    A behaviour among the top n belongs to an item among the top n by best key (each better
    item's most recent behaviour outranks it) and is among its item's n most recent: so only
    an (n x n) grid per row is keyed, like ``recency_keys`` (similarity * length + position).
    """
    u = index.recent.shape[0]
    if u == 0:
        return item_keys.new_full((item_keys.shape[0], n), -1)
    col, taken = topk_keys(item_keys, n)  # (C, n) best columns
    best = torch.gather(item_keys, 1, col)  # (C, n) their keys
    top = col if item is None else torch.gather(item, 1, col)  # (C, n) item index
    grid = index.recent[top, :n]  # (C, n, n) their most recent positions
    base = best - index.last[top]  # (C, n): similarity * length
    keys = torch.where((grid >= 0) & taken.unsqueeze(-1), base.unsqueeze(-1) + grid, NEG).flatten(1)  # (C, n * n)
    pick, found = topk_keys(keys, n)  # (C, n)
    return torch.where(found, torch.gather(grid.flatten(1), 1, pick), -1)
