"""`r2led bench serve` drives a real service process and splits its CPU time."""

from __future__ import annotations

import json

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
    saved = json.loads((tmp_path / "serve_load.json").read_text())
    assert saved["results"][0]["requests"] == r.requests and saved["model"] == "r2led"


def test_a_history_longer_than_t_max_is_refused(bundle):
    res = CliRunner().invoke(cli_app, ["bench", "serve", str(bundle), "--history", "5000", "--duration", "1"])
    assert res.exit_code == 2 and "longer than the bundle's t_max of 1024" in res.output
