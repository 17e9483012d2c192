"""Multi-route Mixed Retrieval, compiled (numba): the same slots as ``retrieval.mixed_topk`` /
``retrieval.disjoint_mixed_topk``, without whole-array passes.

Serving (``request_routes``): a request scores C candidates against ONE history of T behaviours.
A behaviour's key depends on it through its item (SimHash similarity to the candidate,
SID-prefix match) and its position (recency), so the history is indexed once by distinct item
(``count_items``, ``index_items``: U items, each with its positions, most recent first), and
each candidate works on the U items: per-candidate work grows with U, not T, and no (C, T)
array exists. Every list a route reads is produced lazily in key order, by a heap over the
items that can contribute (``_best_behaviours``), only as deep as the routes need.

Training and evaluation (``batch_routes``): every row has its own history; two passes over a
row (similarity-level histograms, then keys for the behaviours above each list's cut) and a
sort of those few.

Both fill the routes with ``_take_route``. Numba rather than array code: the work is a few
hundred small, data-dependent steps per row (a heap, early exits), which array libraries can
only express as many whole-array passes. Compiled on first use and cached (``cache=True``, in
``__pycache__``). The kernels allocate nothing: callers pass every array (``request_scratch``,
``batch_scratch``), so memory accounting (``tracemalloc``) sees every byte.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def count_items(hist, present, order, count_of):
    """Behaviours per item into ``count_of`` (N+1,) (zeroed); returns (distinct items, present
    behaviours). hist (T,) int64 item ids, present (T,) bool, order (N+1,) every item id once."""
    count_of[:] = 0
    n = 0
    for i in range(hist.shape[0]):
        if present[i]:
            count_of[hist[i]] += 1
            n += 1
    u = 0
    for j in range(order.shape[0]):
        if count_of[order[j]] > 0:
            u += 1
    return u, n


@njit(cache=True)
def index_items(hist, present, order, count_of, slot, items, start, count, positions):
    """The history indexed by distinct item, in the order ``order`` lists items (e.g. by
    SID-prefix rank, so the items sharing a prefix are one run), after ``count_items``: items
    (U,), start (U,), count (U,), positions (n,) filled so that item u's behaviours are
    positions[start[u]: start[u] + count[u]], most recent first; slot (N+1,) scratch.
    O(T + N): counting, no sort.
    """
    u, n = 0, 0
    for j in range(order.shape[0]):
        item = order[j]
        c = count_of[item]
        if c > 0:
            items[u], start[u], count[u], slot[item] = item, n, c, u
            n += c
            u += 1
    count_of[:] = 0  # reused: behaviours placed so far per distinct item
    for i in range(hist.shape[0] - 1, -1, -1):  # most recent first
        if present[i]:
            s = slot[hist[i]]
            positions[start[s] + count_of[s]] = i
            count_of[s] += 1


@njit(cache=True)
def _popcount(x):
    """Set bits of a uint64 (LLVM compiles this pattern to one ``popcnt``)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True)
def _sift_down(keys, item, depth, size, at):
    """Restore the max-heap property of (keys, item, depth)[:size] below ``at``."""
    key, it, dp = keys[at], item[at], depth[at]
    while True:
        child = 2 * at + 1
        if child >= size:
            break
        if child + 1 < size and keys[child + 1] > keys[child]:
            child += 1
        if keys[child] <= key:
            break
        keys[at], item[at], depth[at] = keys[child], item[child], depth[child]
        at = child
    keys[at], item[at], depth[at] = key, it, dp


