"""Sources: the synthetic generator's properties and the readers for user-supplied formats."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
import shutil
import time
from datetime import UTC
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from r2led.cli import app
from r2led.data.protocol import Protocol
from r2led.data.sources import load_source
from r2led.data.sources import synthetic as synthetic_module
from r2led.data.sources.amazon import load_amazon
from r2led.data.sources.kuairand import load_kuairand
from r2led.data.sources.movielens import load_ml1m, load_ml100k
from r2led.data.sources.synthetic import load_synthetic
from r2led.data.sources.taobao import load_taobao
from r2led.data.store import build_store
from r2led.data.tables import INTERACTION_SCHEMA, CanonicalTables
from r2led.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"


# ---- synthetic ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth():
    """300 users x ~200 behaviours, with each behaviour's leaf and category attached."""
    t = load_synthetic(users=300, length=200, items=2000, seed=0)
    leaf = t.items.select("item", pl.col("tags").list.get(2).alias("leaf"), "category")
    return t, t.interactions.join(leaf, on="item", how="left")


def test_same_seed_gives_identical_tables_and_another_seed_differs():
    a = load_synthetic(users=40, length=50, items=200, seed=3)
    b = load_synthetic(users=40, length=50, items=200, seed=3)
    c = load_synthetic(users=40, length=50, items=200, seed=4)
    for name in ("interactions", "items", "users"):
        assert getattr(a, name).equals(getattr(b, name))
    assert not a.interactions.equals(c.interactions)
    assert not a.items.equals(c.items)


def test_tables_have_the_canonical_shape(synth):
    t, _ = synth
    assert t.name == "synthetic"
    assert t.interactions.schema == {"user": pl.String, "item": pl.String, "ts": pl.Int64, "signal": pl.Int64}
    assert t.items.height == 2000 and t.users.height == 300
    assert t.user_feature_names == ["segment", "region", "activity"]
    assert set(t.interactions["signal"].unique().to_list()) == {1, 2, 3, 4, 5}
    lens = t.interactions.group_by("user").len()["len"]
    assert lens.min() >= 100 and lens.max() <= 300  # uniform in [0.5, 1.5] x length


def test_item_text_follows_the_topic_path(synth):
    t, _ = synth
    row = t.items.row(0, named=True)
    top, sub, leaf = row["tags"]
    assert row["category"] == top
    assert sub.startswith(top + "-") and leaf.startswith(sub + "-")
    assert row["text"].startswith(f"topic {top} / sub {sub} / leaf {leaf} | item {row['item']} | ")
    assert t.items["category"].n_unique() == 4 and t.items["tags"].list.get(2).n_unique() == 64


def test_item_words_are_shared_inside_a_leaf(synth):
    t, _ = synth
    words = t.items.select(
        pl.col("tags").list.get(2).alias("leaf"),
        "category",
        pl.col("text").str.split(" | ").list.get(2).str.split(" ").alias("words"),  # the topic words
    )

    def jaccard(a, b) -> float:
        return len(set(a) & set(b)) / len(set(a) | set(b))

    leaf = words.filter(pl.col("leaf") == words["leaf"][0])["words"].to_list()
    within = np.mean([jaccard(a, b) for i, a in enumerate(leaf) for b in leaf[i + 1 :]])
    other = words.filter(pl.col("category") != words["category"][0])["words"].to_list()[:50]
    across = max(jaccard(a, b) for a in leaf for b in other)
    assert within > 0.2  # same top, sub and leaf vocabularies
    assert across == 0.0  # another top topic shares no word


def test_item_popularity_is_zipf_skewed(synth):
    _, inter = synth
    counts = np.sort(inter["item"].value_counts()["count"].to_numpy())[::-1]
    top_share = counts[:200].sum() / len(inter)  # the top 10 % of the 2,000 items
    assert top_share > 0.5  # measured 0.585 with seed 0


def test_positive_rate_depends_on_fit_to_the_users_interests(synth):
    _, inter = synth
    # A user's interests as their history shows them: their three most frequent leaves.
    favourite = (
        inter.group_by("user", "leaf")
        .len()
        .sort(["user", "len", "leaf"], descending=[False, True, False])
        .group_by("user", maintain_order=True)
        .head(3)
        .select("user", "leaf", pl.lit(True).alias("fits"))
    )
    rates = (
        inter.join(favourite, on=["user", "leaf"], how="left")
        .group_by(pl.col("fits").fill_null(False))
        .agg((pl.col("signal") > 3).mean().alias("rate"))
    )
    rate = dict(zip(rates["fits"].to_list(), rates["rate"].to_list(), strict=False))
    assert rate[True] > rate[False] + 0.25  # measured 0.65 vs 0.31 with seed 0
    assert 0.45 < (inter["signal"] > 3).mean() < 0.7


