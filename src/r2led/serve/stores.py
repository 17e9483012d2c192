"""Opening a history store by name: the one place that knows every backend.

``open_store("redis://host:6379/0", t_max)`` -> ``RedisHistoryStore``; any other spec is a
SQLite file path -> ``SqliteHistoryStore`` (WAL mode). Both implement
``r2led.serve.history_store.HistoryStore``.
"""

from __future__ import annotations

from r2led.serve.history_store import HistoryStore


def open_store(spec: str, t_max: int) -> HistoryStore:
    """Open the store named by ``spec``: ``redis://host:port/db`` or a SQLite file path."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from r2led.serve.store_redis import RedisHistoryStore  # redis-py only when asked for

        return RedisHistoryStore(spec, t_max)
    from r2led.serve.store_sqlite import SqliteHistoryStore

    return SqliteHistoryStore(spec, t_max)
