"""Readers for RecBole "atomic" TSV files (``name:type`` headers)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from r2led.errors import DataError, one_line


def read_atomic(path: Path, required: list[str]) -> pl.DataFrame:
    """Read a RecBole atomic file as strings, strip the ``:type`` header suffixes and whitespace."""
    if not Path(path).is_file():
        raise DataError(f"file not found: {path}")
    try:
        df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False, truncate_ragged_lines=True)
    except pl.exceptions.PolarsError as exc:  # e.g. bytes that are not UTF-8
        raise DataError(f"cannot read {path} as a tab-separated atomic file: {one_line(exc)}") from None
    df = df.rename({c: c.split(":")[0].strip() for c in df.columns})
    df = df.with_columns(pl.all().str.strip_chars())
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {df.columns}")
    return df
