"""bench prepare (rows/s and peak RSS per size), bench history's table and plot, bench train-speed."""

from __future__ import annotations

import json

import pytest

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


def test_train_speed_times_every_model_on_the_same_batches(tiny_store, tmp_path):
    from r2led.bench.train_scale import run_train_speed

    settings = ["train.batch_size=64", "train.t_max=64", "model.dim=16", "model.k=5"]
    lines = []
    rows = run_train_speed(
        tiny_store.root,
        ["r2led", "r2led:attention=mha+short_len=5", "sim-hard"],
        [1, 2],
        tmp_path / "speed",
        steps=4,
        warmup=1,
        block=2,
        overrides=settings,
        echo=lines.append,
    )
    assert [(r.model, r.threads) for r in rows] == [
        (m, t) for t in (1, 2) for m in ("r2led", "r2led:attention=mha+short_len=5", "sim-hard")
    ]
    assert len({r.samples for r in rows}) == 1 and rows[0].samples == 4 * 64  # the same 4 full batches
    for r in rows:
        assert r.samples_per_s == pytest.approx(r.samples / r.seconds, rel=1e-3)
        assert r.ms_per_step == pytest.approx(1000 * r.seconds / 4, abs=0.01)  # rounded to 0.01
        reference = next(x for x in rows if x.model == "sim-hard" and x.threads == r.threads)
        assert r.ratio == pytest.approx(r.samples_per_s / reference.samples_per_s, abs=2e-3)
    assert len(lines) == 6 and "(1.00x sim-hard)" in lines[2]
    saved = json.loads((tmp_path / "speed" / "train_speed.json").read_text())
    assert saved["results"][1]["model"] == "r2led:attention=mha+short_len=5" and saved["batch_size"] == 64
    assert (tmp_path / "speed" / "train_speed.md").read_text().count("| r2led |") == 2


@pytest.mark.parametrize(
    "models,reference,message",
    [
        (["r2led", "din"], "sim-hard", "--reference 'sim-hard' is not one of --models"),
        (["r2led:attention"], None, "--models: 'r2led:attention' is not NAME or NAME:key=value"),
        (["r2led:colour=red"], None, "colour"),
    ],
)
def test_train_speed_refuses_bad_models_by_name(tiny_store, tmp_path, models, reference, message):
    from r2led.bench.train_scale import run_train_speed
    from r2led.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_train_speed(tiny_store.root, models, [1], tmp_path / "x", steps=1, block=1, reference=reference)
    assert not (tmp_path / "x").exists()
