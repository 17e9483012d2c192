"""``r2led bench serve``: a load test of the real HTTP service.

For each history length T it starts ``r2led serve BUNDLE`` (its own process or processes, a
fresh SQLite store), gives each client's user a history of T behaviours drawn from the
catalogue (``PUT /users/U/history``), then runs ``clients`` concurrent asyncio clients
(httpx, one connection each) that send ``POST /score`` with ``candidates`` random items for
``duration`` seconds, each right after its previous answer.

It reports requests/s, latency percentiles and errors, and the server's CPU time per request,
split in two: the model (the ``model-cpu`` of each answer's ``Server-Timing`` header, measured
by the service around its one model call) and everything else (HTTP, JSON, validation, the
store), which is the server processes' CPU time (psutil, the whole process tree) minus the
model's. The clients run on the same machine and compete for its cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from r2led.errors import R2ledError


@dataclass
class LoadResult:
    """One load-test run at one history length."""

    history: int
    workers: int
    clients: int
    candidates: int
    duration_s: float
    requests: int
    errors: int
    req_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cpu_ms_per_req: float
    model_cpu_ms_per_req: float
    other_cpu_ms_per_req: float  # HTTP + JSON + validation + store


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cpu(proc) -> float:
    """User + system CPU seconds of a process and all its children."""
    import psutil

    total = 0.0
    try:
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def _start_server(bundle: Path, store: str, workers: int, threads: int, port: int):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    script = Path(sys.executable).parent / "r2led"
    cmd = [
        str(script) if script.is_file() else "r2led",
        "serve",
        str(bundle),
        "--store",
        store,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--max-body-bytes",
        str(64 << 20),
    ]
    # stderr goes to a file, not a pipe: a pipe nobody reads fills up under load and stalls the server
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    proc.log = log
    return proc


def _server_log(proc) -> str:
    """The last 500 characters the server wrote to stderr."""
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")[-500:]


async def _wait_ready(client, url: str, proc, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise R2ledError(f"r2led serve exited with {proc.returncode}: {_server_log(proc)}")
        try:
            if (await client.get(url + "/health", timeout=2)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.3)
    raise R2ledError(f"r2led serve did not answer /health within {timeout:.0f} s")


async def _drive(
    url: str, proc, item_keys: list[str], history: int, clients: int, candidates: int, duration: float, seed: int
):
    import httpx

    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        await _wait_ready(client, url, proc)
        for c in range(clients):  # each client scores its own user
            items = rng.choice(item_keys, history)
            body = {"events": [{"item": k, "signal": 1} for k in items.tolist()]}
            r = await client.put(
                f"/users/load-{c}/history", content=json.dumps(body), headers={"content-type": "application/json"}
            )
            if r.status_code != 200:
                raise R2ledError(f"PUT history answered {r.status_code}: {r.text[:200]}")
        requests = [
            json.dumps({"user": f"load-{c % clients}", "candidates": rng.choice(item_keys, candidates).tolist()})
            for c in range(clients * 8)
        ]
        for c in range(clients):  # warm every user's cache entry
            await client.post("/score", content=requests[c], headers={"content-type": "application/json"})

        latencies: list[float] = []
        model_cpu: list[float] = []
        errors = 0
        cpu0, t0 = _server_cpu(proc), time.perf_counter()
        stop = t0 + duration

        async def one_client(c: int):
            nonlocal errors
            n = 0
            while time.perf_counter() < stop:
                body = requests[c + clients * (n % 8)]
                n += 1
                start = time.perf_counter()
                try:
                    r = await client.post("/score", content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError:
                    errors += 1
                    continue
                if r.status_code != 200:  # an error is counted, never timed as a served request
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                timing = dict(
                    part.strip().split(";dur=")
                    for part in r.headers.get("server-timing", "").split(",")
                    if ";dur=" in part
                )
                model_cpu.append(float(timing.get("model-cpu", "nan")))

        await asyncio.gather(*(one_client(c) for c in range(clients)))
        elapsed, cpu = time.perf_counter() - t0, _server_cpu(proc) - cpu0
    return latencies, model_cpu, errors, elapsed, cpu


def run_serve_load(
    bundle: str | Path,
    histories: list[int],
    clients: int = 32,
    duration: float = 30.0,
    candidates: int = 100,
    workers: int = 1,
    threads: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
) -> list[LoadResult]:
    """Load-test ``bundle`` at each history length (see the module docstring); writes
    ``serve_load.json`` to ``out`` when given."""
    from r2led.serve.bundle_load import read_manifest

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    import polars as pl

    item_keys = pl.read_parquet(bundle / "items.parquet")["key"].cast(str).to_list()
    t_max = int(manifest["t_max"])
    too_long = [t for t in histories if t > t_max]
    if too_long:
        raise R2ledError(
            f"--history {too_long[0]} is longer than the bundle's t_max of {t_max}; the service keeps at most t_max behaviours"
        )
    results = []
    for history in histories:
        with tempfile.TemporaryDirectory(prefix="r2led-load-") as tmp:
            port = _free_port()
            proc = _start_server(bundle, str(Path(tmp) / "h.db"), workers, threads, port)
            try:
                lat, model_cpu, errors, elapsed, cpu = asyncio.run(
                    _drive(f"http://127.0.0.1:{port}", proc, item_keys, history, clients, candidates, duration, seed)
                )
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        n = len(lat)
        ms = np.asarray(lat) * 1000
        server_ms = cpu * 1000 / max(n, 1)
        model_ms = float(np.nanmean(model_cpu)) if model_cpu else float("nan")
        results.append(
            LoadResult(
                history,
                workers,
                clients,
                candidates,
                round(elapsed, 2),
                n,
                errors,
                round(n / elapsed, 1),
                *(round(float(np.percentile(ms, q)), 2) if n else float("nan") for q in (50, 95, 99)),
                round(server_ms, 3),
                round(model_ms, 3),
                round(server_ms - model_ms, 3),
            )
        )
    if out is not None:
        from r2led.atomic import write_json_atomic

        write_json_atomic(
            Path(out) / "serve_load.json",
            {
                "bundle": str(bundle.resolve()),
                "model": manifest["model"],
                "cpus": os.cpu_count(),
                "results": [asdict(r) for r in results],
            },
        )
    return results
