"""The request API: one user's state x many candidates -> logits.

A serving request scores C candidate items for ONE user. Everything a model needs about the
user is kept in a ``UserState``, built once from the history and updated on append, so a
request does not rescan the history:

    state = model.new_user_state(items, signals, features, max_length=t_max)  # O(T), once per user
    state.append(item, signal)                               # O(1) amortised per behaviour
    logits = model.score_request(state, candidates)          # (C,) logits; sigmoid -> CTR
    cold = model.score_request(model.new_user_state(...), candidates)  # state built in the request
    model.invalidate_caches()   # only after editing parameters in place in eval mode

``items`` (T,) item ids 1..N, oldest first; ``signals`` (T,) behaviour signals 1..S-1;
``features`` (F,) the user's categorical feature codes (0 = unknown); ``max_length`` (None:
unbounded) keeps only the most recent behaviours, as the batch path's ``train.t_max`` window
does: an append past it drops the oldest in O(1) amortised. ``candidates`` (C,) item ids.
Bad input raises ``RequestError`` (an ``R2ledError`` and a ``ValueError``) with one line.
``score_request`` needs eval mode and runs under ``torch.inference_mode``; it equals the
model's batch path ``model(batch)`` on a batch of C rows holding that history (tested for
every model: the same retrieved behaviours, the same logits within float rounding).

What a state keeps:
    UserState      the history (items, signals; growable arrays), the user's features and the
                   signal counts of the history profile (``CtrModel.user_repr``).
    per model      an index built by ``model.build_request_index(state)`` on first use and
                   updated by every ``append`` (``RequestIndex``):
      R2LED, ETA   ``SignatureIndex``: distinct items with chains of their positions (most
                   recent first), ranked by SID prefix (R2LED: a route's matches are one run),
                   and their packed SimHash signatures.
      SIM-hard     ``ChainIndex``: category -> positions, most recent first.
      TWIN,        ``KeyIndex``: every behaviour's key projection (TWIN: ``W_k x_h``; SIM-soft:
      SIM-soft     its retrieval embedding), computed once.
      SDIM         ``BucketIndex``: per hash round and code, the count and the sum of the
                   colliding behaviours' embeddings.
      AvgPool      ``BucketIndex`` with one bucket: the sum of every behaviour's embedding.
      DIN,         none: their request reads the last behaviours (din-long: all of them).
      din-long
Data derived from parameters (signatures, projections, sums) carry the model's
``cache_generation`` and are rebuilt when it changed (``CachingModule.invalidate_caches``: by
``eval()``/``train()``, ``load_state_dict`` or an explicit call). A state may be shared by
threads: ``append`` and ``score_request`` take the state's lock. One state serves every model
(each keeps its own index in it); ``state.nbytes()`` is its memory.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from r2led.errors import R2ledError


class RequestError(R2ledError, ValueError):
    """A request the model cannot score (an item id outside the catalogue, a bad signal, ...)."""


class Growable:
    """A numpy array grown by appending (capacity doubles): O(1) amortised per element."""

    def __init__(self, values: np.ndarray, dtype=np.int64):
        values = np.asarray(values, dtype=dtype)
        self._data = np.empty((max(16, 2 * len(values)), *values.shape[1:]), dtype=dtype)
        self._data[: len(values)] = values
        self.n = len(values)

    def __len__(self) -> int:
        return self.n

    def append(self, value) -> None:
        if self.n == len(self._data):
            grown = np.empty((2 * len(self._data), *self._data.shape[1:]), dtype=self._data.dtype)
            grown[: self.n] = self._data[: self.n]
            self._data = grown
        self._data[self.n] = value
        self.n += 1

    def view(self) -> np.ndarray:
        """The elements, without a copy (valid until the next append)."""
        return self._data[: self.n]

    @property
    def data(self) -> np.ndarray:
        """The whole buffer (its first ``n`` rows are the elements): for in-place updates."""
        return self._data


class RequestIndex:
    """What one model keeps per user to answer requests (see the module docstring). Positions
    count from the start of the state's arrays; the window is from ``state.start``."""

    def append(self, pos: int, item: int, signal: int) -> None:
        raise NotImplementedError

    def drop(self, pos: int, item: int, signal: int) -> None:
        """The oldest behaviour ``pos`` left the window (an index that reads only positions at
        or after ``state.start`` needs nothing)."""

    def nbytes(self) -> int:
        """Memory held by the index, in bytes."""
        return 0


