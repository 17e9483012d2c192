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
    quota = route_quota(k, rho)
    if quota == 0:  # every route is the same collaborative top-k
        index, taken = topk_keys(keys, k)  # (B, k)
        return index.unsqueeze(1).expand(b, r, k).contiguous(), taken.unsqueeze(1).expand(b, r, k).contiguous()
    m_index, m_taken = topk_keys(torch.where(match, keys.unsqueeze(1), NEG), quota)  # (B, R, q)
    # Fill: the best behaviours the route's matches did not take. At most q are taken, so they
    # are among the best k + q of the whole history: one top-k over (B, T) serves every route.
    g_index, g_taken = topk_keys(keys, k + quota)  # (B, k+q), best first
    g_index = g_index.unsqueeze(1).expand(b, r, k + quota)  # (B, R, k+q)
    clash = (g_index.unsqueeze(-1) == m_index.unsqueeze(-2)) & m_taken.unsqueeze(-2)  # (B, R, k+q, q)
    free = g_taken.unsqueeze(1) & ~clash.any(-1)  # (B, R, k+q): not a taken match
    index = torch.cat([m_index, g_index], dim=-1)  # (B, R, q + k+q)
    taken = torch.cat([m_taken, free], dim=-1)
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
    item_tokens (U, R) and target_tokens (C, R), the SID prefix tokens each route matches on,
    coarsest route first (None: no semantic view). ``index`` must keep at least k + quota
    recent positions per item.

    A route takes its top ``quota`` matching behaviours, then fills from the top k behaviours
    not taken, which are among the top k + quota overall. So the list is the exact top k +
    quota behaviours plus each route's exact top ``quota`` matching ones: M <= k + (1 + R)
    quota. Positions are distinct within a row.
    """
    cand = [best_positions(item_keys, index, length, k + quota)]  # (C, k+q)
    if quota and item_tokens is not None:
        cand.append(matched_positions(item_keys, index, length, quota, item_tokens, target_tokens))  # (C, R q)
    cand = torch.cat(cand, dim=1).sort(dim=1).values  # (C, M), -1 first
    repeat = torch.zeros_like(cand, dtype=torch.bool)
    repeat[:, 1:] = cand[:, 1:] == cand[:, :-1]
    return cand.masked_fill(repeat, -1)


def matched_positions(
    item_keys: torch.Tensor, index: HistoryIndex, length: int, n: int, item_tokens: torch.Tensor, target_tokens: torch.Tensor
) -> torch.Tensor:
    """Each route's n best-keyed behaviours whose item matches the candidate's prefix token:
    (C, R n), route by route; -1 = none.

    SID prefixes nest (a match at a fine level is a match at every coarser one), so every
    route's matches lie in the candidate's bucket of the coarsest route: items are bucketed by
    that token (one sort of U) and a candidate reads only its bucket, padded to the largest
    one read, (C, S) rather than (C, U); the finer routes mask it.
    """
    c, r = target_tokens.shape
    token, order = torch.sort(item_tokens[:, 0])  # (U,)
    coarse = target_tokens[:, 0].contiguous()
    lo, hi = torch.searchsorted(token, torch.stack([coarse, coarse + 1]))  # (C,) each: the bucket
    width = int((hi - lo).max()) if len(lo) else 0
    if width == 0:
        return item_keys.new_full((c, r * n), -1)
    col = lo.unsqueeze(1) + torch.arange(width, device=lo.device)  # (C, S)
    item = order.index_select(0, col.clamp_max(len(order) - 1).view(-1)).view(col.shape)  # (C, S) item index
    keys = torch.gather(item_keys, 1, item).masked_fill_(col >= hi.unsqueeze(1), NEG)  # (C, S)
    if r > 1:  # the finer routes: the bucket's items whose finer prefix matches too
        fine = item_tokens[:, 1:].index_select(0, item.view(-1)).view(c, width, r - 1)  # (C, S, R-1)
        fine = (fine == target_tokens[:, 1:].unsqueeze(1)).transpose(1, 2)  # (C, R-1, S)
        keys = torch.cat([keys.unsqueeze(1), torch.where(fine, keys.unsqueeze(1), NEG)], dim=1)  # (C, R, S)
        item = item.unsqueeze(1).expand(c, r, width)
    return best_positions(keys.reshape(c * r, width), index, length, n, item.reshape(c * r, width)).view(c, r * n)


def best_positions(item_keys: torch.Tensor, index: HistoryIndex, length: int, n: int, item: torch.Tensor | None = None) -> torch.Tensor:
    """The n best-keyed behaviours (C, n) of items keyed (C, S) (NEG: excluded); -1 = none.

    ``item`` (C, S): the item index of each column (default: column s is item s).
    A behaviour among the top n belongs to an item among the top n by best key (each better
    item's most recent behaviour outranks it) and is among its item's n most recent: so only
    an (n x n) grid per row is keyed, like ``recency_keys`` (similarity * length + position).
    """
    c, s = item_keys.shape
    if index.recent.shape[0] == 0 or s == 0:
        return item_keys.new_full((c, n), -1)
    best, col = torch.topk(item_keys, min(n, s), dim=1)  # (C, n') best columns and their keys
    top = (col if item is None else torch.gather(item, 1, col)).reshape(-1)  # (C n') item index
    grid = index.recent[:, :n].index_select(0, top).view(c, -1, n)  # (C, n', n) their recent positions
    base = best - index.last.index_select(0, top).view(c, -1)  # (C, n'): similarity * length
    keys = (base.unsqueeze(-1) + grid).masked_fill_((grid < 0) | (best < 0).unsqueeze(-1), NEG).view(c, -1)
    found, pick = torch.topk(keys, n, dim=1)  # (C, n): n' n >= n
    return torch.gather(grid.view(c, -1), 1, pick).masked_fill_(found < 0, -1)
