"""The speed benchmark (tiny runs, limits, reports) and R2LED's shared-history serving path."""

import io
import json
from typing import Literal

import numpy as np
import pytest
import torch
from rich.console import Console

from r2led.bench.speed import (
    bench_model_config,
    peak_allocated,
    run_speed,
    synthetic_catalogue,
    synthetic_histories,
)
from r2led.bench.speed_report import print_summary
from r2led.errors import ConfigError
from r2led.models.din import DIN, DinConfig
from r2led.models.registry import MODELS

TINY = dict(candidates=8, repeats=2, train_batch=8, items=300, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    report = run_speed(
        [50, 200], ["r2led", "r2led[mha]", "r2led[lsh]", "din", "sim-hard", "eta"], out, strawman_max_t=50, **TINY
    )
    return out, report


def test_tiny_run_writes_every_figure_per_model_mode_and_length(tiny_run):
    out, report = tiny_run
    saved = json.loads((out / "speed.json").read_text())
    assert saved["complete"] and saved["settings"]["lengths"] == [50, 200]
    for name in ("r2led", "din", "sim-hard", "eta"):
        for t in ("50", "200"):
            e = saved["results"][name][t]
            for key in (
                "latency_ms_p50",
                "latency_ms_p95",
                "cpu_ms_p50",
                "train_samples_per_s",
                "peak_mb",
                "train_peak_mb",
                "state_mb",
            ):
                assert e[key] is not None and e[key] > 0, (name, t, key)
            assert e["latency_ms_p95"] >= e["latency_ms_p50"] and e["mode"] == "warm" and e["append_us"] > 0
            assert e["skipped"] is None and e["latency_repeats"] == 2
            cold = saved["results"][f"{name} (cold)"][t]
            assert cold["mode"] == "cold" and cold["cpu_ms_p50"] > 0 and cold["train_samples_per_s"] is None
    # the kept state grows with T; the strawman runs up to strawman_max_t only, with the reason
    assert saved["results"]["r2led"]["200"]["state_mb"] > saved["results"]["r2led"]["50"]["state_mb"]
    assert saved["results"]["sim-hard (batch path)"]["50"]["cpu_ms_p50"] > 0
    assert "strawman is timed up to T=50" in saved["results"]["sim-hard (batch path)"]["200"]["skipped"]
    assert "din (batch path)" not in saved["results"]
    assert saved["results"]["floor"]["200"]["mode"] == "floor" and saved["results"]["floor"]["200"]["cpu_ms_p50"] > 0
    assert saved["machine"]["torch_threads"] == 1 and saved["machine"]["cpu"]
    assert (
        saved["results"]["floor[mha]"]["200"]["mode"] == "floor"
        and saved["results"]["r2led[mha]"]["200"]["cpu_ms_p50"] > 0
    )
    assert saved["settings"]["model_configs"]["r2led[mha]"]["attention"] == "mha"
    assert "floor[lsh]" not in saved["results"]  # the approximate index serves the default config: its floor
    recall = saved["collaborative_recall"]["r2led[lsh]"]
    assert recall["bands"] == 8 and all(0 < r <= 1 for r in recall["recall"].values())
    assert saved["command"].startswith("r2led bench speed --lengths 50,200 --models r2led,r2led[mha],r2led[lsh],din")
    assert saved["command"].endswith("--threads 1")  # the default: one core per request
    assert "checks" not in saved  # a report grades nothing


def test_markdown_gives_ratios_and_the_headline_without_verdicts(tiny_run):
    out, report = tiny_run
    md = (out / "speed.md").read_text()
    assert "| model | T=50 | T=200 |" in md
    r2led_row = next(line for line in md.splitlines() if line.startswith("| r2led |"))
    assert r2led_row.count("(1.00x)") == 2
    res = report["results"]
    for name, floor_name in (("r2led", "floor"), ("r2led[mha]", "floor[mha]")):
        head = next(line for line in md.splitlines() if line.startswith(f"| 200 | {name} |"))
        ratio = res[name]["200"]["cpu_ms_p50"] / res["sim-hard"]["200"]["cpu_ms_p50"]
        floor = res[name]["200"]["cpu_ms_p50"] / res[floor_name]["200"]["cpu_ms_p50"]
        floor_vs = res[floor_name]["200"]["cpu_ms_p50"] / res["sim-hard"]["200"]["cpu_ms_p50"]
        assert f"| {ratio:.2f}x |" in head and f"| {floor:.2f}x | {floor_vs:.2f}x |" in head
        train = res[name]["50"]["train_samples_per_s"] / res["sim-hard"]["50"]["train_samples_per_s"]
        assert f"{train:.2f}x |" in next(line for line in md.splitlines() if line.startswith(f"| 50 | {name} |"))
    assert "Targets" not in md and "**no**" not in md and "torch threads 1" in md and report["date"] in md
    assert "(batch path)" in md and "**cold**" in md
    terminal = io.StringIO()
    print_summary(report, Console(file=terminal, width=200))
    assert "r2led[mha], T=200:" in terminal.getvalue()  # not eaten as a style tag
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_check_finds_no_history_sized_float_tensor(tiny_run):
    _, report = tiny_run
    rc = report["retrieval_check"]
    assert rc["t"] == 200 and rc["largest_float_elements_retrieval"] < rc["candidates_x_t"]


def test_memory_limit_skips_with_a_recorded_reason(tmp_path):
    report = run_speed([50, 200], ["r2led", "din"], tmp_path, memory_limit_gb=1e-7, **TINY)
    for name in ("r2led", "din"):
        e = report["results"][name]["50"]
        assert e["latency_ms_p50"] is None and e["train_samples_per_s"] is None
        assert "not run: needs ~" in e["skipped"] and "GB limit" in e["skipped"]
    md = (tmp_path / "speed.md").read_text()
    assert "not run (memory)" in md and "not run: needs ~" in md
    assert json.loads((tmp_path / "speed.json").read_text())["results"]["din"]["200"]["skipped"]


def test_time_limit_skips_with_a_recorded_reason(tmp_path):
    report = run_speed([50], ["din"], tmp_path, time_limit_s=1e-9, **TINY)
    assert "s limit" in report["results"]["din"]["50"]["skipped"]


class BrokenConfig(DinConfig):
    name: Literal["broken"] = "broken"


class Broken(DIN):
    """A model that fails on long histories (a stand-in for a baseline with a bug)."""

    config_class = BrokenConfig

    def forward(self, batch):
        if batch.hist_items.shape[1] > 100:
            raise RuntimeError("boom")
        return super().forward(batch)

    def _score_request(self, state, index, candidates):
        if len(state) > 100:
            raise RuntimeError("boom")
        return super()._score_request(state, index, candidates)


def test_a_failing_model_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "broken", f"{__name__}:Broken")
    report = run_speed([50, 200], ["din", "broken"], tmp_path, **TINY)
    assert report["results"]["broken"]["50"]["latency_ms_p50"] > 0
    assert "failed at T=200: RuntimeError: boom" in report["results"]["broken"]["200"]["skipped"]
    assert report["results"]["din"]["200"]["latency_ms_p50"] > 0
    assert "boom" in (tmp_path / "speed.md").read_text()


