"""Shared fixtures: a tiny store built from hand-made canonical tables, with a SID table."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from r2led.data.store import LifelongStore, build_store
from r2led.data.tables import CanonicalTables
from r2led.sid.table import SidTable


def make_tables(n_users: int = 60, n_items: int = 80, length: int = 40, seed: int = 0) -> CanonicalTables:
    """Users prefer one of 4 item groups; ratings are high inside the group, low outside."""
    rng = np.random.default_rng(seed)
    group = np.arange(n_items) % 4
    users, items, ts, signal = [], [], [], []
    for u in range(n_users):
        n = int(rng.integers(length // 2, length + 1))
        pref = u % 4
        chosen = rng.integers(0, n_items, n)
        fit = group[chosen] == pref
        rating = np.where(fit, rng.integers(4, 6, n), rng.integers(1, 4, n))
        users += [f"u{u}"] * n
        items += [f"i{i}" for i in chosen]
        ts += list(np.sort(rng.integers(0, 10_000, n)))
        signal += list(rating)
    inter = pl.DataFrame(
        {"user": users, "item": items, "ts": np.array(ts, dtype=np.int64), "signal": np.array(signal, dtype=np.int64)}
    )
    item_tbl = pl.DataFrame(
        {
            "item": [f"i{i}" for i in range(n_items)],
            "text": [f"group {group[i]} item {i}" for i in range(n_items)],
            "category": [f"g{group[i]}" for i in range(n_items)],
            "tags": [[f"g{group[i]}", f"t{i % 3}"] for i in range(n_items)],
        }
    )
    user_tbl = pl.DataFrame(
        {"user": [f"u{u}" for u in range(n_users)], "segment": [f"s{u % 4}" for u in range(n_users)]}
    )
    return CanonicalTables("tiny", inter, item_tbl, user_tbl)


def group_sid(n_items: int) -> SidTable:
    """A 3-level SID table whose level-1 code is the item's group (as in make_tables)."""
    i = np.arange(n_items)
    codes = np.stack([i % 4, (i // 4) % 3, (i // 12) % 5], axis=1)
    return SidTable.from_codes(codes, {"encoder": "test"})


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> LifelongStore:
    root = tmp_path_factory.mktemp("tiny") / "store"
    store = build_store(make_tables(), root)
    group_sid(store.n_items).save(root / "sid")
    return store
