"""Amazon product reviews (McAuley et al., 2014 and 2018 releases): reviews + metadata.

Give a folder holding two JSON-lines files (plain or ``.gz``):

- **reviews**: any ``*.json`` / ``*.jsonl`` (optionally ``.gz``) whose name does not start with
  ``meta``, e.g. ``reviews_Books_5.json.gz`` (2014) or ``Books_5.json.gz`` (2018). One review
  per line with ``reviewerID``, ``asin``, ``overall`` (1..5 stars) and ``unixReviewTime``.
- **metadata**: the file whose name starts with ``meta``, e.g. ``meta_Books.json.gz``. One
  product per line with ``asin`` and optionally ``title``, ``brand`` and either
  ``categories`` (2014: a list of category paths, e.g. ``[["Books", "Literature & Fiction"]]``)
  or ``category`` (2018: one path, e.g. ``["Books", "Literature & Fiction"]``). The 2014 files
  are Python literals rather than strict JSON (single quotes); both are accepted.

Signal = the star rating (``overall``, rounded), so the default protocol labels 4-5 stars
positive, as for MovieLens. An item's text is ``"{title} | {brand} | {path joined by ' > '}"``;
its tags are the names on its first category path (root first) and its category the first
name under the store's root (``path[1]``, else ``path[0]``). Items reviewed but missing from the
metadata get the text ``"item {asin}"`` (counted in ``source_info``); metadata rows never
reviewed are dropped. There are no user features.

Reviews are read lazily (``pl.scan_ndjson``, plain or gzipped): ``interactions`` is a
``pl.LazyFrame``, checked in one pass, with repeated ``(reviewer, asin, unixReviewTime)`` rows
dropped. A review whose ``overall`` is missing, not finite or not 1..5 stars, or whose
``unixReviewTime`` is not a time between 1990 and the end of next year, and a line that is not
JSON, are refused with the file, the line and the column (quoting at most 100 characters).
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import polars as pl

from r2led.data.sources.checks import (
    LINE,
    RowCheck,
    empty,
    first_failure,
    json_integer,
    json_number,
    json_record_line,
    json_string,
    locate_json_problem,
    refusal,
    time_checks,
)
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError, one_line

REVIEW_COLUMNS = {"reviewerID": pl.String, "asin": pl.String, "overall": pl.Float64, "unixReviewTime": pl.Int64}
_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def load_amazon(path: str | Path) -> CanonicalTables:
    """Read an Amazon reviews folder (reviews file + ``meta_*`` file) into canonical tables."""
    reviews_file, meta_file = find_files(Path(path))
    inter, reviewed, users, rows = _read_reviews(reviews_file)
    items, missing_meta = _read_items(meta_file, reviewed)
    info = {
        "reviews": str(reviews_file),
        "metadata": str(meta_file),
        "rows": rows,
        "items_without_metadata": missing_meta,
    }
    return CanonicalTables("amazon", inter, items, users, info).drop_duplicates().validate()


def find_files(folder: Path) -> tuple[Path, Path]:
    """(reviews file, metadata file) inside ``folder``; see the module docstring for names."""
    if not folder.is_dir():
        raise DataError(f"amazon: {folder} is not a folder; give the folder holding the reviews and meta_* files")
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(_SUFFIXES))
    meta = [p for p in candidates if p.name.lower().startswith("meta")]
    reviews = [p for p in candidates if not p.name.lower().startswith("meta")]
    if len(reviews) != 1 or len(meta) != 1:
        raise DataError(
            f"amazon: {folder} must hold exactly one reviews file (e.g. reviews_Books_5.json.gz) and one "
            f"metadata file (meta_Books.json.gz); found reviews {[p.name for p in reviews]}, "
            f"metadata {[p.name for p in meta]}"
        )
    return reviews[0], meta[0]


def _read_bytes(file: Path) -> bytes:
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    try:
        with opener(file, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise DataError(f"amazon: cannot read {file}: {one_line(exc)}") from exc


_REVIEW_RULES = {"reviewerID": json_string, "asin": json_string, "overall": json_number, "unixReviewTime": json_integer}


def _read_reviews(file: Path) -> tuple[pl.LazyFrame, pl.Series, pl.DataFrame, int]:
    """(lazy interactions, reviewed asins in order, users table, rows) of a reviews file."""
    raw = pl.scan_ndjson(file, schema=REVIEW_COLUMNS, row_index_name=LINE, row_index_offset=1)
    stars = pl.col("overall")
    checks = [
        *[RowCheck(c, empty(c), "is missing or empty") for c in ("reviewerID", "asin")],
        RowCheck("overall", stars.is_null() | ~stars.is_finite().fill_null(False), "is missing or not a finite number"),
        RowCheck("overall", ((stars.round() < 1) | (stars.round() > 5)).fill_null(False), "must be 1..5 stars"),
        *time_checks("unixReviewTime", pl.col("unixReviewTime")),
    ]
    try:
        rows, found = first_failure(raw, checks)
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(file, exc) from None
    if found is not None:
        record, check, value = found  # polars numbers non-blank lines: find the file's line
        raise refusal(
            "amazon", file, json_record_line(file, record), check.column, check.problem, "" if value is None else value
        )
    if rows == 0:
        raise DataError(f"amazon: {file} holds no reviews")
    reviewed = raw.select(pl.col("asin").unique(maintain_order=True)).collect()["asin"]
    users = raw.select(pl.col("reviewerID").unique(maintain_order=True).alias("user")).collect()
    inter = raw.select(
        pl.col("reviewerID").alias("user"),
        pl.col("asin").alias("item"),
        pl.col("unixReviewTime").alias("ts"),
        stars.round().cast(pl.Int64).alias("signal"),
    )
    return inter, reviewed, users, rows


def _unreadable(file: Path, exc: Exception) -> DataError:
    """The line polars could not read (found by a slower exact scan), or polars' reason, short."""
    found = locate_json_problem(file, _REVIEW_RULES)
    if found is None:
        return DataError(f"amazon: {file} is not JSON lines with {list(REVIEW_COLUMNS)}: {one_line(exc)}")
    line, column, problem, text = found
    return refusal("amazon", file, line, column, problem, text)