class UserState:
    """One user's history, features and history-profile counts, plus one index per model.

    ``max_length``: only the most recent ``max_length`` behaviours are kept for scoring (the
    window a model was trained on, ``train.t_max``); an append beyond it drops the oldest from
    the window and from every index in O(1); the dropped prefix is compacted away (and the
    indexes rebuilt on their next use) once it is as long as the window: O(1) amortised.
    """

    def __init__(
        self, items, signals, features, n_items: int, signal_size: int, n_features: int, max_length: int | None = None
    ):
        items, signals = np.asarray(items, dtype=np.int64).reshape(-1), np.asarray(signals, dtype=np.int64).reshape(-1)
        if len(items) != len(signals):
            raise RequestError(f"items and signals differ in length: {len(items)} items, {len(signals)} signals")
        self.n_items, self.signal_size = int(n_items), int(signal_size)
        _check_items(items, self.n_items, "history item")
        _check_signals(signals, self.signal_size)
        features = (
            np.zeros(n_features, np.int64) if features is None else np.asarray(features, dtype=np.int64).reshape(-1)
        )
        if len(features) != n_features:
            raise RequestError(f"features: expected {n_features} feature codes, got {len(features)}")
        if max_length is not None and max_length < 1:
            raise RequestError(f"max_length must be at least 1, got {max_length}")
        self.max_length = max_length
        if max_length is not None:
            items, signals = items[-max_length:], signals[-max_length:]
        self.features = features  # (F,)
        self._items, self._signals = Growable(items), Growable(signals)
        self.start = 0  # the window is the arrays' [start:]; positions below it are dropped
        self.counts = np.bincount(signals, minlength=self.signal_size).astype(np.int64)  # (S,) the profile's counts
        self._indexes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> RequestIndex
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {name: (key, value)}
        self.version = 0  # counts appends: values derived from the history (``kept``) compare it
        self.lock = threading.RLock()

    @property
    def items(self) -> np.ndarray:
        """(T,) item ids of the window, oldest first (a view: valid until the next append)."""
        return self._items.view()[self.start :]

    @property
    def signals(self) -> np.ndarray:
        return self._signals.view()[self.start :]

    def __len__(self) -> int:
        return len(self._items) - self.start

    def append(self, item: int, signal: int) -> None:
        """Add one behaviour as the most recent: O(1) amortised, every model's index included."""
        item, signal = int(item), int(signal)
        _check_items(np.array([item]), self.n_items, "item")
        _check_signals(np.array([signal]), self.signal_size)
        with self.lock:
            pos = len(self._items)
            self._items.append(item)
            self._signals.append(signal)
            self.counts[signal] += 1
            for index in list(self._indexes.values()):
                index.append(pos, item, signal)
            self.version += 1
            if self.max_length is not None and len(self) > self.max_length:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        pos = self.start
        item, signal = int(self._items.data[pos]), int(self._signals.data[pos])
        self.start += 1
        self.counts[signal] -= 1
        for index in list(self._indexes.values()):
            index.drop(pos, item, signal)
        if self.start >= max(len(self), 16):
            self._compact()

    def _compact(self) -> None:
        """Forget the dropped prefix: positions renumber from 0, so the indexes are rebuilt on
        their next use (O(T) once per T appends)."""
        self._items, self._signals = Growable(self.items.copy()), Growable(self.signals.copy())
        self.start = 0
        self._indexes = weakref.WeakKeyDictionary()

    def extend(self, items, signals) -> None:
        """``append`` each behaviour in order."""
        for item, signal in zip(
            np.asarray(items).reshape(-1).tolist(), np.asarray(signals).reshape(-1).tolist(), strict=True
        ):
            self.append(item, signal)

    def kept(self, model, name: str, fn):
        """``fn()``, kept per model and ``name`` while neither the history (``version``) nor
        the model's parameters (``cache_generation``) changed: e.g. the user part of the
        head's input, computed once per user instead of once per request."""
        key = (self.version, model.cache_generation)
        per_model = self._kept.setdefault(model, {})
        hit = per_model.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = fn()
        per_model[name] = (key, value)
        return value

    def index_for(self, model) -> RequestIndex | None:
        """The model's index for this user, built on first use (None: the model keeps none)."""
        index = self._indexes.get(model)
        if index is None:
            if self.start:  # indexes are built on positions from 0
                self._compact()
            index = model.build_request_index(self)
            if index is not None:
                self._indexes[model] = index
        return index

    def nbytes(self) -> int:
        """Memory held by the state and its indexes, in bytes."""
        own = self._items.data.nbytes + self._signals.data.nbytes + self.counts.nbytes
        return own + sum(i.nbytes() for i in self._indexes.values())


