"""What the HTTP routes call: histories in the store, users in the cache, the model to score.

``ScoringService`` checks a request's values against the model (item keys, signal range,
feature names, candidate count), keeps histories through ``UserHistories`` and scores through
``ScoringModel.score_state``. It is thread-safe; several processes may share its store.

Users: a user is *known* when it has a row in the exported user table or a record in the store.
Scoring an unknown user raises ``UnknownUserError`` (HTTP 404) rather than silently scoring a
typo; a new user is registered by ``set_history`` (an empty list is fine) or ``append``, and
gets the "unknown" code 0 for every feature it does not give. A known user with no history is
scored with an empty history.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from r2led.serve.errors import ScoringInputError, UnknownUserError
from r2led.serve.history_store import HistoryStore
from r2led.serve.scoring import ScoringModel
from r2led.serve.user_cache import UserHistories

DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_MAX_USERS_IN_MEMORY = 100_000


@dataclass(frozen=True)
class Scored:
    """A scored request: probabilities (C,), the history length used, and the model's share of
    the time (wall and this thread's CPU seconds)."""

    scores: np.ndarray
    history_length: int
    model_wall_s: float
    model_cpu_s: float


class ScoringService:
    """Histories, users and scoring for one exported model (see the module docstring)."""

    def __init__(
        self,
        scoring: ScoringModel,
        store: HistoryStore,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        max_users_in_memory: int = DEFAULT_MAX_USERS_IN_MEMORY,
    ):
        if max_candidates < 1 or max_users_in_memory < 1:
            raise ScoringInputError(
                f"max_candidates and max_users_in_memory must be >= 1, got {max_candidates} and {max_users_in_memory}"
            )
        if store.t_max != scoring.t_max:
            raise ScoringInputError(
                f"the history store keeps {store.t_max} behaviours per user but the model's t_max is {scoring.t_max}"
            )
        self.scoring, self.store = scoring, store
        self.max_candidates = int(max_candidates)
        self.users = UserHistories(store, scoring, max_users_in_memory)

    @property
    def t_max(self) -> int:
        return self.scoring.t_max

    # ---- histories --------------------------------------------------------------------------
    def set_history(
        self, user: str, items: Sequence[str], signals: Sequence[int], features: Mapping[str, object] | None = None
    ) -> dict:
        """Replace the user's history (oldest first) and optionally set some of its features.

        A history longer than ``t_max`` keeps its most recent ``t_max``; the returned dict says
        how many were dropped and which feature values are outside the vocabulary."""
        if len(items) != len(signals):
            raise ScoringInputError(f"items and signals differ in length: {len(items)} items, {len(signals)} signals")
        items = [str(k) for k in items]
        self.scoring.item_ids(items)
        sig = self.scoring.signals(signals)
        feats = self.scoring.check_features(features) if features else None
        dropped = max(len(items) - self.t_max, 0)
        _, length = self.users.replace(user, items[dropped:], sig[dropped:].tolist(), feats)
        out = {"user": user, "length": length, "dropped": dropped}
        unknown = self.scoring.unknown_features(feats) if feats else {}
        if unknown:
            out["unknown_features"] = unknown  # scored as code 0 ("unknown")
        return out

    def append(self, user: str, items: Sequence[str], signals: Sequence[int]) -> dict:
        """Add behaviours as the user's most recent (the oldest beyond ``t_max`` are dropped);
        atomic: concurrent appends to one user are all kept."""
        if len(items) != len(signals) or not items:
            raise ScoringInputError(
                f"an append needs one signal per item and at least one item: {len(items)} items, {len(signals)} signals"
            )
        items = [str(k) for k in items]
        ids, sig = self.scoring.item_ids(items), self.scoring.signals(signals)
        _, length = self.users.append(user, items, ids, sig)
        return {"user": user, "length": length}

    def history(self, user: str) -> tuple[list[str], list[int]]:
        """The user's stored history as (item keys, signals), most recent last."""
        record = self.store.load(user)
        if record is None:
            if not self.scoring.in_user_table(user):
                raise UnknownUserError(user)
            return [], []
        return record.items, record.signals

    def preload(self, store) -> int:
        """Write every user's most recent ``t_max`` behaviours from a ``LifelongStore`` into the
        history store (replacing what it held for them); returns the number of users."""
        from r2led.errors import DataError

        keys = store.items.sort("item")["key"].cast(str).to_list()
        unknown = np.flatnonzero(self.scoring.lookup_items(keys) == 0)
        if len(unknown):
            raise DataError(
                f"{store.root}: item key {keys[unknown[0]]!r} is not in the exported model "
                f"({len(unknown)} unknown items)"
            )
        if int(store.manifest["signal_max"]) > self.scoring.signal_max:
            raise DataError(
                f"{store.root}: signals up to {store.manifest['signal_max']} "
                f"but the model takes 1..{self.scoring.signal_max}"
            )
        offsets = np.asarray(store.offsets)
        records = {}
        for u, key in enumerate(store.users.sort("user")["key"].cast(str).to_list()):
            end = int(offsets[u + 1])
            start = max(int(offsets[u]), end - self.t_max)
            if end > start:
                records[key] = (
                    [keys[i - 1] for i in store.seq_items[start:end].tolist()],
                    store.seq_signal[start:end].astype(int).tolist(),
                )
        return self.store.replace_many(records)

    # ---- scoring ------------------------------------------------------------------------------
    def score(self, user: str, candidates: Sequence[str | int]) -> Scored:
        """Click probabilities of ``candidates`` (item keys, in order; an integer key stands for
        its decimal string) for the user."""
        n = len(candidates)
        if n == 0:
            raise ScoringInputError("candidates is empty: give at least one item key")
        if n > self.max_candidates:
            raise ScoringInputError(
                f"{n} candidates exceed the limit of {self.max_candidates} per request; split the request"
            )
        target = self.scoring.item_ids([str(k) for k in candidates])  # (C,)
        state = self.users.state(user)
        if state is None:
            if not self.scoring.in_user_table(user):
                raise UnknownUserError(user)
            empty = np.zeros(0, np.int64)
            request = self.scoring.new_state(empty, empty, self.scoring.feature_codes(user, {}))
        else:
            request = state.request
        wall, cpu = time.perf_counter(), time.thread_time()
        scores = self.scoring.score_state(request, target)
        return Scored(scores, len(request), time.perf_counter() - wall, time.thread_time() - cpu)
