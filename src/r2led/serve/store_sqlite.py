"""The embedded history store: one SQLite file in WAL mode (``r2led serve B --store PATH``).

Tables: ``users(user, seq, features, replaced)`` and ``events(user, pos, item, signal)``, where
``pos`` is the event's position in the user's stream since its last replace (so order survives
trimming) and ``replaced`` is the ``seq`` of that replace (0: none). Since a replace every change
is an append of one event per ``seq``, so the events after change ``s`` are the last
``seq - s`` rows by ``pos`` (``appended_since``). A file written before ``replaced`` existed is
migrated when opened: the column is added with ``replaced = seq`` (older copies reload once). Each change is one
``BEGIN IMMEDIATE`` transaction: it takes the database's write lock, so concurrent appends from
threads or worker processes are serialised and none is lost. ``synchronous=FULL``: a commit that
returned is on disk, through a process kill or a power cut.

Each thread uses its own connection (SQLite connections are not shared across threads).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import weakref
from pathlib import Path

from r2led.serve.errors import HistoryStoreError
from r2led.serve.history_store import Appended, StoredHistory

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user TEXT PRIMARY KEY, seq INTEGER NOT NULL, features TEXT NOT NULL, replaced INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    user TEXT NOT NULL, pos INTEGER NOT NULL, item TEXT NOT NULL, signal INTEGER NOT NULL,
    PRIMARY KEY (user, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class _Connection(sqlite3.Connection):
    """A SQLite connection that can be weakly referenced (the base class cannot)."""


class SqliteHistoryStore:
    """``HistoryStore`` on a SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path, t_max: int):
        self.path, self.t_max = Path(path), int(t_max)
        if self.path.is_dir():
            raise HistoryStoreError(
                f"--store {self.path} is a folder; give a file path for the SQLite history store "
                f"(e.g. {self.path}/histories.db)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # every open connection, for close(); weak, so that a thread's connection is closed when
        # the thread ends (a thread pool retires idle threads: strong references leaked them)
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._guard = threading.Lock()
        try:
            db = self._db()
            with db:
                db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise HistoryStoreError(f"{self.path} is not a usable SQLite history store: {exc}") from exc

    def _migrate(self) -> None:
        """Add ``users.replaced`` to a file written by an older version (one transaction)."""
        with self._write() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
            if "replaced" not in columns:
                db.execute("ALTER TABLE users ADD COLUMN replaced INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE users SET replaced = seq")  # the gap before now is unknown

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False, factory=_Connection
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._guard:
                self._connections.add(db)
        return db

    def seq(self, user: str) -> int | None:
        row = self._db().execute("SELECT seq FROM users WHERE user = ?", (user,)).fetchone()
        return None if row is None else int(row[0])

    def load(self, user: str) -> StoredHistory | None:
        with self._read() as db:
            head = db.execute("SELECT seq, features FROM users WHERE user = ?", (user,)).fetchone()
            rows = (
                db.execute("SELECT item, signal FROM events WHERE user = ? ORDER BY pos", (user,)).fetchall()
                if head
                else []
            )
        if head is None:
            return None
        return StoredHistory(int(head[0]), [r[0] for r in rows], [int(r[1]) for r in rows], json.loads(head[1]))

    def appended_since(self, user: str, seq: int) -> Appended | None:
        with self._read() as db:
            head = db.execute("SELECT seq, replaced FROM users WHERE user = ?", (user,)).fetchone()
            if head is None or not int(head[1]) <= seq <= int(head[0]):
                return None
            n = int(head[0]) - seq
            rows = db.execute(
                "SELECT item, signal FROM events WHERE user = ? ORDER BY pos DESC LIMIT ?", (user, n)
            ).fetchall()
        if len(rows) < n:  # trimmed away: more than t_max appended since
            return None
        rows.reverse()
        return Appended(int(head[0]), [r[0] for r in rows], [int(r[1]) for r in rows])

    def append(self, user: str, items: list[str], signals: list[int]) -> tuple[int, int]:
        with self._write() as db:
            head = db.execute("SELECT seq FROM users WHERE user = ?", (user,)).fetchone()
            last = db.execute("SELECT MAX(pos) FROM events WHERE user = ?", (user,)).fetchone()[0]
            start = -1 if last is None else int(last)
            db.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?)",
                [(user, start + 1 + i, it, s) for i, (it, s) in enumerate(zip(items, signals, strict=False))],
            )
            end = start + len(items)
            db.execute("DELETE FROM events WHERE user = ? AND pos <= ?", (user, end - self.t_max))
            seq = (int(head[0]) if head else 0) + len(items)
            db.execute(
                "INSERT INTO users (user, seq, features) VALUES (?, ?, '{}') "
                "ON CONFLICT(user) DO UPDATE SET seq = excluded.seq",
                (user, seq),
            )
            length = db.execute("SELECT COUNT(*) FROM events WHERE user = ?", (user,)).fetchone()[0]
        return seq, int(length)

    def replace(
        self, user: str, items: list[str], signals: list[int], features: dict[str, str] | None
    ) -> tuple[int, int]:
        items, signals = items[-self.t_max :], signals[-self.t_max :]
        with self._write() as db:
            head = db.execute("SELECT seq, features FROM users WHERE user = ?", (user,)).fetchone()
            merged = {**(json.loads(head[1]) if head else {}), **(features or {})}
            seq = (int(head[0]) if head else 0) + 1
            db.execute("DELETE FROM events WHERE user = ?", (user,))
            db.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?)",
                [(user, i, it, s) for i, (it, s) in enumerate(zip(items, signals, strict=False))],
            )
            db.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?)", (user, seq, json.dumps(merged), seq))
        return seq, len(items)

    def replace_many(self, records: dict[str, tuple[list[str], list[int]]]) -> int:
        with self._write() as db:
            for user, (items, signals) in records.items():
                items, signals = items[-self.t_max :], signals[-self.t_max :]
                head = db.execute("SELECT seq, features FROM users WHERE user = ?", (user,)).fetchone()
                db.execute("DELETE FROM events WHERE user = ?", (user,))
                db.executemany(
                    "INSERT INTO events VALUES (?, ?, ?, ?)",
                    [(user, i, it, s) for i, (it, s) in enumerate(zip(items, signals, strict=False))],
                )
                seq = (int(head[0]) if head else 0) + 1
                db.execute(
                    "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?)", (user, seq, head[1] if head else "{}", seq)
                )
        return len(records)

    def count_users(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def close(self) -> None:
        with self._guard:
            for db in list(self._connections):
                db.close()
            self._connections.clear()
        self._local = threading.local()

    def _write(self):
        return _Transaction(self._db())

    @contextlib.contextmanager
    def _read(self):
        """One snapshot for several reads: ``BEGIN`` ... ``COMMIT`` (a read commits nothing)."""
        db = self._db()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, exc, tb) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
