"""Multi-route Mixed Retrieval, compiled (numba): the same slots as ``retrieval.mixed_topk`` /
``retrieval.disjoint_mixed_topk``, without whole-array passes.

Serving (``state_routes``): a request scores C candidates against ONE user's history, kept in
the user's state (``user_state.SignatureIndex``) as chains: each distinct item's positions,
most recent first (``chain_items`` builds them in O(T); an append extends them in O(1)). A
behaviour's key depends on it through its item (SimHash similarity to the candidate,
SID-prefix match) and its position (recency), so each candidate works on the U distinct items:
one vectorised popcount pass (``_similarities_one_word``), then for every list a route reads
the lowest similarity level that can reach it, counting each item's behaviours in the window
(``_list_cut``), and the list itself produced lazily in key order by a heap over the items at
or above that level (``_best_chained``), only as deep as the routes need. Nothing of size T
is touched per request (taken behaviours are marked in small hash sets).

SIM-hard's state (``chain_keys``, ``walk_chains``): positions chained by category; a request
walks k links per candidate.

Training and evaluation (``batch_routes``): every row has its own history; two passes over a
row (similarity-level histograms, then keys for the behaviours above each list's cut) and a
sort of those few.

Both fill the routes with ``_take_route``. Numba rather than array code: the work is a few
hundred small, data-dependent steps per row (a heap, early exits), which array libraries can
only express as many whole-array passes. Compiled on first use and cached (``cache=True``, in
``__pycache__``). The kernels allocate nothing: callers pass every array (``state_scratch``,
``batch_scratch``), so memory accounting (``tracemalloc``) sees every byte.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _popcount(x):
    """Set bits of a uint64 (LLVM compiles this pattern to one ``popcnt``)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True)
def _hamming(a, i, b, j):
    """Hamming distance between packed signatures ``a[i]`` and ``b[j]`` (uint64 words)."""
    total = np.uint64(0)
    for w in range(a.shape[1]):
        total += _popcount(a[i, w] ^ b[j, w])
    return np.int64(total)


@njit(cache=True)
def _sift_down4(keys, rank, pos, cursor, size, at):
    """Restore the heap order from slot ``at`` down, for a heap of (key, rank, position, group cursor)."""
    key, rk, ps, cur = keys[at], rank[at], pos[at], cursor[at]
    while True:
        child = 2 * at + 1
        if child >= size:
            break
        if child + 1 < size and keys[child + 1] > keys[child]:
            child += 1
        if keys[child] <= key:
            break
        keys[at], rank[at], pos[at], cursor[at] = keys[child], rank[child], pos[child], cursor[child]
        at = child
    keys[at], rank[at], pos[at], cursor[at] = key, rk, ps, cur


@njit(cache=True)
def group_positions(hist, slot_of, slot_item, u, group_off, grouped, cursor):
    """Each slot's positions, most recent first, stored together: ``grouped[group_off[s]:
    group_off[s+1]]`` (a counting sort of the history by slot; ``slot_item`` from
    ``chain_items``). The chains list the same positions in the same order, one random access
    each: walking a group instead reads consecutive memory (at T = 10^6 the chains' misses were
    half of a request's route filling). ``slot_of`` (N+1,) must hold -1 (it is left so);
    cursor (U,) scratch. O(T)."""
    for s in range(u):
        slot_of[slot_item[s]] = s
    group_off[:] = 0
    for i in range(hist.shape[0]):
        group_off[slot_of[hist[i]] + 1] += 1
    for s in range(u):
        group_off[s + 1] += group_off[s]
        cursor[s] = group_off[s]
    for i in range(hist.shape[0] - 1, -1, -1):
        s = slot_of[hist[i]]
        grouped[cursor[s]] = i
        cursor[s] += 1
    for s in range(u):
        slot_of[slot_item[s]] = -1


@njit(cache=True)
def chain_items(hist, slot_of, slot_item, slot_last, prev):
    """Index a history (T,) by distinct item, as chains: the items in order of first
    appearance get slots 0..U-1 (``slot_item``), ``slot_last[s]`` is slot s's most recent
    position and ``prev[i]`` the previous position of position i's item (-1: none), so
    walking from ``slot_last`` along ``prev`` lists an item's behaviours most recent first.
    ``slot_of`` (N+1,) must hold -1 everywhere (it is left so). Returns U. O(T), no sort;
    appending a behaviour later extends the chains in O(1) (``user_state.SignatureIndex``).
    """
    u = 0
    for i in range(hist.shape[0]):
        item = hist[i]
        s = slot_of[item]
        if s < 0:
            s = u
            slot_of[item], slot_item[s], slot_last[s] = s, item, -1
            u += 1
        prev[i] = slot_last[s]
        slot_last[s] = i
    for s in range(u):
        slot_of[slot_item[s]] = -1
    return u