def test_user_segment_reflects_the_main_interest(synth):
    t, inter = synth
    main = (
        inter.group_by("user", "category")
        .len()
        .sort(["user", "len"], descending=[False, True])
        .group_by("user", maintain_order=True)
        .first()
    )
    agree = t.users.join(main, on="user").select((pl.col("segment") == "seg-" + pl.col("category")).mean()).item()
    assert agree > 0.6  # measured 0.78 with seed 0 (chance is 0.25)


def test_users_interleave_over_one_period_so_the_time_split_works(tmp_path):
    t = load_synthetic(users=200, length=40, items=300, seed=1)
    store = build_store(t, tmp_path / "s", Protocol())
    m = store.manifest
    assert m["split_users"]["test"] > 40  # the last 10 % of time holds many users, not a few
    assert m["split_users"]["train"] > 150
    assert abs(m["positive_rate"]["train"] - m["positive_rate"]["test"]) < 0.1


def test_long_sequences_generate_quickly():
    t0 = time.perf_counter()
    t = load_synthetic(users=3, length=20_000, items=2000, seed=0)
    elapsed = time.perf_counter() - t0
    lens = t.interactions.group_by("user").len()["len"]
    assert lens.len() == 3 and lens.min() >= 10_000 and lens.max() <= 30_000
    assert elapsed < 5.0  # about 0.05 s on 2 cores


def test_bad_synthetic_settings_are_refused():
    with pytest.raises(ConfigError, match="items=10 is fewer than the 64 leaves"):
        load_synthetic(users=5, length=10, items=10)
    with pytest.raises(ConfigError, match="drift must be in"):
        load_synthetic(users=5, length=10, drift=1.5)


# ---- Taobao UserBehavior ----------------------------------------------------------------------


def test_taobao_reads_the_headerless_csv_and_builds_a_store(tmp_path):
    t = load_taobao(FIXTURES / "taobao")  # the folder; the file itself works too
    assert t.lazy and isinstance(t.interactions, pl.LazyFrame)  # read when the store streams it
    store = build_store(t, tmp_path / "tb", Protocol(label_threshold=1))  # the lazy frame, as returned
    m = store.manifest
    assert (m["users"], m["items"], m["interactions"], m["duplicates_dropped"]) == (3, 9, 20, 0)
    assert m["samples"] == {"train": 4, "valid": 0, "test": 1}  # users 1 and 100 have 8 and 7 rows
    assert m["positive_rate"] == {"train": 0.5, "valid": 0.0, "test": 1.0}  # cart/fav/buy
    t.collect()
    assert not t.lazy and t.interactions.schema == dict(INTERACTION_SCHEMA)
    assert (t.interactions.height, t.items.height, t.users.height) == (20, 9, 3)
    assert t.interactions["signal"].value_counts().sort("signal")["count"].to_list() == [14, 2, 2, 2]
    item = t.items.filter(pl.col("item") == "2268318").row(0, named=True)
    assert item == {"item": "2268318", "text": "category 2520377", "category": "2520377", "tags": ["2520377"]}
    buy_only = build_store(t, tmp_path / "buy", Protocol())
    assert buy_only.samples["label"].sum() == 2


def _taobao_with(tmp_path, rows: list[str]) -> Path:
    file = tmp_path / "UserBehavior.csv"
    file.write_text("\n".join(rows) + "\n")
    return file


TAOBAO_ROWS = (FIXTURES / "taobao" / "UserBehavior.csv").read_text().splitlines()


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("1,2268318,2520377,click,1511544070", r"line 4, column 'behavior': must be one of \[.*\] \(found 'click'\)"),
        ("1,2268318,2520377,pv,", r"line 4, column 'timestamp': is empty"),
        ("1,2268318,2520377,pv", r"line 4, column 'timestamp': is empty"),
        (
            "1,2268318,2520377,pv,-5",
            r"line 4, column 'timestamp': is out of range \(before 1990-01-01 .*\(found '-5'\)",
        ),
        ("1,2268318,2520377,pv,1511544070000", r"line 4, column 'timestamp': is out of range"),  # milliseconds
        ("1,2268318,2520377,pv,4102444800", r"line 4, column 'timestamp': is out of range"),  # 2100-01-01
        ("1,2268318,2520377,pv,1511544070.5", r"line 4, column 'timestamp': must be an integer timestamp"),
        (
            "1,2268318,2520377,pv,1511544070,7",
            r"line 4: has 6 fields; expected 5 \(user,item,category,behavior,timestamp\)",
        ),
        ("1,2268318x,2520377,pv,1511544070", r"line 4, column 'item': must be an integer id \(found '2268318x'\)"),
    ],
)
def test_taobao_bad_rows_are_refused_by_file_line_and_column(tmp_path, line, pattern):
    file = _taobao_with(tmp_path, TAOBAO_ROWS[:3] + [line] + TAOBAO_ROWS[3:])
    with pytest.raises(DataError, match=r"^taobao: .*UserBehavior\.csv: " + pattern) as err:
        load_taobao(file)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_stray_quote_in_a_big_taobao_file_gives_a_short_message(tmp_path):
    # Before: the quote swallowed the rest of the file into one field, and polars' message
    # quoted all of it (24 MB for the full dataset).
    rows = TAOBAO_ROWS[:3] + ['1,"2268318,2520377,pv,1511544070'] + TAOBAO_ROWS * 5_000  # 100,004 lines
    with pytest.raises(DataError) as err:
        load_taobao(_taobao_with(tmp_path, rows))
    message = str(err.value)
    assert re.match(
        r"^taobao: .*UserBehavior\.csv: line 4, column 'item': must be an integer id \(found '\"2268318'\)$", message
    )
    assert len(message) < 400


