"""Top-k retrieval over a lifelong history, on integer keys only.

The collaborative score of a behaviour is its SimHash similarity to the target; the semantic
view is a SID-prefix match. Both are integers, so a history of any length is scored without
building a (B, T, d) float tensor: only the k winners' embeddings are gathered afterwards.
"""

from __future__ import annotations

import math

import numpy as np
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


def disjoint_mixed_topk(
    keys: torch.Tensor, match: torch.Tensor, k: int, rho: float
) -> tuple[torch.Tensor, torch.Tensor]:
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


# ---- serving: many candidates against ONE user's state --------------------------------------
# A request scores C candidates against one user's history. Keys depend on a behaviour only
# through its item (similarity, prefix match) and its position (recency), so the user state
# keeps the history indexed by distinct item (``user_state.SignatureIndex``: chains of
# positions, updated on append) and each candidate scores distinct items instead of
# behaviours; compiled code (``route_kernels.state_routes``) then reads the items' behaviours
# in key order only as deep as the routes need: exactly the batch path's result.


def batch_route_positions(
    hist: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    sigs: torch.Tensor,
    tokens: torch.Tensor | None,
    k: int,
    quota: int,
    routes: int,
    disjoint: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixed_topk`` (``disjoint_mixed_topk`` if ``disjoint``) for a batch whose rows have
    their own histories, compiled (``route_kernels.batch_routes``), on CPU: the same slots.

    hist, mask (B, T); target (B,); sigs (N+1, words) every item's SimHash signature; tokens
    (N+1, R) each item's prefix token at each route's level (None: no semantic view). Returns
    index (B, R, k) into T (0 in a slot not taken) and taken (B, R, k).
    """
    from r2led.models import route_kernels

    b, t = hist.shape
    tok = (
        np.zeros((len(sigs), 0), np.int64)
        if tokens is None
        else np.ascontiguousarray(tokens.cpu().numpy().astype(np.int64, copy=False))
    )
    out, n = np.zeros((b, routes, k), np.int64), np.empty((b, routes), np.int64)
    args = [np.ascontiguousarray(x.cpu().numpy()) for x in (hist, mask, target)]
    sig = np.ascontiguousarray(sigs.cpu().numpy()).view(np.uint64)
    work = route_kernels.batch_scratch(t, k, quota, routes, sig.shape[1])
    route_kernels.batch_routes(*args, sig, tok, k, quota, routes, disjoint, out, n, work)
    return torch.from_numpy(out), torch.from_numpy(np.arange(k) < n[..., None])


def prefix_ranks(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets of items by SID prefix as rank ranges, for the request path (``SignatureIndex``).

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
