"""`r2led main` (the README's first command) on the tiny store."""

import json

from typer.testing import CliRunner

from r2led.cli import app

FAST = ["train.lr=0.01", "train.batch_size=64", "train.eval_batch_size=256", "train.t_max=64", "train.epochs=1"]


def test_main_job_trains_both_models_and_prints_the_comparison(tiny_store, tmp_path):
    out = tmp_path / "main"
    args = ["main", "--data", str(tiny_store.root), "--out", str(out)]
    for o in FAST:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "r2led" in res.output and "din" in res.output and "test AUC" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"r2led", "din"}
    for metrics in summary["results"].values():
        assert 0.5 < metrics["test"]["auc"] <= 1.0
    assert "| r2led |" in (out / "summary.md").read_text()
    # a second call reuses the finished runs
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "reusing the finished run" in res.output
