"""KuaiRand (Gao et al., CIKM 2022): Kuaishou short-video logs, as published (1K, 27K, Pure).

Give the dataset's ``data`` folder, or one log file. Files read (CSV with a header):

- logs: ``log_standard_*.csv`` (e.g. ``log_standard_4_08_to_4_21_1k.csv`` and
  ``log_standard_4_22_to_5_08_1k.csv``), concatenated; the randomly exposed
  ``log_random_*.csv`` is left out (it follows another policy) unless ``logs`` says otherwise.
  Columns used: ``user_id, video_id, time_ms, is_click`` and, when present, ``is_like``
  (the others, ``date, hourmin, play_time_ms, ...``, are ignored).
- optional ``video_features_basic*.csv``: ``video_id, video_type, tag`` (and ``upload_type``
  when present); ``tag`` is a comma-separated list of tag ids.
- optional ``user_features*.csv``: ``user_id`` and categorical columns
  (``user_active_degree, is_live_streamer, ..., onehot_feat0..17``); the raw counts that have a
  ``*_range`` bucket next to them (``follow_user_num``, ``fans_user_num``, ``friend_user_num``,
  ``register_days``) are dropped in favour of the buckets.

Signal = ``1 + is_click + is_like`` (1 impression only, 2 click, 3 click and like), timestamps
are ``time_ms // 1000``. The default protocol (threshold 3) would label nothing positive: use
``Protocol(label_threshold=1)`` (click) or ``label_threshold=2`` (like). An item's text is
``"video {id} | type {video_type} | upload {upload_type} | tags {tag ...}"``, its category the
first tag and its tags the tag list (empty when the video has no features row).

Logs are read lazily (``pl.scan_csv``): ``interactions`` is a ``pl.LazyFrame``, each log
checked in one pass, with repeated ``(user_id, video_id, time_ms // 1000)`` rows dropped. An
empty id, a ``time_ms`` that is not a time between 1990 and the end of next year, an
``is_click``/``is_like`` other than 0 or 1, and a line that cannot be parsed are refused with
the file, the line and the column (quoting at most 100 characters of it).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from r2led.data.sources.checks import (
    LINE,
    RowCheck,
    empty,
    locate_csv_problem,
    raise_first_failure,
    refusal,
    time_checks,
)
from r2led.data.tables import CanonicalTables
from r2led.errors import DataError, one_line

LOG_REQUIRED = ("user_id", "video_id", "time_ms", "is_click")
VIDEO_REQUIRED = ("video_id", "video_type", "tag")
USER_COUNTS = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")


def load_kuairand(path: str | Path, logs: str = "log_standard*.csv") -> CanonicalTables:
    """Read a KuaiRand ``data`` folder (or one log file) into canonical tables."""
    path = Path(path)
    if path.is_dir():
        folder, log_files = path, sorted(path.glob(logs))
        if not log_files:
            raise DataError(
                f"kuairand: no log file matching {logs!r} in {path} (e.g. log_standard_4_08_to_4_21_1k.csv)"
            )
    elif path.is_file():
        folder, log_files = path.parent, [path]
    else:
        raise DataError(f"kuairand: file not found: {path}")

    logs = [_read_log(f) for f in log_files]
    inter = pl.concat([frame for frame, _ in logs])
    video_file = _optional(folder, "video_features_basic*.csv")
    user_file = _optional(folder, "user_features*.csv")
    keys = inter.select(pl.col("item"), pl.col("user"))
    videos = keys.select(pl.col("item").unique(maintain_order=True)).collect()
    items = _items(videos, video_file)
    users = _users(keys.select(pl.col("user").unique(maintain_order=True)).collect(), user_file)
    info = {
        "logs": [str(f) for f in log_files],
        "video_features": str(video_file) if video_file else None,
        "user_features": str(user_file) if user_file else None,
        "rows": sum(rows for _, rows in logs),
        "signal": "1 + is_click + is_like",
    }
    return CanonicalTables("kuairand", inter, items, users, info).drop_duplicates().validate()


def _optional(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def _header(file: Path) -> list[str]:
    try:
        return pl.read_csv(file, n_rows=0, infer_schema=False).columns
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"kuairand: cannot read {file} as CSV: {one_line(exc)}") from None


def _read_csv(file: Path, required: tuple[str, ...]) -> pl.DataFrame:
    """Read a features file as strings; every ``required`` column must exist and be filled."""
    header = _header(file)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"kuairand: {file} lacks column(s) {missing}; it has {header}")
    try:
        df = pl.read_csv(file, infer_schema=False, row_index_name=LINE, row_index_offset=2)
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(file, header, exc) from None
    raise_first_failure("kuairand", file, df, [RowCheck(c, _blank(c), "is empty or NaN") for c in required])
    return df.drop(LINE)


def _blank(col: str) -> pl.Expr:
    return empty(col) | (pl.col(col).str.strip_chars().str.to_lowercase() == "nan").fill_null(False)


def _flag(col: str) -> tuple[pl.Expr, RowCheck]:
    """A 0/1 column as Int64, and the check that it is 0 or 1."""
    value = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    return value.cast(pl.Int64, strict=False), RowCheck(
        col, ~value.is_in([0.0, 1.0]).fill_null(False), "must be 0 or 1"
    )


def _read_log(file: Path) -> tuple[pl.LazyFrame, int]:
    """One log file as lazy canonical interactions and its row count, checked in one pass
    (line 1 is the header)."""
    header = _header(file)
    missing = [c for c in LOG_REQUIRED if c not in header]
    if missing:
        raise DataError(f"kuairand: {file} lacks column(s) {missing}; it has {header}")
    wanted = [c for c in header if c in LOG_REQUIRED + ("is_like",)]
    raw = (
        pl.scan_csv(file, infer_schema=False, row_index_name=LINE, row_index_offset=2)
        .select(LINE, *wanted)
        .filter(~pl.all_horizontal([pl.col(c).is_null() for c in wanted]))  # blank lines
    )
    ms = pl.col("time_ms").str.strip_chars().cast(pl.Float64, strict=False)
    seconds = pl.when(ms.is_finite() & (ms.abs() < 2.0**62)).then(ms).cast(pl.Int64) // 1000
    click, click_ok = _flag("is_click")
    checks = [
        RowCheck("user_id", _blank("user_id"), "is empty or NaN"),
        RowCheck("video_id", _blank("video_id"), "is empty or NaN"),
        RowCheck("time_ms", ms.is_null(), "must be a number of milliseconds", pl.col("time_ms")),
        *time_checks("time_ms", seconds, pl.col("time_ms"), unit="milliseconds"),
        click_ok,
    ]
    signal = 1 + click
    if "is_like" in wanted:
        like, like_ok = _flag("is_like")
        checks.append(like_ok)
        signal = signal + like
    try:
        rows = raise_first_failure("kuairand", file, raw, checks)
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(file, header, exc) from None
    frame = raw.select(
        pl.col("user_id").str.strip_chars().alias("user"),
        pl.col("video_id").str.strip_chars().alias("item"),
        seconds.alias("ts"),
        signal.alias("signal"),
    )
    return frame, rows


def _unreadable(file: Path, header: list[str], exc: Exception) -> DataError:
    """The line polars could not read (found by a slower exact scan), or polars' reason, short."""
    found = locate_csv_problem(file, header, header=True)
    if found is None:
        return DataError(f"kuairand: cannot read {file} as CSV: {one_line(exc)}")
    line, problem, text = found
    return refusal("kuairand", file, line, None, problem, text)


