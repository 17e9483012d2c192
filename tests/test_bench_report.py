"""The accuracy report: published JSON -> markdown, with user-clustered intervals that agree."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fast_training import FAST
from r2led.bench.accuracy import run_accuracy
from r2led.bench.report import load_results, render, usable_intervals, write_report
from r2led.bench.significance import UserBootstrap, percentile_ci
from r2led.cli import app
from r2led.config import BenchConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    out, pub = root / "out", root / "pub"
    bench = BenchConfig(models=["r2led", "din", "avgpool"], seeds=2, ablations=False, replicates=300)
    run_accuracy(tiny_store.root, bench, out, overrides=FAST, publish=pub)
    return tiny_store, out, pub


def table_rows(md: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table under ``## heading``."""
    block = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in block.splitlines()
        if line.startswith("| ") and not line.startswith("| model")
    ]


def test_published_records_are_small_and_fingerprint_the_predictions(bench):
    _, out, pub = bench
    files = sorted((pub / "runs").glob("*/seed*.json"))
    assert [f"{f.parent.name}/{f.name}" for f in files] == [
        f"{m}/seed{s}.json" for m in ("avgpool", "din", "r2led") for s in (0, 1)
    ]
    for f in files:
        r = json.loads(f.read_text())
        assert f.stat().st_size < 20_000 and "pred" not in json.dumps(r["metrics"])
        pred = Path(r["run"]) / "test_pred.npy"
        assert r["test_pred_sha256"] == hashlib.sha256(pred.read_bytes()).hexdigest()
        assert r["settings"]["model"]["name"] == r["model"] and r["settings"]["train"]["seed"] == r["seed"]
        assert r["metrics"] == {
            **r["metrics"],
            **{k: json.loads((Path(r["run"]) / "metrics.json").read_text())[k] for k in ("valid", "test")},
        }
    assert json.loads((pub / "benchmark.json").read_text())["meta"]["models"] == ["r2led", "din", "avgpool"]


def test_markdown_agrees_with_the_json(bench):
    store, out, pub = bench
    md = (out / "results.md").read_text()
    _, rows = load_results(pub)
    every = table_rows(md, "Every run")
    expected = [
        [
            n,
            str(r["seed"]),
            r["metrics"]["valid"]["auc"],
            r["metrics"]["test"]["auc"],
            r["metrics"]["test"]["logloss"],
            r["metrics"]["test"]["gauc"],
        ]
        for n, row in rows.items()
        for r in row["seeds"]
    ]
    assert len(every) == len(expected) == 6
    for cells, exp in zip(every, expected, strict=False):
        assert cells[:2] == exp[:2]
        assert [float(c) for c in cells[3:7]] == [round(v, 4) for v in exp[2:]]
    main = {cells[0]: cells for cells in table_rows(md, "Models")}
    assert list(main) == ["r2led", "din", "avgpool"]
    intervals = json.loads((pub / "intervals.json").read_text())
    for name, row in rows.items():
        test_auc = np.array([r["metrics"]["test"]["auc"] for r in row["seeds"]])
        assert main[name][1] == "2"
        assert main[name][3] == f"{test_auc.mean():.4f} ± {test_auc.std(ddof=1):.4f}"
        lo, hi = intervals["rows"][name]["auc_ci"]
        assert main[name][4] == f"[{lo:.4f}, {hi:.4f}]"
    for name in ("din", "avgpool"):
        e = intervals["rows"][name]
        assert main[name][6] == f"[{e['diff_ci'][0]:.4f}, {e['diff_ci'][1]:.4f}]"
        verdict = "R2LED ahead" if e["diff_ci"][0] > 0 else "row ahead" if e["diff_ci"][1] < 0 else "not separable"
        assert main[name][7] == verdict
        claim = {
            "R2LED ahead": "R2LED is ahead of",
            "not separable": "Not separable from R2LED",
            "row ahead": "Ahead of R2LED",
        }[verdict]
        assert re.search(rf"- {claim}: [^\n]*\b{name}\b", md)


