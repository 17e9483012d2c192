"""CtrModel: what every model shares (item/user embeddings, behaviour inputs, head, loss).

A model file subclasses ``CtrModel`` and writes ``forward`` so that it reads like its paper:
select behaviours (retrieval), model them (refinement), then the head. ``forward(batch)`` is
the batch path (training, evaluation: every row its own history); ``score_request(state,
candidates)`` is the request path (serving: one user's kept state x many candidates), see
``r2led.models.user_state``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from r2led.config import ModelConfig
from r2led.data.batches import Batch
from r2led.models.layers import MLP, CachingModule, ItemEmbeddings, KeptValue, UserEmbeddings, per_unique_item
from r2led.models.spec import DataSpec
from r2led.models.user_state import RequestError, RequestIndex, UserState, check_candidates
from r2led.sid.table import SidTable


class CtrModel(CachingModule):
    """Base class. ``forward(batch) -> logits (B,)``; ``loss(batch, logits) -> scalar``;
    ``score_request(state, candidates) -> logits (C,)`` for serving."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, cfg: ModelConfig, spec: DataSpec, sid: SidTable | None = None):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        d = cfg.dim
        self.items = ItemEmbeddings(spec, d, sid if self.wants_sid(cfg) else None)
        self.users = UserEmbeddings(spec, d)
        self.signal = nn.Embedding(spec.signal_size, d, padding_idx=0)
        nn.init.normal_(self.signal.weight, std=0.05)
        self._item_table = KeptValue(
            lambda: self._item_repr(torch.arange(spec.n_items + 1, device=self.signal.weight.device))
        )
        self._projections = KeptValue(dict)  # encoder name -> its (N+1, 2d), (S, 2d) projections

    @classmethod
    def wants_sid(cls, cfg: ModelConfig) -> bool:
        return cfg.sid_features

    # ---- item and behaviour representations ---------------------------------------------
    def item_repr(self, items: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., d): ID embedding + side features (+ SID prefixes, fairness control).

        In eval mode without autograd, rows of a per-item table kept until
        ``invalidate_caches`` (the same values: the function is row-wise), as a server keeps
        them and as R2LED keeps its ``serving_tables``."""
        if not self.training and not torch.is_grad_enabled():
            table = self._item_table()  # (N+1, d)
            return table.index_select(0, items.reshape(-1)).view(*items.shape, table.shape[-1])
        return per_unique_item(self._item_repr, items)

    def _item_repr(self, items: torch.Tensor) -> torch.Tensor:
        x = self.items.id(items) + self.items.features(items)
        if self.cfg.sid_features and self.items.levels:
            x = x + self.items.prefixes(items).mean(-2)
        return x

    def behaviour_repr(self, items: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """Keys/values of behaviours: the item plus the behaviour's own signal (e.g. rating)."""
        return self.item_repr(items) + self.signal(signal)

    def behaviour_rows(self, name: str, items: torch.Tensor, signals: torch.Tensor) -> torch.Tensor:
        """The key and value projections (``TargetAttention.project``) of behaviours (n,) for
        the encoder ``getattr(self, name)``: (n, 2d). In eval mode without autograd, rows of
        per-item and per-signal projection tables kept until ``invalidate_caches`` (the map
        is linear, so the parts add up), as TWIN keeps its keys and R2LED its tables."""
        encoder = getattr(self, name)
        if self.training or torch.is_grad_enabled():
            return encoder.project(self.behaviour_repr(items, signals))
        tables = self._projections()
        if name not in tables:
            tables[name] = (encoder.project(self._item_table()), encoder.project(self.signal.weight))
        item_rows, signal_rows = tables[name]
        return item_rows.index_select(0, items.reshape(-1)) + signal_rows.index_select(0, signals.reshape(-1))

    def user_repr(self, batch: Batch) -> torch.Tensor:
        """(B, F*d [+ S]): profile feature embeddings, and the history profile when enabled.

        The history profile is the share of each signal value (e.g. each rating) among the
        user's behaviours plus log(1 + length): integer counting over (B, T), no embeddings,
        so it costs every model the same and stays cheap at lifelong lengths.
        """
        users = self.users(batch.user_feats)
        if not self.cfg.history_profile:
            return users
        signal = batch.hist_signal  # (B, T), 0 = padding
        counts = torch.zeros(signal.shape[0], self.spec.signal_size, device=signal.device)
        counts.scatter_add_(1, signal, torch.ones_like(signal, dtype=counts.dtype))
        return torch.cat([users, history_profile(counts)], dim=-1)

    def head_input_dim(self, n_vectors: int) -> int:
        profile = self.spec.signal_size if self.cfg.history_profile else 0
        return self.users.out_dim + profile + n_vectors * self.cfg.dim

    def make_head(self, n_vectors: int) -> MLP:
        return MLP(self.head_input_dim(n_vectors), self.cfg.mlp, self.cfg.dropout)

    # ---- the request API (serving): one user state x many candidates ----------------------
    def new_user_state(self, items, signals, features=None, max_length: int | None = None) -> UserState:
        """A user's state from the history (T,) items and signals, oldest first, and the
        user's (F,) feature codes (None: all unknown); ``max_length``: keep only the most
        recent ones (e.g. ``train.t_max``). See ``r2led.models.user_state``."""
        n_features = len(self.spec.user_feature_sizes)
        return UserState(items, signals, features, self.spec.n_items, self.spec.signal_size, n_features, max_length)

    def score_request(self, state: UserState, candidates) -> torch.Tensor:
        """Logits (C,) of the candidate item ids (C,) for the user of ``state``: the batch
        path's result on C rows holding that history, from the state's kept index (built on
        first use). Eval mode only; runs under ``torch.inference_mode``."""
        if self.training:
            raise RequestError("score_request needs eval mode: call model.eval() first")
        cands = check_candidates(candidates, self.spec.n_items)
        with state.lock, torch.inference_mode():
            return self._score_request(state, state.index_for(self), cands)

    def build_request_index(self, state: UserState) -> RequestIndex | None:
        """The per-user index this model keeps (``user_state``); None: it needs none."""
        return None

    def _score_request(self, state: UserState, index: RequestIndex | None, candidates: torch.Tensor) -> torch.Tensor:
        """The request path; this default runs the batch path on ``state_batch``."""
        return self(state_batch(state, candidates))

    def request_user_repr(self, state: UserState, c: int) -> torch.Tensor:
        """``user_repr`` of the user of ``state`` for ``c`` candidate rows: one row, from the
        kept profile counts (O(S), not O(T)), kept in the state until an append or a parameter
        change (``UserState.kept``), expanded. (C, F*d [+ S])"""
        if self.training or torch.is_grad_enabled():
            return self._user_row(state).expand(c, -1)
        return state.kept(self, "user_repr", lambda: self._user_row(state)).expand(c, -1)

    def _user_row(self, state: UserState) -> torch.Tensor:
        users = self.users(torch.from_numpy(state.features).unsqueeze(0))  # (1, F*d)
        if self.cfg.history_profile:
            counts = torch.from_numpy(state.counts).float().unsqueeze(0)  # (1, S), kept by the state
            users = torch.cat([users, history_profile(counts)], dim=-1)
        return users

    def request_short(self, state: UserState, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``n`` behaviours of the state: items and signals (min(n, T),)."""
        start = max(len(state) - n, 0) if n > 0 else len(state)
        return torch.from_numpy(state.items[start:].copy()), torch.from_numpy(state.signals[start:].copy())

    # ---- training -----------------------------------------------------------------------
    def loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, batch.label)


def history_profile(counts: torch.Tensor) -> torch.Tensor:
    """The history profile from per-signal counts (B, S) (column 0: padding, not counted):
    each signal value's share of the behaviours, and log(1 + T) / 8 -> (B, S)."""
    length = counts[:, 1:].sum(1, keepdim=True)  # (B, 1)
    return torch.cat([counts[:, 1:] / length.clamp_min(1.0), torch.log1p(length) / 8.0], dim=-1)


def short_window(batch: Batch, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last ``n`` behaviours of each history: items, signal, mask, each (B, min(n, L))."""
    start = max(batch.hist_items.shape[1] - n, 0)  # n = 0 gives an empty window, not the whole
    return batch.hist_items[:, start:], batch.hist_signal[:, start:], batch.hist_mask[:, start:]


def state_batch(state: UserState, candidates: torch.Tensor) -> Batch:
    """The batch the batch path would see for a request: C rows, each holding the state's
    history (one tensor ``expand``-ed, not copied). An empty history is one padding column."""
    c, t = len(candidates), len(state)
    items, signals = (state.items.copy(), state.signals.copy()) if t else (np.zeros(1, np.int64), np.zeros(1, np.int64))
    row = lambda x: torch.from_numpy(x).unsqueeze(0).expand(c, -1)  # noqa: E731
    return Batch(
        user=torch.zeros(c, dtype=torch.long),
        user_feats=row(state.features),
        target=candidates,
        hist_items=row(items),
        hist_signal=row(signals),
        hist_mask=row(np.ones(len(items), bool) if t else np.zeros(1, bool)),
        label=torch.zeros(c),
    )


def state_history(state: UserState) -> tuple[torch.Tensor, torch.Tensor]:
    """The state's items and signals (T,) as tensors (views); an empty history is one padding
    behaviour, which no retrieval ever takes (positions index it safely)."""
    if len(state):
        return torch.from_numpy(state.items), torch.from_numpy(state.signals)
    return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)


def short_route_head(model: CtrModel, state: UserState, target: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The request path's end for a model with ``short_attention`` and a 4-vector head
    (SIM, ETA, TWIN, SDIM, AvgPool): the short route over the state's last behaviours (their
    projections computed once, shared by the rows), then ``MLP([user; e(t); u; r_s; e(t) * u])``.
    target, u (C, d) -> logits (C,)."""
    c = len(target)
    s_items, s_signal = model.request_short(state, model.cfg.short_len)  # (n_s,)
    s_rows = model.behaviour_rows("short_attention", s_items, s_signal)  # (n_s, 2d): projected once, shared
    r_short, _ = model.short_attention.attend(target, s_rows, torch.ones(len(s_items), dtype=torch.bool))  # (C, d)
    x = torch.cat([model.request_user_repr(state, c), target, u, r_short, target * u], dim=-1)
    return model.head(x)
