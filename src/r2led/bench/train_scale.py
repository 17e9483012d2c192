"""Training throughput: ``r2led bench train-speed`` (every model on the same batches, in one
process) and ``r2led bench train-scale`` (throughput and peak memory against ``train.t_max``).

``train-speed``: every model trains on the same batches of a prepared store (the trainer's own
order: shuffled, bucketed by length, ``train.batch_size`` rows), one ``trainer.train_step``
each (batch building, forward, loss, backward, optimiser), interleaved in blocks of steps so
that the machine's state is shared fairly, at each thread count in turn. It reports samples/s,
ms per step, minor page faults per step and each model's ratio to a reference model's samples/s
at the same thread count. Writes ``OUT/train_speed.json`` and ``OUT/train_speed.md``.

``train-scale``: each (model, T) is one short ``r2led train`` run in its own process (its peak
resident memory is that process's own, from ``os.wait4``): ``max_train`` training samples,
then valid and test on their first ``max_eval`` samples with the configured evaluation batch.
Writes ``OUT/train_scale.json`` and ``OUT/train_scale.md``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from r2led.atomic import write_json_atomic, write_text_atomic
from r2led.errors import ConfigError

Echo = Callable[[str], None]


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
    from r2led.terminal import console

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
            f"| {r['model']} | {r['t_max']:,} | {r['train_samples_per_s']:,.0f} | "
            f"{r['eval_samples_per_s']:,.0f} | {r['peak_rss_mb']:,} MB |"
        )
    write_text_atomic(out / "train_scale.md", "\n".join(lines) + "\n")
    return results


# ---- train-speed: every model on the same batches, one process ---------------------------------
@dataclass
class SpeedRow:
    """One model at one thread count."""

    model: str  # the label: a model name, or ``name:key=value+key=value`` for a variant
    threads: int
    steps: int
    samples: int
    seconds: float
    samples_per_s: float
    ms_per_step: float
    page_faults_per_step: float  # minor faults (ru_minflt) during its steps, per step
    ratio: float | None  # samples/s over the reference model's at the same threads


def parse_model_spec(spec: str) -> tuple[str, list[str]]:
    """``"r2led:attention=mha+k=30"`` -> ("r2led", ["model.attention=mha", "model.k=30"])."""
    name, _, variant = spec.partition(":")
    overrides = [f"model.{kv}" for kv in variant.split("+") if kv]
    bad = [o for o in overrides if "=" not in o]
    if not name or bad:
        raise ConfigError(f"--models: {spec!r:.60} is not NAME or NAME:key=value+key=value")
    return name, overrides


def run_train_speed(
    data: str | Path,
    models: list[str],
    threads: list[int],
    out: str | Path,
    steps: int = 60,
    warmup: int = 5,
    block: int = 5,
    config_files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    reference: str | None = "sim-hard",
    echo: Echo | None = None,
) -> list[SpeedRow]:
    """Samples/s of every model in ``models`` (names or ``name:key=value+...`` variants) on the
    same ``warmup + steps`` training batches of ``data``, interleaved in blocks of ``block``
    steps, at each thread count of ``threads``. Settings: ``config_files`` then ``overrides``
    (``train.batch_size``, ``train.t_max``, ``train.seed``, ``train.bucket`` choose the batches).
    Ratios are to ``reference`` (a label in ``models``; None: no ratios). ``echo``: where each
    row's line goes (default: the console)."""
    import torch

    from r2led.config import load_config
    from r2led.data.batches import BatchIterator, make_batch
    from r2led.data.store import LifelongStore
    from r2led.models.registry import build_model
    from r2led.models.spec import DataSpec
    from r2led.terminal import console
    from r2led.train.memory import tune_allocator
    from r2led.train.trainer import load_sid, make_optimizer, seed_everything, train_step

    echo = echo or console.print
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise ConfigError(f"--models names {repeated[0]!r:.60} more than once")
    if reference is not None and reference not in models:
        raise ConfigError(f"--reference {reference!r:.60} is not one of --models ({', '.join(models)})")
    if not threads or min(threads) < 1:
        raise ConfigError(f"--threads: expected thread counts of at least 1, got {threads}")
    if steps < block:
        raise ConfigError(f"--steps ({steps}) must be at least --block ({block})")
    tune_allocator()  # as the trainer does
    store = LifelongStore(data)
    spec = DataSpec.from_store(store)
    contenders = []
    for label in models:
        name, variant = parse_model_spec(label)
        cfg = load_config(config_files, [*(overrides or []), f"model.name={name}", *variant])
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, spec, load_sid(store, cfg))
        optimizer = make_optimizer(model, cfg.train)
        contenders.append((label, model, optimizer))
    tc = cfg.train  # the batches: the same for every model (train.* is not per model)
    train_idx = store.split_indices("train")
    order = BatchIterator(
        store, train_idx, tc.batch_size, tc.t_max, shuffle=True, seed=tc.seed, bucket=tc.bucket
    ).batch_positions()
    if len(order) < warmup + steps:
        raise ConfigError(f"the train split has {len(order)} batches; --warmup + --steps needs {warmup + steps}")
    samples = sum(len(p) for p in order[warmup : warmup + steps])  # the timed steps' samples
    rows: list[SpeedRow] = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        seconds = dict.fromkeys(models, 0.0)
        faults = dict.fromkeys(models, 0)
        for _, model, optimizer in contenders:  # compiles kernels, sizes buffers: not timed
            for positions in order[:warmup]:
                train_step(model, model, optimizer, make_batch(store, train_idx[positions], tc.t_max))
        for turn, start in enumerate(range(warmup, warmup + steps, block)):
            # each round starts with the next model: none is always first after another's turn
            for label, model, optimizer in contenders[turn % len(contenders) :] + contenders[: turn % len(contenders)]:
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                for positions in order[start : min(start + block, warmup + steps)]:
                    train_step(model, model, optimizer, make_batch(store, train_idx[positions], tc.t_max))
                seconds[label] += time.perf_counter() - t0
                faults[label] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        ref_rate = samples / seconds[reference] if reference is not None else None
        for label in models:
            rate = samples / seconds[label]
            rows.append(
                SpeedRow(
                    label,
                    n_threads,
                    steps,
                    samples,
                    round(seconds[label], 6),
                    round(rate, 1),
                    round(1000 * seconds[label] / steps, 2),
                    round(faults[label] / steps, 1),
                    round(rate / ref_rate, 3) if ref_rate else None,
                )
            )
            echo(_speed_line(rows[-1], reference))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "train_speed.json",
        {
            "data": str(Path(data).resolve()),
            "models": models,
            "threads": threads,
            "steps": steps,
            "warmup": warmup,
            "block": block,
            "batch_size": tc.batch_size,
            "t_max": tc.t_max,
            "config_files": [str(f) for f in config_files or []],
            "overrides": list(overrides or []),
            "reference": reference,
            "results": [asdict(r) for r in rows],
        },
    )
    lines = [
        f"Training steps on the same {steps} batches of {tc.batch_size} rows (T_max {tc.t_max:,}), "
        f"interleaved in blocks of {block}; ratio: samples/s over {reference or 'none'}'s at the same threads.",
        "",
        "| model | threads | samples/s | ms/step | page faults/step | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        lines.append(
            f"| {r.model} | {r.threads} | {r.samples_per_s:,.0f} | {r.ms_per_step:.1f} | "
            f"{r.page_faults_per_step:,.0f} | {ratio} |"
        )
    write_text_atomic(out / "train_speed.md", "\n".join(lines) + "\n")
    return rows


def _speed_line(r: SpeedRow, reference: str | None) -> str:
    ratio = f" ({r.ratio:.2f}x {reference})" if r.ratio is not None else ""
    return f"{r.model}, {r.threads} thread(s): {r.samples_per_s:,.0f} samples/s{ratio}"
