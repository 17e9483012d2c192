"""The accuracy benchmark on the tiny store: every output, resume, significance."""

import json
from pathlib import Path

import pytest

from fast_training import FAST
from r2led.bench.accuracy import ABLATIONS, run_accuracy
from r2led.config import BenchConfig
from r2led.errors import ConfigError


def run(store, models: list[str], seeds: int, out, overrides=FAST, report_only=False, grid=None, **bench):
    """``run_accuracy`` of ``models`` x ``seeds`` with ``bench`` settings (no ablations unless asked)."""
    config = BenchConfig(models=models, seeds=seeds, **{"ablations": False, **bench})
    return run_accuracy(store.root, config, out, overrides=overrides, report_only=report_only, grid=grid)


def test_accuracy_benchmark_writes_tables_plot_and_pvalues(tiny_store, tmp_path):
    out = tmp_path / "res"
    results = run(tiny_store, ["r2led", "din"], 2, out, ablations=True, fairness=True)
    assert set(results) == {"r2led", "din", "din +sid", *[f"r2led {a}" for a in ABLATIONS]}
    saved = json.loads((out / "results.json").read_text())["results"]
    din = saved["din"]
    aucs = [seed["test"]["auc"] for seed in din["seeds"]]
    assert len(aucs) == 2
    # the summary is the sample mean and the (n - 1) standard deviation of the per-seed AUCs
    assert din["test"]["auc"]["mean"] == pytest.approx((aucs[0] + aucs[1]) / 2)
    assert din["test"]["auc"]["std"] == pytest.approx(abs(aucs[0] - aucs[1]) / 2**0.5)
    assert 0.5 < din["test"]["auc"]["mean"] < 1.0
    assert len(din["delong_p_vs_r2led"]) == 2 and all(0 <= p <= 1 for p in din["delong_p_vs_r2led"])
    md = (out / "results.md").read_text()
    assert "## R2LED ablations" in md and "## Fairness control" in md and "| din |" in md
    assert (out / "auc.png").stat().st_size > 1000
    # a second call reuses every finished run (no retraining: the run folders are untouched)
    stamp = (out / "runs" / "din" / "seed0" / "metrics.json").stat().st_mtime
    again = run(tiny_store, ["r2led", "din"], 2, out, ablations=True, fairness=True)
    assert (out / "runs" / "din" / "seed0" / "metrics.json").stat().st_mtime == stamp
    assert again["din"]["test"] == results["din"]["test"]


def test_report_only_tabulates_finished_runs_and_trains_nothing(tiny_store, tmp_path):
    out = tmp_path / "res"
    run(tiny_store, ["din"], 1, out)
    results = run(tiny_store, ["din", "eta"], 2, out, report_only=True)
    assert set(results) == {"din"} and len(results["din"]["seeds"]) == 1
    assert not (out / "runs" / "eta").exists() and not (out / "runs" / "din" / "seed1").exists()
    assert "| din | 1 |" in (out / "results.md").read_text()


def test_a_finished_run_with_other_settings_is_refused_not_reused(tiny_store, tmp_path):
    out = tmp_path / "res"
    run(tiny_store, ["din"], 1, out)
    # the same command with threads changed reuses the run (threads do not change the model)
    run(tiny_store, ["din"], 1, out, overrides=[*FAST, "train.threads=2"])
    with pytest.raises(ConfigError, match=r"model.dropout: 0.0 → 0.1"):
        run(tiny_store, ["din"], 1, out, overrides=[*FAST, "model.dropout=0.1"])
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 → 0.02"):
        run(tiny_store, ["din"], 1, out, overrides=[*FAST, "train.lr=0.02"], report_only=True)


SMALL_GRID = """
lr: [0.01, 0.02]
models:
  din:
    why: "test grid"
    knobs:
      model.short_len: [30, 10]
      model.dropout: [0.0, 0.1]
"""


def test_search_on_valid_runs_the_whole_grid_and_trains_the_best(tiny_store, tmp_path):
    out = tmp_path / "res"
    grid = tmp_path / "grid.yaml"
    grid.write_text(SMALL_GRID)
    results = run(tiny_store, ["din"], 1, out, grid=grid, search=True)
    searched = json.loads((out / "search.json").read_text())["din"]
    trials = searched["trials"]
    # lr x short_len x dropout, lr outermost: every combination once
    assert [t["overrides"] for t in trials] == [
        [f"train.lr={lr}", f"model.short_len={n}", f"model.dropout={d}"]
        for lr in (0.01, 0.02)
        for n in (30, 10)
        for d in (0.0, 0.1)
    ]
    best = max(trials, key=lambda t: t["valid_auc"])
    assert searched["chosen"] == best["overrides"] and searched["why"] == "test grid"
    assert results["din"]["overrides"] == best["overrides"]
    assert len({t["valid_auc"] for t in trials}) > 1  # the trials really differ
    for trial in trials:  # every trial is its own seed-0 run, selected on valid only
        assert 0.0 < trial["valid_auc"] < 1.0
        assert json.loads((Path(trial["run"]) / "metrics.json").read_text())["valid"]["auc"] == trial["valid_auc"]
    md = (out / "results.md").read_text()
    assert "## Search on valid" in md and f"| 8 | 0 | {best['valid_auc']:.4f} |" in md
    assert json.loads((out / "results.json").read_text())["search"]["din"]["chosen"] == best["overrides"]
    # the chosen trial is the seed-0 run of the table: copied, not trained again (same timings too)
    assert (out / "runs" / "din" / "seed0" / "metrics.json").read_text() == (
        Path(best["run"]) / "metrics.json"
    ).read_text()
    # resumable: a second call trains nothing (every trial's metrics.json untouched)
    stamps = {t["run"]: (Path(t["run"]) / "metrics.json").stat().st_mtime_ns for t in trials}
    run(tiny_store, ["din"], 1, out, grid=grid, search=True)
    assert stamps == {t["run"]: (Path(t["run"]) / "metrics.json").stat().st_mtime_ns for t in trials}


