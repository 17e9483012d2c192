"""``r2led bench serve``: a load test of the real HTTP service.

For each history length T it starts ``r2led serve BUNDLE`` (its own process or processes, a
fresh SQLite store), gives each client's user a history of T behaviours drawn from the
catalogue (``PUT /users/U/history``), then runs ``clients`` concurrent clients, each on its own
keep-alive connection, that send ``POST /score`` with ``candidates`` random items for
``duration`` seconds, each right after its previous answer.

The clients share one asyncio event loop (uvloop) in this process, and send pre-encoded
requests over raw streams (``_Connection``): per request they cost a fraction of what an httpx
client does, so more of the shared cores is left to the server. Their CPU is reported too.

It reports requests/s, latency percentiles and errors, and the server's CPU time per request,
split in two: the model (the ``model-cpu`` of each answer's ``Server-Timing`` header, measured
by the service around its one model call) and everything else (HTTP, JSON, validation, the
store), which is the server processes' CPU time (psutil, the whole process tree) minus the
model's, and its share of all the machine's cores (on a shared machine, throughput follows
the CPU the server got). The clients run on the same machine and compete for its cores: their
own CPU per request and their share of all cores, and the load average at the end of each run,
are reported beside it.
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

REQUEST_TIMEOUT_S = 30.0  # an answer slower than this counts as an error (and its connection is dropped)


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
    server_cpu_share: float  # the server's CPU as a share of all the machine's cores
    client_cpu_ms_per_req: float  # the load generator's own CPU (this process)
    client_cpu_share: float  # the load generator's CPU as a share of all the machine's cores
    load_average: float  # the 1-minute load average at the end of the run


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


def _start_server(bundle: Path, store: str, workers: int, threads: int, port: int, log):
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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    proc.log = log
    return proc


def stop_server(proc: subprocess.Popen, grace: float) -> None:
    """Stop a server started in its own session (its workers included): SIGTERM to the process
    group, then SIGKILL if it has not exited after ``grace`` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded requests and reads the answers:
    a client far lighter than httpx, so that less of the shared cores goes to the load
    generator. Answers must carry ``Content-Length`` (every answer of ``r2led serve`` does)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def send(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers with lower-case names, body) of one request (bytes on the wire)."""
        if self.writer is None:
            await self.open()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if b"content-length" not in headers:
            raise ConnectionError(f"an answer without Content-Length (status {status})")
        body = await self.reader.readexactly(int(headers[b"content-length"]))
        if headers.get(b"connection") == b"close":
            self.close()
        return status, headers, body


def _post(path: str, body: bytes, host: str) -> bytes:
    """A POST request on the wire."""
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


def _model_cpu_ms(headers: dict[bytes, bytes]) -> float:
    """The ``model-cpu`` duration of a ``Server-Timing`` header, NaN when absent."""
    for part in headers.get(b"server-timing", b"").split(b","):
        name, _, dur = part.strip().partition(b";dur=")
        if name == b"model-cpu":
            return float(dur)
    return float("nan")


async def _drive(
    url: str, proc, item_keys: list[str], history: int, clients: int, candidates: int, duration: float, seed: int
):
    import httpx

    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await _wait_ready(client, url, proc)
        for c in range(clients):  # each client scores its own user
            items = rng.choice(item_keys, history)
            body = {"events": [{"item": k, "signal": 1} for k in items.tolist()]}
            r = await client.put(
                f"/users/load-{c}/history", content=json.dumps(body), headers={"content-type": "application/json"}
            )
            if r.status_code != 200:
                raise R2ledError(f"PUT history answered {r.status_code}: {r.text[:200]}")
    host, port = url.removeprefix("http://").split(":")
    requests = [
        _post(
            "/score",
            json.dumps(
                {"user": f"load-{c % clients}", "candidates": rng.choice(item_keys, candidates).tolist()}
            ).encode(),
            f"{host}:{port}",
        )
        for c in range(clients * 8)
    ]
    connections = [_Connection(host, int(port)) for _ in range(clients)]
    for c, conn in enumerate(connections):  # open every connection and warm every user's cache entry
        status, _, body = await conn.send(requests[c])
        if status != 200:
            raise R2ledError(f"POST /score answered {status}: {body[:200].decode(errors='replace')}")

    latencies: list[float] = []
    model_cpu: list[float] = []
    errors = 0
    cpu0, own0, t0 = _server_cpu(proc), time.process_time(), time.perf_counter()
    stop = t0 + duration

    async def one_client(c: int):
        nonlocal errors
        n, conn = 0, connections[c]
        while time.perf_counter() < stop:
            request = requests[c + clients * (n % 8)]
            n += 1
            start = time.perf_counter()
            try:
                # a stalled answer is an error, not a hang of the whole run (a timeout scope: no
                # task per request, as wait_for creates on Python 3.11)
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, headers, _ = await conn.send(request)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                errors += 1
                conn.close()  # the next request opens a new connection
                continue
            if status != 200:  # an error is counted, never timed as a served request
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            model_cpu.append(_model_cpu_ms(headers))

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    elapsed, cpu, own = time.perf_counter() - t0, _server_cpu(proc) - cpu0, time.process_time() - own0
    for conn in connections:
        conn.close()
    return latencies, model_cpu, errors, elapsed, cpu, own


def _run(coro):
    """``asyncio.run`` on uvloop where it is installed (a cheaper event loop for the clients)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_serve_load(
    bundle: str | Path,
    histories: list[int],
    clients: int = 32,
    duration: float = 30.0,
    candidates: int = 100,
    workers: int | list[int] = 1,
    threads: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
) -> list[LoadResult]:
    """Load-test ``bundle`` at each history length, for each number of workers in turn (see the
    module docstring); writes ``serve_load.json`` to ``out`` when given."""
    from r2led.serve.bundle_load import read_manifest

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    import polars as pl

    item_keys = pl.read_parquet(bundle / "items.parquet")["key"].cast(str).to_list()
    t_max = int(manifest["t_max"])
    too_long = [t for t in histories if t > t_max]
    if too_long:
        raise R2ledError(
            f"--history {too_long[0]} is longer than the bundle's t_max of {t_max}; "
            "the service keeps at most t_max behaviours"
        )
    results = [
        _load_run(bundle, item_keys, history, clients, candidates, n, threads, duration, seed)
        for n in ([workers] if isinstance(workers, int) else workers)
        for history in histories
    ]
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


