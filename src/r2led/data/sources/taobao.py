"""Taobao UserBehavior (Alibaba Tianchi dataset 649): ``UserBehavior.csv``.

The published file has no header; each line is ``user,item,category,behavior,timestamp``::

    1,2268318,2520377,pv,1511544070

``behavior`` is one of ``pv`` (page view), ``cart``, ``fav``, ``buy``; it becomes the signal
``pv=1, cart=2, fav=3, buy=4``. There is no item text: an item's text is ``"category {id}"``,
its category and only tag are the category id (the first one seen if an item has several), so
its semantic ID comes from the category and collaborative embeddings. There are no user
features.

Labels: the store labels a sample ``signal > label_threshold``. The default protocol
(threshold 3) makes *buy* the positive class; ``Protocol(label_threshold=1)`` makes any
engagement beyond a view (cart, fav or buy) positive. Choose one and report it.
The full file (about 100M rows) also holds a few timestamps outside the official
2017-11-25 .. 2017-12-03 window; they are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from r2led.data.tables import CanonicalTables
from r2led.errors import DataError

FILE_NAME = "UserBehavior.csv"
COLUMNS = ("user", "item", "category", "behavior", "timestamp")
BEHAVIORS = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}


def load_taobao(path: str | Path) -> CanonicalTables:
    """Read ``UserBehavior.csv`` (or a folder holding it) into canonical tables."""
    file = Path(path)
    if file.is_dir():
        file = file / FILE_NAME
    if not file.is_file():
        raise DataError(f"taobao: file not found: {file} (expected the headerless {FILE_NAME})")
    try:
        raw = pl.read_csv(file, has_header=False, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"taobao: cannot read {file} as CSV: {exc}") from exc
    if raw.width != len(COLUMNS):
        raise DataError(
            f"taobao: {file} has {raw.width} columns; expected {len(COLUMNS)} ({','.join(COLUMNS)}), no header"
        )
    raw.columns = list(COLUMNS)
    raw = raw.with_columns(pl.all().str.strip_chars())
    for col in COLUMNS:
        missing = raw[col].is_null() | (raw[col] == "")
        if missing.any():
            line = int(missing.arg_max()) + 1
            raise DataError(f"taobao: {file}: column '{col}' is empty in {int(missing.sum())} rows (first at line {line})")
    ts = raw["timestamp"].cast(pl.Int64, strict=False)
    if ts.is_null().any():
        line = int(ts.is_null().arg_max()) + 1
        raise DataError(
            f"taobao: {file}: column 'timestamp' must be integer seconds; line {line} has {raw['timestamp'][line - 1]!r}"
        )
    signal = raw["behavior"].replace_strict(BEHAVIORS, default=None, return_dtype=pl.Int64)
    if signal.is_null().any():
        line = int(signal.is_null().arg_max()) + 1
        raise DataError(
            f"taobao: {file}: column 'behavior' must be one of {sorted(BEHAVIORS)}; "
            f"line {line} has {raw['behavior'][line - 1]!r}"
        )
    inter = pl.DataFrame({"user": raw["user"], "item": raw["item"], "ts": ts, "signal": signal})
    items = (
        raw.select("item", "category")
        .unique(subset="item", keep="first", maintain_order=True)
        .select(
            "item",
            ("category " + pl.col("category")).alias("text"),
            pl.col("category"),
            pl.concat_list("category").alias("tags"),
        )
    )
    users = raw.select("user").unique(maintain_order=True)
    info = {"file": str(file), "rows": raw.height, "signal": BEHAVIORS}
    return CanonicalTables("taobao", inter, items, users, info).validate()
