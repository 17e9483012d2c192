"""The memory guard: absurd settings are refused with the estimate, fast, before allocating."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import r2led.train.trainer as trainer_module
from r2led.cli import app
from r2led.config import load_config
from r2led.data.sources import load_source
from r2led.data.store import build_store
from r2led.errors import ConfigError
from r2led.train.memory import available_memory, check_memory, estimate_memory, parse_size


@pytest.fixture(scope="module")
def long_store(tmp_path_factory):
    """40 users with about 1,500 behaviours each: histories long enough for t_max to matter."""
    root = tmp_path_factory.mktemp("memory") / "long"
    return build_store(load_source("synthetic", users=40, length=1500, items=300, seed=0), root)


@pytest.fixture
def no_allocation(monkeypatch):
    """Building a model fails the test: a refusal must come before any allocation."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was built before the memory check refused the run")

    monkeypatch.setattr(trainer_module, "build_model", forbidden)


def train(store, tmp_path, *args):
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["train", str(store.root), "--out", str(tmp_path / "run"), *args])
    return res, time.perf_counter() - t0


def assert_refused_with_estimate(res, seconds, tmp_path, knob):
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in res.output
    assert line.startswith("error: this run needs about ") and " GB" in line and knob in line, line
    assert seconds < 20
    assert not (tmp_path / "run").exists()


def test_the_issue_k_is_refused_with_the_estimate(tiny_store, tmp_path, no_allocation):
    """``--set model.k=100000`` was killed by the kernel at 23.7 GB; now it is one line."""
    res, seconds = train(tiny_store, tmp_path, "--set", "model.k=100000")
    assert_refused_with_estimate(res, seconds, tmp_path, "model.k")


def test_absurd_dim_is_refused(tiny_store, tmp_path, no_allocation):
    res, seconds = train(tiny_store, tmp_path, "--set", "model.dim=8192", "--max-memory", "4GB")
    assert_refused_with_estimate(res, seconds, tmp_path, "model.dim")


def test_absurd_batch_size_is_refused(long_store, tmp_path, no_allocation):
    res, seconds = train(
        long_store, tmp_path, "--model", "din", "--set", "train.batch_size=50000", "--max-memory", "2GB"
    )
    assert_refused_with_estimate(res, seconds, tmp_path, "train.batch_size")


def test_absurd_t_max_is_refused_and_a_short_one_fits(long_store, tmp_path, no_allocation):
    res, seconds = train(
        long_store, tmp_path, "--model", "din-long", "--set", "train.t_max=100000", "--max-memory", "1GB"
    )
    assert_refused_with_estimate(res, seconds, tmp_path, "train.t_max")
    short = load_config(None, ["train.t_max=50"], base={"model": {"name": "din-long"}})
    assert check_memory(short, long_store.manifest, max_memory="1GB").total < 1e9


def test_max_memory_lets_a_refused_run_through(tiny_store):
    cfg = load_config(None, ["model.k=100000"])
    with pytest.raises(ConfigError, match="pass --max-memory"):
        check_memory(cfg, tiny_store.manifest, [5, 13, 61], max_memory="1GB")
    est = estimate_memory(cfg, tiny_store.manifest, [5, 13, 61])
    assert check_memory(cfg, tiny_store.manifest, [5, 13, 61], max_memory=est.total + 1) == est


def test_the_estimate_scales_with_batch_history_k_and_dim(long_store):
    man = long_store.manifest
    longest = max(h["max"] for h in man["history"].values())

    def est(*overrides, name="din-long"):
        return estimate_memory(load_config(None, list(overrides), base={"model": {"name": name}}), man)

    a, b = est("train.batch_size=100"), est("train.batch_size=200")
    assert b.train_step == pytest.approx(2 * a.train_step, rel=1e-6)
    # t_max beyond the longest history in the store costs nothing more
    assert est("train.t_max=100000").length == longest == est(f"train.t_max={longest}").length
    assert est("train.t_max=100").length == 100
    k1, k2 = est("model.k=100", name="sim-hard"), est("model.k=200", name="sim-hard")
    assert k2.slots - k1.slots == 100 and k2.train_step > k1.train_step
    d1, d2 = est("model.dim=32"), est("model.dim=64")
    assert d2.model > 1.9 * d1.model and d2.train_step > d1.train_step
    # batches never exceed the train split
    assert est("train.batch_size=1000000").batch == man["samples"]["train"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GB", 8_000_000_000),
        ("512MiB", 512 * 2**20),
        ("1.5g", 1_500_000_000),
        ("2e9", 2_000_000_000),
        ("4096", 4096),
        (3e9, 3_000_000_000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "-1GB", "0", "nan", "inf"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ConfigError, match="--max-memory"):
        parse_size(text)


def test_available_memory_is_a_positive_part_of_the_machine():
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < available_memory() <= total


FAULT_LOOP = """
import ctypes, resource, sys, torch
from r2led.train.memory import tune_allocator
if sys.argv[1] == "tuned":
    applied = tune_allocator()
else:  # glibc's starting point, pinned (its threshold otherwise moves with what was freed before)
    applied = ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
x = torch.randn(512, 60, 64)  # an activation buffer of an R2LED step (7.5 MB, 1,920 pages)
def step():
    kept = [x * 2.0 for _ in range(6)]  # a step's activations: kept for backward, then freed together
    del kept
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", FAULT_LOOP, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied, int(faults)

    applied, tuned = run("tuned")
    _, default = run("default")
    assert applied == "True"
    assert default > 10 * 6 * 1500  # glibc's initial threshold: every buffer of every step faulted in again
    # tuned: the freed heap is reused (0 faults in most runs; up to 7 of the 60 buffers were seen
    # faulted in when the heap grew once more after the warm-up)
    assert tuned < default / 4
