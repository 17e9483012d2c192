"""bench prepare (rows/s and peak RSS per size) and bench history's table and plot."""

from __future__ import annotations

import json

from r2led.bench.history_curve import curve_table, plot_curve
from r2led.bench.prepare import run_prepare_bench


def test_prepare_bench_measures_each_size_in_its_own_process_and_cleans_up(tmp_path):
    results = run_prepare_bench([12_000], length=100, items=200, out=tmp_path, chunk_rows=5_000)
    assert [r["mode"] for r in results] == ["synthetic", "parquet"]
    a, b = results
    assert a["rows"] == b["rows"] and 6_000 <= a["rows"] <= 18_000  # 120 users x U[50, 150] rows
    assert a["samples"] == b["samples"] == a["rows"] - 5 * 120
    for r in results:
        assert r["peak_rss_mb"] > 50 and r["rows_per_s"] > 0 and r["rows_per_cpu_s"] > 0
    saved = json.loads((tmp_path / "prepare.json").read_text())
    assert saved["results"] == results and saved["chunk_rows"] == 5_000
    assert "| parquet |" in (tmp_path / "prepare.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepare.json", "prepare.md"]  # work files removed


def test_history_curve_table_and_plot(tmp_path):
    record = {
        "t_max": [100, 1000],
        "test_rows": 4500,
        "ceiling": 0.81,
        "oracle": {"100": 0.75, "1000": 0.79},
        "models": {
            "r2led": {"100": {"mean": 0.71, "std": 0.01, "seeds": 2}, "1000": {"mean": 0.72, "std": 0.0, "seeds": 2}},
            "din": {"100": {"mean": 0.69, "std": 0.0, "seeds": 2}},
        },
    }
    table = curve_table(record)
    assert "| r2led | 0.7100 ± 0.0100 | 0.7200 ± 0.0000 |" in table
    assert "| din | 0.6900 ± 0.0000 | — |" in table
    assert "| Bayes ceiling (true probabilities) | 0.8100 | 0.8100 |" in table
    assert "mean ± std over 2 seed(s)" in table
    plot_curve(record, tmp_path / "auc.png")
    assert (tmp_path / "auc.png").read_bytes()[:4] == b"\x89PNG"
