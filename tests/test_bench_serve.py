"""`r2led bench serve` drives a real service process and splits its CPU time."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from r2led.bench.serve_load import run_serve_load
from r2led.cli import app as cli_app
from r2led.serve import export_run
from test_serve import train


@pytest.fixture(scope="module")
def bundle(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    train(tiny_store, root / "run", "r2led")
    return export_run(root / "run", root / "bundle")


def test_load_test_measures_a_live_service(bundle, tmp_path):
    results = run_serve_load(bundle, [50], clients=3, duration=2.0, candidates=20, out=tmp_path)
    (r,) = results
    assert r.history == 50 and r.errors == 0 and r.requests >= 3
    assert r.req_per_s == pytest.approx(r.requests / r.duration_s, rel=0.01)
    assert 0 < r.p50_ms <= r.p95_ms <= r.p99_ms
    # the server did the model's work and more: the split adds up, both parts positive
    assert 0 < r.model_cpu_ms_per_req < r.server_cpu_ms_per_req
    assert r.other_cpu_ms_per_req == pytest.approx(r.server_cpu_ms_per_req - r.model_cpu_ms_per_req, abs=2e-3)
    # the clients' own CPU is measured too, and it is a share of the machine's cores
    assert r.client_cpu_ms_per_req > 0 and 0 < r.client_cpu_share < 1 and r.load_average >= 0
    assert r.server_cpu_share == pytest.approx(
        r.server_cpu_ms_per_req * r.requests / 1000 / (r.duration_s * os.cpu_count()), rel=0.05, abs=2e-3
    )
    assert r.client_cpu_share == pytest.approx(
        r.client_cpu_ms_per_req * r.requests / 1000 / (r.duration_s * os.cpu_count()), rel=0.05, abs=2e-3
    )
    saved = json.loads((tmp_path / "serve_load.json").read_text())
    assert saved["results"][0]["requests"] == r.requests and saved["model"] == "r2led"


def test_a_history_longer_than_t_max_is_refused(bundle):
    res = CliRunner().invoke(cli_app, ["bench", "serve", str(bundle), "--history", "5000", "--duration", "1"])
    assert res.exit_code == 2 and "longer than the bundle's t_max of 1024" in res.output


def test_the_command_runs_each_worker_count_and_prints_the_split(bundle, tmp_path):
    args = ["bench", "serve", str(bundle), "--history", "20", "--duration", "1", "--clients", "2"]
    res = CliRunner().invoke(cli_app, [*args, "--candidates", "5", "--workers", "1,2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "serve_load.json").read_text())["results"]
    assert [(r["workers"], r["history"], r["errors"]) for r in saved] == [(1, 20, 0), (2, 20, 0)]
    assert "client" in res.output and "other" in res.output
    for bad in ("0", "1,x", "65"):
        res = CliRunner().invoke(cli_app, [*args, "--workers", bad])
        assert res.exit_code == 2 and "--workers" in res.output, bad
    for bad in ("abc", "-5", ","):
        res = CliRunner().invoke(cli_app, [*args[:3], "--history", bad])
        assert res.exit_code == 2 and "--history" in res.output, bad