def test_a_diverged_trial_is_recorded_never_chosen_and_not_retrained(tiny_store, tmp_path, monkeypatch):
    from r2led.bench import accuracy
    from r2led.train.trainer import TrainingDiverged

    grid = tmp_path / "grid.yaml"
    grid.write_text(SMALL_GRID)
    real, calls = accuracy._train, []

    def train(data, job, seed, run, files, overrides):
        calls.append(job.label)
        if "train.lr=0.02" in job.overrides and "model.dropout=0.1" in job.overrides:
            raise TrainingDiverged("training diverged by epoch 1 (test)")
        return real(data, job, seed, run, files, overrides)

    monkeypatch.setattr(accuracy, "_train", train)
    out = tmp_path / "res"
    run(tiny_store, ["din"], 1, out, grid=grid, search=True)
    trials = json.loads((out / "search.json").read_text())["din"]["trials"]
    diverged = [t for t in trials if t["valid_auc"] is None]
    assert len(diverged) == 2 and all("diverged by epoch 1" in t["diverged"] for t in diverged)
    assert "| 8 | 2 |" in (out / "results.md").read_text()
    chosen = json.loads((out / "search.json").read_text())["din"]["chosen"]
    assert chosen == max((t for t in trials if t["valid_auc"] is not None), key=lambda t: t["valid_auc"])["overrides"]
    calls.clear()
    run(tiny_store, ["din"], 1, out, grid=grid, search=True)
    assert not any(c.startswith("search/") and "dropout=0.1" in c and "lr=0.02" in c for c in calls)


def test_the_declared_grid_gives_every_model_the_same_sixteen_valid_trials():
    from r2led.bench.accuracy import load_grid
    from r2led.config import load_config
    from r2led.models.registry import MODELS

    grid = load_grid()
    assert grid["lr"] == [0.0005, 0.001, 0.002, 0.004]
    assert set(grid["models"]) == set(MODELS)
    for model, entry in grid["models"].items():
        assert len(entry["trials"]) == 16 and len({tuple(t) for t in entry["trials"]}) == 16
        assert entry["why"]
        defaults = load_config(None, [], base={"model": {"name": model}}).model_dump()
        for knob, values in entry["knobs"].items():  # the first value of each knob is the default
            section, key = knob.split(".")
            assert defaults[section][key] == values[0], (model, knob)
        for trial in entry["trials"]:  # every trial is a valid configuration
            load_config(None, trial, base={"model": {"name": model}})


@pytest.mark.parametrize(
    "text, named",
    [
        ("lr: [0.001]\nmodels:\n  din:\n    knobs: {model.dropout: [0.0, 0.1], model.short_len: [30, 50]}\n", "why"),
        ("lr: [0.001]\nmodels:\n  din:\n    why: x\n    knobs: {model.dropout: [0.0, 0.1]}\n", "exactly two knobs"),
        (
            "lr: [0.001]\nmodels:\n  din:\n    why: x\n"
            "    knobs: {model.dropout: [0.0, 0.1, 0.2], model.short_len: [30, 50]}\n",
            "two values",
        ),
        ("models: {}\n", "lr"),
    ],
)
def test_a_grid_that_breaks_the_equal_budget_is_refused(tmp_path, text, named):
    from r2led.bench.accuracy import load_grid

    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_grid(path)


def test_report_only_search_trains_nothing_and_leaves_out_unsearched_models(tiny_store, tmp_path):
    out = tmp_path / "res"
    results = run(tiny_store, ["din", "eta"], 1, out, report_only=True, search=True)
    assert results == {} and not (out / "runs").exists()
    assert json.loads((out / "search.json").read_text()) == {}


def test_the_command_reads_bench_settings_from_files_set_and_options(tiny_store, tmp_path):
    from typer.testing import CliRunner

    from r2led.cli import app

    out = tmp_path / "res"
    (tmp_path / "bench.yaml").write_text("bench: {models: [din], seeds: 5, ablations: false}\ntrain: {lr: 0.02}\n")
    args = ["bench", "accuracy", str(tiny_store.root), "--out", str(out), "--report-only"]
    args += ["--config", str(tmp_path / "bench.yaml"), "--set", "bench.models=din,eta", "--seeds", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "results.json").read_text())["meta"]
    # models from --set over the file, seeds from the option over the file; train.* goes to the runs
    assert meta["models"] == ["din", "eta"] and meta["seeds"] == [0, 1] and meta["search"] is False
    assert meta["defaults"]["din"]["train"]["lr"] == 0.02