def test_taobao_errors_name_the_file_and_column(tmp_path):
    with pytest.raises(DataError, match="has 4 columns; expected 5"):
        load_taobao(_taobao_with(tmp_path, ["1,2268318,2520377,pv"]))
    with pytest.raises(DataError, match="file not found"):
        load_taobao(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"line 1, column 'user': must be an integer id \(found 'user'\)"):
        load_taobao(_taobao_with(tmp_path, ["user,item,category,behavior,timestamp"] + TAOBAO_ROWS))
    a_huge_value = "pv" * 500_000
    with pytest.raises(DataError) as err:
        load_taobao(_taobao_with(tmp_path, TAOBAO_ROWS + [f"1,2268318,2520377,{a_huge_value},1511544070"]))
    assert "line 21, column 'behavior'" in str(err.value) and "(1,000,000 characters)" in str(err.value)
    assert len(str(err.value)) < 400


def _twins(store) -> int:
    """Samples whose last history row is the same behaviour (same item, same time) as the target."""
    a = store.sample_arrays
    target = store.offsets[a["user"]] + a["pos"]
    has = a["pos"] > 0
    prev = target[has] - 1
    same = (store.seq_items[prev] == store.seq_items[target[has]]) & (store.seq_ts[prev] == store.seq_ts[target[has]])
    return int(same.sum())


def test_doubled_taobao_rows_are_dropped_so_no_sample_sees_its_twin(tmp_path, caplog):
    doubled = _taobao_with(tmp_path, [row for row in TAOBAO_ROWS for _ in range(2)])  # every row twice
    with caplog.at_level(logging.WARNING, logger="r2led.data"):
        t = load_taobao(doubled)
    assert t.duplicates_dropped == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["taobao: dropped 20 duplicate interaction(s) (same user, item and timestamp) of 40 rows"]
    store = build_store(t, tmp_path / "doubled", Protocol(min_history=0))
    assert store.manifest["duplicates_dropped"] == 20 and store.manifest["interactions"] == 20
    assert sum(store.manifest["samples"].values()) == 20
    assert _twins(store) == 0
    # The same store as from the file with each row once.
    once = build_store(load_taobao(FIXTURES / "taobao"), tmp_path / "once", Protocol(min_history=0))
    for name in ("offsets", "seq_items", "seq_ts", "seq_signal"):
        assert np.array_equal(getattr(store, name), getattr(once, name))
    assert store.samples.equals(once.samples)
    # Without the deduplication the twins are there: the check above can fail.
    raw = load_taobao(doubled).collect()
    leaky = CanonicalTables("taobao", pl.concat([raw.interactions, raw.interactions]), raw.items, raw.users)
    assert _twins(build_store(leaky, tmp_path / "leaky", Protocol(min_history=0))) == 20


# ---- Amazon reviews ---------------------------------------------------------------------------


def test_amazon_reads_reviews_and_both_metadata_styles(tmp_path):
    t = load_amazon(FIXTURES / "amazon")
    assert t.lazy
    store = build_store(t, tmp_path / "az", Protocol())
    m = store.manifest
    assert (m["users"], m["items"], m["interactions"], m["duplicates_dropped"]) == (3, 8, 18, 0)
    assert sum(m["samples"].values()) == 5  # 7 and 8 reviews -> 2 + 3 samples
    # global order: the 2013 reviewer's 4, 3, 5 stars, then the 2014 reviewer's 5, 1
    assert store.samples["label"].to_list() == [1, 0, 1, 1, 0]
    t.collect()
    assert (t.interactions.height, t.items.height, t.users.height) == (18, 8, 3)
    assert t.source_info["items_without_metadata"] == 1
    items = {r["item"]: r for r in t.items.iter_rows(named=True)}
    assert (
        items["048645195X"]["text"]
        == "Dover Fairy Tale Coloring Book | Dover | Toys & Games > Arts & Crafts > Coloring Books"
    )
    assert items["048645195X"]["category"] == "Arts & Crafts"
    assert items["B00000IZLS"]["tags"] == ["Toys & Games", "Preschool", "Pre-Kindergarten Toys"]  # 2018 "category"
    assert items["B00004WKPH"]["text"] == "item B00004WKPH" and items["B00004WKPH"]["tags"] == []
    assert "B000UNREVD" not in items  # never reviewed


