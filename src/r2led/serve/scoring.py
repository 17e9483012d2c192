"""The model side of serving: item and user vocabularies, input checks, and the one model call.

``ScoringModel`` holds an exported model (eval mode), the item key -> id map, the exported
user table's features and the feature vocabularies. It holds no histories: those live in the
history store (``r2led.serve.history_store``) and, while a user is active, in the
``UserHistories`` cache (``r2led.serve.user_cache``).

``ScoringModel.score_state`` is the single place where the service calls the model: one user's
request state x C candidates -> C click probabilities, through the model's request API
(``new_state``: ``model.new_user_state`` once per user loaded into memory, then appended to;
``model.score_request`` per request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from r2led.serve.errors import ScoringInputError, UnknownItemError, clip


class ScoringModel:
    """An exported model ready to score, with the vocabularies that turn keys into ids."""

    def __init__(
        self,
        model: torch.nn.Module,
        item_keys: Sequence,
        user_keys: Sequence,
        user_features: np.ndarray,
        feature_vocab: dict[str, list[str]],
        t_max: int,
        info: dict | None = None,
    ):
        self.model = model.eval()
        self.name = model.cfg.name
        self.t_max = int(t_max)
        self.info = dict(info or {})
        self.signal_max = int(model.spec.signal_size) - 1  # signals are 1..signal_max; 0 is padding
        self.item_keys = [str(k) for k in item_keys]  # id i has key item_keys[i - 1]
        self._item_id = {k: i for i, k in enumerate(self.item_keys, start=1)}
        self._user_row = {str(k): r for r, k in enumerate(user_keys)}
        self._table_features = np.asarray(user_features, dtype=np.int64).reshape(len(self._user_row), -1)  # (U, F)
        self.feature_names = list(feature_vocab)
        self.feature_values = {n: [str(v) for v in vals] for n, vals in feature_vocab.items()}
        self._feature_codes = {
            n: {v: c for c, v in enumerate(vals, start=1)} for n, vals in self.feature_values.items()
        }
        # torch modules are not re-entrant under concurrent forward passes that fill caches
        self._model_lock = threading.Lock()

    # ---- vocabularies ---------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_keys)

    @property
    def table_users(self) -> list[str]:
        """Keys of the users in the exported user table, in row order."""
        return list(self._user_row)

    def in_user_table(self, user_key: str) -> bool:
        return user_key in self._user_row

    def user_row(self, user_key: str) -> int:
        """The user's row in the exported user table, -1 when it has none."""
        return self._user_row.get(user_key, -1)

    def lookup_items(self, keys: Sequence[str]) -> np.ndarray:
        """(n,) int64 item ids of ``keys``, 0 for a key the model does not know."""
        return np.fromiter((self._item_id.get(k, 0) for k in keys), dtype=np.int64, count=len(keys))

    def item_ids(self, keys: Sequence[str]) -> np.ndarray:
        """(n,) int64 item ids of ``keys``; ``UnknownItemError`` names the first unknown key."""
        ids = self.lookup_items(keys)
        bad = np.flatnonzero(ids == 0)
        if len(bad):
            raise UnknownItemError(keys[bad[0]], len(bad))
        return ids

    def signals(self, signals: Sequence[int]) -> np.ndarray:
        """(n,) int64 signals, each checked to lie in 1..signal_max."""
        sig = np.asarray(signals, dtype=np.int64).reshape(-1)
        bad = np.flatnonzero((sig < 1) | (sig > self.signal_max))
        if len(bad):
            where = f" (position {bad[0]})" if len(sig) > 1 else ""
            raise ScoringInputError(f"signal {int(sig[bad[0]])}{where} is out of range: expected 1..{self.signal_max}")
        return sig

    def check_features(self, features: Mapping[str, object]) -> dict[str, str]:
        """Feature values as strings, each name checked; values outside the vocabulary are kept
        (they are scored as code 0, "unknown")."""
        for name in features:
            if name not in self._feature_codes:
                raise ScoringInputError(
                    f"unknown user feature {clip(name)}; known: {', '.join(self.feature_names) or 'none'}"
                )
        return {name: str(value) for name, value in features.items()}

    def unknown_features(self, features: Mapping[str, str]) -> dict[str, str]:
        """The given feature values that are outside the vocabulary (scored as code 0)."""
        return {n: v for n, v in features.items() if v not in self._feature_codes[n]}

    def feature_codes(self, user_key: str, features: Mapping[str, str]) -> np.ndarray:
        """(F,) the user's feature codes: the exported table's row, with ``features`` over it."""
        row = self._user_row.get(user_key)
        codes = (
            self._table_features[row].copy() if row is not None else np.zeros(len(self.feature_names), dtype=np.int64)
        )
        for name, value in features.items():
            if name in self._feature_codes:
                codes[self.feature_names.index(name)] = self._feature_codes[name].get(value, 0)
        return codes

    # ---- the model call ---------------------------------------------------------------------
    def new_state(self, items: np.ndarray, signals: np.ndarray, feats: np.ndarray):
        """The model's request state (``r2led.models.user_state.UserState``) of one user: history
        ``items``/``signals`` (T,) item ids and signals, most recent last (T may be 0), feature
        codes ``feats`` (F,); it keeps the most recent ``t_max``. Build it once per user and
        ``append`` to it; the model's per-user index is built on its first request."""
        return self.model.new_user_state(items, signals, feats, max_length=self.t_max)

    def score_state(self, state, target: np.ndarray) -> np.ndarray:
        """Click probabilities (C,) float64 of ``target`` (C,) item ids for the user of
        ``state`` (``new_state``): the one place the service calls the model, through its
        request API (``model.score_request``, exact to the batch path)."""
        with self._model_lock:
            logits = self.model.score_request(state, target)  # (C,)
        return torch.sigmoid(logits).double().numpy()

    def score(
        self, user_row: int, feats: np.ndarray, items: np.ndarray, signals: np.ndarray, target: np.ndarray
    ) -> np.ndarray:
        """Click probabilities (C,) of ``target`` (C,) for a history given whole (cold: the state
        is built inside the call). ``user_row`` is the user's row in the exported table (-1:
        none); the models score from the feature codes ``feats`` (F,)."""
        return self.score_state(self.new_state(items, signals, feats), target)

    def warm_up(self) -> float:
        """One throw-away request (a one-behaviour history, two candidates, no user) so that the
        first real request does not pay for compiling R2LED's retrieval kernels or filling the
        per-item caches. Returns its seconds, also kept in ``info["warm_up_s"]``."""
        start = time.perf_counter()
        one = np.ones(1, np.int64)
        self.score(-1, np.zeros(self._table_features.shape[1], np.int64), one, one, np.ones(2, np.int64))
        self.info["warm_up_s"] = round(time.perf_counter() - start, 3)
        return self.info["warm_up_s"]
