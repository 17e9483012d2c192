"""The shared history store: Redis, for several service replicas (``--store redis://host:port/db``).

Keys per user ``U`` (under the prefix ``r2led:``): ``h:U`` a list of ``"signal|item"`` entries,
oldest first, trimmed to ``t_max``; ``s:U`` the change counter; ``f:U`` the feature values
(JSON). The set ``users`` names every user. Each change is one ``MULTI``/``EXEC`` transaction,
so it is atomic per user and every replica sees it whole.

Durability is the server's: run Redis with ``appendonly yes`` and ``appendfsync always`` for an
acknowledged append to survive a crash of Redis itself (the service warns at start otherwise).
"""

from __future__ import annotations

import json

from r2led.serve.errors import HistoryStoreError
from r2led.serve.history_store import StoredHistory

PREFIX = "r2led:"


class RedisHistoryStore:
    """``HistoryStore`` on a Redis server (see the module docstring)."""

    def __init__(self, url: str, t_max: int):
        import redis

        self.url, self.t_max = url, int(t_max)
        try:
            self._r = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
            self._r.ping()
            config = self._r.config_get("append*")
        except (redis.RedisError, ValueError) as exc:
            raise HistoryStoreError(f"cannot use the Redis history store {url}: {exc}") from exc
        self.durable = config.get("appendonly") == "yes" and config.get("appendfsync") == "always"

    def seq(self, user: str) -> int | None:
        value = self._r.get(PREFIX + "s:" + user)
        return None if value is None else int(value)

    def load(self, user: str) -> StoredHistory | None:
        pipe = self._r.pipeline(transaction=True)  # one snapshot of the three keys
        pipe.get(PREFIX + "s:" + user).lrange(PREFIX + "h:" + user, 0, -1).get(PREFIX + "f:" + user)
        seq, entries, features = pipe.execute()
        if seq is None:
            return None
        items, signals = [], []
        for entry in entries:
            signal, _, item = entry.decode().partition("|")
            items.append(item)
            signals.append(int(signal))
        return StoredHistory(int(seq), items, signals, json.loads(features) if features else {})

    def append(self, user: str, items: list[str], signals: list[int]) -> tuple[int, int]:
        pipe = self._r.pipeline(transaction=True)
        pipe.rpush(PREFIX + "h:" + user, *[f"{s}|{it}" for it, s in zip(items, signals, strict=False)])
        pipe.ltrim(PREFIX + "h:" + user, -self.t_max, -1)
        pipe.incrby(PREFIX + "s:" + user, len(items))
        pipe.sadd(PREFIX + "users", user)
        length, _, seq, _ = pipe.execute()
        return int(seq), min(int(length), self.t_max)

    def replace(
        self, user: str, items: list[str], signals: list[int], features: dict[str, str] | None
    ) -> tuple[int, int]:
        items, signals = items[-self.t_max :], signals[-self.t_max :]
        key = PREFIX + "f:" + user
        with self._r.pipeline(transaction=True) as pipe:
            while True:  # features merge: optimistic lock on the feature key
                try:
                    pipe.watch(key)
                    old = pipe.get(key)
                    merged = {**(json.loads(old) if old else {}), **(features or {})}
                    pipe.multi()
                    self._queue_replace(pipe, user, items, signals)
                    pipe.set(key, json.dumps(merged))
                    seq = pipe.execute()[-2]
                    break
                except self._watch_error():
                    continue
        return int(seq), len(items)

    def replace_many(self, records: dict[str, tuple[list[str], list[int]]]) -> int:
        pipe = self._r.pipeline(transaction=True)  # MULTI/EXEC per chunk of 500 users
        for n, (user, (items, signals)) in enumerate(records.items(), start=1):
            self._queue_replace(pipe, user, items[-self.t_max :], signals[-self.t_max :])
            if n % 500 == 0:
                pipe.execute()
        pipe.execute()
        return len(records)

    def count_users(self) -> int:
        return int(self._r.scard(PREFIX + "users"))

    def close(self) -> None:
        self._r.close()

    @staticmethod
    def _queue_replace(pipe, user: str, items: list[str], signals: list[int]) -> None:
        pipe.delete(PREFIX + "h:" + user)
        if items:
            pipe.rpush(PREFIX + "h:" + user, *[f"{s}|{it}" for it, s in zip(items, signals, strict=False)])
        pipe.sadd(PREFIX + "users", user)
        pipe.incr(PREFIX + "s:" + user)

    @staticmethod
    def _watch_error():
        import redis

        return redis.WatchError
