"""Users in memory: an LRU cache of per-user state in front of the history store.

``UserHistories.state(user)`` returns the user's ``UserState``, current with the store: it
reads the user's change counter ``seq`` from the store (one cheap read). When another process
(a worker or a replica) appended to the user, the kept copy catches up: under the user's lock
it reads only the new events (``store.appended_since``) and applies them with ``state.append``
(O(events), the model's index included). It reloads the whole record (O(T)) only when the
store cannot give that gap (a replace, or more than ``t_max`` events since), when some stored
items are unknown to the model, or when the user was evicted. At most ``max_users`` users stay
in memory; the least recently used leave first and reload from the store on their next request.

A ``UserState`` holds the model's request state (``r2led.models.user_state``: the history
window, the features, and the per-user index the model builds on its first request), built
when the user is loaded. An append goes to the store first (the durable, atomic step), then,
under the user's lock, into the kept request state with ``state.append`` (O(1) amortised per
event, the model's index included); when another process appended in between, the kept copy
catches up as above, and only when that is impossible is it dropped (to reload on the next
request).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from r2led.models.user_state import UserState as RequestState
from r2led.serve.errors import ScoringInputError
from r2led.serve.history_store import HistoryStore, StoredHistory
from r2led.serve.scoring import ScoringModel


@dataclass
class UserState:
    """One user in memory: the model's request state as of store change ``seq``.

    ``seq`` and ``request`` change together, under ``lock``, when an append is applied in
    place: the content is updated first and ``seq`` last, so a reader that sees ``seq`` sees at
    least that content."""

    seq: int
    request: RequestState  # history window (T <= t_max), features, the model's index
    features: dict[str, str]  # feature values set through the API
    skipped: int = 0  # stored items the model does not know (left out of scoring)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)  # appends

    @property
    def items(self) -> np.ndarray:
        """(T,) item ids, most recent last (a view: valid until the next append)."""
        return self.request.items

    @property
    def signals(self) -> np.ndarray:
        """(T,) signals."""
        return self.request.signals

    def apply(self, ids: np.ndarray, signals: np.ndarray, seq: int) -> None:
        """Events the store holds up to ``seq`` reach the kept copy (held: ``lock``): a request
        sees all of them or none (the request state's lock), and ``seq`` moves last."""
        with self.request.lock:
            self.request.extend(ids, signals)
        self.seq = seq


class UserHistories:
    """The LRU cache of ``UserState`` over a ``HistoryStore`` (see the module docstring)."""

    def __init__(self, store: HistoryStore, scoring: ScoringModel, max_users: int):
        self.store, self.scoring, self.max_users = store, scoring, int(max_users)
        self._cache: OrderedDict[str, UserState] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # whole records read from the store (cache misses and stale copies)
        self.catch_ups = 0  # kept copies brought up to date from the store's new events only

    def __len__(self) -> int:
        return len(self._cache)

    def state(self, user: str) -> UserState | None:
        """The user's current state, ``None`` when the store has no record of it."""
        seq = self.store.seq(user)
        if seq is None:
            self._drop(user)
            return None
        with self._lock:
            cached = self._cache.get(user)
            # seq only grows, so a copy ahead of what was read is newer (an append of this
            # process landed after the read): it is current, not a reason to reload
            if cached is not None and cached.seq >= seq:
                self._cache.move_to_end(user)
                return cached
        if cached is not None and cached.seq < seq:
            with cached.lock:  # serialised with this process's appends to the user
                if cached.seq >= seq or self._catch_up(user, cached):
                    self._touch(user, cached)
                    return cached
            self._drop(user, cached)
        record = self.store.load(user)
        if record is None:
            return None
        self.loads += 1
        state = self._build(user, record)
        self._put(user, state)
        return state

    def append(self, user: str, keys: list[str], ids: np.ndarray, signals: np.ndarray) -> tuple[int, int]:
        """Append events (already checked) to the store, then to the cached state; returns
        (seq, length)."""
        with self._lock:
            cached = self._cache.get(user)
        if cached is None:
            return self.store.append(user, keys, [int(s) for s in signals])
        # the user's lock: this process's appends reach the kept state in the store's order
        with cached.lock:
            seq, length = self.store.append(user, keys, [int(s) for s in signals])
            if cached.seq == seq - len(keys) and not cached.skipped:  # nothing else changed the user
                cached.apply(ids, signals, seq)
                return seq, length
            if cached.seq >= seq or self._catch_up(user, cached):  # others' appends, then this one
                return seq, length
        self._drop(user, cached)
        return seq, length

    def _catch_up(self, user: str, cached: UserState) -> bool:
        """Apply the events appended to the user after ``cached.seq`` (held: ``cached.lock``);
        ``False`` when the store cannot give them or they cannot be applied (reload instead)."""
        if cached.skipped:  # the kept window is not the stored one: trimming would not match
            return False
        new = self.store.appended_since(user, cached.seq)
        if new is None:
            return False
        try:  # every event checked before any is applied: never half of them
            ids, signals = self.scoring.item_ids(new.items), self.scoring.signals(new.signals)
        except ScoringInputError:  # an item the model does not know, or a bad signal
            return False
        cached.apply(ids, signals, new.seq)
        self.catch_ups += 1
        return True

    def _touch(self, user: str, state: UserState) -> None:
        """Mark the user as just used (if ``state`` is still its cached copy)."""
        with self._lock:
            if self._cache.get(user) is state:
                self._cache.move_to_end(user)

    def replace(
        self, user: str, keys: list[str], signals: list[int], features: dict[str, str] | None
    ) -> tuple[int, int]:
        """Set the user's history in the store (the cached copy reloads on the next request)."""
        seq, length = self.store.replace(user, keys, signals, features)
        self._drop(user)
        return seq, length

    def _build(self, user: str, record: StoredHistory) -> UserState:
        ids = self.scoring.lookup_items(record.items)
        known = ids > 0
        signals = np.asarray(record.signals, dtype=np.int64)
        codes = self.scoring.feature_codes(user, record.features)
        request = self.scoring.new_state(ids[known], signals[known], codes)
        return UserState(record.seq, request, record.features, int((~known).sum()))

    def _put(self, user: str, state: UserState) -> None:
        with self._lock:
            cached = self._cache.get(user)
            if cached is not None and cached.seq > state.seq:  # a newer copy got there first
                return
            self._cache[user] = state
            self._cache.move_to_end(user)
            while len(self._cache) > self.max_users:
                self._cache.popitem(last=False)

    def _drop(self, user: str, only: UserState | None = None) -> None:
        """Forget the user's cached state (with ``only``: if it is still that one)."""
        with self._lock:
            if only is None or self._cache.get(user) is only:
                self._cache.pop(user, None)