def _parse_meta_line(line: str, file: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        try:  # the 2014 metadata is written as Python literals
            row = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise refusal("amazon", file, number, None, "is neither JSON nor a Python dict literal", line) from None
    if not isinstance(row, dict):
        raise refusal("amazon", file, number, None, "is not an object", line)
    return row


def _category_path(row: dict) -> list[str]:
    cats = row.get("categories")
    if isinstance(cats, list) and cats:
        first = cats[0]
        path = first if isinstance(first, list) else cats
    else:
        path = row.get("category") or []
    if not isinstance(path, list):
        path = [path]
    out: list[str] = []
    for name in path:
        name = str(name).strip()
        if name and name not in out:
            out.append(name)
    return out


def _read_items(file: Path, reviewed: pl.Series) -> tuple[pl.DataFrame, int]:
    wanted = set(reviewed.to_list())
    rows: dict[str, tuple[str, str, list[str]]] = {}
    for number, raw in enumerate(_read_bytes(file).decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        row = _parse_meta_line(raw, file, number)
        asin = row.get("asin")
        if asin is None or str(asin).strip() == "":
            raise DataError(f"amazon: {file}: column 'asin' is missing or null at line {number}")
        asin = str(asin).strip()
        if asin not in wanted or asin in rows:
            continue
        path = _category_path(row)
        title = str(row.get("title") or "").strip()
        brand = str(row.get("brand") or "").strip()
        text = " | ".join(part for part in (title, brand, " > ".join(path)) if part) or f"item {asin}"
        category = path[1] if len(path) > 1 else (path[0] if path else "")
        rows[asin] = (text, category, path)
    keys = reviewed.to_list()
    missing = sum(1 for k in keys if k not in rows)
    fallback = ("", "", [])
    items = pl.DataFrame(
        {
            "item": keys,
            "text": [rows.get(k, fallback)[0] or f"item {k}" for k in keys],
            "category": [rows.get(k, fallback)[1] for k in keys],
            "tags": [rows.get(k, fallback)[2] for k in keys],
        },
        schema={"item": pl.String, "text": pl.String, "category": pl.String, "tags": pl.List(pl.String)},
    )
    return items, missing
