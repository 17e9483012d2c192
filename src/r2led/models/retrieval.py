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
FAR = -(1 << 62)  # a position past an item's count (``HistoryIndex``): every key built on it is < 0


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
    return fill_routes(m_index, m_taken, g_index, g_taken, k)


def fill_routes(
    m_index: torch.Tensor, m_taken: torch.Tensor, g_index: torch.Tensor, g_taken: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second half of ``mixed_topk``: each route's matches, then its fills.

    m_index/m_taken (B, R, q): each route's best matching behaviours, best first; g_index/
    g_taken (B, k+q): the best behaviours overall, best first (any index space, e.g. positions).
    Route r keeps its matches, then the best of g that are not among them: the first k taken.
    """
    b, r, _ = m_index.shape
    g_index = g_index.unsqueeze(1).expand(b, r, g_index.shape[-1])  # (B, R, k+q)
    clash = g_index.unsqueeze(-1) == m_index.masked_fill(~m_taken, -2).unsqueeze(-2)  # (B, R, k+q, q); -2: no index
    free = g_taken.unsqueeze(1) & ~clash.any(-1)  # (B, R, k+q): not a taken match
    index = torch.cat([m_index, g_index], dim=-1)  # (B, R, q + k+q)
    taken = torch.cat([m_taken, free], dim=-1)
    # Keep the first k taken slots in order (matches, then fills): order key = slot rank.
    slots = index.shape[-1]
    order = torch.where(taken, slots - torch.arange(slots, device=index.device), torch.zeros_like(index))
    pick = torch.topk(order, k, dim=-1).indices  # (B, R, k): taken slots first, in slot order
    return torch.gather(index, -1, pick), torch.gather(taken, -1, pick)


def disjoint_mixed_topk(keys: torch.Tensor, match: torch.Tensor, k: int, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixed_topk`` with routes that never share a behaviour: the finest route chooses first,
    then each coarser route chooses among the behaviours the finer ones left. Same shapes.

    A behaviour that matches at a fine level matches at every coarser one, so the most specific
    semantic evidence goes to the most specific route; the collaborative fills of the routes
    are successive bands of the similarity ranking instead of R copies of its top.
    """
    b, r, t = match.shape
    index, taken = keys.new_zeros(b, r, k), match.new_zeros(b, r, k)
    free = keys
    for route in reversed(range(r)):
        idx, tk = mixed_topk(free, match[:, route : route + 1], k, rho)  # (B, 1, k)
        index[:, route], taken[:, route] = idx[:, 0], tk[:, 0]
        used = torch.zeros_like(keys).scatter_add_(1, idx[:, 0], tk[:, 0].long())  # (B, T)
        free = free.masked_fill(used > 0, NEG)
    return index, taken


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
# of behaviours. The winners can only come from short lists of behaviours (each route's best
# matching ones, the best overall); filling the routes from those lists in key order gives
# exactly the batch path's result (``route_positions``). A short history is keyed whole
# (``dense_route_positions``).


@dataclass
class HistoryIndex:
    """One history's distinct items and the positions of their behaviours, most recent first."""

    items: torch.Tensor  # (U,) distinct item ids among the present behaviours (by rank when ranked)
    start: torch.Tensor  # (U,) where each item's positions begin in ``positions``
    count: torch.Tensor  # (U,) how many behaviours it has
    last: torch.Tensor  # (U,) its most recent position
    positions: torch.Tensor  # (n,) the present behaviours' positions, item by item, most recent first
    rank: torch.Tensor | None = None  # (U,) the items' ranks, ascending (``index_history(..., rank)``)

    def recent(self, item: torch.Tensor, n: int) -> torch.Tensor:
        """(M,) item indices -> (M, n) their n most recent positions; FAR past an item's count."""
        j = torch.arange(n, device=item.device)
        cell = (self.start.index_select(0, item).unsqueeze(1) + j).clamp_max_(max(len(self.positions) - 1, 0))
        found = self.positions.index_select(0, cell.view(-1)).view(cell.shape) if len(self.positions) else cell
        return found.masked_fill_(j >= self.count.index_select(0, item).unsqueeze(1), FAR)


def index_history(hist: torch.Tensor, mask: torch.Tensor, rank: torch.Tensor | None = None) -> HistoryIndex:
    """Index one history (T,) by item: its distinct items and each one's positions, most recent
    first.

    One sort of T packed integers (item, then most recent first); no Python loop. In numpy: its
    sort is several times faster than torch's on CPU, and its operations are lighter on short
    arrays. ``rank`` (N+1,): the distinct items come in the order of their ``rank``
    (``prefix_ranks``: the items sharing a SID prefix are then one run), kept in
    ``HistoryIndex.rank``.
    """
    h, present = hist.cpu().numpy().astype(np.int64, copy=False), mask.cpu().numpy()
    t = len(h)
    shift = max(t - 1, 1).bit_length()  # key = item << shift | (t - 1 - position)
    key = (h << shift) | np.arange(t - 1, -1, -1)
    n = int(present.sum())
    if n < t:
        key[~present] = _LAST  # absent behaviours sort last
    key.sort()  # by item, then most recent first
    key = key[:n]
    items = key >> shift
    first = np.ones(n, dtype=bool)
    np.not_equal(items[1:], items[:-1], out=first[1:])
    start = np.flatnonzero(first)  # (U,) where each item's run begins
    count = np.diff(np.append(start, n))
    items = items[start]
    positions = (t - 1) - (key & ((1 << shift) - 1))
    ranks = None
    if rank is not None:
        ranks = rank.cpu().numpy()[items]
        order = np.argsort(ranks, kind="stable")
        items, start, count, ranks = items[order], start[order], count[order], torch.from_numpy(ranks[order]).to(rank.device)
    last = positions[start] if n else start
    return HistoryIndex(*(torch.from_numpy(a).to(hist.device) for a in (items, start, count, last, positions)), ranks)


def route_positions(
    item_keys: torch.Tensor,
    index: HistoryIndex,
    length: int,
    k: int,
    quota: int,
    routes: int,
    span: torch.Tensor | None = None,
    disjoint: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixed_topk`` (``disjoint_mixed_topk`` if ``disjoint``) for C candidates against one
    history, from its distinct items.

    item_keys: (C, U) each distinct item's best key for each candidate (``recency_keys`` of its
    similarity at its most recent position, in a history of ``length``). The semantic view:
    span (C, R, 2), each candidate's rank range at each route, coarsest route first
    (``prefix_ranks``; None: none), with ``index`` ranked by the same ranks.
    Returns positions (C, R, k) into the history (0 in a slot not taken) and taken (C, R, k):
    the batch path's result on C copies of the history.

    A route takes its best ``quota`` matching behaviours, then fills from the best ones not
    among them: every behaviour ranked above its last fill is one of its k, so its fills are
    among the best k overall and its matches among its best ``quota`` matching ones. A
    disjoint route chooses after s finer routes took s k behaviours: everything above its
    last fill is one of the (s + 1) k taken so far, so its fills are among the best (s + 1) k
    overall and its matches among its best quota + s k matching ones. Those lists are exact
    (``best_behaviours``, ``matched_items``); merged into key order they are all the batch
    retrieval reads (``fill_in_order``). Past the top-k over items (torch), the arrays are
    short: numpy, much lighter per operation.
    """
    c, device = item_keys.shape[0], item_keys.device
    if len(index.items) == 0:  # nothing to retrieve
        return torch.zeros(c, routes, k, dtype=torch.long, device=device), torch.zeros(c, routes, k, dtype=torch.bool, device=device)
    arrays = {name: getattr(index, name).cpu().numpy() for name in ("start", "count", "last", "positions")}
    n = routes * k if disjoint else k
    best, top = torch.topk(item_keys, min(n, item_keys.shape[1]), dim=1)  # (C, w) the best items
    lists = [best_behaviours(best.cpu().numpy(), top.cpu().numpy(), n, length, **arrays)]  # (C, n)
    if quota and span is not None:
        depth = [quota + (routes - 1 - r) * k * disjoint for r in range(routes)]  # the finest route chooses first
        for best, top, n in matched_items(item_keys, index, depth, span):  # coarsest route, then the others
            lists.append(best_behaviours(best, top, n, length, **arrays).reshape(c, -1))  # (C, g n)
    # merged into key order, each behaviour once; transposed (L, C): numpy scans along axis 0 fastest
    packed = np.ascontiguousarray(np.sort(np.concatenate(lists, axis=1), axis=1)[:, ::-1].T)
    valid = packed >= 0
    valid[1:] &= packed[1:] != packed[:-1]  # a behaviour in two lists (equal keys are adjacent)
    key, item = packed >> _ITEM_BITS, np.where(packed >= 0, packed & (2**_ITEM_BITS - 1), 0)
    rank = index.rank.cpu().numpy()[item] if quota and span is not None else None
    return _routes(key % length, valid, rank, span, k, quota, routes, disjoint, device)


def dense_route_positions(
    keys: torch.Tensor, rank: torch.Tensor | None, span: torch.Tensor | None, k: int, quota: int, routes: int, disjoint: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_positions`` for a short history, every behaviour keyed: keys (C, T)
    (``recency_keys``), rank (T,) each behaviour's item rank (``prefix_ranks``; None with no
    semantic view). One sort per candidate puts the whole history in key order."""
    key = np.ascontiguousarray(np.sort(keys.cpu().numpy(), axis=1)[:, ::-1].T)  # (T, C), best first
    position = key % keys.shape[1]
    rank = rank.cpu().numpy()[position] if rank is not None and quota and span is not None else None
    return _routes(position, key >= 0, rank, span, k, quota, routes, disjoint, keys.device)


def _routes(
    position: np.ndarray, valid: np.ndarray, rank: np.ndarray | None, span: torch.Tensor | None, k: int, quota: int, routes: int, disjoint: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routes from behaviours in key order (L, C): their positions, valid, item ranks."""
    match = None
    if rank is not None:  # the semantic view of each listed behaviour
        bounds = span.cpu().numpy().transpose(1, 2, 0)  # (R, 2, C)
        match = (rank >= bounds[:, :1]) & (rank < bounds[:, 1:])  # (R, L, C)
    position, taken = fill_in_order(position, valid, match, k, quota, routes, disjoint)  # (R, k, C)
    return torch.from_numpy(position.transpose(2, 0, 1).copy()).to(device), torch.from_numpy(taken.transpose(2, 0, 1).copy()).to(device)


_ITEM_BITS = 24  # item indices packed under the keys, to sort them together: U < 2^24, keys < 2^39


def fill_in_order(
    position: np.ndarray, valid: np.ndarray, match: np.ndarray | None, k: int, quota: int, routes: int, disjoint: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The routes' slots from behaviours listed in key order: position, valid (L, C); match
    (R, L, C) the semantic view (None: none). Route r takes its first ``quota`` valid matches,
    then its first valid behaviours not among them, k in all: matches first, then fills, each
    in key order (``mixed_topk``'s slots). ``disjoint``: the finest route first, each one among
    what the finer ones left (``disjoint_mixed_topk``). -> position (R, k, C), taken (R, k, C).
    """
    c = position.shape[1]
    out = np.zeros((routes, k, c), dtype=np.int64)
    count = np.zeros((routes, 1, c), dtype=np.int64)
    free = valid
    for r in reversed(range(routes)):
        rank = np.cumsum(free & match[r], axis=0) if match is not None else np.zeros(free.shape, dtype=np.int64)
        chosen = free & (rank <= quota) & (match[r] if match is not None else False)  # its matches
        n_match = np.minimum(rank[-1], quota)  # (C,)
        fill = free & ~chosen
        fill_rank = np.cumsum(fill, axis=0)
        fill &= fill_rank <= k - n_match  # its fills
        at, col = np.nonzero(chosen | fill)  # the k (at most) entries taken, per column
        out[r, np.where(chosen[at, col], rank[at, col], n_match[col] + fill_rank[at, col]) - 1, col] = position[at, col]
        count[r, 0] = n_match + fill.sum(0)
        if disjoint:
            free = free & ~(chosen | fill)
    return out, np.arange(k)[:, None] < count


def prefix_ranks(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets of items by SID prefix as rank ranges, for ``matched_items``.

    tokens (N+1, R): each item's prefix token at each route's level, coarsest first; prefixes
    nest (items sharing a fine prefix share every coarser one). Returns rank (N+1,): the item's
    place in the lexicographic order of its tokens, and span (N+1, R, 2): the rank range
    [lo, hi) of the items that share its prefix at each route, one run since prefixes nest.
    """
    tok = tokens.cpu().numpy()
    _, rank = np.unique(tok, axis=0, return_inverse=True)
    rank = rank.reshape(-1)
    span = np.empty((*tok.shape, 2), dtype=np.int64)
    for r in range(tok.shape[1]):
        runs = np.unique(np.stack([tok[:, r], rank], axis=1), axis=0)[:, 0]  # one row per (token, rank)
        lo = np.full(tok[:, r].max() + 1, len(tok), dtype=np.int64)
        hi = np.zeros_like(lo)
        np.minimum.at(lo, tok[:, r], rank)
        np.maximum.at(hi, tok[:, r], rank + 1)
        if not np.array_equal(np.bincount(runs, minlength=len(lo))[tok[:, r]], (hi - lo)[tok[:, r]]):
            raise ValueError("route tokens must nest: items sharing a fine prefix share every coarser one")
        span[:, r, 0], span[:, r, 1] = lo[tok[:, r]], hi[tok[:, r]]
    return torch.from_numpy(rank).to(tokens.device), torch.from_numpy(span).to(tokens.device)


def matched_items(item_keys: torch.Tensor, index: HistoryIndex, depth: list[int], span: torch.Tensor):
    """Each route's best-keyed items whose item shares the candidate's prefix at the route's
    level, as many as ``depth`` says (per route), for ``best_behaviours``: per group of routes,
    (best keys, item indices) (C g, w) as numpy arrays and the group's depth n, the coarsest
    route first, then the finer ones.

    span (C, R, 2): each candidate's rank range at each route (``prefix_ranks``); ``index`` is
    ranked by the same ranks, so the items matching a candidate at a route are one run of
    columns: a candidate reads only its runs, padded to the longest one read, (C, S) rather
    than (C, U). The coarsest route's runs are the longest, so it is read apart.
    """
    c, r, _ = span.shape
    u = len(index.items)
    lo, hi = torch.searchsorted(index.rank, span).unbind(-1)  # (C, R) each: the runs
    for routes in (slice(0, 1), slice(1, r)):
        g_lo, g_hi = lo[:, routes], hi[:, routes]  # (C, g)
        g = g_lo.shape[1]
        if g == 0:
            continue
        n = max(depth[routes])
        width = max(int((g_hi - g_lo).max()), 1)
        col = g_lo.unsqueeze(-1) + torch.arange(width, device=lo.device)  # (C, g, S) item index
        keys = torch.gather(item_keys, 1, col.view(c, -1).clamp_max(u - 1)).masked_fill_((col >= g_hi.unsqueeze(-1)).view(c, -1), NEG)
        best, top = torch.topk(keys.view(c * g, width), min(n, width), dim=1)
        # a padding column past the run is excluded (NEG): any item will do
        yield best.cpu().numpy(), top.add_(g_lo.reshape(-1, 1)).clamp_max_(u - 1).cpu().numpy(), n


def best_behaviours(
    best: np.ndarray, top: np.ndarray, n: int, length: int, start: np.ndarray, count: np.ndarray, last: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """The n best-keyed behaviours of each row's best items, best first, packed as
    ``key << _ITEM_BITS | item index`` (B, n) int64, -1 = none.

    best, top (B, w): a row's w best items (index into the history's distinct items; their
    ``HistoryIndex`` arrays follow) and their keys, best first, NEG = excluded.
    A behaviour among the top n belongs to an item among the top n by best key (each better
    item's most recent behaviour outranks it). The j-th most recent behaviour of an item is
    outranked by every behaviour of the items of higher similarity, by the most recent one of
    each better item of the same similarity, and by its own j more recent ones: it can be
    among the top n only if these are fewer than n. So a row keys only those cells, often a
    few items' behaviours (``recency_keys``: similarity * length + position), packed row by
    row and padded to the longest row.
    """
    b, w = best.shape
    if len(count) >= 1 << _ITEM_BITS or best.max(initial=0) >= 1 << (63 - _ITEM_BITS):
        raise ValueError(f"history too long to pack its keys: {len(count)} distinct items, keys up to {best.max()}")
    count = np.minimum(count[top], n)  # (B, w) the behaviours that can count
    sim, at = best // length, np.arange(w)
    level = np.maximum.accumulate(np.where(np.diff(sim, axis=1, prepend=-2) != 0, at, 0), axis=1)  # first item of its similarity
    above = np.take_along_axis(np.cumsum(count, axis=1) - count, level, 1) + at - level  # behaviours that outrank its most recent
    depth = np.clip(n - above, 0, count)  # (B, w) cells of each (row, item)
    depth[best < 0] = 0  # none for an excluded item
    flat = depth.ravel()
    owner = np.repeat(np.arange(b * w), flat)  # (L,) the (row, item) of each cell, row by row
    cell = np.arange(len(owner))
    item = top.ravel()[owner]
    key = (best - last[top]).ravel()[owner] + positions[start[item] + cell - (np.cumsum(flat) - flat)[owner]]
    per_row = depth.sum(1)
    row = owner // w
    packed = np.full((b, max(int(per_row.max(initial=0)), n)), -1, dtype=np.int64)
    packed[row, cell - (np.cumsum(per_row) - per_row)[row]] = (key << _ITEM_BITS) | item
    return np.sort(packed, axis=1)[:, : -n - 1 : -1]
