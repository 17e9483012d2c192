"""Durable user histories behind one interface: ``HistoryStore``.

A store keeps, per user: the most recent ``t_max`` behaviours (item key, signal), oldest first;
the feature values set through the API (name -> value); and ``seq``, a counter that every
change of the user increases (by the number of events appended, or by one for a replace).
Caches compare ``seq`` to know whether their copy is current, so several processes (workers,
replicas) can share one store. A store also keeps the ``seq`` of the user's last replace, so a
cache that is behind by appends only can ask for just those events
(``appended_since(user, seq)``) instead of reloading the whole record.

Policy for older behaviours: an append that takes a user past ``t_max`` drops the oldest in
the same transaction. The store is the serving copy of recent behaviour, not the system of
record; the full log stays with the data pipeline (``r2led data prepare`` reads it).

Guarantees of every implementation:
- an append or replace is atomic per user (concurrent appends are all kept, in one order);
- a call that returned is durable (SQLite: WAL with ``synchronous=FULL``; Redis: as durable as
  the server's persistence, ``appendonly yes`` with ``appendfsync always`` for the same promise).

``open_store(spec, t_max)``: a path opens SQLite (created if missing), ``redis://host:port/db``
opens Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StoredHistory:
    """One user's record as the store holds it."""

    seq: int
    items: list[str]  # item keys, oldest first, at most t_max
    signals: list[int]
    features: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Appended:
    """The events a user got after some ``seq`` (all appends, oldest first), up to ``seq``."""

    seq: int  # the user's change counter after these events
    items: list[str]  # item keys, oldest first
    signals: list[int]


class HistoryStore(Protocol):
    """What the service needs from a history store (see the module docstring)."""

    t_max: int

    def seq(self, user: str) -> int | None:
        """The user's change counter, ``None`` for a user the store has never seen."""

    def load(self, user: str) -> StoredHistory | None:
        """The user's record, ``None`` for a user the store has never seen."""

    def appended_since(self, user: str, seq: int) -> Appended | None:
        """The events appended to the user after change ``seq``, read in one snapshot; ``None``
        when they are not enough to bring a copy at ``seq`` up to date: a replace happened after
        ``seq``, more events than ``t_max`` were appended since, or the store never saw ``seq``."""

    def append(self, user: str, items: list[str], signals: list[int]) -> tuple[int, int]:
        """Add events as the most recent (dropping the oldest past t_max); returns (seq, length)."""

    def replace(
        self, user: str, items: list[str], signals: list[int], features: dict[str, str] | None
    ) -> tuple[int, int]:
        """Set the user's history (and, when given, merge its feature values); returns (seq, length)."""

    def replace_many(self, records: dict[str, tuple[list[str], list[int]]]) -> int:
        """Bulk-load histories (features unchanged); returns the number of users written."""

    def count_users(self) -> int:
        """Users with a record."""

    def close(self) -> None:
        """Release connections."""
