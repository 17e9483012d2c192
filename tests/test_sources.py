"""Sources: the synthetic generator's properties and the readers for user-supplied formats."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from r2led.cli import app
from r2led.data.protocol import Protocol
from r2led.data.sources import load_source
from r2led.data.sources.amazon import load_amazon
from r2led.data.sources.kuairand import load_kuairand
from r2led.data.sources.synthetic import load_synthetic
from r2led.data.sources.taobao import load_taobao
from r2led.data.store import build_store
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
    rate = dict(zip(rates["fits"].to_list(), rates["rate"].to_list()))
    assert rate[True] > rate[False] + 0.25  # measured 0.65 vs 0.31 with seed 0
    assert 0.45 < (inter["signal"] > 3).mean() < 0.7


def test_user_segment_reflects_the_main_interest(synth):
    t, inter = synth
    main = (
        inter.group_by("user", "category").len().sort(["user", "len"], descending=[False, True])
        .group_by("user", maintain_order=True).first()
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
    assert (t.interactions.height, t.items.height, t.users.height) == (20, 9, 3)
    assert t.interactions["signal"].value_counts().sort("signal")["count"].to_list() == [14, 2, 2, 2]
    item = t.items.filter(pl.col("item") == "2268318").row(0, named=True)
    assert item == {"item": "2268318", "text": "category 2520377", "category": "2520377", "tags": ["2520377"]}
    store = build_store(t, tmp_path / "tb", Protocol(label_threshold=1))
    m = store.manifest
    assert (m["users"], m["items"], m["interactions"]) == (3, 9, 20)
    assert m["samples"] == {"train": 4, "valid": 0, "test": 1}  # users 1 and 100 have 8 and 7 rows
    assert m["positive_rate"] == {"train": 0.5, "valid": 0.0, "test": 1.0}  # cart/fav/buy
    buy_only = build_store(t, tmp_path / "buy", Protocol())
    assert buy_only.samples["label"].sum() == 2


def test_taobao_errors_name_the_file_and_column(tmp_path):
    rows = (FIXTURES / "taobao" / "UserBehavior.csv").read_text().splitlines()
    bad = tmp_path / "UserBehavior.csv"
    bad.write_text("\n".join(rows[:3] + ["1,2268318,2520377,click,1511544070"]) + "\n")
    with pytest.raises(DataError, match=r"UserBehavior\.csv: column 'behavior' must be one of .* line 4 has 'click'"):
        load_taobao(bad)
    bad.write_text("\n".join(rows[:3] + ["1,2268318,2520377,pv,"]) + "\n")
    with pytest.raises(DataError, match=r"UserBehavior\.csv: column 'timestamp' is empty in 1 rows"):
        load_taobao(bad)
    bad.write_text("1,2268318,2520377,pv\n")
    with pytest.raises(DataError, match="has 4 columns; expected 5"):
        load_taobao(bad)
    with pytest.raises(DataError, match="file not found"):
        load_taobao(tmp_path / "nowhere")


# ---- Amazon reviews ---------------------------------------------------------------------------


def test_amazon_reads_reviews_and_both_metadata_styles(tmp_path):
    t = load_amazon(FIXTURES / "amazon")
    assert (t.interactions.height, t.items.height, t.users.height) == (18, 8, 3)
    assert t.source_info["items_without_metadata"] == 1
    items = {r["item"]: r for r in t.items.iter_rows(named=True)}
    assert items["048645195X"]["text"] == "Dover Fairy Tale Coloring Book | Dover | Toys & Games > Arts & Crafts > Coloring Books"
    assert items["048645195X"]["category"] == "Arts & Crafts"
    assert items["B00000IZLS"]["tags"] == ["Toys & Games", "Preschool", "Pre-Kindergarten Toys"]  # 2018 "category"
    assert items["B00004WKPH"]["text"] == "item B00004WKPH" and items["B00004WKPH"]["tags"] == []
    assert "B000UNREVD" not in items  # never reviewed
    store = build_store(t, tmp_path / "az", Protocol())
    m = store.manifest
    assert (m["users"], m["items"], m["interactions"]) == (3, 8, 18)
    assert sum(m["samples"].values()) == 5  # 7 and 8 reviews -> 2 + 3 samples
    # global order: the 2013 reviewer's 4, 3, 5 stars, then the 2014 reviewer's 5, 1
    assert store.samples["label"].to_list() == [1, 0, 1, 1, 0]


def test_amazon_reads_gzipped_files(tmp_path):
    for f in (FIXTURES / "amazon").iterdir():
        with gzip.open(tmp_path / (f.name + ".gz"), "wb") as fh:
            fh.write(f.read_bytes())
    a, b = load_amazon(tmp_path), load_amazon(FIXTURES / "amazon")
    assert a.interactions.equals(b.interactions) and a.items.equals(b.items)


def test_amazon_errors_name_the_file_and_column(tmp_path):
    shutil.copy(FIXTURES / "amazon" / "reviews_Toys_and_Games_5.json", tmp_path)
    with pytest.raises(DataError, match=r"exactly one reviews file .* metadata \[\]"):
        load_amazon(tmp_path)
    shutil.copy(FIXTURES / "amazon" / "meta_Toys_and_Games.json", tmp_path)
    reviews = tmp_path / "reviews_Toys_and_Games_5.json"
    lines = reviews.read_text().splitlines()
    row = json.loads(lines[2])
    del row["overall"]
    reviews.write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"reviews_Toys_and_Games_5\.json: column 'overall' is missing or null in 1 reviews \(first at line 3\)"):
        load_amazon(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_amazon(reviews)


# ---- KuaiRand ---------------------------------------------------------------------------------


def test_kuairand_reads_standard_logs_with_features(tmp_path):
    t = load_kuairand(FIXTURES / "kuairand")
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
    store = build_store(t, tmp_path / "kr", Protocol(label_threshold=1))
    m = store.manifest
    assert (m["users"], m["items"], m["interactions"]) == (3, 5, 18)
    assert sum(m["samples"].values()) == 3  # 7, 6 and 5 rows -> 2 + 1 + 0
    assert sorted(store.samples["label"].to_list()) == [0, 1, 1]  # clicks


def test_kuairand_log_pattern_and_single_file(tmp_path):
    every = load_kuairand(FIXTURES / "kuairand", logs="log_*.csv")
    assert (every.interactions.height, every.items.height) == (21, 6)
    one = load_kuairand(FIXTURES / "kuairand" / "log_standard_4_22_to_5_08_1k.csv")
    assert (one.interactions.height, one.items.height, one.users.height) == (8, 5, 3)
    assert one.items.filter(pl.col("item") == "9912")["tags"].to_list() == [["8", "5", "12"]]


def test_kuairand_errors_name_the_file_and_column(tmp_path):
    log = (FIXTURES / "kuairand" / "log_standard_4_08_to_4_21_1k.csv").read_text().splitlines()
    bad = tmp_path / "log_standard_x.csv"
    bad.write_text("\n".join([log[0].replace("time_ms", "time")] + log[1:]) + "\n")
    with pytest.raises(DataError, match=r"log_standard_x\.csv lacks column\(s\) \['time_ms'\]"):
        load_kuairand(tmp_path)
    bad.write_text("\n".join(log[:3] + [log[3].replace(",1,1,0,0,0,0,1,", ",NaN,1,0,0,0,0,1,")] + log[4:]) + "\n")
    with pytest.raises(DataError, match=r"log_standard_x\.csv: column 'is_click' is empty or NaN in 1 rows \(first at data row 3\)"):
        load_kuairand(tmp_path)
    with pytest.raises(DataError, match="no log file matching"):
        load_kuairand(FIXTURES / "taobao")


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
    args = ["data", "prepare", "taobao", "--path", str(FIXTURES / "taobao"), "--out", str(out), "--label-threshold", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["label_threshold"] == 1.0
    assert manifest["positive_rate"]["train"] == 0.5
