"""The speed benchmark (tiny runs, limits, reports) and R2LED's shared-history serving path."""

import json
from typing import Literal

import numpy as np
import pytest
import torch

from r2led.bench.speed import (
    FloatTensorSizes,
    bench_model_config,
    draw_candidates,
    peak_allocated,
    request_batch,
    run_speed,
    synthetic_catalogue,
    synthetic_histories,
)
from r2led.config import load_config
from r2led.errors import ConfigError
from r2led.models.din import DIN, DinConfig
from r2led.models.registry import MODELS, build_model
from r2led.models.simhash import SimHash, popcount64

TINY = dict(candidates=8, repeats=2, train_batch=8, items=300, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    report = run_speed([50, 200], ["r2led", "din"], out, **TINY)
    return out, report


def test_tiny_run_writes_every_figure_per_model_and_length(tiny_run):
    out, report = tiny_run
    saved = json.loads((out / "speed.json").read_text())
    assert saved["complete"] and saved["settings"]["lengths"] == [50, 200]
    for name in ("r2led", "din"):
        for t in ("50", "200"):
            e = saved["results"][name][t]
            for key in ("latency_ms_p50", "latency_ms_p95", "train_samples_per_s", "peak_mb", "train_peak_mb"):
                assert e[key] is not None and e[key] > 0, (name, t, key)
            assert e["latency_ms_p95"] >= e["latency_ms_p50"]
            assert e["skipped"] is None and e["latency_repeats"] == 2
    assert saved["results"]["r2led"]["200"]["history_input"] == "shared"
    # the variant without the serving path is timed too, serving only
    variant = saved["results"]["r2led (copied history)"]["200"]
    assert variant["history_input"] == "copied" and variant["latency_ms_p50"] > 0 and variant["train_samples_per_s"] is None
    assert saved["machine"]["torch_threads"] == 2 and saved["machine"]["cpu"]
    assert saved["command"].startswith("r2led bench speed --lengths 50,200 --models r2led,din")


def test_markdown_gives_ratios_to_r2led_and_the_targets(tiny_run):
    out, report = tiny_run
    md = (out / "speed.md").read_text()
    assert "| model | T=50 | T=200 |" in md
    r2led_row = next(line for line in md.splitlines() if line.startswith("| r2led |"))
    assert r2led_row.count("(1.00x)") == 2
    din = report["results"]["din"]["200"]["latency_ms_p50"] / report["results"]["r2led"]["200"]["latency_ms_p50"]
    assert f"({din:.2f}x)" in md
    assert "## Targets" in md and "at most 3x" in md and "torch threads 2" in md and report["date"] in md
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_check_finds_no_history_sized_float_tensor(tiny_run):
    _, report = tiny_run
    rc = report["retrieval_check"]
    assert rc["t"] == 200 and rc["largest_float_elements_retrieval"] < rc["candidates_x_t"]
    check = next(c for c in report["checks"] if "float tensor" in c["target"])
    assert check["passed"] is True


def test_memory_limit_skips_with_a_recorded_reason(tmp_path):
    report = run_speed([50, 200], ["r2led", "din"], tmp_path, memory_limit_gb=1e-7, batch_path_variant=False, **TINY)
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


# ---- R2LED's shared-history serving path --------------------------------------------------
def r2led(cat, **overrides):
    cfg = load_config(None, ["model.name=r2led", *[f"model.{k}={v}" for k, v in overrides.items()]]).model
    torch.manual_seed(0)
    return build_model(cfg, cat.spec, cat.sid).eval()


@pytest.fixture(scope="module")
def cat():
    return synthetic_catalogue(300, seed=0)


SWITCHES = [
    {}, {"rho": 0}, {"rho": 1}, {"rho": 0.5, "k": 7}, {"routes": 1}, {"sid": "off"}, {"k": 1},
    {"disjoint_routes": "true"}, {"disjoint_routes": "true", "rho": 0}, {"disjoint_routes": "true", "rho": 0.5, "k": 7}, {"disjoint_routes": "true", "routes": 2},
]


@pytest.mark.parametrize("overrides", SWITCHES)
@pytest.mark.parametrize(
    "t,absent,structured", [(1, 0, True), (30, 0, True), (400, 0, True), (700, 150, True), (2000, 0, True), (700, 0, False), (60, 60, True)]
)
def test_shared_path_equals_the_batch_path(cat, overrides, t, absent, structured):
    model = r2led(cat, **overrides)
    rng = np.random.default_rng(t + absent)
    hist, _, _, interests = synthetic_histories(cat, 1, t, rng)
    hist = torch.from_numpy(hist[0] if structured else rng.integers(1, 301, t))  # repeats / mostly distinct
    mask = torch.ones(t, dtype=torch.bool)
    mask[:absent] = False  # left padding (absent = t: an empty history)
    hist = hist.masked_fill(~mask, 0)
    target = torch.from_numpy(draw_candidates(cat, interests[0], 23, rng))
    rows = (len(target), t)
    index, taken = model.retrieve_routes(target, hist.repeat(len(target), 1), mask.repeat(len(target), 1))  # batch path
    s_index, s_taken = model.retrieve_routes_shared(target, hist, mask)
    assert torch.equal(taken, s_taken)
    assert torch.equal(index[taken], s_index[s_taken])  # the same behaviours, in the same slots
    if len(target) > 1:  # an expand-ed history takes the shared path by itself
        e_index, e_taken = model.retrieve_routes(target, hist.expand(rows), mask.expand(rows))
        assert torch.equal(e_taken, taken) and torch.equal(e_index[e_taken], index[taken])


def test_shared_path_gives_the_same_scores_and_no_history_sized_float(cat):
    model = r2led(cat)
    t = 640
    rng = np.random.default_rng(0)
    hist, signal, feats, interests = synthetic_histories(cat, 1, t, rng)
    candidates = draw_candidates(cat, interests[0], 40, rng)
    shared = request_batch(hist[0], signal[0], feats[0], candidates, user=0, shared=True)
    copied = request_batch(hist[0], signal[0], feats[0], candidates, user=0, shared=False)
    assert shared.hist_items.stride(0) == 0
    with torch.no_grad():
        assert torch.allclose(model(shared), model(copied), atol=1e-6)
        model.item_signatures()
        with FloatTensorSizes() as sizes:
            model.retrieve_routes(shared.target, shared.hist_items, shared.hist_mask)
    assert sizes.largest < len(candidates) * t  # not even one float per (candidate, behaviour)


def test_bench_config_gives_every_model_the_same_budget():
    assert bench_model_config("r2led").k == 20 and bench_model_config("r2led").dim == 32
    assert bench_model_config("din").short_len == 20