def test_amazon_reads_gzipped_files(tmp_path):
    for f in (FIXTURES / "amazon").iterdir():
        with gzip.open(tmp_path / (f.name + ".gz"), "wb") as fh:
            fh.write(f.read_bytes())
    a, b = load_amazon(tmp_path).collect(), load_amazon(FIXTURES / "amazon").collect()
    assert a.interactions.equals(b.interactions) and a.items.equals(b.items)


AMAZON_REVIEWS = (FIXTURES / "amazon" / "reviews_Toys_and_Games_5.json").read_text().splitlines()


def _amazon_with(tmp_path, lines: list[str], gz: bool = False) -> Path:
    folder = tmp_path / "az"
    folder.mkdir(exist_ok=True)
    shutil.copy(FIXTURES / "amazon" / "meta_Toys_and_Games.json", folder)
    data = ("\n".join(lines) + "\n").encode()
    name = "reviews_Toys_and_Games_5.json"
    if gz:
        (folder / (name + ".gz")).write_bytes(gzip.compress(data))
    else:
        (folder / name).write_bytes(data)
    return folder


def _review(**fields) -> str:
    row = json.loads(AMAZON_REVIEWS[2])
    row.update(fields)
    return json.dumps(row)  # NaN and inf are written as NaN and Infinity


