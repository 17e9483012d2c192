"""``r2led bench prepare``: store preparation rate and peak memory against the number of rows.

Each size runs in a fresh process (so that its peak resident memory, read from
``resource.getrusage``, is its own) and is measured twice:

- ``synthetic``: generate ``synthetic`` interactions block by block (a lazy frame) and stream
  them into a store: what ``r2led data prepare synthetic`` does;
- ``parquet``: the writer alone, reading the same interactions from a parquet file through
  ``pl.scan_parquet`` (the shape of a user-provided source).

Rows/s is interactions over wall seconds; rows per CPU-second (user + system time of the
process) is also given, since wall time on a shared machine depends on the other load. Writes
``OUT/prepare.json`` and ``OUT/prepare.md``; the stores and the parquet file are deleted after
each size.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from r2led.atomic import write_json_atomic, write_text_atomic


def _child(mode: str, users: int, length: int, items: int, work: Path, chunk_rows: int) -> dict:
    """Runs in the measuring process: one preparation; returns its figures."""
    import polars as pl

    from r2led.data.protocol import Protocol
    from r2led.data.sources.synthetic import load_synthetic
    from r2led.data.store import build_store
    from r2led.data.tables import CanonicalTables

    tables = load_synthetic(users=users, length=length, items=items, lazy=True)
    source = work / "interactions.parquet"
    if mode == "parquet":
        tables = CanonicalTables(tables.name, pl.scan_parquet(source), tables.items, tables.users, tables.source_info)
    t0 = time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    store = build_store(tables, work / f"store-{mode}", Protocol(), force=True, chunk_rows=chunk_rows)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    rows = int(store.manifest["interactions"])
    size = sum(p.stat().st_size for p in store.root.iterdir() if p.is_file())
    return {
        "mode": mode,
        "rows": rows,
        "users": users,
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "cpu_seconds": round(cpu, 2),
        "rows_per_cpu_s": round(rows / max(cpu, 1e-9)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "store_gb": round(size / 1e9, 2),
        "samples": sum(store.manifest["samples"].values()),
    }


def _write_source(users: int, length: int, items: int, path: Path) -> None:
    from r2led.data.sources.synthetic import load_synthetic

    load_synthetic(users=users, length=length, items=items, lazy=True).interactions.sink_parquet(path)


def run_prepare_bench(
    rows: list[int], length: int, items: int, out: str | Path, chunk_rows: int = 1 << 22, modes=("synthetic", "parquet")
) -> list[dict]:
    """Measure every size (``rows`` interactions as ``rows // length`` users) in child processes."""
    from r2led.terminal import console

    out = Path(out)
    work = out / "work"
    results = []
    for n in rows:
        users = max(1, n // length)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            if "parquet" in modes:
                _write_source(users, length, items, work / "interactions.parquet")
            for mode in modes:
                args = [
                    sys.executable,
                    "-m",
                    "r2led.bench.prepare",
                    mode,
                    str(users),
                    str(length),
                    str(items),
                    str(work),
                    str(chunk_rows),
                ]
                done = subprocess.run(args, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"bench prepare {mode} at {n:,} rows failed:\n{done.stderr[-2000:]}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(record)
                console.print(
                    f"{mode:9s} {record['rows']:>13,} rows  {record['seconds']:8.1f} s  "
                    f"{record['rows_per_s'] / 1e6:5.2f}M rows/s  "
                    f"({record['rows_per_cpu_s'] / 1e6:.2f}M per CPU-second)  peak RSS {record['peak_rss_mb']:,} MB"
                )
                shutil.rmtree(work / f"store-{mode}", ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    write_json_atomic(
        out / "prepare.json", {"length": length, "items": items, "chunk_rows": chunk_rows, "results": results}
    )
    lines = [
        "| source | rows | wall s | rows/s | CPU s | rows per CPU-s | peak RSS | store on disk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['rows']:,} | {r['seconds']} | {r['rows_per_s'] / 1e6:.2f}M | {r['cpu_seconds']} | "
            f"{r['rows_per_cpu_s'] / 1e6:.2f}M | {r['peak_rss_mb']:,} MB | {r['store_gb']} GB |"
        )
    write_text_atomic(out / "prepare.md", "\n".join(lines) + "\n")
    return results


if __name__ == "__main__":  # the measuring child: python -m r2led.bench.prepare MODE USERS LENGTH ITEMS WORK CHUNK
    mode, users, length, items, work, chunk = sys.argv[1:7]
    print(json.dumps(_child(mode, int(users), int(length), int(items), Path(work), int(chunk))))