@njit(cache=True)
def chain_keys(keys, last_of, prev):
    """Chains of positions by key (e.g. SIM-hard's category): ``last_of[key]`` the most recent
    position with that key (-1: none; the caller fills it with -1), ``prev[i]`` the previous
    position with position i's key. O(T)."""
    for i in range(keys.shape[0]):
        key = keys[i]
        prev[i] = last_of[key]
        last_of[key] = i


@njit(cache=True)
def walk_chains(last_of, prev, keys, k, start, out, taken):
    """For each query c, the ``k`` most recent positions at or after ``start`` whose key is
    ``keys[c]`` (key 0 never matches), most recent first, as positions from ``start``, into
    out (C, k); how many into taken (C,). O(C k)."""
    for c in range(keys.shape[0]):
        n = 0
        key = keys[c]
        if key > 0 and key < last_of.shape[0]:
            p = last_of[key]
            while p >= start and n < k:
                out[c, n] = p - start
                n += 1
                p = prev[p]
        taken[c] = n


@njit(cache=True)
def _similarities(target_sig, c, slot_sig, levels, sim):
    """sim[s] = m - hamming(target c, slot s) for every slot: one pass over the slots'
    contiguous signatures."""
    for s in range(slot_sig.shape[0]):
        sim[s] = levels - 1 - _hamming(target_sig, c, slot_sig, s)


@njit(cache=True)
def _similarities_one_word(t, words, top, sim):
    """sim[j] = top - popcount(t ^ words[j]) over a 1-D array of one-word signatures: a plain
    map over contiguous memory, which LLVM vectorises (``vpopcntq`` where the CPU has it).
    Measured on the bench's AMD EPYC: 12,317 items x 100 candidates in 0.07 ms, against
    0.6 ms for the same pass over (U, 1) rows with the popcount in a word loop. Returns the
    highest similarity (-1 if none)."""
    best = np.int64(-1)
    for j in range(words.shape[0]):
        v = top - np.int64(_popcount(t ^ words[j]))
        sim[j] = v
        best = max(best, v)
    return best


@njit(cache=True)
def _similarities_by_rank(target_sig, c, rank_sig, rank_words, levels, sim, order, slot_last, start):
    """``_similarities`` over the items in rank order (``rank_sig`` (U, W): their signatures in
    the order of ``order``; ``rank_words`` the same memory as one 1-D array) into ``sim`` by
    rank; an item whose behaviours all lie before ``start`` (out of the window) gets -1. The
    common case (one 64-bit word, no window) is one vectorised map. Returns the highest
    similarity (-1 if none)."""
    if rank_sig.shape[1] == 1 and start == 0:
        return _similarities_one_word(target_sig[c, 0], rank_words, np.int64(levels - 1), sim)
    best = np.int64(-1)
    for j in range(rank_sig.shape[0]):
        if slot_last[order[j]] < start:
            sim[j] = -1
        else:
            v = levels - 1 - _hamming(target_sig, c, rank_sig, j)
            sim[j] = v
            best = max(best, v)
    return best


@njit(cache=True)
def _count_at_least(sim, weight, lo, hi, level):
    """The behaviours (``weight``: each item's count) of the items in sim[lo:hi] at or above
    ``level`` (a masked sum LLVM vectorises)."""
    n = 0
    for j in range(lo, hi):
        if sim[j] >= level:
            n += weight[j]
    return n


@njit(cache=True)
def _list_cut(sim, weight, pick, lo, hi, need, top, per_level):
    """``_cut`` of the similarity levels of the items at ranks pick[lo:hi] (``pick`` empty: the
    ranks lo..hi-1 themselves, as in ``_best_chained``; -1: not counted), each counting its
    behaviours in the window (``weight``): the highest level with at least ``need`` behaviours
    at or above it (0 if none). Counting behaviours rather than items keeps the heap small at
    long T, where the best item alone often holds the whole list.

    For a long run of ranks, ``top`` (at least the run's highest similarity) is tried first
    with one vectorised count: it settles the cut whenever the best level alone holds ``need``
    (for over half of the overall lists at T = 10^6 in the speed benchmark, 500 measured: a
    candidate the user has interacted with many times). Otherwise one histogram pass
    (``per_level`` scratch): measured on 12,600 items, a count pass takes 1.0 us, a histogram
    pass 4.1 us, and a binary search over the levels needs about 7 counts."""
    direct = pick.shape[0] == 0
    if direct and hi - lo > 256 and top > 0 and _count_at_least(sim, weight, lo, hi, top) >= need:
        return top
    per_level[:] = 0
    for i in range(lo, hi):
        j = i if direct else pick[i]
        v = sim[j]
        if v >= 0:
            per_level[v] += weight[j]
    return _cut(per_level, need)


