"""``r2led bench train-scale``: training throughput and peak memory against ``train.t_max``.

Each (model, T) is one short ``r2led train`` run in its own process (its peak resident memory
is that process's own, from ``os.wait4``): ``max_train`` training samples, then valid and test
on their first ``max_eval`` samples with the configured evaluation batch. Writes
``OUT/train_scale.json`` and ``OUT/train_scale.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from r2led.atomic import write_json_atomic, write_text_atomic


def _run(args: list[str]) -> tuple[int, float, float]:
    """Run ``args``; (exit code, wall seconds, peak RSS in MB of that process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... failed ({proc.returncode}):\n{err[-2000:]}")
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def run_train_scale(
    data: str | Path,
    models: list[str],
    t_maxes: list[int],
    out: str | Path,
    max_train: int = 4096,
    max_eval: int = 2048,
    overrides: list[str] | None = None,
) -> list[dict]:
    from r2led.cli.common import console

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for t in t_maxes:  # interleaved: every model at one T before the next T
        for model in models:
            run = out / "runs" / f"{model}-t{t}"
            shutil.rmtree(run, ignore_errors=True)
            args = [
                sys.executable,
                "-m",
                "r2led",
                "train",
                str(data),
                "--model",
                model,
                "--out",
                str(run),
                "--set",
                f"train.t_max={t}",
                "--set",
                "train.epochs=1",
                "--set",
                "train.evals_per_epoch=1",
                "--set",
                f"train.max_train_samples={max_train}",
                "--set",
                f"train.max_eval_samples={max_eval}",
                *[x for o in overrides or [] for x in ("--set", o)],
            ]
            _, wall, rss = _run(args)
            m = json.loads((run / "metrics.json").read_text())
            record = {
                "model": model,
                "t_max": t,
                "train_samples_per_s": m["train_samples_per_s"],
                "eval_samples_per_s": m["eval_samples_per_s"],
                "peak_rss_mb": round(rss),
                "wall_s": round(wall, 1),
            }
            results.append(record)
            console.print(
                f"{model:9s} T={t:>6}  train {record['train_samples_per_s']:>8,.0f} samples/s  "
                f"eval {record['eval_samples_per_s']:>8,.0f} samples/s  peak RSS {record['peak_rss_mb']:,} MB"
            )
    write_json_atomic(
        out / "train_scale.json",
        {
            "data": str(Path(data).resolve()),
            "max_train": max_train,
            "max_eval": max_eval,
            "overrides": list(overrides or []),
            "results": results,
        },
    )
    lines = ["| model | T_max | train samples/s | eval samples/s | peak RSS |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['t_max']:,} | {r['train_samples_per_s']:,.0f} | {r['eval_samples_per_s']:,.0f} | {r['peak_rss_mb']:,} MB |"
        )
    write_text_atomic(out / "train_scale.md", "\n".join(lines) + "\n")
    return results
