"""Canonical tables: the one shape every source hands to the store.

A source turns its raw format into three polars tables, keyed by the source's own ids:

- ``interactions``: ``user`` (str), ``item`` (str), ``ts`` (int64, seconds), ``signal``
  (int, >= 1: the behaviour's own side signal, e.g. a rating or an action type).
- ``items``: ``item`` (str, unique), ``text`` (str, used for semantic IDs), ``category``
  (str, may be empty), ``tags`` (list[str]).
- ``users``: ``user`` (str, unique) and any number of categorical feature columns (str).

``validate`` checks all of it at the edge, so that later stages can trust the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from r2led.errors import DataError

INTERACTION_SCHEMA = {"user": pl.String, "item": pl.String, "ts": pl.Int64, "signal": pl.Int64}


@dataclass
class CanonicalTables:
    """What a source produces. ``name`` and ``source_info`` end up in the manifest."""

    name: str
    interactions: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    source_info: dict = field(default_factory=dict)

    def validate(self) -> "CanonicalTables":
        """Check columns, types, nulls and referential integrity; raise ``DataError``."""
        _require_columns("interactions", self.interactions, ["user", "item", "ts", "signal"])
        _require_columns("items", self.items, ["item", "text", "category", "tags"])
        _require_columns("users", self.users, ["user"])
        for table_name, df in (("interactions", self.interactions), ("items", self.items), ("users", self.users)):
            if df.height == 0:
                raise DataError(f"{self.name}: the {table_name} table is empty")
        inter = self.interactions
        for col in ("user", "item", "ts", "signal"):
            nulls = inter[col].null_count()
            if nulls:
                raise DataError(f"{self.name}: interactions column '{col}' has {nulls} null/NaN values")
        for col in ("ts", "signal"):
            if not inter[col].dtype.is_numeric():
                raise DataError(f"{self.name}: interactions column '{col}' must be numeric; it is {inter[col].dtype}")
            if inter[col].dtype.is_float() and inter[col].is_nan().any():
                raise DataError(f"{self.name}: interactions column '{col}' has {int(inter[col].is_nan().sum())} NaN values")
        if (inter["signal"] < 1).any():
            bad = inter.filter(pl.col("signal") < 1).head(1).row(0, named=True)
            raise DataError(f"{self.name}: interaction signal must be >= 1 (0 is padding); first bad row: {bad}")
        for table_name, df, key in (("items", self.items, "item"), ("users", self.users, "user")):
            dup = df[key].is_duplicated()
            if dup.any():
                raise DataError(f"{self.name}: {table_name}.{key} is not unique, e.g. {df.filter(dup)[key][0]!r}")
        unknown = inter.join(self.items.select("item"), on="item", how="anti")
        if unknown.height:
            raise DataError(
                f"{self.name}: {unknown.height} interactions name items missing from the item table, "
                f"e.g. item {unknown['item'][0]!r}"
            )
        unknown = inter.join(self.users.select("user"), on="user", how="anti")
        if unknown.height:
            raise DataError(
                f"{self.name}: {unknown.height} interactions name users missing from the user table, "
                f"e.g. user {unknown['user'][0]!r}"
            )
        return self

    @property
    def user_feature_names(self) -> list[str]:
        return [c for c in self.users.columns if c != "user"]


def _require_columns(table: str, df: pl.DataFrame, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{table} table lacks column(s) {missing}; it has {df.columns}")