@njit(cache=True)
def scan_similarities(target_sig, slot_sig, sim):
    """One pass of every candidate over every distinct item: the popcount similarities, and
    nothing else (the speed benchmark's floor), by the same functions as ``state_routes``.
    sim (U,) scratch; returns the best per candidate summed, so the work cannot be optimised
    away."""
    levels = 64 * target_sig.shape[1] + 1
    words = slot_sig.reshape(-1)
    total = 0
    for c in range(target_sig.shape[0]):
        if slot_sig.shape[1] == 1:
            _similarities_one_word(target_sig[c, 0], words, np.int64(levels - 1), sim)
        else:
            _similarities(target_sig, c, slot_sig, levels, sim)
        best = 0
        for s in range(sim.shape[0]):
            best = max(best, sim[s])
        total += best
    return total


@njit(cache=True)
def _best_chained(sim, pick, lo, hi, order, need, cut, length, start, slot_last, prev, groups, heap, out):
    """The ``need`` best-keyed behaviours of the items at ranks pick[lo:hi] (``pick`` empty:
    the ranks lo..hi-1 themselves, e.g. a SID-prefix run), key = sim * length + position (as
    ``retrieval.recency_keys``), best first, into ``out``; returns how many. ``sim`` is by rank;
    ``order`` maps a rank to the item's slot.

    Every behaviour of an item shares its similarity, so the ``need`` best lie at the highest
    similarity levels holding ``need`` behaviours: ``cut`` (>= 0, from
    ``_list_cut``) is the lowest of those levels; a heap over the items at or
    above it merges their positions in key order. An item's positions, most recent first:
    along the chain (``prev``) while they are later than ``groups``' build, then its group
    (``grouped[group_off[s]:group_off[s+1]]``, consecutive) from there.
    """
    if need <= 0 or lo >= hi:
        return 0
    grouped, group_off, built = groups
    heap_key, heap_rank, heap_pos, heap_cur = heap
    direct = pick.shape[0] == 0
    size = 0
    # A plain scan: its rarely taken branch predicts well (measured on 12,600 items: 1.7 us,
    # against 3.3 us skipping blocks of 64 by their maximum, which numba does not vectorise).
    for i in range(lo, hi):
        j = i if direct else pick[i]
        if sim[j] >= cut:
            s = order[j]
            p = slot_last[s]
            heap_key[size], heap_rank[size], heap_pos[size] = sim[j] * length + p, j, p
            heap_cur[size] = group_off[s] if p < built else -1  # -1: on the chain
            size += 1
    for at in range(size // 2 - 1, -1, -1):
        _sift_down4(heap_key, heap_rank, heap_pos, heap_cur, size, at)
    n = 0
    while n < need and size > 0:
        j, p, cur = heap_rank[0], heap_pos[0], heap_cur[0]
        out[n] = p
        n += 1
        if cur >= 0:  # in the item's group: the next entry, if the group goes on
            s = order[j]
            cur += 1
            q = grouped[cur] if cur < group_off[s + 1] else -1
        else:
            q = prev[p]
            if 0 <= q < built:  # the chain reaches the group: read it from its head (== q)
                cur = group_off[order[j]]
        if q >= start:  # the item's next most recent behaviour in the window takes its place
            heap_key[0], heap_pos[0], heap_cur[0] = sim[j] * length + q, q, cur
        else:
            size -= 1
            heap_key[0], heap_rank[0], heap_pos[0], heap_cur[0] = (
                heap_key[size], heap_rank[size], heap_pos[size], heap_cur[size],
            )  # fmt: skip
        _sift_down4(heap_key, heap_rank, heap_pos, heap_cur, size, 0)
    return n


@njit(cache=True)
def state_routes(
    target_sig, rank_sig, order, rank_of_slot, rank_count, slot_last, prev, groups, length, start, lo, hi, k, quota,
    disjoint, band_slots, band_lo, band_hi, out, taken, scratch,
):  # fmt: skip
    """Every candidate's routes against one user's history kept as chains (``chain_items``):
    positions (C, R, k) into the history (0 where not taken) into ``out`` (zeroed), and the
    number taken (C, R) into ``taken``, slots taken first.

    target_sig (C, W) uint64 SimHash signatures of the candidates, rank_sig (U, W) of the
    history's distinct items in rank order; order (U,) the slots by SID-prefix rank (rank_of_slot
    its inverse), rank_count (U,) each item's behaviours in the window, by rank; lo, hi (C, R)
    each candidate's run of matching items in ``order`` at each route, coarsest route first
    (lo = hi: no semantic view); slot_last, prev: the chains; groups (grouped, group_off,
    built): the positions before ``built`` grouped by slot (``group_positions``); length: the
    arrays' length;
    only positions at or after ``start`` are the window (``UserState.max_length``).
    Route r takes its best ``quota`` matching behaviours, then its best behaviours not among
    them, k in all; ``disjoint``: the finest route first, each one among what finer ones left.
    The fills of a route are among the best R k behaviours overall (k if not disjoint), its
    matches among its best quota + (R - 1 - r) k matching ones (quota if not disjoint).

    band_slots (bands, U), band_lo, band_hi (C, bands): with bands (``SignatureBands``), the
    overall list is taken among the candidate's semantic run (its coarsest route's items, whose
    similarities the matches need anyway) and the items sharing a band with it, and only those
    items are scored: approximate; no bands (shape (0, 0)): among every item, exact.

    The behaviours a candidate's routes took (and a route's own matches) are marked in two
    small hash sets (``_PositionSet``), not in arrays of size T: random access into T-sized
    stamps missed the cache at long T (measured: most of the kernel's time at T = 10^6).
    ``scratch``:
    ``state_scratch``. Per candidate: one popcount pass over the U items (vectorised), the
    cuts by vectorised counts, then heaps.
    """
    c_n = target_sig.shape[0]
    u_n = order.shape[0]
    levels = 64 * target_sig.shape[1] + 1  # similarity 0..m
    routes = lo.shape[1]
    heap_key, heap_rank, heap_pos, heap_cur, sim, best, matched, per_level, used, chosen, near, stamp = scratch
    heap = (heap_key, heap_rank, heap_pos, heap_cur)
    n_best = routes * k if disjoint else k
    every = order[:0]  # no ``pick``: a run of ranks
    banded = band_slots.shape[0] > 0
    used[:] = -1
    chosen[:] = -1
    stamp[:] = -1
    rank_words = rank_sig.reshape(-1)  # (U W,): one word per item in the common case
    for c in range(c_n):
        if banded:
            n_near = _near_items(
                target_sig, c, rank_sig, levels, sim, order, rank_of_slot, lo, hi, quota, band_slots, band_lo,
                band_hi, slot_last, start, near, stamp,
            )  # fmt: skip
            top = levels - 1  # an upper bound for the runs' cuts
            cut = _list_cut(sim, rank_count, near, 0, n_near, n_best, top, per_level)
            n_g = _best_chained(
                sim, near, 0, n_near, order, n_best, cut, length, start, slot_last, prev, groups, heap, best
            )  # fmt: skip
        else:
            top = _similarities_by_rank(target_sig, c, rank_sig, rank_words, levels, sim, order, slot_last, start)
            cut = _list_cut(sim, rank_count, every, 0, u_n, n_best, top, per_level)
            n_g = _best_chained(
                sim, every, 0, u_n, order, n_best, cut, length, start, slot_last, prev, groups, heap, best
            )  # fmt: skip
        for r in range(routes - 1, -1, -1):
            n_m = 0
            if quota > 0 and lo[c, r] < hi[c, r]:
                depth = quota + (routes - 1 - r) * k if disjoint else quota
                cut = _list_cut(sim, rank_count, every, lo[c, r], hi[c, r], depth, top, per_level)
                n_m = _best_chained(
                    sim, every, lo[c, r], hi[c, r], order, depth, cut, length, start, slot_last, prev, groups, heap,
                    matched,
                )  # fmt: skip
            taken[c, r] = _take_route_sets(matched, n_m, best, n_g, k, quota, disjoint, used, chosen, out[c, r])
            _unset(chosen, out[c, r], taken[c, r])  # emptied for the next route
        if disjoint:  # emptied for the next candidate, the last route's insertions first
            for r in range(routes):
                _unset(used, out[c, r], taken[c, r])


@njit(cache=True)
def _near_items(
    target_sig, c, rank_sig, levels, sim, order, rank_of_slot, lo, hi, quota, band_slots, band_lo, band_hi, slot_last,
    start, near, stamp,
):  # fmt: skip
    """The items candidate ``c`` scores with bands, by rank: its coarsest route's run (every
    route's matches lie in it: prefixes nest) and every item in its buckets (slots, ranked
    through ``rank_of_slot``), each once (``stamp``: the candidate that listed it last), into
    ``near``; their similarities into ``sim`` (-1: out of the window). Returns how many."""
    n = 0
    if quota > 0 and lo.shape[1] > 0:
        for j in range(lo[c, 0], hi[c, 0]):
            stamp[j] = c
            near[n] = j
            n += 1
    for b in range(band_slots.shape[0]):
        for i in range(band_lo[c, b], band_hi[c, b]):
            j = rank_of_slot[band_slots[b, i]]
            if stamp[j] != c:
                stamp[j] = c
                near[n] = j
                n += 1
    for i in range(n):
        j = near[i]
        sim[j] = -1 if slot_last[order[j]] < start else levels - 1 - _hamming(target_sig, c, rank_sig, j)
    return n


@njit(cache=True)
def _unset(table, slots, n):
    """Remove ``slots[:n]`` from the set ``table`` (absent ones are skipped), most recently
    inserted first: in that order every key's probe sequence is intact when it is looked up,
    so the set ends empty in O(n), with no pass over the table."""
    for i in range(n - 1, -1, -1):
        p = slots[i]
        h = _set_slot(table, p)
        if table[h] == p:
            table[h] = -1


@njit(cache=True)
def _set_slot(table, p):
    """Where position ``p`` is, or would go, in the open-addressing set ``table`` (size a
    power of two, -1 = empty)."""
    mask = table.shape[0] - 1
    h = (p * 0x9E3779B1) & mask
    while table[h] != -1 and table[h] != p:
        h = (h + 1) & mask
    return h


@njit(cache=True)
def _take_route_sets(matched, n_m, best, n_g, k, quota, disjoint, used, chosen, slots):
    """``_take_route`` with the marks in small hash sets: ``used`` the positions the
    candidate's finer routes took (disjoint), ``chosen`` this route's matches."""
    n = 0
    for i in range(n_m):
        if n == quota:
            break
        p = matched[i]
        if used[_set_slot(used, p)] == p:
            continue
        slots[n] = p
        chosen[_set_slot(chosen, p)] = p
        n += 1
    for i in range(n_g):
        if n == k:
            break
        p = best[i]
        if used[_set_slot(used, p)] == p or chosen[_set_slot(chosen, p)] == p:
            continue
        slots[n] = p
        n += 1
    if disjoint:
        for i in range(n):
            used[_set_slot(used, slots[i])] = slots[i]
    return n


def state_scratch(distinct: int, k: int, quota: int, routes: int, words: int) -> tuple[np.ndarray, ...]:
    """``state_routes``'s working arrays: heap (4 x U), similarity per slot (U), best (R k),
    matched (quota + (R-1) k), per level (64 W + 1), the two position sets (a power of two,
    at least 4x what they hold), and with bands the items scored and their stamps (U each).
    Nothing of size T."""
    heap = [np.empty(max(distinct, 1), np.int64) for _ in range(4)]
    sim = np.empty(max(distinct, 1), np.int16)  # levels 0..m <= 4096, and -1; int16 packs 32 to a vector
    lists = [np.empty(max(n, 1), np.int64) for n in (routes * k, quota + (routes - 1) * k, 64 * words + 1)]
    size = 1 << max(4, int(4 * (routes * k + quota)).bit_length())
    sets = (np.empty(size, np.int64), np.empty(size, np.int64))
    return (
        *heap,
        sim,
        *lists,
        *sets,
        np.empty(max(distinct, 1), np.int64),
        np.empty(max(distinct, 1), np.int64),
    )


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
            s = levels - 1 - _hamming(sigs, tb, sigs, h)
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
            cut_route[r] = (
                _cut(level_route[r], quota + (routes - 1 - r) * k if disjoint else quota) if semantic else levels
            )
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
            taken[b, r] = _take_route(
                b, b * routes + r, matched, n_m, best, n_g, k, quota, disjoint, used, chosen, out[b, r]
            )


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
        np.empty(length, np.int64), np.empty(length, np.int64), np.empty(length, np.int64),
        np.empty((routes, length), np.int64), np.empty(routes * k, np.int64),
        np.empty(quota + (routes - 1) * k, np.int64),
        np.empty(levels, np.int64), np.empty((routes, levels), np.int64), np.empty(routes, np.int64),
        np.empty(routes, np.int64),
        np.empty(length, np.int32), np.empty(length, np.int32),
    )  # fmt: skip