def _check_items(items: np.ndarray, n_items: int, what: str) -> None:
    if len(items) and (items.min() < 1 or items.max() > n_items):
        bad = items[(items < 1) | (items > n_items)][0]
        raise RequestError(f"{what} id {int(bad)} is outside the catalogue 1..{n_items}")


def _check_signals(signals: np.ndarray, signal_size: int) -> None:
    if len(signals) and (signals.min() < 1 or signals.max() >= signal_size):
        bad = signals[(signals < 1) | (signals >= signal_size)][0]
        raise RequestError(f"signal {int(bad)} is outside 1..{signal_size - 1}")


def check_candidates(candidates, n_items: int) -> torch.Tensor:
    """(C,) int64 candidate ids, each in 1..n_items, at least one."""
    cands = torch.as_tensor(np.asarray(candidates, dtype=np.int64).reshape(-1))
    if len(cands) == 0:
        raise RequestError("candidates is empty: give at least one item id")
    _check_items(cands.numpy(), n_items, "candidate")
    return cands


# ---- the indexes ------------------------------------------------------------------------------
class SignatureIndex(RequestIndex):
    """A history indexed by distinct item (R2LED, ETA): each item's positions as a chain, most
    recent first (``route_kernels.chain_items``), the items in SID-prefix rank order (``rank``;
    none: order of first appearance), their packed SimHash signatures and how many behaviours
    each has in the window (``slot_count``: the retrieval's cuts count behaviours, not items).

    Append: O(1) amortised; an item new to the user is also inserted into the rank order (a
    memmove of U slots). Drop (the oldest left a bounded window): O(1). Signatures are copied
    from the model's per-item table, per slot, when the model's ``cache_generation`` changed
    (O(U)) or for new slots.
    """

    def __init__(self, items: np.ndarray, rank: np.ndarray | None):
        from r2led.models import route_kernels

        t = len(items)
        slot_of = np.full(len(rank) if rank is not None else int(items.max(initial=0)) + 1, -1, np.int64)
        slot_item, slot_last, prev = np.empty(t, np.int64), np.empty(t, np.int64), np.empty(t, np.int64)
        u = route_kernels.chain_items(items, slot_of, slot_item, slot_last, prev)
        # The positions grouped by slot, most recent first (``route_kernels.group_positions``):
        # read instead of the chains up to ``built``; appends extend the chains only.
        self.group_off, self.grouped, self.built = np.empty(u + 1, np.int64), np.empty(t, np.int64), t
        route_kernels.group_positions(items, slot_of, slot_item, u, self.group_off, self.grouped, np.empty(u, np.int64))
        self.rank = rank  # (N+1,) or None
        self.slot_item, self.slot_last, self.prev = Growable(slot_item[:u]), Growable(slot_last[:u]), Growable(prev)
        self.slot_count = Growable(np.diff(self.group_off))  # each slot's behaviours in the window
        self._slot_of: dict[int, int] | None = None  # item -> slot (``_slots``)
        if rank is not None:
            self.order = np.argsort(rank[slot_item[:u]], kind="stable")  # (U,) slots by rank
            self.order_rank = rank[slot_item[:u]][self.order]
        else:
            self.order, self.order_rank = np.arange(u, dtype=np.int64), None
        self.slot_sig: Growable | None = None  # (U, W) uint64, per slot
        self.generation = -1
        self._bands = None  # SignatureBands over slot_sig (the approximate collaborative view), built on use
        self._bands_generation = -1
        # The signatures in rank order (a SID-prefix run is a run of rows) and each slot's rank,
        # for the (generation, U) in _rank_key; kept in step by ``append`` once built.
        self._rank_sig: np.ndarray | None = None
        self._rank_of_slot: np.ndarray | None = None
        self._rank_count: np.ndarray | None = None  # slot_count in rank order
        self._rank_key: tuple[int, int] | None = None
        self._table: np.ndarray | None = None  # the model's (N+1, W) signatures of that generation

    def _slots(self) -> dict[int, int]:
        """item -> slot, built on the first append or drop and kept in step by ``append``."""
        if self._slot_of is None:
            self._slot_of = {int(v): s for s, v in enumerate(self.slot_item.view().tolist())}
        return self._slot_of

    def append(self, pos: int, item: int, signal: int) -> None:
        slots = self._slots()
        s = slots.get(item)
        if s is None:
            s = len(self.slot_item)
            slots[item] = s
            self.slot_item.append(item)
            self.slot_last.append(-1)
            if self.rank is not None:
                at = int(np.searchsorted(self.order_rank, self.rank[item], side="right"))
                self.order, self.order_rank = (
                    np.insert(self.order, at, s),
                    np.insert(self.order_rank, at, self.rank[item]),
                )
            else:
                at = len(self.order)
                self.order = np.append(self.order, s)
            self.slot_count.append(0)
            if self._rank_key is not None and self._rank_key[1] == s:  # keep the rank-ordered signatures
                self._rank_sig = np.insert(self._rank_sig, at, self._table[item], axis=0)
                self._rank_count = np.insert(self._rank_count, at, 0)
                self._rank_of_slot[self._rank_of_slot >= at] += 1
                self._rank_of_slot = np.append(self._rank_of_slot, at)
                self._rank_key = (self._rank_key[0], s + 1)
        self.prev.append(self.slot_last.data[s])
        self.slot_last.data[s] = pos
        self._count(s, 1)

    def drop(self, pos: int, item: int, signal: int) -> None:
        """The oldest behaviour left the window: its item counts one behaviour fewer there."""
        self._count(self._slots()[item], -1)

    def _count(self, s: int, delta: int) -> None:
        """Slot ``s`` gained (1) or lost (-1) a behaviour in the window; the rank-ordered
        counts follow when they are in step with the slots (else they are rebuilt on use)."""
        self.slot_count.data[s] += delta
        if self._rank_key is not None and self._rank_key[1] == len(self.slot_item):
            self._rank_count[self._rank_of_slot[s]] += delta

    def signatures(self, table: np.ndarray, generation: int) -> np.ndarray:
        """(U, W) the slots' signatures from ``table`` (N+1, W), refreshed if stale."""
        items = self.slot_item.view()
        if self.slot_sig is None or self.generation != generation:
            self.slot_sig, self.generation = Growable(table[items], dtype=table.dtype), generation
        for s in range(len(self.slot_sig), len(items)):
            self.slot_sig.append(table[items[s]])
        return self.slot_sig.view()

    def rank_signatures(self, table: np.ndarray, generation: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U, W) the items' signatures in rank order (``order``), (U,) each slot's rank and
        (U,) each item's behaviours in the window by rank, rebuilt if stale (O(U)); ``append``
        and ``drop`` keep them in step afterwards."""
        slot_sig = self.signatures(table, generation)
        u = len(slot_sig)
        if self._rank_key != (generation, u):
            self._rank_sig = np.ascontiguousarray(slot_sig[self.order])
            self._rank_of_slot = np.empty(u, np.int64)
            self._rank_of_slot[self.order] = np.arange(u)
            self._rank_count = self.slot_count.view()[self.order]
            self._rank_key, self._table = (generation, u), table
        return self._rank_sig, self._rank_of_slot, self._rank_count

    def routes(
        self,
        target_sig: np.ndarray,
        table: np.ndarray,
        generation: int,
        span,
        k: int,
        quota: int,
        n_routes: int,
        disjoint: bool,
        start: int = 0,
        bands: int = 0,
    ):
        """Positions (C, R, k) into the window from ``start`` and the number taken (C, R)
        (``route_kernels.state_routes``).

        target_sig (C, W) uint64; span (C, R, 2) each candidate's rank range per route (None:
        no semantic view). ``bands`` > 0: the collaborative view reads only the items that
        share a band with the candidate (``SignatureBands``) besides its semantic run:
        approximate; 0: every item (exact)."""
        from r2led.models import route_kernels

        c = len(target_sig)
        slot_sig = self.signatures(table, generation)
        rank_sig, rank_of_slot, rank_count = self.rank_signatures(table, generation)
        if bands:
            lsh = self.signature_bands(slot_sig, bands, generation)
            band_lo, band_hi = lsh.queries(target_sig)  # (C, bands)
            band_slots = lsh.slots
        else:
            band_lo = band_hi = np.zeros((c, 0), np.int64)
            band_slots = np.zeros((0, 0), np.int64)
        if span is not None and quota and self.order_rank is not None:
            bounds = np.searchsorted(self.order_rank, span)  # (C, R, 2): each route's run of items
            lo, hi = np.ascontiguousarray(bounds[..., 0]), np.ascontiguousarray(bounds[..., 1])
        else:
            lo = hi = np.zeros((c, n_routes), dtype=np.int64)
        out, n = np.zeros((c, n_routes, k), np.int64), np.empty((c, n_routes), np.int64)
        scratch = route_kernels.state_scratch(len(self.order), k, quota, n_routes, target_sig.shape[1])
        route_kernels.state_routes(
            target_sig, rank_sig, self.order, rank_of_slot, rank_count, self.slot_last.view(), self.prev.view(),
            (self.grouped, self.group_off, self.built), len(self.prev), start, lo, hi, k, quota, disjoint, band_slots,
            band_lo, band_hi, out, n, scratch,
        )  # fmt: skip
        if start:
            out = np.where(np.arange(k) < n[..., None], out - start, 0)
        return out, n

    def signature_bands(self, slot_sig: np.ndarray, bands: int, generation: int):
        """The ``SignatureBands`` of the slots' signatures: rebuilt when the signatures were
        (another ``generation``, or another number of bands), else extended by the slots
        added since: O(bands U) per new item."""
        from r2led.models.signature_bands import SignatureBands

        lsh = self._bands
        if lsh is None or lsh.bands != bands or self._bands_generation != generation:
            lsh, self._bands_generation = SignatureBands(slot_sig, bands), generation
        for slot in range(len(lsh), len(slot_sig)):
            lsh.insert(slot, slot_sig[slot])
        self._bands = lsh
        return lsh

    def nbytes(self) -> int:
        arrays = [self.slot_item.data, self.slot_last.data, self.slot_count.data, self.prev.data, self.order]
        arrays += [self.grouped, self.group_off]
        if self.slot_sig is not None:
            arrays.append(self.slot_sig.data)
        lsh = self._bands.nbytes() if self._bands is not None else 0
        if self._rank_sig is not None:
            lsh += self._rank_sig.nbytes + self._rank_of_slot.nbytes + self._rank_count.nbytes
        return sum(a.nbytes for a in arrays) + (self.order_rank.nbytes if self.order_rank is not None else 0) + lsh


class ChainIndex(RequestIndex):
    """Positions by a per-item key (SIM-hard: the item's category), most recent first: the
    last position per key and a chain ``prev`` (``route_kernels.chain_keys``). O(1) append."""

    def __init__(self, items: np.ndarray, item_key: np.ndarray, n_keys: int):
        from r2led.models import route_kernels

        self.item_key = item_key  # (N+1,)
        self.last_of = np.full(n_keys, -1, np.int64)
        prev = np.empty(len(items), np.int64)
        route_kernels.chain_keys(item_key[items], self.last_of, prev)
        self.prev = Growable(prev)

    def append(self, pos: int, item: int, signal: int) -> None:
        key = self.item_key[item]
        self.prev.append(self.last_of[key])
        self.last_of[key] = pos

    def most_recent(self, keys: np.ndarray, k: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per query key (C,): its ``k`` most recent positions (C, k) in the window from
        ``start`` (0 where none) and how many there are (C,); key 0 never matches."""
        from r2led.models import route_kernels

        out, n = np.zeros((len(keys), k), np.int64), np.empty(len(keys), np.int64)
        route_kernels.walk_chains(
            self.last_of, self.prev.view(), np.ascontiguousarray(keys, dtype=np.int64), k, start, out, n
        )
        return out, n

    def nbytes(self) -> int:
        return self.last_of.nbytes + self.prev.data.nbytes


class KeyIndex(RequestIndex):
    """Every behaviour's key vector (T, d), computed once by ``keys(items, signals)`` (a
    function of the model's parameters: rebuilt when its ``cache_generation`` changed)."""

    def __init__(self, state: UserState, keys, generation: int):
        self.keys_fn = keys
        self.rows = Growable(keys(state._items.view(), state._signals.view()), dtype=np.float32)  # every position
        self.generation = generation
        self.state = weakref.ref(state)

    def append(self, pos: int, item: int, signal: int) -> None:
        self.rows.append(self.keys_fn(np.array([item]), np.array([signal]))[0])

    def current(self, generation: int) -> np.ndarray:
        """(T, d) the window's keys, rebuilt if the model's parameters changed."""
        state = self.state()
        if generation != self.generation:
            rows = self.keys_fn(state._items.view(), state._signals.view())
            self.rows, self.generation = Growable(rows, dtype=np.float32), generation
        return self.rows.view()[state.start :]

    def nbytes(self) -> int:
        return self.rows.data.nbytes


class BucketIndex(RequestIndex):
    """Per hash round and code: how many behaviours fall in the bucket and the sum of their
    embeddings (SDIM; AvgPool with one round and one code). ``codes(items)`` (n, rounds) and
    ``embed(items, signals)`` (n, d) are functions of the model's parameters, rebuilt when its
    ``cache_generation`` changed. O(rounds d) per append."""

    def __init__(self, state: UserState, codes, embed, rounds: int, n_codes: int, generation: int):
        self.codes_fn, self.embed_fn, self.shape = codes, embed, (rounds, n_codes)
        self.state = weakref.ref(state)
        self._build(state, generation)

    def _build(self, state: UserState, generation: int, chunk: int = 1 << 16) -> None:
        rounds, n_codes = self.shape
        self.count = np.zeros((rounds, n_codes), np.int64)
        self.sums = None
        for a in range(0, max(len(state), 1), chunk):
            items, signals = state.items[a : a + chunk], state.signals[a : a + chunk]
            x = torch.from_numpy(self.embed_fn(items, signals))  # (n, d) float64
            if self.sums is None:
                self.sums = np.zeros((rounds, n_codes, x.shape[-1]), np.float64)
            if not len(items):
                continue
            codes = torch.from_numpy(self.codes_fn(items))  # (n, rounds)
            sums = torch.from_numpy(self.sums)
            for r in range(rounds):
                self.count[r] += np.bincount(codes[:, r].numpy(), minlength=n_codes)
                sums[r].index_add_(0, codes[:, r], x)
        self.generation = generation

    def append(self, pos: int, item: int, signal: int) -> None:
        codes = self.codes_fn(np.array([item]))[0]
        x = self.embed_fn(np.array([item]), np.array([signal]))[0]
        for r, code in enumerate(codes):
            self.count[r, code] += 1
            self.sums[r, code] += x

    def drop(self, pos: int, item: int, signal: int) -> None:
        codes = self.codes_fn(np.array([item]))[0]
        x = self.embed_fn(np.array([item]), np.array([signal]))[0]
        for r, code in enumerate(codes):
            self.count[r, code] -= 1
            self.sums[r, code] -= x

    def current(self, generation: int) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, codes) counts and (rounds, codes, d) sums, rebuilt if stale."""
        if generation != self.generation:
            self._build(self.state(), generation)
        return self.count, self.sums

    def nbytes(self) -> int:
        return self.count.nbytes + self.sums.nbytes


def topk_rows(
    keys: torch.Tensor, query: torch.Tensor, k: int, scale: float = 1.0, chunk: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the ``k`` behaviours with the largest ``keys @ query * scale``: positions
    (C, k) and taken (C, k), over chunks of ``chunk`` behaviours (no (C, T) score matrix).
    keys (T, d), query (C, d)."""
    c, t = len(query), len(keys)
    best_v = query.new_full((c, 0), float("-inf"))
    best_i = torch.zeros((c, 0), dtype=torch.long)
    for a in range(0, t, chunk):
        scores = (query @ keys[a : a + chunk].T) * scale  # (C, chunk)
        v, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_v, pick = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, i + a], 1), 1, pick)
    n = best_i.shape[1]
    taken = torch.arange(k) < n
    if n < k:
        best_i = torch.cat([best_i, best_i.new_zeros(c, k - n)], 1)
    return best_i, taken.expand(c, k)
