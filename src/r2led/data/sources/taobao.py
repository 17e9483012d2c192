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
2017-11-25 .. 2017-12-03 window; those between 1990 and the end of next year are kept as they
are, others (negative, far future) are refused like any bad row: the message names the file,
the line and the column, and quotes at most 100 characters of it.

The file is read lazily (``pl.scan_csv``, no quoting: the format has none, and a stray quote
must not swallow the rest of the file): ``interactions`` is a ``pl.LazyFrame``, checked in one
pass, with repeated ``(user, item, timestamp)`` rows dropped; ``items`` and ``users`` are
DataFrames. Ids must be integers, as published, and cells unpadded.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from r2led.data.sources.checks import (
    LINE,
    RowCheck,
    locate_csv_problem,
    not_in,
    raise_first_failure,
    refusal,
    time_checks,
)
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError, one_line

FILE_NAME = "UserBehavior.csv"
COLUMNS = ("user", "item", "category", "behavior", "timestamp")
BEHAVIORS = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}


def load_taobao(path: str | Path) -> CanonicalTables:
    """Read ``UserBehavior.csv`` (or a folder holding it) into canonical tables (lazy interactions)."""
    file = Path(path)
    if file.is_dir():
        file = file / FILE_NAME
    if not file.is_file():
        raise DataError(f"taobao: file not found: {file} (expected the headerless {FILE_NAME})")
    _check_width(file)
    raw = pl.scan_csv(
        file,
        has_header=False,
        schema={c: pl.String for c in COLUMNS},
        quote_char=None,
        row_index_name=LINE,
        row_index_offset=1,
    ).filter(~pl.all_horizontal([pl.col(c).is_null() for c in COLUMNS]))  # blank lines
    # Cells are taken as they are (the published file has no padding): stripping every cell
    # on each pass over a 100M-row file cost more than the checks; a padded cell is refused.
    seconds = pl.col("timestamp").cast(pl.Int64, strict=False)
    checks = [
        *[RowCheck(c, pl.col(c).fill_null("") == "", "is empty") for c in COLUMNS],
        *[
            RowCheck(c, ~pl.col(c).str.contains(r"^[0-9]+$"), "must be an integer id")
            for c in ("user", "item", "category")
        ],
        RowCheck("behavior", not_in("behavior", list(BEHAVIORS)), f"must be one of {sorted(BEHAVIORS)}"),
        *time_checks("timestamp", seconds),
    ]
    try:
        rows = raise_first_failure("taobao", file, raw, checks)
        items = (
            raw.select("item", "category")
            .unique(subset="item", keep="first", maintain_order=True)
            .select(
                "item",
                ("category " + pl.col("category")).alias("text"),
                pl.col("category"),
                pl.concat_list("category").alias("tags"),
            )
            .collect()
        )
        users = raw.select("user").unique(maintain_order=True).collect()
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(file, exc) from None
    if rows == 0:
        raise DataError(f"taobao: {file} holds no rows")
    inter = raw.select(
        "user",
        "item",
        seconds.alias("ts"),
        pl.col("behavior").replace_strict(BEHAVIORS, return_dtype=pl.Int64).alias("signal"),
    )
    info = {"file": str(file), "rows": rows, "signal": BEHAVIORS}
    return CanonicalTables("taobao", inter, items, users, info).drop_duplicates().validate()


def _check_width(file: Path) -> None:
    """Refuse a file whose first line is not 5 comma-separated fields (a header is caught later)."""
    try:
        with open(file, "rb") as fh:
            first = fh.readline(4096).decode("utf-8", errors="replace").rstrip("\r\n")
    except OSError as exc:
        raise DataError(f"taobao: cannot read {file}: {one_line(exc)}") from exc
    if not first.strip():
        if file.stat().st_size == 0:
            raise DataError(f"taobao: {file} holds no rows")
        return
    width = first.count(",") + 1
    if width != len(COLUMNS):
        raise DataError(f"taobao: {file} has {width} columns; expected {len(COLUMNS)} ({','.join(COLUMNS)}), no header")


def _unreadable(file: Path, exc: Exception) -> DataError:
    """The line polars could not read (found by a slower exact scan), or polars' reason, short."""
    found = locate_csv_problem(file, list(COLUMNS), header=False, quoting=False)
    if found is None:
        return DataError(f"taobao: cannot read {file} as CSV: {one_line(exc)}")
    line, problem, text = found
    return refusal("taobao", file, line, None, problem, text)
