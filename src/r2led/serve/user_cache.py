"""Users in memory: an LRU cache of per-user state in front of the history store.

``UserHistories.state(user)`` returns the user's ``UserState`` (item ids, signals, feature
codes), current with the store: it reads the user's change counter ``seq`` from the store (one
cheap read) and reloads the record only when another process (a worker or a replica) changed
it, or when the user was evicted. At most ``max_users`` users stay in memory; the least
recently used leave first and reload from the store on their next request.

Appends go to the store first (the durable, atomic step) and then update the cached state in
place when nothing else changed the user in between; otherwise the cached copy is dropped.

``UserState`` is where the models' per-user retrieval state will live once they expose it
(built on load, updated on append); today it is the history arrays that ``ScoringModel.score``
takes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from r2led.serve.history_store import HistoryStore, StoredHistory
from r2led.serve.scoring import ScoringModel


@dataclass(frozen=True)
class UserState:
    """One user's scoring inputs, as of store change ``seq``. Arrays are never changed in place."""

    seq: int
    items: np.ndarray  # (T,) int64 item ids, most recent last, T <= t_max
    signals: np.ndarray  # (T,) int64
    features: dict[str, str]  # feature values set through the API
    feature_codes: np.ndarray  # (F,) int64
    skipped: int = 0  # stored items the model does not know (left out of scoring)
    # the model's request state (``model.new_user_state``), built on the first score of this
    # copy and kept with it; a newer store change builds a new UserState, and so a new one
    kept: dict = field(default_factory=dict, compare=False, repr=False)


class UserHistories:
    """The LRU cache of ``UserState`` over a ``HistoryStore`` (see the module docstring)."""

    def __init__(self, store: HistoryStore, scoring: ScoringModel, max_users: int):
        self.store, self.scoring, self.max_users = store, scoring, int(max_users)
        self._cache: OrderedDict[str, UserState] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # records read from the store (cache misses and stale copies)

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
            if cached is not None and cached.seq == seq:
                self._cache.move_to_end(user)
                return cached
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
        seq, length = self.store.append(user, keys, [int(s) for s in signals])
        with self._lock:
            cached = self._cache.get(user)
        if cached is not None and cached.seq == seq - len(keys):  # nothing else changed the user
            t = self.store.t_max
            self._put(
                user,
                UserState(
                    seq,
                    np.concatenate([cached.items, ids])[-t:],
                    np.concatenate([cached.signals, signals])[-t:],
                    cached.features,
                    cached.feature_codes,
                    cached.skipped,
                ),
            )
        else:
            self._drop(user)
        return seq, length

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
        return UserState(
            record.seq,
            ids[known],
            signals[known],
            record.features,
            self.scoring.feature_codes(user, record.features),
            int((~known).sum()),
        )

    def _put(self, user: str, state: UserState) -> None:
        with self._lock:
            cached = self._cache.get(user)
            if cached is not None and cached.seq > state.seq:  # a newer copy got there first
                return
            self._cache[user] = state
            self._cache.move_to_end(user)
            while len(self._cache) > self.max_users:
                self._cache.popitem(last=False)

    def _drop(self, user: str) -> None:
        with self._lock:
            self._cache.pop(user, None)
