"""Speed benchmark: serving cost, training throughput and memory against history length.

Everything runs in ONE process on synthetic data, and the measurements are interleaved: every
timed round makes one call for every (contender, length) pair, so that changes of load on the
machine hit every model and every length alike (see ``Phase``).

- **Data.** A catalogue of ``items`` items whose 3-level SID codes (16 x 16 x 16) come from a
  hidden topic hierarchy with skewed leaf sizes; item category = top topic, tags = the level-2
  and level-3 prefixes; three user features; signal values 1..5. Histories of length T are
  drawn per user from a few top topics (Dirichlet weights), Zipf-skewed inside a topic, with
  10 % exploration over the whole catalogue: so a long history repeats items, as real ones do.
- **Serving.** One request = one user's history of length T scored against ``candidates``
  items through the model's request API (``model.score_request(state, candidates)``,
  ``r2led.models.user_state``), each model through its best honest path. Contenders:
  *warm* (the model's name; the user state built before and kept), *cold* (``"<model>
  (cold)"``: the state built inside the request), the *strawman* (``"<model> (batch path)"``:
  the batch path on C rows sharing the history, how serving was timed before the request API;
  for the models in ``strawman``, up to ``strawman_max_t``) and the *floor* (``Floor``: R2LED's
  state scan and refinement products timed alone). Warm-up requests, then the median and p95
  of wall and CPU time over ``repeats`` requests (different users where memory allows).
- **Training throughput.** Samples/s of forward + backward + Adam step on a batch of
  ``train_batch`` samples, each with its own history of length T (T <= 100,000); a warm-up
  step, then ``train_steps`` timed steps (median).
- **Peak memory.** The extra bytes torch allocates during one request (or one training step)
  beyond what existed before it (``torch.profiler`` allocation events) plus the peak of numpy
  and Python allocations (``tracemalloc``), on a separate, untimed call; and one user's kept
  state with the model's index (``state_mb``).
- **Limits.** Before a contender runs at a length, its memory (its users' states included) and
  time are extrapolated linearly in T from the largest length already measured (a small
  calibration length first); a run needing more than ``memory_limit_gb`` or more than
  ``time_limit_s`` per call is not run, and the reason is recorded. Nothing is skipped silently.

Outputs in ``out``: ``speed.json``, ``speed.md`` (a result document: what and how, headline
ratios, tables, caveats), ``latency.png`` (log-log, warm and cold lines); a table in the
terminal. A report prints figures and ratios; it grades nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# OpenMP threads that spin while waiting stall each other when the cores are shared with other
# processes (a 2-core machine under load made one R2LED request 50x slower). libgomp reads
# this once, when torch loads it: so only when this module is what imports torch (the speed_*
# modules it imports below load torch too, hence this comes before them).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from r2led.bench.speed_measure import (
    MODES,
    Contender,
    Entry,
    Floor,
    Phase,
    calibrate,
    collaborative_recall,
    retrieval_float_check,
)  # noqa: E402
from r2led.bench.speed_report import _write_json, command_line, machine_info, print_summary, write_reports  # noqa: E402
from r2led.bench.speed_workload import (  # noqa: E402
    BRANCHING,
    REFERENCE,
    SERVING_SWITCHES,
    VARIANTS,
    bench_model_config,
    make_workload,
    other_encoder,
    r2led_floor_name,
    synthetic_catalogue,
)
from r2led.errors import ConfigError  # noqa: E402
from r2led.models.registry import MODELS, build_model  # noqa: E402

STRAWMAN = ("r2led", "sim-hard", "eta")  # also timed through their batch path (the old way)


def default_models() -> list[str]:
    """Every registered model, and next to R2LED: its other per-route encoder and its
    approximate collaborative index."""
    names = list(MODELS)
    names[names.index(REFERENCE) + 1 : names.index(REFERENCE) + 1] = [other_encoder(), "r2led[lsh]"]
    return names


# Re-exported: the tests import these from r2led.bench.speed.
from r2led.bench.speed_measure import FloatTensorSizes, peak_allocated  # noqa: E402, F401
from r2led.bench.speed_workload import draw_candidates, request_batch, synthetic_histories  # noqa: E402, F401


# ---- the run ---------------------------------------------------------------------------------
def run_speed(
    lengths: list[int],
    models: list[str],
    out: Path,
    candidates: int = 100,
    repeats: int = 20,
    train_batch: int = 64,
    items: int = 20000,
    seed: int = 0,
    *,
    warmup: int = 2,
    train_steps: int = 3,
    threads: int = 1,
    memory_limit_gb: float = 8.0,
    time_limit_s: float = 10.0,
    strawman: Sequence[str] = STRAWMAN,
    strawman_max_t: int = 100_000,
    console: Console | None = None,
) -> dict:
    """Measure every model at every length (see the module docstring); write the reports.

    Every model is served warm and cold through its request API (``score_request``); the
    models in ``strawman`` are also timed through their batch path on C rows sharing the
    history (what this benchmark timed before the request API), up to ``strawman_max_t``;
    the floor is timed in the same rounds. Returns the content of ``speed.json``.
    """
    models = check_models(models)
    lengths = check_lengths(lengths)
    for name, value in (
        ("candidates", candidates),
        ("repeats", repeats),
        ("train_batch", train_batch),
        ("threads", threads),
    ):
        if int(value) < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value}")
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC).astimezone()
    load_before = os.getloadavg()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    strawman = [m for m in strawman if m in models]
    try:
        report = _run(
            lengths, models, candidates, repeats, train_batch, items, seed, warmup, train_steps,
            memory_limit_gb * 2**30, time_limit_s, strawman, strawman_max_t, console, out,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    report["settings"] = {
        "lengths": lengths, "models": models, "candidates": candidates, "repeats": repeats, "warmup": warmup,
        "train_batch": train_batch, "train_steps": train_steps, "items": items, "seed": seed,
        "memory_limit_gb": memory_limit_gb, "time_limit_s": time_limit_s, "sid_codebooks": list(BRANCHING),
        "strawman": strawman, "strawman_max_t": strawman_max_t, "threads": threads,
        "model_configs": {m: bench_model_config(m).model_dump() for m in models},
    }  # fmt: skip
    report["machine"] = machine_info(threads, load_before)
    report["command"] = command_line(report["settings"], out)
    report["date"] = started.isoformat(timespec="seconds")
    write_reports(report, out)
    print_summary(report, console)
    return report


def _run(
    lengths,
    models,
    candidates,
    repeats,
    train_batch,
    items,
    seed,
    warmup,
    train_steps,
    memory_limit,
    time_limit,
    strawman,
    strawman_max_t,
    console,
    out,
) -> dict:
    cat = synthetic_catalogue(items, seed)
    contenders = []
    for name in models:
        torch.manual_seed(seed)
        model = build_model(bench_model_config(name), cat.spec, cat.sid)
        for key, value in SERVING_SWITCHES.get(name, {}).items():
            setattr(model, key, value)
        contenders.append(Contender(name, model, torch.optim.Adam(model.parameters(), lr=1e-3), "warm"))
        contenders.append(Contender(MODES["cold"].format(name), model, None, "cold"))
        if name in strawman:
            contenders.append(Contender(MODES["batch"].format(name), model, None, "batch", max_t=strawman_max_t))
        floor = r2led_floor_name(name)  # "floor" but for an R2LED variant with other settings
        if name == REFERENCE or floor != "floor":  # each R2LED config, its own floor
            contenders.append(Contender(floor, None, None, "floor", floor=Floor(model)))
    results: dict[str, dict[str, Entry]] = {c.name: {str(t): Entry() for t in lengths} for c in contenders}
    n_requests = warmup + 1 + repeats
    serving = Phase("serving", warmup, repeats, memory_limit, time_limit)
    training = Phase("training", 1, train_steps, memory_limit, time_limit)
    total = len(lengths) * sum(serving.units + (training.units if c.optimizer else 0) for c in contenders)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("data", total=total)
        workloads = {t: make_workload(cat, t, n_requests, candidates, train_batch, seed) for t in lengths}
        data = {str(t): {"mean_distinct_items": w.distinct_items} for t, w in workloads.items()}
        progress.update(task, description="calibrating")
        calibrate(contenders, cat, candidates, train_batch, seed)
        for phase in (serving, training):
            phase.run(contenders, workloads, results, progress, task)
            partial = {"results": _results_dict(results), "data": data, "complete": False}
            _write_json(partial, out / "speed.json")  # a long run leaves its progress behind
    report = {"results": _results_dict(results), "data": data, "complete": True}
    report["retrieval_check"] = retrieval_float_check(contenders, cat, lengths, results, candidates, seed)
    report["collaborative_recall"] = collaborative_recall(contenders, workloads)
    return report


def _results_dict(results: dict[str, dict[str, Entry]]) -> dict:
    return {name: {t: e.to_dict() for t, e in per_t.items()} for name, per_t in results.items()}


# ---- argument checks ------------------------------------------------------------------------
def check_models(models: Sequence[str]) -> list[str]:
    """Refuse an unknown model name before anything runs, naming the registered ones."""
    models = list(dict.fromkeys(models))
    if not models:
        raise ConfigError("models: give at least one model name")
    unknown = [m for m in models if m not in MODELS and m not in VARIANTS]
    if unknown:
        raise ConfigError(
            f"models: unknown model(s) {', '.join(map(repr, unknown))}; "
            f"registered: {', '.join(MODELS)}; variants: {', '.join(VARIANTS)}"
        )
    return models


def check_lengths(lengths: Sequence[int]) -> list[int]:
    bad = [t for t in lengths if int(t) < 1]
    if bad or not lengths:
        raise ConfigError(f"lengths: expected positive history lengths, got {list(lengths)}")
    return sorted({int(t) for t in lengths})  # ascending: limits extrapolate from shorter runs