def test_intervals_are_the_bootstrap_of_the_saved_predictions(bench):
    store, out, pub = bench
    intervals = json.loads((pub / "intervals.json").read_text())
    assert (intervals["replicates"], intervals["seed"]) == (300, 0)
    s = store.sample_arrays
    test = store.split_indices("test")
    boot = UserBootstrap(s["label"][test], s["user"][test], replicates=300, seed=0)
    preds = {
        m: [np.load(out / "runs" / m / f"seed{k}" / "test_pred.npy").astype(np.float64) for k in (0, 1)]
        for m in ("r2led", "din")
    }
    ref = np.mean([boot.auc(p) for p in preds["r2led"]], axis=0)
    din = np.mean([boot.auc(p) for p in preds["din"]], axis=0)
    assert intervals["rows"]["din"]["auc_ci"] == pytest.approx(list(percentile_ci(din)), abs=1e-12)
    assert intervals["rows"]["din"]["diff_ci"] == pytest.approx(list(percentile_ci(ref - din)), abs=1e-12)
    assert intervals["rows"]["r2led"]["auc_ci"] == pytest.approx(list(percentile_ci(ref)), abs=1e-12)
    assert len(intervals["rows"]["din"]["delong_p"]) == 2


def test_report_regenerates_from_the_json_alone_and_refuses_stale_intervals(bench, tmp_path):
    store, out, pub = bench
    copy = tmp_path / "results"
    shutil.copytree(pub, copy)
    runs = tmp_path / "runs_moved"
    shutil.move(out / "runs", runs)  # no predictions anywhere now
    try:
        md = write_report(copy, data=store.root)
        assert md == tmp_path / "results.md"
        assert md.read_text() == (out / "results.md").read_text()
        # a run whose predictions changed: its recorded interval no longer applies
        f = copy / "runs" / "din" / "seed1.json"
        r = json.loads(f.read_text())
        r["test_pred_sha256"] = "0" * 64
        f.write_text(json.dumps(r))
        text = write_report(copy, data=store.root).read_text()
        din = {c[0]: c for c in table_rows(text, "Models")}["din"]
        assert din[4] == din[6] == din[7] == "—"
        assert "No interval (predictions not available when the report was made): din." in text
    finally:
        shutil.move(runs, out / "runs")


def test_cli_report_writes_the_markdown_and_names_a_folder_without_results(bench, tmp_path):
    _, out, pub = bench
    res = CliRunner().invoke(app, ["bench", "report", str(pub), "--markdown", str(tmp_path / "r.md")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.md").read_text() == (out / "results.md").read_text()
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["bench", "report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "benchmark.json" in res.output


def test_the_repository_results_folder_and_results_page_agree():
    """docs/results/ holds only measured runs; docs/results.md is their report, or, while the
    folder has no runs yet, the previous benchmark marked as superseded."""
    folder = REPO / "docs" / "results"
    page = (REPO / "docs" / "results.md").read_text()
    if list((folder / "runs").glob("*/seed*.json")):
        benchmark, rows = load_results(folder)
        recorded = json.loads((folder / "intervals.json").read_text()) if (folder / "intervals.json").is_file() else {}
        replicates, seed = recorded.get("replicates", 1000), recorded.get("seed", 0)
        assert page == render(benchmark, rows, usable_intervals(recorded, rows, replicates, seed), replicates, seed)
        every = table_rows(page, "Every run")
        assert len(every) == sum(len(r["seeds"]) for r in rows.values())
        for cells, (name, r) in zip(every, [(n, r) for n, row in rows.items() for r in row["seeds"]], strict=False):
            assert cells[0] == name and float(cells[4]) == round(r["metrics"]["test"]["auc"], 4)
    else:
        assert (folder / "README.md").is_file()
        assert page.startswith("> **Superseded, pending the rerun") and "docs/results/" in page.split("\n\n", 1)[0]


def test_publish_keeps_only_the_current_benchmark_runs(tmp_path):
    from r2led.bench.report import publish

    def rec(label: str, seed: int) -> dict:
        return {"label": label, "seed": seed}

    publish(tmp_path, {}, None, None, [rec("a", 0), rec("a", 1), rec("b c", 0)])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("runs/*/*.json")) == [
        "runs/a/seed0.json",
        "runs/a/seed1.json",
        "runs/b_c/seed0.json",
    ]
    publish(tmp_path, {}, None, None, [rec("a", 0)])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("runs/*/*.json")) == ["runs/a/seed0.json"]
    assert not (tmp_path / "runs" / "b_c").exists()
