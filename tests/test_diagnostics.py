"""``r2led bench diagnose``: retrieval hit rates, gate weights by popularity, tail-item AUC."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fast_training import FAST_SMALL as FAST
from r2led.bench.diagnostics import (
    diagnose,
    item_popularity,
    popularity_buckets,
    relevant_to_target,
    retrieval_stats,
    tail_auc,
)
from r2led.cli import app
from r2led.config import load_config
from r2led.errors import DataError
from r2led.train.trainer import Trainer, load_run


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    for name, extra in {
        "shared": ["model.k=5", "model.disjoint_routes=false"],
        "disjoint": ["model.k=5"],
        "din": [],
    }.items():
        base = {"model": {"name": "din" if name == "din" else "r2led"}}
        Trainer(tiny_store.root, load_config(None, [*FAST, *extra], base=base), root / name, show_progress=False).fit()
    return root


def test_popularity_buckets_are_equal_sized_and_labelled_by_count():
    pop = np.array([0, 0, 1, 2, 5, 5, 9, 20, 30, 40])
    bucket, labels = popularity_buckets(pop, 2)
    assert bucket.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # the median, 5, opens the upper bucket
    assert labels == ["0-4", "5-40"]
    bucket, labels = popularity_buckets(np.zeros(6, dtype=int), 3)  # all tied: one bucket
    assert set(bucket.tolist()) == {0} and labels == ["0-0"]


def test_item_popularity_counts_training_samples_only(tiny_store):
    pop = item_popularity(tiny_store)
    s = tiny_store.sample_arrays
    train = s["split"] == 0
    assert pop.sum() == train.sum() and pop[0] == 0
    item = int(s["target"][train][0])
    assert pop[item] == int((s["target"][train] == item).sum())


def test_relevance_is_a_shared_nonzero_tag():
    tags = torch.tensor([[0, 0], [1, 2], [2, 0], [3, 0]])  # item 0 = padding
    target = torch.tensor([1, 3])
    items = torch.tensor([[2, 3, 0], [3, 1, 0]])
    assert relevant_to_target(tags, target, items).tolist() == [[True, False, False], [True, False, False]]


def test_retrieval_stats_count_distinct_behaviours_and_nested_matches(tiny_store, runs):
    shared = retrieval_stats(load_run(runs / "shared")[0], tiny_store, every=1, t_max=64)
    disjoint = retrieval_stats(load_run(runs / "disjoint")[0], tiny_store, every=1, t_max=64)
    assert shared["samples"] == disjoint["samples"] == len(tiny_store.split_indices("test"))
    # disjoint routes never repeat a behaviour; shared routes do on this data
    assert disjoint["distinct_per_sample"] == pytest.approx(disjoint["slots_per_sample"])
    assert shared["distinct_per_sample"] < shared["slots_per_sample"]
    # prefixes nest: a coarser route holds at least as many matches as a finer one
    m = [r["match_share"] for r in shared["routes"]]
    assert [r["level"] for r in shared["routes"]] == [1, 2, 3]
    assert m[0] >= m[1] >= m[2] and m[0] > 0
    for st in (shared, disjoint):
        for r in st["routes"]:
            assert 0 <= r["relevant_share"] <= 1 and 0 <= r["match_share"] <= 1


def test_tail_auc_is_the_auc_inside_each_bucket(tiny_store):
    s = tiny_store.sample_arrays
    test = tiny_store.split_indices("test")
    rng = np.random.default_rng(0)
    label = s["label"][test]
    preds = {"a": label * 0.3 + rng.random(len(test)), "b": rng.random(len(test))}
    pop = item_popularity(tiny_store)
    report = tail_auc(tiny_store, preds, pop, n_buckets=2)
    bucket, labels = popularity_buckets(pop[s["target"][test]], 2)
    rows = report["buckets"]
    assert rows[-1]["popularity"] == "all" and rows[-1]["rows"] == len(test)
    assert rows[-1]["auc"]["a"] == round(roc_auc_score(label, preds["a"]), 4)
    for row in (r for r in rows if r["popularity"] != "all"):
        sel = bucket == labels.index(row["popularity"])
        assert row["rows"] == sel.sum()
        assert row["auc"]["b"] == round(roc_auc_score(label[sel], preds["b"][sel]), 4)
        assert set(row["p"]) == {"b"} and 0 <= row["p"]["b"] <= 1
    with pytest.raises(DataError, match="test predictions"):
        tail_auc(tiny_store, {"a": preds["a"][:-1]}, pop)


def test_diagnose_writes_reports_and_gate_weights_sum_to_one(runs, tmp_path):
    report = diagnose(runs / "shared", [runs / "disjoint", runs / "din"], tmp_path / "d", every=1, n_buckets=3)
    assert set(report["retrieval"]) == {"shared", "disjoint"}  # DIN retrieves nothing
    for b in report["gate"]["buckets"]:
        assert sum(b["weights"]) == pytest.approx(1.0, abs=1e-3) and len(b["weights"]) == 4
    assert json.loads((tmp_path / "d" / "diagnostics.json").read_text())["run"] == "shared"
    md = (tmp_path / "d" / "diagnostics.md").read_text()
    assert "## Gate weights by item popularity" in md and "| all |" in md


def test_cli_diagnose_names_a_folder_that_is_not_a_finished_run(runs, tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "diagnose", str(runs / "shared"), "--compare", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and "test_pred.npy" in str(result.exception) + result.output
    ok = CliRunner().invoke(
        app, ["bench", "diagnose", str(runs / "shared"), "--out", str(tmp_path / "o"), "--every", "2"]
    )
    assert ok.exit_code == 0, ok.output
    assert "Valid AUC by target popularity" in ok.output  # valid by default: test is read once


def test_run_names_are_short_and_distinct(tmp_path):
    from r2led.bench.diagnostics import run_names

    runs = [
        tmp_path / "a" / "runs" / "r2led" / "seed0",
        tmp_path / "b" / "runs" / "r2led" / "seed0",
        tmp_path / "x" / "sid_off",
    ]
    assert run_names(runs) == ["a/runs/r2led/seed0", "b/runs/r2led/seed0", "sid_off"]
    assert run_names(runs[1:]) == ["r2led/seed0", "sid_off"]


def test_diagnose_reads_valid_by_default_and_test_only_when_asked(tiny_store, runs, tmp_path):
    from r2led.bench.diagnostics import analysis_settings
    from r2led.train.trainer import predict

    settings = analysis_settings()
    assert settings["split"] == "valid" and settings["popularity_buckets"] == 5 and settings["tail_bucket"] == 0
    report = diagnose(runs / "shared", [runs / "din"], tmp_path / "v", every=1, n_buckets=2)
    assert report["split"] == "valid" and report["tail"]["split"] == "valid"
    valid = tiny_store.split_indices("valid")
    assert report["tail"]["buckets"][-1]["rows"] == len(valid) and report["retrieval"]["shared"]["split"] == "valid"
    model, store, cfg = load_run(runs / "din")
    pred = predict(model, store, valid, cfg.train.eval_batch_size, cfg.train.t_max)
    label = tiny_store.sample_arrays["label"][valid]
    assert report["tail"]["buckets"][-1]["auc"]["din"] == round(roc_auc_score(label, pred), 4)
    # the valid AUC of the whole split is the one the trainer recorded for its best checkpoint
    recorded = json.loads((runs / "din" / "metrics.json").read_text())["valid"]["auc"]
    assert report["tail"]["buckets"][-1]["auc"]["din"] == pytest.approx(recorded, abs=1e-4)
    test = diagnose(runs / "shared", [runs / "din"], tmp_path / "t", every=1, n_buckets=2, split="test")
    assert test["tail"]["buckets"][-1]["rows"] == len(tiny_store.split_indices("test"))
    assert "Test AUC by target popularity" in (tmp_path / "t" / "diagnostics.md").read_text()
    with pytest.raises(DataError, match="split 'train'"):
        diagnose(runs / "shared", [], tmp_path / "x", split="train")