def _load_run(
    bundle: Path,
    item_keys: list[str],
    history: int,
    clients: int,
    candidates: int,
    workers: int,
    threads: int,
    duration: float,
    seed: int,
) -> LoadResult:
    """One run: a fresh service with ``workers`` workers and a fresh store, loaded at history T."""
    with tempfile.TemporaryDirectory(prefix="r2led-load-") as tmp, tempfile.TemporaryFile() as log:
        port = _free_port()
        proc = _start_server(bundle, str(Path(tmp) / "h.db"), workers, threads, port, log)
        try:
            lat, model_cpu, errors, elapsed, cpu, own = _run(
                _drive(f"http://127.0.0.1:{port}", proc, item_keys, history, clients, candidates, duration, seed)
            )
        finally:
            stop_server(proc, grace=30)
    n = len(lat)
    ms = np.asarray(lat) * 1000
    server_ms = cpu * 1000 / max(n, 1)
    model_ms = float(np.nanmean(model_cpu)) if model_cpu else float("nan")
    return LoadResult(
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
        round(cpu / (elapsed * (os.cpu_count() or 1)), 3),
        round(own * 1000 / max(n, 1), 3),
        round(own / (elapsed * (os.cpu_count() or 1)), 3),
        round(os.getloadavg()[0], 2),
    )
