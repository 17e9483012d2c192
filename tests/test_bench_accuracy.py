"""The accuracy benchmark on the tiny store: every output, resume, significance."""

import json

import pytest

from r2led.bench.accuracy import ABLATIONS, run_accuracy
from r2led.errors import ConfigError

FAST = ["train.lr=0.01", "train.batch_size=64", "train.eval_batch_size=256", "train.t_max=64", "train.threads=1", "train.epochs=1"]


def test_accuracy_benchmark_writes_tables_plot_and_pvalues(tiny_store, tmp_path):
    out = tmp_path / "res"
    results = run_accuracy(tiny_store.root, ["r2led", "din"], 2, out, overrides=FAST, ablations=True, fairness=True)
    assert set(results) == {"r2led", "din", "din +sid", *[f"r2led {a}" for a in ABLATIONS]}
    saved = json.loads((out / "results.json").read_text())["results"]
    din = saved["din"]
    assert len(din["seeds"]) == 2 and din["test"]["auc"]["std"] >= 0
    assert 0.5 < din["test"]["auc"]["mean"] < 1.0
    assert len(din["delong_p_vs_r2led"]) == 2 and all(0 <= p <= 1 for p in din["delong_p_vs_r2led"])
    md = (out / "results.md").read_text()
    assert "## R2LED ablations" in md and "## Fairness control" in md and "| din |" in md
    assert (out / "auc.png").stat().st_size > 1000
    # a second call reuses every finished run (no retraining: the run folders are untouched)
    stamp = (out / "runs" / "din" / "seed0" / "metrics.json").stat().st_mtime
    again = run_accuracy(tiny_store.root, ["r2led", "din"], 2, out, overrides=FAST, ablations=True, fairness=True)
    assert (out / "runs" / "din" / "seed0" / "metrics.json").stat().st_mtime == stamp
    assert again["din"]["test"] == results["din"]["test"]


def test_report_only_tabulates_finished_runs_and_trains_nothing(tiny_store, tmp_path):
    out = tmp_path / "res"
    run_accuracy(tiny_store.root, ["din"], 1, out, overrides=FAST, ablations=False)
    results = run_accuracy(tiny_store.root, ["din", "eta"], 2, out, overrides=FAST, ablations=False, report_only=True)
    assert set(results) == {"din"} and len(results["din"]["seeds"]) == 1
    assert not (out / "runs" / "eta").exists() and not (out / "runs" / "din" / "seed1").exists()
    assert "| din | 1 |" in (out / "results.md").read_text()


def test_a_finished_run_with_other_settings_is_refused_not_reused(tiny_store, tmp_path):
    out = tmp_path / "res"
    run_accuracy(tiny_store.root, ["din"], 1, out, overrides=FAST, ablations=False)
    # the same command with threads changed reuses the run (threads do not change the model)
    run_accuracy(tiny_store.root, ["din"], 1, out, overrides=[*FAST, "train.threads=2"], ablations=False)
    with pytest.raises(ConfigError, match=r"model.dropout: 0.0 in the run, 0.1 now"):
        run_accuracy(tiny_store.root, ["din"], 1, out, overrides=[*FAST, "model.dropout=0.1"], ablations=False)
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 in the run, 0.02 now"):
        run_accuracy(tiny_store.root, ["din"], 1, out, overrides=[*FAST, "train.lr=0.02"], ablations=False, report_only=True)


def test_search_on_valid_records_every_trial_and_trains_the_best(tiny_store, tmp_path):
    out = tmp_path / "res"
    results = run_accuracy(tiny_store.root, ["din"], 1, out, overrides=FAST, ablations=False, search=True)
    searched = json.loads((out / "search.json").read_text())["din"]
    trials = searched["trials"]
    assert len(trials) == 4 and trials[0]["overrides"] == []  # the defaults, then one change at a time
    best = max(trials, key=lambda t: t["valid_auc"])
    assert searched["chosen"] == best["overrides"]
    assert results["din"]["overrides"] == best["overrides"]
    for trial in trials:  # every trial is its own seed-0 run, selected on valid only
        assert 0.0 < trial["valid_auc"] < 1.0
    md = (out / "results.md").read_text()
    assert "## Search on valid" in md and f"{best['valid_auc']:.4f}" in md
    assert json.loads((out / "results.json").read_text())["search"]["din"]["chosen"] == best["overrides"]
    # the chosen trial is the seed-0 run of the table: copied, not trained again (same timings too)
    chosen_run = out / "runs" / f"search_din_{trials.index(best)}" / "seed0"
    assert (out / "runs" / "din" / "seed0" / "metrics.json").read_text() == (chosen_run / "metrics.json").read_text()


def test_report_only_search_trains_nothing_and_leaves_out_unsearched_models(tiny_store, tmp_path):
    out = tmp_path / "res"
    results = run_accuracy(tiny_store.root, ["din", "eta"], 1, out, overrides=FAST, ablations=False, search=True, report_only=True)
    assert results == {} and not (out / "runs").exists()
    assert json.loads((out / "search.json").read_text()) == {}