@pytest.mark.parametrize(
    "line, pattern",
    [
        (_review(overall=1e300), r"line 3, column 'overall': must be 1\.\.5 stars \(found '1e\+300'\)"),
        (_review(overall=float("nan")), r"line 3, column 'overall': must be a finite number"),
        (
            '{"reviewerID": "A", "asin": "B", "overall": 1e999, "unixReviewTime": 1390953600}',
            r"line 3, column 'overall': must be a finite number",
        ),
        (_review(overall=0.0), r"line 3, column 'overall': must be 1\.\.5 stars \(found '0\.0'\)"),
        (_review(overall="5"), r"line 3, column 'overall': must be a number"),
        (_review(overall=None), r"line 3, column 'overall': is missing or not a finite number"),
        (_review(unixReviewTime=-1), r"line 3, column 'unixReviewTime': is out of range"),
        (_review(unixReviewTime=1390953600000), r"line 3, column 'unixReviewTime': is out of range"),
        (_review(unixReviewTime=1.5e9), r"line 3, column 'unixReviewTime': must be an integer timestamp"),
        (_review(asin=""), r"line 3, column 'asin': is missing or empty"),
        ("[1, 2]", r"line 3: is not a JSON object"),
        (
            '{"reviewerID": "A", "asin": ' + '"x' * 100_000,
            r"line 3: is not valid JSON \(.*\) \(found .*\(200,028 characters\)\)",
        ),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_amazon_bad_reviews_are_refused_by_file_line_and_column(tmp_path, line, pattern, gz):
    folder = _amazon_with(tmp_path, AMAZON_REVIEWS[:2] + [line] + AMAZON_REVIEWS[3:], gz=gz)
    with pytest.raises(DataError, match=r"^amazon: .*reviews_Toys_and_Games_5\.json(\.gz)?: " + pattern) as err:
        load_amazon(folder)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_amazon_line_numbers_count_blank_lines(tmp_path):
    # polars skips blank lines when it numbers records; the message names the file's own line
    lines = AMAZON_REVIEWS[:1] + ["", "  "] + AMAZON_REVIEWS[1:4] + [_review(overall=9.0)] + AMAZON_REVIEWS[4:]
    with pytest.raises(DataError, match=r"json: line 7, column 'overall': must be 1\.\.5 stars \(found '9\.0'\)"):
        load_amazon(_amazon_with(tmp_path, lines))


def test_amazon_errors_name_the_file_and_column(tmp_path):
    shutil.copy(FIXTURES / "amazon" / "reviews_Toys_and_Games_5.json", tmp_path)
    with pytest.raises(DataError, match=r"exactly one reviews file .* metadata \[\]"):
        load_amazon(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_amazon(tmp_path / "reviews_Toys_and_Games_5.json")
    meta = (FIXTURES / "amazon" / "meta_Toys_and_Games.json").read_text().splitlines()
    (tmp_path / "meta_Toys_and_Games.json").write_text(
        "\n".join(meta[:1] + ["{'asin': " + "[" * 50_000] + meta[1:]) + "\n"
    )
    with pytest.raises(
        DataError, match=r"meta_Toys_and_Games\.json: line 2: is neither JSON nor a Python dict literal"
    ) as err:
        load_amazon(tmp_path)
    assert len(str(err.value)) < 400


def test_doubled_amazon_reviews_are_dropped(tmp_path):
    t = load_amazon(_amazon_with(tmp_path, AMAZON_REVIEWS + AMAZON_REVIEWS))
    assert t.duplicates_dropped == 18
    assert t.collect().interactions.equals(load_amazon(FIXTURES / "amazon").collect().interactions)


# ---- KuaiRand ---------------------------------------------------------------------------------


def test_kuairand_reads_standard_logs_with_features(tmp_path):
    t = load_kuairand(FIXTURES / "kuairand")
    assert t.lazy
    store = build_store(t, tmp_path / "kr", Protocol(label_threshold=1))
    m = store.manifest
    assert (m["users"], m["items"], m["interactions"], m["duplicates_dropped"]) == (3, 5, 18, 0)
    assert sum(m["samples"].values()) == 3  # 7, 6 and 5 rows -> 2 + 1 + 0
    assert sorted(store.samples["label"].to_list()) == [0, 1, 1]  # clicks
    t.collect()
    assert (t.interactions.height, t.items.height, t.users.height) == (18, 5, 3)  # log_random left out
    assert len(t.source_info["logs"]) == 2
    assert t.interactions["signal"].value_counts().sort("signal")["count"].to_list() == [7, 7, 4]
    assert t.interactions["ts"].min() == 1649383200  # time_ms // 1000
    items = {r["item"]: r for r in t.items.iter_rows(named=True)}
    assert items["2377"]["text"] == "video 2377 | type NORMAL | upload LongImport | tags 11 28"
    assert items["2377"]["tags"] == ["11", "28"] and items["2377"]["category"] == "11"
    assert items["5555"]["tags"] == [] and items["5555"]["category"] == ""
    assert "follow_user_num" not in t.users.columns and "follow_user_num_range" in t.users.columns
    assert len(t.user_feature_names) == 11


def test_kuairand_log_pattern_and_single_file(tmp_path):
    every = load_kuairand(FIXTURES / "kuairand", logs="log_*.csv").collect()
    assert (every.interactions.height, every.items.height) == (21, 6)
    one = load_kuairand(FIXTURES / "kuairand" / "log_standard_4_22_to_5_08_1k.csv").collect()
    assert (one.interactions.height, one.items.height, one.users.height) == (8, 5, 3)
    assert one.items.filter(pl.col("item") == "9912")["tags"].to_list() == [["8", "5", "12"]]


KUAIRAND_LOG = (FIXTURES / "kuairand" / "log_standard_4_08_to_4_21_1k.csv").read_text().splitlines()


@pytest.mark.parametrize(
    "line, pattern",
    [
        (
            KUAIRAND_LOG[3].replace(",1,1,0,0,0,0,1,", ",NaN,1,0,0,0,0,1,"),
            r"line 4, column 'is_click': must be 0 or 1 \(found 'NaN'\)",
        ),
        (
            KUAIRAND_LOG[3].replace(",1,1,0,0,0,0,1,", ",2,1,0,0,0,0,1,"),
            r"line 4, column 'is_click': must be 0 or 1 \(found '2'\)",
        ),
        (
            "0,4381,20220408,1000,-1649383200123,1,0,0,0,0,0,0,8933,15000,0,0,0,0,1",
            r"line 4, column 'time_ms': is out of range .*milliseconds since 1970",
        ),
        (
            "0,4381,20220408,1000,1649383200,1,0,0,0,0,0,0,8933,15000,0,0,0,0,1",
            r"line 4, column 'time_ms': is out of range",
        ),  # seconds
        (
            "0,4381,20220408,1000,soon,1,0,0,0,0,0,0,8933,15000,0,0,0,0,1",
            r"line 4, column 'time_ms': must be a number of milliseconds",
        ),
        (
            ",4381,20220408,1000,1649383200123,1,0,0,0,0,0,0,8933,15000,0,0,0,0,1",
            r"line 4, column 'user_id': is empty or NaN",
        ),
    ],
)
def test_kuairand_bad_rows_are_refused_by_file_line_and_column(tmp_path, line, pattern):
    (tmp_path / "log_standard_x.csv").write_text("\n".join(KUAIRAND_LOG[:3] + [line] + KUAIRAND_LOG[4:]) + "\n")
    with pytest.raises(DataError, match=r"^kuairand: .*log_standard_x\.csv: " + pattern) as err:
        load_kuairand(tmp_path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_kuairand_errors_name_the_file_and_column(tmp_path):
    bad = tmp_path / "log_standard_x.csv"
    bad.write_text("\n".join([KUAIRAND_LOG[0].replace("time_ms", "time")] + KUAIRAND_LOG[1:]) + "\n")
    with pytest.raises(DataError, match=r"log_standard_x\.csv lacks column\(s\) \['time_ms'\]"):
        load_kuairand(tmp_path)
    quote = '0,"4381,20220408,1000,1649383200123,1,0,0,0,0,0,0,8933,15000,0,0,0,0,1'
    bad.write_text("\n".join(KUAIRAND_LOG[:3] + [quote] + KUAIRAND_LOG[1:] * 3_000) + "\n")
    with pytest.raises(DataError, match=r"log_standard_x\.csv: line 4: cannot be parsed as CSV") as err:
        load_kuairand(tmp_path)
    assert len(str(err.value)) < 400
    with pytest.raises(DataError, match="no log file matching"):
        load_kuairand(FIXTURES / "taobao")


def test_repeated_kuairand_log_rows_are_dropped(tmp_path):
    for f in (FIXTURES / "kuairand").iterdir():
        shutil.copy(f, tmp_path)
    log = tmp_path / "log_standard_4_08_to_4_21_1k.csv"
    log.write_text("\n".join(KUAIRAND_LOG + KUAIRAND_LOG[1:]) + "\n")  # the 10 rows twice
    t = load_kuairand(tmp_path)
    assert t.duplicates_dropped == 10
    assert t.collect().interactions.equals(load_kuairand(FIXTURES / "kuairand").collect().interactions)


# ---- MovieLens (tiny hand-written atomic files in the packaged format) --------------------------
# Made-up rows written at test time (no MovieLens data is committed); each repeats one
# (user, item, timestamp) row.
MOVIELENS_FILES = {
    "ml-100k/ml-100k.inter": (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t4\t880000100\n"
        "1\t11\t2\t880000200\n"
        "1\t12\t5\t880000300\n"
        "2\t10\t3\t890000100\n"
        "2\t12\t1\t890000200\n"
        "1\t13\t4\t880000400\n"
        "2\t11\t5\t890000300\n"
        "3\t13\t2\t885000000\n"
        "1\t11\t2\t880000200\n"
        "1\t10\t4\t880000500\n"
    ),
    "ml-100k/ml-100k.item": (
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tFirst Film\t1995\tAnimation Comedy\n"
        "11\tSecond Film\t1994\tDrama\n"
        "12\tThird Film\t\tAction Thriller\n"
        "13\tFourth Film\t1997\tDrama Romance\n"
    ),
    "ml-100k/ml-100k.user": (
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t30\tM\tengineer\t10001\n"
        "2\t51\tF\tother\t20002\n"
        "3\t17\tM\twriter\t30003\n"
    ),
    "ml-1m/ml-1m.inter": (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1m_1\tFilm One (1975)\t5\t970000100\n"
        "1m_1\tFilm Two (1996)\t3\t970000300\n"
        "1m_2\tFilm One (1975)\t4\t969000100\n"
        "1m_1\tFilm Three (1995)\t1\t970000200\n"
        "1m_2\tFilm Two (1996)\t2\t969000200\n"
        "1m_1\tFilm Two (1996)\t3\t970000300\n"
        "1m_2\tFilm Three (1995)\t5\t969000300\n"
    ),
    "ml-1m/ml-1m.item": (
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        "Film One (1975)\tFilm One\t1975.0\tDrama\n"
        "Film Two (1996)\tFilm Two\t1996\tAnimation Children's Musical\n"
        "Film Three (1995)\tFilm Three\t1995\tComedy\n"
    ),
    "ml-1m/ml-1m.user": (
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        "1m_1\t25\tF\t4\t11111\n"
        "1m_2\t45\tM\t7\t22222\n"
    ),
}


def _movielens(tmp_path: Path, name: str) -> Path:
    """The tiny atomic files of ``name`` (ml-100k | ml-1m), written to a folder of their own."""
    folder = tmp_path / f"{name}-files"
    folder.mkdir(exist_ok=True)
    for key, text in MOVIELENS_FILES.items():
        if key.startswith(name + "/"):
            (folder / key.split("/", 1)[1]).write_text(text)
    return folder


@pytest.mark.parametrize("name, loader, rows", [("ml-100k", load_ml100k, 9), ("ml-1m", load_ml1m, 6)])
def test_movielens_readers_drop_a_repeated_rating(tmp_path, name, loader, rows):
    t = loader(path=_movielens(tmp_path, name))  # each fixture repeats one (user, item, timestamp) row
    assert (t.interactions.height, t.duplicates_dropped) == (rows, 1)
    assert t.interactions.select(pl.struct("user", "item", "ts").is_duplicated().any()).item() is False
    store = build_store(t, tmp_path / name, Protocol(min_history=0))
    assert (store.manifest["interactions"], store.manifest["duplicates_dropped"]) == (rows, 1)


def _ml100k_with(tmp_path, line: str) -> Path:
    folder = _movielens(tmp_path, "ml-100k")
    inter = (folder / "ml-100k.inter").read_text().splitlines()
    (folder / "ml-100k.inter").write_text("\n".join(inter[:2] + [line] + inter[2:]) + "\n")
    return folder


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("1\t12\t7\t881250950", r"line 3, column 'rating': must be a rating from 1 to 5 \(found '7'\)"),
        ("1\t12\t0\t881250950", r"line 3, column 'rating': must be a rating from 1 to 5"),
        ("1\t12\tnan\t881250950", r"line 3, column 'rating': must be a finite number \(found 'nan'\)"),
        ("1\t12\t1e300\t881250950", r"line 3, column 'rating': must be a rating from 1 to 5"),
        ("1\t12\t4\t-5", r"line 3, column 'timestamp': is out of range"),
        ("1\t12\t4\t1e300", r"line 3, column 'timestamp': must be an integer timestamp"),
        ("1\t12\t4", r"line 3, column 'timestamp': must be an integer timestamp"),
        ("\t12\t4\t881250950", r"line 3, column 'user_id': is empty"),
    ],
)
def test_movielens_bad_rows_are_refused_by_file_line_and_column(tmp_path, line, pattern):
    with pytest.raises(DataError, match=r"^ml-100k: .*ml-100k\.inter: " + pattern):
        load_ml100k(path=_ml100k_with(tmp_path, line))


def test_movielens_path_must_hold_the_three_files(tmp_path):
    with pytest.raises(DataError, match=r"lacks ml-1m\.inter, ml-1m\.item, ml-1m\.user"):
        load_ml1m(path=tmp_path)


def test_time_window_and_excerpts():
    from datetime import datetime

    from r2led.data.sources.checks import TS_MIN, excerpt, ts_max

    assert int(datetime(1990, 1, 1, tzinfo=UTC).timestamp()) == TS_MIN
    assert ts_max(datetime(2026, 5, 1, tzinfo=UTC)) == int(datetime(2027, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
    assert excerpt("abc") == "'abc'"
    assert excerpt("x" * 1000) == "'" + "x" * 100 + "'... (1,000 characters)"


# ---- duplicates: the rule itself and the synthetic source -------------------------------------


DUPLICATED = [("a", "i1", 10, 1), ("b", "i2", 5, 2), ("a", "i1", 10, 4), ("a", "i1", 11, 3), ("b", "i2", 5, 2)]


@pytest.mark.parametrize("lazy", [False, True])
def test_drop_duplicates_keeps_one_row_per_behaviour_with_the_strongest_signal(lazy, caplog):
    inter = pl.DataFrame(DUPLICATED, schema=INTERACTION_SCHEMA, orient="row")
    items = pl.DataFrame({"item": ["i1", "i2"], "text": ["x", "y"], "category": ["", ""], "tags": [[], []]})
    t = CanonicalTables("dups", inter.lazy() if lazy else inter, items, pl.DataFrame({"user": ["a", "b"]}))
    with caplog.at_level(logging.WARNING, logger="r2led.data"):
        t.drop_duplicates().validate()
    assert t.lazy == lazy and t.duplicates_dropped == 2
    assert t.collect().interactions.rows() == [("a", "i1", 10, 4), ("b", "i2", 5, 2), ("a", "i1", 11, 3)]
    assert [r.getMessage() for r in caplog.records] == [
        "dups: dropped 2 duplicate interaction(s) (same user, item and timestamp) of 5 rows"
    ]
    t.drop_duplicates()  # nothing left to drop: no second warning, the count stays
    assert t.duplicates_dropped == 2 and len(caplog.records) == 1


def test_validate_checks_again_a_replaced_table_and_a_collected_lazy_frame():
    inter = pl.DataFrame(DUPLICATED[:2], schema=INTERACTION_SCHEMA, orient="row")
    items = pl.DataFrame({"item": ["i1", "i2"], "text": ["x", "y"], "category": ["", ""], "tags": [[], []]})
    users = pl.DataFrame({"user": ["a", "b"]})
    t = CanonicalTables("v", inter, items, users).validate()
    t.interactions = inter.with_columns(pl.lit(0, pl.Int64).alias("signal"))
    with pytest.raises(DataError, match="signal must be >= 1"):
        t.validate()
    lazy = CanonicalTables("v", t.interactions.lazy(), items, users).validate()  # no pass over the rows
    with pytest.raises(DataError, match="signal must be >= 1"):
        lazy.collect().validate()


def test_synthetic_drops_repeats_within_one_second(monkeypatch):
    # One day for thousands of behaviours puts several in a second, some on the same item.
    raw = {}

    @dataclasses.dataclass
    class Recording(CanonicalTables):
        def __post_init__(self):
            raw.setdefault("interactions", self.interactions)

    monkeypatch.setattr(synthetic_module, "CanonicalTables", Recording)
    t = load_synthetic(users=3, length=3_000, items=64, days=1, seed=0)
    before = raw["interactions"]
    repeats = before.height - before.select("user", "item", "ts").unique().height
    assert repeats > 0 and t.duplicates_dropped == repeats
    assert t.interactions.height == before.height - repeats
    strongest = before.group_by("user", "item", "ts").agg(pl.col("signal").max())
    kept = t.interactions.join(strongest, on=["user", "item", "ts"], suffix="_max")
    assert kept.height == t.interactions.height and (kept["signal"] == kept["signal_max"]).all()


# ---- collaborative SIDs see train rows only ---------------------------------------------------


def test_collaborative_sids_do_not_change_with_valid_or_test_rows(tmp_path):
    from r2led.sid.build import build_sid_table
    from r2led.sid.encoders import collaborative_embeddings, train_rows

    t = load_synthetic(users=200, length=40, items=300, seed=2)
    a = build_store(t, tmp_path / "a", Protocol())
    # Time of the first valid or test sample: rows after it belong to valid and test.
    rank = np.load(a.root / "seq_rank.npy")
    first_late = int(a.samples.filter(pl.col("split") > 0)["rank"].min())
    cutoff = int(a.seq_ts[np.nonzero(rank == first_late)[0][0]])
    rng = np.random.default_rng(0)
    inter = t.interactions
    late = inter["ts"] > cutoff
    assert 0.1 < late.mean() < 0.3
    other_items = pl.Series(rng.choice(t.items["item"].to_numpy(), inter.height))
    changed = inter.with_columns(
        pl.when(late).then(other_items).otherwise(pl.col("item")).alias("item"),
        pl.when(late).then(6 - pl.col("signal")).otherwise(pl.col("signal")).alias("signal"),
    )
    b = build_store(CanonicalTables("synthetic", changed, t.items, t.users), tmp_path / "b", Protocol())
    assert np.array_equal(train_rows(a), train_rows(b))
    assert a.samples.filter(pl.col("split") == 0).equals(b.samples.filter(pl.col("split") == 0))
    # All rows differ between the stores (so an encoder that read them would change) ...
    every_a = collaborative_embeddings(a.offsets, a.seq_items, a.n_items)
    every_b = collaborative_embeddings(b.offsets, b.seq_items, b.n_items)
    assert not np.allclose(every_a, every_b, atol=1e-3)
    # ... but the collaborative SIDs are built from train rows only: identical codes.
    sid_a = build_sid_table(a, encoder="collaborative", codebook=8, seed=0)
    sid_b = build_sid_table(b, encoder="collaborative", codebook=8, seed=0)
    assert np.array_equal(sid_a.codes, sid_b.codes)
    # Changing train rows does change them (the comparison above can fail).
    early = (inter["ts"] < cutoff) & (pl.Series(rng.random(inter.height)) < 0.3)
    moved = inter.with_columns(pl.when(early).then(other_items).otherwise(pl.col("item")).alias("item"))
    c = build_store(CanonicalTables("synthetic", moved, t.items, t.users), tmp_path / "c", Protocol())
    assert not np.array_equal(build_sid_table(c, encoder="collaborative", codebook=8, seed=0).codes, sid_a.codes)


# ---- registry and command line ------------------------------------------------------------------


def test_registry_loads_every_reader_by_name():
    assert load_source("taobao", path=FIXTURES / "taobao").name == "taobao"
    assert load_source("amazon", path=FIXTURES / "amazon").name == "amazon"
    assert load_source("kuairand", path=FIXTURES / "kuairand").name == "kuairand"
    assert load_source("synthetic", users=5, length=10).interactions.height >= 30


def test_cli_prepares_synthetic_data_and_prints_its_info(tmp_path):
    runner = CliRunner()
    out = tmp_path / "syn"
    result = runner.invoke(app, ["data", "prepare", "synthetic", "--users", "50", "--length", "40", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["samples"]) == {"train", "valid", "test"}
    assert (manifest["users"], manifest["items"]) == (50, 2000)
    assert 50 * 20 <= manifest["interactions"] <= 50 * 60
    n = sum(manifest["samples"].values())
    assert manifest["samples"]["train"] == int(0.8 * n)
    info = runner.invoke(app, ["data", "info", str(out)])
    assert info.exit_code == 0, info.output
    assert "synthetic: 50 users, 2,000 items" in info.output
    for split in ("train", "valid", "test"):
        assert split in info.output
    assert f"{manifest['samples']['train']:,}" in info.output


def test_cli_label_threshold_reaches_the_protocol(tmp_path):
    out = tmp_path / "tb"
    args = [
        "data",
        "prepare",
        "taobao",
        "--path",
        str(FIXTURES / "taobao"),
        "--out",
        str(out),
        "--label-threshold",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["label_threshold"] == 1.0
    assert manifest["positive_rate"]["train"] == 0.5


def test_cli_prepare_reports_dropped_duplicates(tmp_path):
    doubled = tmp_path / "raw"
    doubled.mkdir()
    _taobao_with(doubled, [row for row in TAOBAO_ROWS for _ in range(2)])
    out = tmp_path / "tb"
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", "taobao", "--path", str(doubled), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["duplicates_dropped"] == 20
    info = runner.invoke(app, ["data", "info", str(out)])
    assert "taobao: 3 users, 9 items, 20 interactions (20 duplicates dropped)" in info.output


def test_cli_refuses_a_bad_row_in_one_short_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _taobao_with(raw, TAOBAO_ROWS[:3] + ['1,"2268318,2520377,pv,1511544070'] + TAOBAO_ROWS * 1_000)
    result = CliRunner().invoke(app, ["data", "prepare", "taobao", "--path", str(raw), "--out", str(tmp_path / "tb")])
    assert result.exit_code == 2
    assert "line 4, column 'item': must be an integer id" in result.output
    assert len(result.output) < 600 and "Traceback" not in result.output
    assert not (tmp_path / "tb").exists()
