"""Canonical tables: the one shape every source hands to the store.

A source turns its raw format into three polars tables, keyed by the source's own ids:

- ``interactions``: ``user`` (str), ``item`` (str), ``ts`` (int64, seconds), ``signal``
  (int, >= 1: the behaviour's own side signal, e.g. a rating or an action type). A
  ``pl.DataFrame``, or a ``pl.LazyFrame`` when a reader scans a large file lazily (``collect``
  makes it a DataFrame). At most one row per ``(user, item, ts)``: see ``drop_duplicates``.
- ``items``: ``item`` (str, unique), ``text`` (str, used for semantic IDs), ``category``
  (str, may be empty), ``tags`` (list[str]).
- ``users``: ``user`` (str, unique) and any number of categorical feature columns (str).

``validate`` checks all of it at the edge, so that later stages can trust the tables.

Duplicates leak labels: a behaviour logged twice puts its twin, with the same item and the
same signal, as the last history row of the sample it is the target of. Every reader calls
``drop_duplicates``, which keeps one row per ``(user, item, ts)`` (the strongest signal, e.g.
a purchase over a view logged in the same second), counts the rest in ``duplicates_dropped``
(written to the store manifest) and logs one warning line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import polars as pl

from r2led.errors import DataError

INTERACTION_SCHEMA = {"user": pl.String, "item": pl.String, "ts": pl.Int64, "signal": pl.Int64}
INTERACTION_KEY = ["user", "item", "ts"]  # one behaviour; a repeat of it is a duplicate

log = logging.getLogger("r2led.data")


@dataclass
class CanonicalTables:
    """What a source produces. ``name`` and ``source_info`` end up in the manifest."""

    name: str
    interactions: pl.DataFrame | pl.LazyFrame
    items: pl.DataFrame
    users: pl.DataFrame
    source_info: dict = field(default_factory=dict)
    duplicates_dropped: int = 0  # rows removed by ``drop_duplicates``
    _checked: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def lazy(self) -> bool:
        """Whether ``interactions`` is a ``pl.LazyFrame`` (read when collected or streamed)."""
        return isinstance(self.interactions, pl.LazyFrame)

    def collect(self) -> CanonicalTables:
        """Make ``interactions`` a DataFrame (reads a lazy reader's file); returns ``self``."""
        if self.lazy:
            self.interactions = self.interactions.collect()
            self._checked = None  # a lazy frame's rows were not checked: the next validate does
        return self

    def drop_duplicates(self) -> CanonicalTables:
        """Keep one interaction per ``(user, item, ts)``, the one with the strongest signal.

        Counts the dropped rows in ``duplicates_dropped`` and logs one warning when there are
        any. Row order is kept (a key's first row stands for it). A lazy frame stays lazy: the
        count takes one pass over it, the deduplication happens when it is read.
        """
        inter = self.interactions
        columns = inter.collect_schema().names() if self.lazy else inter.columns
        _require_columns("interactions", inter, ["user", "item", "ts", "signal"])
        # Fast exact test first: equal keys have equal fingerprints, so as many distinct
        # fingerprints as rows proves every key distinct. Otherwise count keys exactly.
        fingerprint = pl.col("user").hash(1).xor(pl.col("item").hash(2)).xor(pl.col("ts").hash(3))
        rows, distinct = inter.lazy().select(pl.len(), fingerprint.n_unique()).collect().row(0)
        keys = (
            distinct
            if distinct == rows
            else (inter.lazy().select(INTERACTION_KEY).unique().select(pl.len()).collect().item())
        )
        dropped = int(rows) - int(keys)
        if dropped:
            others = [c for c in columns if c not in (*INTERACTION_KEY, "signal")]
            self.interactions = (
                inter.group_by(INTERACTION_KEY, maintain_order=True)
                .agg(pl.col("signal").max(), *[pl.col(c).first() for c in others])
                .select(columns)
            )
            self.duplicates_dropped += dropped
            log.warning(
                "%s: dropped %d duplicate interaction(s) (same user, item and timestamp) of %d rows",
                self.name,
                dropped,
                rows,
            )
        return self

    def validate(self) -> CanonicalTables:
        """Check columns, types, nulls and referential integrity; raise ``DataError``.

        A lazy ``interactions`` frame gets the checks that need no pass over it (columns,
        types, the item and user tables); its rows get the same checks as ``build_store``
        streams them, batch by batch. Tables already validated (and not replaced since) are
        not checked again.
        """
        if self._checked is not None and all(a is b for a, b in zip(self._checked, self._fingerprint(), strict=False)):
            return self
        _require_columns("interactions", self.interactions, ["user", "item", "ts", "signal"])
        _require_columns("items", self.items, ["item", "text", "category", "tags"])
        _require_columns("users", self.users, ["user"])
        schema = self.interactions.collect_schema()
        for col in ("ts", "signal"):
            if not schema[col].is_numeric():
                raise DataError(f"{self.name}: interactions column '{col}' must be numeric; it is {schema[col]}")
        tables = [("items", self.items), ("users", self.users)]
        if not self.lazy:
            tables.insert(0, ("interactions", self.interactions))
        for table_name, df in tables:
            if df.height == 0:
                raise DataError(f"{self.name}: the {table_name} table is empty")
        if not self.lazy:
            self._check_rows(self.interactions)
        for table_name, df, key in (("items", self.items, "item"), ("users", self.users, "user")):
            dup = df[key].is_duplicated()
            if dup.any():
                raise DataError(f"{self.name}: {table_name}.{key} is not unique, e.g. {df.filter(dup)[key][0]!r}")
        if not self.lazy:
            self._check_keys(self.interactions)
        self._checked = self._fingerprint()
        return self

    def _check_rows(self, inter: pl.DataFrame) -> None:
        for col in ("user", "item", "ts", "signal"):
            nulls = inter[col].null_count()
            if nulls:
                raise DataError(f"{self.name}: interactions column '{col}' has {nulls} null/NaN values")
        for col in ("ts", "signal"):
            if inter[col].dtype.is_float() and inter[col].is_nan().any():
                raise DataError(
                    f"{self.name}: interactions column '{col}' has {int(inter[col].is_nan().sum())} NaN values"
                )
        if (inter["signal"] < 1).any():
            bad = inter.filter(pl.col("signal") < 1).head(1).row(0, named=True)
            raise DataError(f"{self.name}: interaction signal must be >= 1 (0 is padding); first bad row: {bad}")

    def _check_keys(self, inter: pl.DataFrame) -> None:
        for what, table in (("item", self.items), ("user", self.users)):
            unknown = inter.join(table.select(what), on=what, how="anti")
            if unknown.height:
                raise DataError(
                    f"{self.name}: {unknown.height} interactions name {what}s missing from the {what} table, "
                    f"e.g. {what} {unknown[what][0]!r}"
                )

    def _fingerprint(self) -> tuple:
        """The three tables themselves (compared with ``is``): validation is redone when one is replaced."""
        return (self.interactions, self.items, self.users)

    @property
    def user_feature_names(self) -> list[str]:
        return [c for c in self.users.columns if c != "user"]


def _require_columns(table: str, df: pl.DataFrame | pl.LazyFrame, cols: list[str]) -> None:
    names = df.collect_schema().names()
    missing = [c for c in cols if c not in names]
    if missing:
        raise DataError(f"{table} table lacks column(s) {missing}; it has {names}")