def _items(videos: pl.DataFrame, file: Path | None) -> pl.DataFrame:
    if file is None:
        feats = pl.DataFrame(
            schema={"item": pl.String, "video_type": pl.String, "upload_type": pl.String, "tag": pl.String}
        )
    else:
        raw = _read_csv(file, ("video_id",))
        missing = [c for c in VIDEO_REQUIRED if c not in raw.columns]
        if missing:
            raise DataError(f"kuairand: {file} lacks column(s) {missing}; it has {raw.columns}")
        feats = raw.select(
            pl.col("video_id").str.strip_chars().alias("item"),
            pl.col("video_type"),
            (pl.col("upload_type") if "upload_type" in raw.columns else pl.lit(None, pl.String)).alias("upload_type"),
            pl.col("tag"),
        ).unique(subset="item", keep="first", maintain_order=True)
    clean = pl.element().str.strip_chars()
    tags = (
        pl.col("tag")
        .fill_null("")
        .str.split(",")
        .list.eval(clean.filter((clean != "") & (clean.str.to_lowercase() != "nan")))
    )

    def part(label: str, col: str) -> pl.Expr:
        value = pl.col(col).str.strip_chars()
        return pl.when(value.is_not_null() & (value != "") & (value.str.to_lowercase() != "nan")).then(
            pl.lit(label) + value
        )

    df = videos.join(feats, on="item", how="left", maintain_order="left").with_columns(tags.alias("tags"))
    text = pl.concat_str(
        [
            pl.lit("video ") + pl.col("item"),
            part("type ", "video_type"),
            part("upload ", "upload_type"),
            pl.when(pl.col("tags").list.len() > 0).then(pl.lit("tags ") + pl.col("tags").list.join(" ")),
        ],
        separator=" | ",
        ignore_nulls=True,
    )
    return df.select(
        "item",
        text.alias("text"),
        pl.col("tags").list.first().fill_null("").alias("category"),
        pl.col("tags"),
    )


def _users(users: pl.DataFrame, file: Path | None) -> pl.DataFrame:
    if file is None:
        return users
    raw = _read_csv(file, ("user_id",))
    keep = [c for c in raw.columns if c != "user_id" and c not in USER_COUNTS]
    feats = raw.select(
        pl.col("user_id").str.strip_chars().alias("user"),
        *[pl.col(c).str.strip_chars() for c in keep],
    ).unique(subset="user", keep="first", maintain_order=True)
    return users.join(feats, on="user", how="left", maintain_order="left")