@njit(cache=True)
def _best_behaviours(sim, lo, hi, need, length, start, count, positions, per_level, counted, heap_key, heap_item, heap_depth, out):
    """The ``need`` best-keyed behaviours of items lo..hi-1 (key = sim * length + position, as
    ``retrieval.recency_keys``), best first, written to ``out``; returns how many there are.

    Only the ``need`` best items by their most recent behaviour can hold one of them, and they
    lie at the ``need`` highest similarity levels that have items: a histogram over levels
    finds the cut (``per_level``: items per similarity, already ``counted`` or not), a heap
    over the items above it merges their behaviours in key order.
    """
    if need <= 0 or lo >= hi:
        return 0
    if not counted:
        per_level[:] = 0
        for u in range(lo, hi):
            per_level[sim[u]] += 1
    cut = _cut(per_level, need)
    size = 0
    for u in range(lo, hi):
        if sim[u] >= cut:
            heap_key[size] = sim[u] * length + positions[start[u]]
            heap_item[size], heap_depth[size] = u, 0
            size += 1
    for at in range(size // 2 - 1, -1, -1):
        _sift_down(heap_key, heap_item, heap_depth, size, at)
    n = 0
    while n < need and size > 0:
        u, j = heap_item[0], heap_depth[0]
        out[n] = positions[start[u] + j]
        n += 1
        if j + 1 < count[u]:  # the item's next most recent behaviour takes its place
            heap_key[0] = sim[u] * length + positions[start[u] + j + 1]
            heap_depth[0] = j + 1
        else:
            size -= 1
            heap_key[0], heap_item[0], heap_depth[0] = heap_key[size], heap_item[size], heap_depth[size]
        _sift_down(heap_key, heap_item, heap_depth, size, 0)
    return n


@njit(cache=True)
def request_routes(target_sig, item_sig, length, start, count, positions, lo, hi, k, quota, disjoint, out, taken, scratch):
    """Every candidate's routes: positions (C, R, k) into the history (0 where not taken) and
    the number taken (C, R), slots taken first.

    target_sig (C, W), item_sig (U, W) uint64 SimHash signatures of the candidates and of the
    history's distinct items: similarity = m - hamming, m = 64 W; start, count, positions:
    ``index_history``; lo, hi (C, R) the items matching each candidate at each route (one run,
    coarsest route first; lo = hi: no semantic view). Writes out (C, R, k) zeroed and taken
    (C, R); ``scratch``: the arrays of ``request_scratch``.
    Route r takes its best ``quota`` matching behaviours, then its best behaviours not among
    them, k in all; ``disjoint``: the finest route first, each one among what finer ones left.
    The fills of a route are among the best R k behaviours overall (k if not disjoint), its
    matches among its best quota + (R - 1 - r) k matching ones (quota if not disjoint).
    """
    c_n, words = target_sig.shape
    u_n = item_sig.shape[0]
    levels = 64 * words + 1  # similarity 0..m
    routes = lo.shape[1]
    heap_key, heap_item, heap_depth, row, best, matched, per_level, used, chosen = scratch
    n_best = routes * k if disjoint else k
    used[:] = -1  # candidate that took the behaviour (disjoint routes)
    chosen[:] = -1  # candidate * R + route that chose it as a match
    for c in range(c_n):
        per_level[:] = 0
        for u in range(u_n):  # similarity to every distinct item, and how many per level
            hamming = 0
            for w in range(words):
                hamming += _popcount(target_sig[c, w] ^ item_sig[u, w])
            row[u] = levels - 1 - hamming
            per_level[row[u]] += 1
        n_g = _best_behaviours(row, 0, u_n, n_best, length, start, count, positions, per_level, True, heap_key, heap_item, heap_depth, best)
        for r in range(routes - 1, -1, -1):
            n_m = 0
            if quota > 0 and lo[c, r] < hi[c, r]:
                depth = quota + (routes - 1 - r) * k if disjoint else quota
                n_m = _best_behaviours(row, lo[c, r], hi[c, r], depth, length, start, count, positions, per_level, False, heap_key, heap_item, heap_depth, matched)
            taken[c, r] = _take_route(c, c * routes + r, matched, n_m, best, n_g, k, quota, disjoint, used, chosen, out[c, r])


@njit(cache=True)
def _take_route(owner, route_id, matched, n_m, best, n_g, k, quota, disjoint, used, chosen, slots):
    """One route of one row: its first ``quota`` matches not ``used`` by ``owner``'s finer
    routes (``matched[:n_m]``, key order), then the first of ``best[:n_g]`` neither used nor
    among them, k in all, into ``slots``; returns how many. Stamps: ``chosen[p] = route_id``
    for its matches, ``used[p] = owner`` for all it takes when ``disjoint``."""
    n = 0
    for i in range(n_m):
        if n == quota:
            break
        p = matched[i]
        if used[p] == owner:
            continue
        slots[n] = p
        chosen[p] = route_id
        n += 1
    for i in range(n_g):
        if n == k:
            break
        p = best[i]
        if used[p] == owner or chosen[p] == route_id:
            continue
        slots[n] = p
        n += 1
    if disjoint:
        for i in range(n):
            used[slots[i]] = owner
    return n


def request_scratch(length: int, distinct: int, k: int, quota: int, routes: int, words: int) -> tuple[np.ndarray, ...]:
    """``request_routes``'s working arrays: heap (3 x U), similarity row (U), best (R k), matched
    (quota + (R-1) k), per level (64 W + 1), and two stamps per position (T, int32)."""
    ints = [distinct, distinct, distinct, distinct, routes * k, quota + (routes - 1) * k, 64 * words + 1]
    return (*(np.empty(n, np.int64) for n in ints), np.empty(length, np.int32), np.empty(length, np.int32))


@njit(cache=True)
def _best_keys(keys, n_keys, need, out):
    """The ``need`` largest of ``keys[:n_keys]`` (distinct), largest first, as positions
    (key % T is left to the caller) into ``out``; returns how many. Sorts in place."""
    part = keys[:n_keys]
    part.sort()
    n = min(need, n_keys)
    for i in range(n):
        out[i] = part[n_keys - 1 - i]
    return n


@njit(cache=True)
def batch_routes(hist, mask, target, sigs, tokens, k, quota, routes, disjoint, out, taken, scratch):
    """``retrieval.mixed_topk`` / ``disjoint_mixed_topk`` for a training batch, row by row:
    positions (B, R, k) into each row's history (0 where not taken) into ``out`` (zeroed),
    the number taken (B, R) into ``taken``.

    hist, mask (B, T); target (B,); sigs (N+1, W) uint64 SimHash signatures of every item;
    tokens (N+1, R') each item's prefix token at each route's level, coarsest first (R' = 0:
    no semantic view). A row's keys are similarity * T + position; two passes over its T
    behaviours (histograms of similarity levels, overall and per route, then the behaviours
    at or above each list's cut) and a sort of those few give every list the routes read.
    """
    b_n, t_n = hist.shape
    words = sigs.shape[1]
    levels = 64 * words + 1
    semantic = tokens.shape[1] > 0 and quota > 0
    sim, flags, cand, route_cand, best, matched, level_all, level_route, cut_route, n_route, used, chosen = scratch
    n_best = routes * k if disjoint else k
    used[:] = -1
    chosen[:] = -1
    for b in range(b_n):
        tb = target[b]
        level_all[:] = 0
        level_route[:, :] = 0
        for t in range(t_n):  # pass 1: similarity, route matches, histograms
            if not mask[b, t]:
                sim[t] = -1
                continue
            h = hist[b, t]
            hamming = 0
            for w in range(words):
                hamming += _popcount(sigs[tb, w] ^ sigs[h, w])
            s = levels - 1 - hamming
            sim[t] = s
            level_all[s] += 1
            f = 0
            if semantic:
                for r in range(routes):
                    if tokens[h, r] == tokens[tb, r]:
                        f |= 1 << r
                        level_route[r, s] += 1
            flags[t] = f
        cut = _cut(level_all, n_best)
        for r in range(routes):
            cut_route[r] = _cut(level_route[r], quota + (routes - 1 - r) * k if disjoint else quota) if semantic else levels
            n_route[r] = 0
        n_cand = 0
        for t in range(t_n):  # pass 2: the behaviours that can make a list, keyed
            s = sim[t]
            if s < 0:
                continue
            key = s * t_n + t
            if s >= cut:
                cand[n_cand] = key
                n_cand += 1
            if flags[t]:
                for r in range(routes):
                    if flags[t] & (1 << r) and s >= cut_route[r]:
                        route_cand[r, n_route[r]] = key
                        n_route[r] += 1
        n_g = _best_keys(cand, n_cand, n_best, best)
        for i in range(n_g):
            best[i] %= t_n
        for r in range(routes - 1, -1, -1):
            n_m = 0
            if semantic:
                depth = quota + (routes - 1 - r) * k if disjoint else quota
                n_m = _best_keys(route_cand[r], n_route[r], depth, matched)
                for i in range(n_m):
                    matched[i] %= t_n
            taken[b, r] = _take_route(b, b * routes + r, matched, n_m, best, n_g, k, quota, disjoint, used, chosen, out[b, r])


@njit(cache=True)
def _cut(per_level, need):
    """The lowest similarity level a list of ``need`` can reach: the highest level at which
    the behaviours counted at or above it are at least ``need`` (0 if never)."""
    cut, seen = per_level.shape[0] - 1, 0
    while cut > 0:
        seen += per_level[cut]
        if seen >= need:
            break
        cut -= 1
    return cut


def batch_scratch(length: int, k: int, quota: int, routes: int, words: int) -> tuple[np.ndarray, ...]:
    """``batch_routes``'s working arrays (per row, reused): similarity and match flags per
    behaviour, the keyed candidates overall and per route (T each), the lists, the level
    histograms, and two stamps per position."""
    levels = 64 * words + 1
    return (
        np.empty(length, np.int64), np.empty(length, np.int64), np.empty(length, np.int64), np.empty((routes, length), np.int64),
        np.empty(routes * k, np.int64), np.empty(quota + (routes - 1) * k, np.int64),
        np.empty(levels, np.int64), np.empty((routes, levels), np.int64), np.empty(routes, np.int64), np.empty(routes, np.int64),
        np.empty(length, np.int32), np.empty(length, np.int32),
    )  # fmt: skip
