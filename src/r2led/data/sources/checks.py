"""Row checks shared by the readers of raw files.

Every refusal is one line that names the file, the line and the column, and quotes at most
``EXCERPT`` characters of the input (a bad quote in a CSV once produced a 24 MB message).

A reader describes its checks as ``RowCheck``s: polars expressions that are true on a bad row.
``first_failure`` runs them in one pass over a (lazy) frame carrying a ``line`` column and
reports the first bad row, so readers stay lazy and fast on clean input; the slow, exact
Python scans below (``locate_csv_problem``, ``locate_json_problem``) run only when polars
itself cannot parse a file, to say where.

Timestamps must lie between 1990-01-01 and the end of next year (UTC): anything else is a
unit mistake (milliseconds as seconds), a sentinel or corruption. The synthetic source, which
makes its own clock, is not checked.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from r2led.errors import DataError, one_line

EXCERPT = 100  # characters of input quoted in a message, at most
TS_MIN = 631_152_000  # 1990-01-01T00:00:00Z
LINE = "line"  # the column that carries each row's 1-based line number in the file


def ts_max(now: datetime | None = None) -> int:
    """The last second of next year (UTC): the latest timestamp a reader accepts."""
    year = (now or datetime.now(UTC)).year
    return int(datetime(year + 2, 1, 1, tzinfo=UTC).timestamp()) - 1


def excerpt(value: object, limit: int = EXCERPT) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters (with the full length said)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def refusal(
    source: str, file: Path | str, line: int | None, column: str | None, problem: str, value: object = ...
) -> DataError:
    """``DataError('<source>: <file>: line <n>, column '<c>': <problem> (found '<value>')')``."""
    where = ", ".join(
        p for p in (f"line {line}" if line is not None else "", f"column '{column}'" if column else "") if p
    )
    found = "" if value is ... else f" (found {excerpt(value)})"
    return DataError(f"{source}: {file}: {where + ': ' if where else ''}{problem}{found}")


@dataclass(frozen=True)
class RowCheck:
    """One rule about one column: ``bad`` is true (never null) on a row that breaks it."""

    column: str  # the column named in the message (the file's own name for it)
    bad: pl.Expr
    problem: str  # e.g. "must be one of ['buy', 'cart', 'fav', 'pv']"
    value: pl.Expr | None = None  # what to quote; default the column itself


def empty(col: str) -> pl.Expr:
    """True where a string cell is missing or blank."""
    return pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")


def not_in(col: str, values: list) -> pl.Expr:
    """True where a cell is missing or not one of ``values``."""
    return ~pl.col(col).is_in(values).fill_null(False)


def time_checks(column: str, seconds: pl.Expr, raw: pl.Expr | None = None, unit: str = "seconds") -> list[RowCheck]:
    """A timestamp that is not a number, then one outside [1990-01-01, end of next year].

    ``seconds`` is the column converted to integer seconds (null where it is not a number);
    ``raw`` what to quote (default the column); ``unit`` the column's own unit, for the message.
    """
    high = ts_max()
    return [
        RowCheck(column, seconds.is_null(), f"must be an integer timestamp in {unit}", raw),
        RowCheck(
            column,
            ((seconds < TS_MIN) | (seconds > high)).fill_null(False),
            f"is out of range (before 1990-01-01 or after "
            f"{datetime.fromtimestamp(high, UTC):%Y-%m-%d}; {unit} since 1970 expected)",
            raw,
        ),
    ]


def first_failure(
    frame: pl.LazyFrame | pl.DataFrame, checks: list[RowCheck]
) -> tuple[int, tuple[int, RowCheck, object] | None]:
    """(rows, failure) of ``frame``: its row count, and (line, check, value) of the first row
    that breaks a check, in file order (None if every row is clean).

    ``frame`` must carry the ``line`` column. The checks and the count take one pass; on the
    first bad row the first broken check (in list order) is the one reported.
    """
    frame = frame.lazy()
    any_bad = pl.any_horizontal([c.bad for c in checks]) if checks else pl.lit(False)
    rows, line = frame.select(pl.len().alias("rows"), pl.col(LINE).filter(any_bad).min().alias("bad")).collect().row(0)
    if line is None:
        return int(rows), None
    flags = [c.bad.alias(f"_bad{i}") for i, c in enumerate(checks)]
    values = [
        (c.value if c.value is not None else pl.col(c.column)).cast(pl.String).alias(f"_val{i}")
        for i, c in enumerate(checks)
    ]
    row = frame.filter(pl.col(LINE) == line).head(1).select(*flags, *values).collect().row(0, named=True)
    i = next(i for i in range(len(checks)) if row[f"_bad{i}"])
    return int(rows), (int(line), checks[i], row[f"_val{i}"])


def raise_first_failure(source: str, file: Path, frame: pl.LazyFrame | pl.DataFrame, checks: list[RowCheck]) -> int:
    """Raise the ``refusal`` for the first bad row of ``frame`` (see ``first_failure``);
    return its row count when every row is clean."""
    rows, found = first_failure(frame, checks)
    if found is not None:
        line, check, value = found
        raise refusal(source, file, line, check.column, check.problem, "" if value is None else value)
    return rows


# ---- exact locators for the error path -------------------------------------------------------
def _open_text(file: Path) -> io.TextIOBase:
    # the caller closes it (`with _open_text(file) as fh`): the handle outlives this function
    raw = gzip.open(file, "rb") if file.name.lower().endswith(".gz") else open(file, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    with _open_text(file) as fh:
        for number, line in enumerate(fh, start=1):
            yield number, line.rstrip("\r\n")


def locate_csv_problem(
    file: Path, columns: list[str], header: bool, quoting: bool = True
) -> tuple[int, str, str] | None:
    """(line, problem, text) of the first line Python's csv module cannot read as ``columns``.

    Used only after polars failed, to say where. A line with a bad quote, or with another
    number of fields than ``columns``, is a problem; blank lines are not.
    """
    with _open_text(file) as fh:
        reader = csv.reader(fh, strict=True, quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
        line = 1
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return None
            except csv.Error as exc:
                return start, f"cannot be parsed as CSV ({one_line(exc, 80)})", _line_text(file, start)
            line = start
            if header and line == 1 or not fields:
                continue
            if len(fields) != len(columns):
                return (
                    line,
                    f"has {len(fields)} fields; expected {len(columns)} ({','.join(columns)})",
                    ",".join(fields),
                )


def _line_text(file: Path, wanted: int) -> str:
    for number, line in _lines(file):
        if number == wanted:
            return line
    return ""


def json_record_line(file: Path, record: int) -> int:
    """File line of the ``record``-th (1-based) non-blank line: polars skips blank lines."""
    seen = 0
    for number, line in _lines(file):
        if line.strip():
            seen += 1
            if seen == record:
                return number
    return record


def locate_json_problem(
    file: Path, schema: dict[str, Callable[[object], str | None]], parse: Callable[[str], object] = json.loads
) -> tuple[int, str | None, str, str] | None:
    """(line, column, problem, text) of the first JSON line that is broken or breaks ``schema``.

    ``schema`` maps a field to a function returning a problem (or None) for its value. Used only
    after polars failed to read the file, to say where.
    """
    for number, line in _lines(file):
        if not line.strip():
            continue
        try:
            row = parse(line)
        except (ValueError, SyntaxError) as exc:
            return number, None, f"is not valid JSON ({one_line(exc, 80)})", line
        if not isinstance(row, dict):
            return number, None, "is not a JSON object", line
        for col, rule in schema.items():
            problem = rule(row.get(col))
            if problem:
                return number, col, problem, repr(row.get(col))
    return None


def json_number(value: object) -> str | None:
    """Problem with a JSON number field (None if fine; a missing field is checked later)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    if not math.isfinite(value) or abs(value) > 2**63:
        return "must be a finite number in range"
    return None


def json_integer(value: object) -> str | None:
    """Problem with a JSON integer-seconds field (None if fine or missing)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
        return "must be an integer timestamp"
    return None


def json_string(value: object) -> str | None:
    """Problem with a JSON id field: a string or an integer (None if fine or missing)."""
    if value is None or isinstance(value, (str, int)) and not isinstance(value, bool):
        return None
    return "must be a string"