def test_unknown_model_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="unknown model.*'nope'.*registered: r2led"):
        run_speed([50], ["r2led", "nope"], tmp_path / "out", **TINY)
    assert not (tmp_path / "out").exists()


def test_bad_lengths_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="lengths"):
        run_speed([0, 50], ["din"], tmp_path, **TINY)


def test_peak_allocated_counts_what_a_call_allocates():
    def work():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more, both alive
        del a
        return b.sum()

    _, peak = peak_allocated(work)
    assert 8 * 2**20 <= peak < 9 * 2**20

    def numpy_work():
        a = np.ones(1 << 19)  # 4 MiB in numpy, outside torch's allocator
        return torch.from_numpy(a).sum()

    _, peak = peak_allocated(numpy_work)
    assert 4 * 2**20 <= peak < 5 * 2**20


def test_synthetic_histories_repeat_items_within_few_topics():
    cat = synthetic_catalogue(2000, seed=1)
    assert cat.sid.levels == 3 and cat.spec.n_items == 2000
    hist, signal, feats, interests = synthetic_histories(cat, 4, 3000, np.random.default_rng(0))
    assert hist.shape == signal.shape == (4, 3000) and hist.min() >= 1 and hist.max() <= 2000
    assert signal.min() >= 1 and signal.max() <= 5 and feats.shape == (4, 3)
    top = np.asarray(cat.spec.item_category)[hist] - 1
    in_topics = np.mean([np.isin(top[u], interests[u]).mean() for u in range(4)])
    assert in_topics > 0.85  # mostly the user's own topics (10 % exploration)
    assert len(np.unique(hist[0])) < 3000 // 2  # a long history repeats items


def test_bench_config_gives_every_model_the_same_budget():
    assert bench_model_config("r2led").k == 20 and bench_model_config("r2led").dim == 32
    assert bench_model_config("din").short_len == 20
