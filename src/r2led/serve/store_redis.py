"""The shared history store: Redis, for several service replicas (``--store redis://host:port/db``).

Keys per user ``U`` (under the prefix ``r2led:``): ``h:U`` a list of ``"signal|item"`` entries,
oldest first, trimmed to ``t_max``; ``s:U`` the change counter; ``f:U`` the feature values
(JSON); ``r:U`` the ``seq`` of the user's last replace. The set ``users`` names every user. Each
change is one Lua script (an append) or one ``MULTI``/``EXEC`` transaction (a replace), so it is
atomic per user and every replica sees it whole. Since a replace every change is an append of one
event per ``seq``, so the events after change ``s`` are the last ``seq - s`` entries of ``h:U``
(``appended_since``, one script: one snapshot). A user written before ``r:U`` existed gets it at
its next append (the ``seq`` before that append: older copies reload once).

Durability is the server's: run Redis with ``appendonly yes`` and ``appendfsync always`` for an
acknowledged append to survive a crash of Redis itself (the service warns at start otherwise).
"""

from __future__ import annotations

import json

from r2led.serve.errors import HistoryStoreError
from r2led.serve.history_store import Appended, StoredHistory

PREFIX = "r2led:"

# KEYS: h, s, r, users; ARGV: t_max, user, entries...  -> {length, seq}
APPEND = """
local before = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SETNX', KEYS[3], before)
local length = 0
for i = 3, #ARGV, 1000 do
    length = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
local seq = redis.call('INCRBY', KEYS[2], #ARGV - 2)
redis.call('SADD', KEYS[4], ARGV[2])
return {length, seq}
"""

# KEYS: h, s, r, users; ARGV: user, entries...  -> seq
REPLACE = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('SADD', KEYS[4], ARGV[1])
local seq = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], seq)
return seq
"""

# KEYS: h, s, r; ARGV: since  -> {seq, entries} or nil
APPENDED_SINCE = """
local seq, replaced = redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])
if not seq or not replaced then return false end
seq, replaced = tonumber(seq), tonumber(replaced)
local since = tonumber(ARGV[1])
if since < replaced or since > seq then return false end
if since == seq then return {seq, {}} end
local entries = redis.call('LRANGE', KEYS[1], since - seq, -1)
if #entries < seq - since then return false end
return {seq, entries}
"""


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
        self._append = self._r.register_script(APPEND)
        self._replace = self._r.register_script(REPLACE)
        self._appended_since = self._r.register_script(APPENDED_SINCE)

    @staticmethod
    def _keys(user: str) -> list[str]:
        return [PREFIX + "h:" + user, PREFIX + "s:" + user, PREFIX + "r:" + user, PREFIX + "users"]

    @staticmethod
    def _encode(items: list[str], signals: list[int]) -> list[str]:
        """Events as list entries ``"signal|item"`` (``_decode`` reads them back)."""
        return [f"{s}|{it}" for it, s in zip(items, signals, strict=False)]

    @staticmethod
    def _decode(entries) -> tuple[list[str], list[int]]:
        items, signals = [], []
        for entry in entries:
            signal, _, item = entry.decode().partition("|")
            items.append(item)
            signals.append(int(signal))
        return items, signals

    def seq(self, user: str) -> int | None:
        value = self._r.get(PREFIX + "s:" + user)
        return None if value is None else int(value)

    def load(self, user: str) -> StoredHistory | None:
        pipe = self._r.pipeline(transaction=True)  # one snapshot of the three keys
        pipe.get(PREFIX + "s:" + user).lrange(PREFIX + "h:" + user, 0, -1).get(PREFIX + "f:" + user)
        seq, entries, features = pipe.execute()
        if seq is None:
            return None
        items, signals = self._decode(entries)
        return StoredHistory(int(seq), items, signals, json.loads(features) if features else {})

    def appended_since(self, user: str, seq: int) -> Appended | None:
        got = self._appended_since(keys=self._keys(user)[:3], args=[int(seq)])
        if got is None:
            return None
        items, signals = self._decode(got[1])
        return Appended(int(got[0]), items, signals)

    def append(self, user: str, items: list[str], signals: list[int]) -> tuple[int, int]:
        entries = self._encode(items, signals)
        length, seq = self._append(keys=self._keys(user), args=[self.t_max, user, *entries])
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
                    seq = pipe.execute()[-2]  # the replace script's result
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

    def _queue_replace(self, pipe, user: str, items: list[str], signals: list[int]) -> None:
        entries = self._encode(items, signals)
        self._replace(keys=self._keys(user), args=[user, *entries], client=pipe)

    @staticmethod
    def _watch_error():
        import redis

        return redis.WatchError
