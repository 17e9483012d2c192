"""Speed benchmark: serving latency, training throughput and peak memory against history length.

Everything runs in ONE process on synthetic data, and the measurements are interleaved: every
timed round makes one call for every (model, length) pair, so that changes of load on the
machine hit every model and every length alike (see ``Phase``).

- **Data.** A catalogue of ``items`` items whose 3-level SID codes (16 x 16 x 16) come from a
  hidden topic hierarchy with skewed leaf sizes; item category = top topic, tags = the level-2
  and level-3 prefixes; three user features; signal values 1..5. Histories of length T are
  drawn per user from a few top topics (Dirichlet weights), Zipf-skewed inside a topic, with
  10 % exploration over the whole catalogue: so a long history repeats items, as real ones do.
- **Serving latency.** One request = one user's history of length T scored against
  ``candidates`` items: a batch of ``candidates`` rows that share ONE history tensor
  (``expand``, falling back to a copy for a model that cannot take it), ``torch.no_grad()``,
  eval mode, per-item caches warm (R2LED's SimHash signatures). Warm-up requests, then the
  median and p95 over ``repeats`` requests (different users, the same ones for every model).
- **Training throughput.** Samples/s of forward + backward + Adam step on a batch of
  ``train_batch`` samples, each with its own history of length T; a warm-up step, then
  ``train_steps`` timed steps (median).
- **Peak memory.** The extra bytes torch allocates during one request (or one training step)
  beyond what existed before it: the peak of the running sum of the CPU allocator's
  allocation/free events recorded by ``torch.profiler`` (``profile_memory=True``), measured
  on a separate, untimed call. Parameters, optimizer state, caches and the input tensors
  exist before and are not counted. Plus the peak of what numpy and Python allocate meanwhile
  (``tracemalloc``): R2LED's serving retrieval keeps its history index and working arrays in
  numpy (its compiled kernels allocate nothing themselves). The sum of the two peaks bounds
  the request's peak from above.
- **Limits.** Before a model runs at a length, its memory and time are extrapolated linearly
  in T from the largest length already measured (a small calibration length first); a run
  needing more than ``memory_limit_gb`` or more than ``time_limit_s`` per call is not run, and
  the reason ("not run: needs ~21.3 GB > 8 GB limit") is recorded. An out-of-memory error is
  caught and recorded the same way; a call slower than the time limit stops that model's
  repeats and its larger lengths. Nothing is skipped silently.

Outputs in ``out``: ``speed.json``, ``speed.md`` (figures and ratios to R2LED at the same T,
machine, command, date, target checks), ``latency.png``; a table in the terminal.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import sys
import tracemalloc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP threads that spin while waiting stall each other when the cores are shared with other
# processes (a 2-core machine under load made one R2LED request 50x slower). libgomp reads
# this once, when torch loads it: so only when this module is what imports torch.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from r2led.data.batches import Batch  # noqa: E402
from r2led.errors import ConfigError  # noqa: E402
from r2led.models.registry import MODELS, build_model, model_config_class  # noqa: E402
from r2led.models.spec import DataSpec  # noqa: E402
from r2led.sid.table import SidTable  # noqa: E402

REFERENCE = "r2led"
BRANCHING = (16, 16, 16)  # SID codebook sizes per level (the hidden topic hierarchy)
USER_FEATURES = [3, 8, 22]  # cardinalities incl. 0 = unknown (like gender, age, occupation)
SIGNAL_SIZE = 6  # ratings 1..5, 0 = padding
CALIBRATION_T = 32  # first, tiny length every model runs at, to extrapolate from


# ---- synthetic data ------------------------------------------------------------------------
@dataclass
class Catalogue:
    """A synthetic catalogue: the model-facing DataSpec and SID table, plus how to draw items."""

    spec: DataSpec
    sid: SidTable
    topic_items: list[np.ndarray]  # per top topic: its items, most popular first
    topic_cdf: list[np.ndarray]  # per top topic: Zipf CDF over topic_items
    global_cdf: np.ndarray  # Zipf CDF over all items 1..N (by a fixed popularity order)
    global_items: np.ndarray


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    cdf = np.cumsum((np.arange(n) + 1.0) ** -exponent)
    return cdf / cdf[-1]


def synthetic_catalogue(items: int, seed: int = 0, branching: tuple[int, ...] = BRANCHING, zipf: float = 1.1) -> Catalogue:
    """``items`` items on the leaves of a hidden hierarchy; SID codes = the leaf's path.

    Leaves get skewed sizes (weight ``rank ** -0.7``), so some SID prefixes hold many items and
    many leaves hold none or one, as RQ-KMeans codes on real data do; collisions are allowed.
    """
    if items < 2:
        raise ConfigError(f"items: the synthetic catalogue needs at least 2 items, got {items}")
    rng = np.random.default_rng(seed)
    n_leaves = math.prod(branching)
    leaf_weight = rng.permutation((np.arange(n_leaves) + 1.0) ** -0.7)
    leaf = rng.choice(n_leaves, size=items, p=leaf_weight / leaf_weight.sum())
    codes = np.stack(np.unravel_index(leaf, branching), axis=1).astype(np.int64)  # (N, L)
    sid = SidTable.from_codes(codes, {"encoder": "synthetic hierarchy", "codebook_sizes": list(branching), "seed": seed})

    ids = np.arange(1, items + 1)
    top = codes[:, 0]
    category = np.concatenate([[0], top + 1])  # (N+1,)
    v2 = sid.vocab_sizes[1] if sid.levels > 1 else 1
    tags = np.zeros((items + 1, 2), dtype=np.int64)  # tags = level-2 and level-3 prefixes
    tags[:, 0] = sid.prefix_tokens[:, min(1, sid.levels - 1)]
    tags[1:, 1] = v2 - 1 + sid.prefix_tokens[1:, -1]
    spec = DataSpec(
        n_items=items,
        user_feature_sizes=list(USER_FEATURES),
        signal_size=SIGNAL_SIZE,
        item_category=category,
        n_categories=branching[0] + 1,
        item_tags=tags,
        n_tags=int(tags.max()) + 1,
    )
    topic_items, topic_cdf = [], []
    for t in range(branching[0]):
        members = rng.permutation(ids[top == t])  # popularity order inside the topic
        topic_items.append(members)
        topic_cdf.append(_zipf_cdf(len(members), zipf) if len(members) else np.ones(0))
    return Catalogue(spec, sid, topic_items, topic_cdf, _zipf_cdf(items, zipf), rng.permutation(ids))


def _draw(cdf: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return pool[np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(pool) - 1)]


def synthetic_histories(
    cat: Catalogue, users: int, length: int, rng: np.random.Generator, topics_per_user: int = 3, explore: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Histories (users, length) of items and signals, user features (users, F), and each
    user's interest topics (users, K): Zipf within a few topics per user, some exploration."""
    n_topics = len(cat.topic_items)
    nonempty = np.array([len(t) > 0 for t in cat.topic_items])
    k = min(topics_per_user, int(nonempty.sum()))
    interests = np.stack([rng.choice(np.flatnonzero(nonempty), size=k, replace=False) for _ in range(users)])  # (U, K)
    cum = np.cumsum(rng.dirichlet(np.ones(k), size=users), axis=1)  # (U, K)
    slot = (rng.random((users, length, 1)) > cum[:, None, :-1]).sum(-1)  # (U, T) in 0..K-1
    topic = np.take_along_axis(interests, slot, axis=1)  # (U, T)
    hist = np.empty((users, length), dtype=np.int64)
    for t in range(n_topics):
        sel = topic == t
        if sel.any():
            hist[sel] = _draw(cat.topic_cdf[t], cat.topic_items[t], int(sel.sum()), rng)
    wander = rng.random((users, length)) < explore
    hist[wander] = _draw(cat.global_cdf, cat.global_items, int(wander.sum()), rng)
    main = interests[np.arange(users), 0]
    liked = np.asarray(cat.spec.item_category)[hist] - 1 == main[:, None]
    signal = np.where(liked, rng.integers(3, 6, hist.shape), rng.integers(1, 5, hist.shape)).astype(np.int64)
    feats = np.stack([rng.integers(1, size, users) for size in USER_FEATURES], axis=1).astype(np.int64)
    return hist, signal, feats, interests


def draw_candidates(cat: Catalogue, interests: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` candidate items for one user: half from the user's topics, half from popularity."""
    own = n // 2
    topic = interests[rng.integers(0, len(interests), own)]
    out = np.empty(n, dtype=np.int64)
    for i, t in enumerate(topic):
        out[i] = _draw(cat.topic_cdf[t], cat.topic_items[t], 1, rng)[0]
    out[own:] = _draw(cat.global_cdf, cat.global_items, n - own, rng)
    return out


def request_batch(hist: np.ndarray, signal: np.ndarray, feats: np.ndarray, candidates: np.ndarray, user: int, shared: bool = True) -> Batch:
    """One serving request: ``len(candidates)`` rows over ONE history (T,).

    ``shared``: the rows are ``expand``-ed views of one tensor (stride 0, nothing copied);
    otherwise the history is copied once per row, for a model that cannot take a view.
    """
    b, t = len(candidates), len(hist)

    def rows(x: np.ndarray) -> torch.Tensor:
        one = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0)  # (1, ...)
        return one.expand(b, *one.shape[1:]) if shared else one.repeat(b, *([1] * (one.dim() - 1)))

    return Batch(
        user=torch.full((b,), user, dtype=torch.long),
        user_feats=rows(feats),
        target=torch.from_numpy(candidates.astype(np.int64)),
        hist_items=rows(hist),
        hist_signal=rows(signal),
        hist_mask=rows(np.ones(t, dtype=bool)),
        label=torch.zeros(b),
    )


def training_batch(hist: np.ndarray, signal: np.ndarray, feats: np.ndarray, targets: np.ndarray, labels: np.ndarray) -> Batch:
    """A training batch: every sample has its own history (B, T)."""
    return Batch(
        user=torch.arange(len(hist)),
        user_feats=torch.from_numpy(feats),
        target=torch.from_numpy(targets.astype(np.int64)),
        hist_items=torch.from_numpy(hist),
        hist_signal=torch.from_numpy(signal),
        hist_mask=torch.ones(hist.shape, dtype=torch.bool),
        label=torch.from_numpy(labels.astype(np.float32)),
    )


# ---- models --------------------------------------------------------------------------------
def bench_model_config(name: str):
    """The shared bench config: d = 32, short window 20; R2LED k = 20 per route (x 3 routes),
    a baseline with a retrieval budget ``k`` keeps the same R*k = 60 behaviours."""
    cls = model_config_class(name)
    values = {"name": name, "dim": 32, "short_len": 20}
    if "k" in cls.model_fields:
        values["k"] = 20 if name == REFERENCE else 60
    return cls.model_validate(values)


def check_models(models: Sequence[str]) -> list[str]:
    """Refuse an unknown model name before anything runs, naming the registered ones."""
    models = list(dict.fromkeys(models))
    if not models:
        raise ConfigError("models: give at least one model name")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"models: unknown model(s) {', '.join(map(repr, unknown))}; registered: {', '.join(MODELS)}")
    return models


def check_lengths(lengths: Sequence[int]) -> list[int]:
    bad = [t for t in lengths if int(t) < 1]
    if bad or not lengths:
        raise ConfigError(f"lengths: expected positive history lengths, got {list(lengths)}")
    return sorted({int(t) for t in lengths})  # ascending: limits extrapolate from shorter runs


# ---- measurement primitives ----------------------------------------------------------------
def peak_allocated(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn`` once; return its result and the peak extra bytes allocated meanwhile: torch's
    peak plus the peak of numpy and Python allocations (``tracemalloc``).

    The running sum of the profiler's "[memory]" events (allocations +, frees -, in time
    order) only counts blocks allocated inside the window, so it is the request's own
    working set, whatever was allocated before; so is tracemalloc's peak, started with it.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()
        try:
            result = fn()
        finally:
            outside_torch = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = np.cumsum([n for _, n in events]) if events else np.zeros(1)
    return result, int(max(running.max(), 0)) + outside_torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side prints a start/stop line per use."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def train_step(model, optimizer, batch: Batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    model.loss(batch, model(batch)).backward()
    optimizer.step()


@dataclass
class Track:
    """What one model's measurements so far say about the next, longer run (per mode)."""

    t: int = 0  # largest length measured
    peak: int = 0  # its peak bytes
    seconds: float = 0.0  # its median time per call
    stopped: str | None = None  # why longer runs are not attempted

    def refuse(self, t: int, memory_limit: float, time_limit: float) -> str | None:
        if self.stopped:
            return self.stopped
        if not self.t:
            return None
        scale = t / self.t
        need = self.peak * scale
        if need > memory_limit:
            return f"not run: needs ~{_gb(need)} GB > {_gb(memory_limit)} GB limit (extrapolated from {_mb(self.peak)} MB at T={self.t:,})"
        if self.seconds * scale > time_limit:
            return f"not run: ~{self.seconds * scale:,.0f} s per call > {time_limit:g} s limit (extrapolated from {self.seconds:.2f} s at T={self.t:,})"
        return None


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g}"


def _mb(n: float) -> str:
    return f"{n / 2**20:.3g}"



@dataclass
class Entry:
    """One model at one length: the figures, or why they are missing."""

    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    cpu_ms_p50: float | None = None  # process CPU time per request (all threads)
    latency_repeats: int = 0
    history_input: str | None = None  # "shared" (expand-ed view) or "copied" (one copy per row)
    peak_mb: float | None = None  # extra memory of one request
    train_samples_per_s: float | None = None
    train_step_ms: float | None = None
    train_peak_mb: float | None = None  # extra memory of one training step
    serve_skipped: str | None = None
    train_skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        reasons = [f"{what}: {why}" for what, why in (("serving", self.serve_skipped), ("training", self.train_skipped)) if why]
        out["skipped"] = "; ".join(reasons) or None
        return out


@dataclass
class Contender:
    """A model under test, with its optimizer and what its runs so far predict."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None: serving only (a variant of another model)
    shared: bool | None = None  # takes expand-ed histories; decided on its first request
    serve: Track = field(default_factory=Track)
    train: Track = field(default_factory=Track)


@dataclass
class Workload:
    """The inputs at one history length, the same for every model."""

    t: int
    requests: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # hist, signal, feats, candidates
    train: Batch
    distinct_items: float  # mean distinct items in a request's history

    def request(self, i: int, shared: bool) -> Batch:
        hist, signal, feats, candidates = self.requests[i % len(self.requests)]
        return request_batch(hist, signal, feats, candidates, user=i, shared=shared)


def make_workload(cat: Catalogue, t: int, n_requests: int, candidates: int, train_batch: int, seed: int) -> Workload:
    rng = np.random.default_rng([seed, t])
    hist, signal, feats, interests = synthetic_histories(cat, n_requests, t, rng)
    requests = [(hist[i], signal[i], feats[i], draw_candidates(cat, interests[i], candidates, rng)) for i in range(n_requests)]
    distinct = float(np.mean([len(np.unique(h)) for h in hist]))
    hist, signal, feats, interests = synthetic_histories(cat, train_batch, t, rng)
    targets = np.array([draw_candidates(cat, interests[i], 2, rng)[i % 2] for i in range(train_batch)])
    labels = (rng.random(train_batch) < 0.3).astype(np.float32)
    return Workload(t, requests, training_batch(hist, signal, feats, targets, labels), distinct)


class FloatTensorSizes:
    """Records the largest floating-point tensor any operation produces (a dispatch mode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        outer.largest = max(outer.largest, t.numel())
                return out

        self.largest = 0
        self.mode = _Mode()

    def __enter__(self) -> "FloatTensorSizes":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


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
    threads: int = 2,
    memory_limit_gb: float = 8.0,
    time_limit_s: float = 10.0,
    batch_path_variant: bool = True,
    console: Console | None = None,
) -> dict:
    """Measure every model at every length (see the module docstring); write the reports.

    ``batch_path_variant`` also times R2LED with the history copied per candidate, i.e.
    without its shared-history serving path, so the report shows what that path buys.
    Returns the content of ``speed.json``.
    """
    models = check_models(models)
    lengths = check_lengths(lengths)
    for name, value in (("candidates", candidates), ("repeats", repeats), ("train_batch", train_batch), ("threads", threads)):
        if int(value) < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value}")
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).astimezone()
    load_before = os.getloadavg()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report = _run(
            lengths, models, candidates, repeats, train_batch, items, seed, warmup, train_steps,
            memory_limit_gb * 2**30, time_limit_s, batch_path_variant, console, out,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    report["settings"] = {
        "lengths": lengths, "models": models, "candidates": candidates, "repeats": repeats, "warmup": warmup,
        "train_batch": train_batch, "train_steps": train_steps, "items": items, "seed": seed,
        "memory_limit_gb": memory_limit_gb, "time_limit_s": time_limit_s, "sid_codebooks": list(BRANCHING),
        "model_configs": {m: bench_model_config(m).model_dump() for m in models},
    }  # fmt: skip
    report["machine"] = machine_info(threads, load_before)
    report["command"] = command_line(lengths, models, out, candidates, repeats, train_batch, items, seed, memory_limit_gb, time_limit_s)
    report["date"] = started.isoformat(timespec="seconds")
    report["checks"] = target_checks(report, candidates)
    write_reports(report, out)
    print_summary(report, console)
    return report


def _run(lengths, models, candidates, repeats, train_batch, items, seed, warmup, train_steps, memory_limit, time_limit, variant, console, out) -> dict:
    cat = synthetic_catalogue(items, seed)
    contenders = []
    for name in models:
        torch.manual_seed(seed)
        model = build_model(bench_model_config(name), cat.spec, cat.sid)
        contenders.append(Contender(name, model, torch.optim.Adam(model.parameters(), lr=1e-3)))
        if variant and name == REFERENCE:
            contenders.append(Contender(BATCH_PATH, model, None, shared=False))
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
    return report


BATCH_PATH = "r2led (copied history)"


def _results_dict(results: dict[str, dict[str, Entry]]) -> dict:
    return {name: {t: e.to_dict() for t, e in per_t.items()} for name, per_t in results.items()}


def calibrate(contenders: list[Contender], cat: Catalogue, candidates: int, batch: int, seed: int) -> None:
    """Every model runs once at a tiny length, to extrapolate its first real run from."""
    work = make_workload(cat, CALIBRATION_T, 1, candidates, batch, seed)
    for c in contenders:
        c.model.eval()
        try:
            with torch.no_grad():
                c.shared = _decide_shared(c, work)
                (_, peak), seconds = _timed(lambda: peak_allocated(lambda: c.model(work.request(0, c.shared))))
            c.serve.t, c.serve.peak, c.serve.seconds = work.t, peak, seconds
        except Exception as exc:  # noqa: BLE001 - the model is reported as not run, the others go on
            c.serve.stopped = _failure(exc, work.t)
        if c.optimizer is not None:
            c.model.train()
            try:
                train_step(c.model, c.optimizer, work.train)  # creates the optimizer state
                (_, peak), seconds = _timed(lambda: peak_allocated(lambda: train_step(c.model, c.optimizer, work.train)))
                c.train.t, c.train.peak, c.train.seconds = work.t, peak, seconds
            except Exception as exc:  # noqa: BLE001
                c.train.stopped = _failure(exc, work.t)


def _decide_shared(c: Contender, work: Workload) -> bool:
    """Whether the model takes a history shared by all candidate rows (an expand-ed view)."""
    if c.shared is not None:
        return c.shared
    try:
        c.model(work.request(0, shared=True))
        return True
    except RuntimeError:  # e.g. an in-place write into the history: give it copies
        return False


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _failure(exc: BaseException, t: int) -> str:
    if is_out_of_memory(exc):
        return f"not run: out of memory at T={t:,} ({str(exc).splitlines()[0][:120]})"
    return f"not run: failed at T={t:,}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


class _TooSlow(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"{seconds:.1f} s")
        self.seconds = seconds


@dataclass
class Phase:
    """Serving (requests) or training (steps), measured for every model at every length.

    First, in order of length, each (model, length) gets its warm-up calls and an untimed
    memory probe, unless its extrapolated memory or time is over a limit. Then come the timed
    rounds: each round makes one call for every (model, length) pair (see ``_round_order``),
    so that a change of load on the machine hits every model and every length alike (ratios
    across lengths, like R2LED at 10^5 against 10^2, included).
    """

    kind: str  # "serving" or "training"
    warmup: int  # untimed calls before the memory probe
    rounds: int  # timed calls per (model, length)
    memory_limit: float  # bytes
    time_limit: float  # seconds per call

    @property
    def units(self) -> int:
        return self.warmup + 1 + self.rounds

    def takes(self, c: Contender) -> bool:
        return self.kind == "serving" or c.optimizer is not None

    def track(self, c: Contender) -> Track:
        return c.serve if self.kind == "serving" else c.train

    def call(self, c: Contender, work: Workload, i: int) -> None:
        """Request ``i`` (serving) or one training step (training)."""
        if self.kind == "serving":
            with torch.no_grad():
                c.model(work.request(i, c.shared))
        else:
            train_step(c.model, c.optimizer, work.train)

    def _skip(self, entry: Entry, reason: str) -> None:
        if self.kind == "serving":
            entry.serve_skipped = reason
        else:
            entry.train_skipped = reason

    def run(self, contenders: list[Contender], workloads: dict[int, Workload], results: dict, progress, task) -> None:
        for c in contenders:
            c.model.train(self.kind == "training")
        pairs = []  # (contender, length, workload, wall times, cpu times)
        for t, work in workloads.items():  # ascending: each run extrapolates from the last
            for c in filter(self.takes, contenders):
                progress.update(task, description=f"{self.kind} warm-up: {c.name} at T={t:,}")
                if self._probe(c, work, results[c.name][str(t)], progress, task):
                    pairs.append((c, t, work, [], []))
        stopped: dict[str, int] = {}  # model -> length from which it stopped
        gc.collect()
        gc.disable()  # no collector pauses inside timed calls
        try:
            for r in range(self.rounds):
                progress.update(task, description=f"{self.kind}: round {r + 1}/{self.rounds}")
                order = self._round_order(pairs, r)
                if order:  # untimed: the previous round ended on the longest length, caches are cold
                    self.call(order[0][0], order[0][2], 0)
                for c, t, work, walls, cpus in order:
                    if t >= stopped.get(c.name, t + 1):
                        continue
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    try:
                        self.call(c, work, self.warmup + 1 + r)
                    except Exception as exc:  # noqa: BLE001 - what it measured so far stays, with a note
                        stopped[c.name] = min(t, stopped.get(c.name, t))
                        results[c.name][str(t)].notes.append(f"{self.kind} stopped after {len(walls)} of {self.rounds}: {_failure(exc, t)}")
                        continue
                    walls.append(time.perf_counter() - wall0)
                    cpus.append(time.process_time() - cpu0)
                    progress.advance(task)
                    if walls[-1] > self.time_limit:  # this length and the longer ones stop here
                        stopped[c.name] = min(t, stopped.get(c.name, t))
                        for other, t2, _, done, _ in pairs:
                            if other is c and t2 >= t:
                                results[c.name][str(t2)].notes.append(
                                    f"{self.kind} stopped after {len(done)} of {self.rounds} timed calls: "
                                    f"one took {walls[-1]:.1f} s > {self.time_limit:g} s at T={t:,}"
                                )
        finally:
            gc.enable()
        progress.advance(task, sum(self.rounds - len(p[3]) for p in pairs))  # calls not made
        for c, t, work, walls, cpus in pairs:
            entry = results[c.name][str(t)]
            if not walls:
                self._skip(entry, f"not run: stopped at a shorter length ({entry.notes[-1] if entry.notes else 'see notes'})")
                continue
            median = float(np.median(walls))
            if self.kind == "serving":
                entry.latency_ms_p50 = median * 1e3
                entry.latency_ms_p95 = float(np.percentile(walls, 95)) * 1e3
                entry.cpu_ms_p50 = float(np.median(cpus)) * 1e3
                entry.latency_repeats = len(walls)
            else:
                entry.train_step_ms = median * 1e3
                entry.train_samples_per_s = len(work.train) / median

    @staticmethod
    def _round_order(pairs: list, r: int) -> list:
        """One round: lengths in ascending order, the models of a length in a shuffled order.

        Calls of one length run back to back, so a short request never follows a long one
        (whose gigabytes of memory traffic leave the caches cold) except at the start of the
        round, which one untimed call absorbs. A fixed rotation would put the same model right
        after the heaviest call in every round: a bias, not noise.
        """
        rng = np.random.default_rng(r)
        order = []
        for t in sorted({p[1] for p in pairs}):
            block = [p for p in pairs if p[1] == t]
            order += [block[i] for i in rng.permutation(len(block))]
        return order

    def _probe(self, c: Contender, work: Workload, entry: Entry, progress, task) -> bool:
        """Warm-up calls and the memory probe; False (with the reason recorded) if not run."""
        track = self.track(c)
        reason = track.refuse(work.t, self.memory_limit, self.time_limit)
        if reason:
            self._skip(entry, reason)
            progress.advance(task, self.units)
            return False
        try:
            seconds = math.inf
            for i in range(self.warmup):  # first calls: caches, optimizer state
                _, took = _timed(lambda: self.call(c, work, i))
                seconds = min(seconds, took)
                progress.advance(task)
                if took > self.time_limit:
                    raise _TooSlow(took)
            _, peak = peak_allocated(lambda: self.call(c, work, self.warmup))
            progress.advance(task)
        except _TooSlow as slow:
            track.stopped = f"not run: a warm-up call took {slow.seconds:.1f} s > {self.time_limit:g} s limit at T={work.t:,}"
        except Exception as exc:  # noqa: BLE001 - recorded in the report, the other models go on
            track.stopped = _failure(exc, work.t)
            progress.console.print(f"[yellow]{c.name}, {self.kind} at T={work.t:,}: {track.stopped}")
        if track.stopped:
            self._skip(entry, track.stopped)
            progress.advance(task, self.rounds + 1)
            return False
        track.t, track.peak, track.seconds = work.t, peak, seconds
        if self.kind == "serving":
            entry.peak_mb = peak / 2**20
            entry.history_input = "shared" if c.shared else "copied"
        else:
            entry.train_peak_mb = peak / 2**20
        return True


def retrieval_float_check(contenders, cat: Catalogue, lengths: list[int], results: dict, candidates: int, seed: int) -> dict | None:
    """The largest float tensor R2LED builds for one request at the longest length it ran:
    in its retrieval, and in the whole request."""
    ref = next((c for c in contenders if c.name == REFERENCE), None)
    ran = [t for t in lengths if results.get(REFERENCE, {}).get(str(t)) and results[REFERENCE][str(t)].latency_ms_p50 is not None]
    if ref is None or not ran:
        return None
    t = max(ran)
    request = make_workload(cat, t, 1, candidates, 1, seed).request(0, shared=True)
    ref.model.eval()
    with torch.no_grad():
        ref.model(request)  # the per-item caches a server keeps (signatures, tables), filled
        with FloatTensorSizes() as in_retrieval:
            ref.model.retrieve_routes(request.target, request.hist_items, request.hist_mask)
        with FloatTensorSizes() as in_request:
            ref.model(request)
    return {
        "t": t,
        "candidates": candidates,
        "largest_float_elements_retrieval": in_retrieval.largest,
        "largest_float_elements_request": in_request.largest,
        "candidates_x_t": candidates * t,
        "candidates_x_t_x_d": candidates * t * ref.model.cfg.dim,
    }


# ---- reports -------------------------------------------------------------------------------
def machine_info(threads: int, load_before: tuple[float, float, float]) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def command_line(lengths, models, out, candidates, repeats, train_batch, items, seed, memory_limit_gb, time_limit_s) -> str:
    cmd = (
        f"r2led bench speed --lengths {','.join(map(str, lengths))} --models {','.join(models)} --out {out} "
        f"--candidates {candidates} --repeats {repeats} --train-batch {train_batch} --items {items} --seed {seed}"
    )
    if (memory_limit_gb, time_limit_s) != (8.0, 10.0):
        cmd += f"  (run_speed: memory_limit_gb={memory_limit_gb:g}, time_limit_s={time_limit_s:g})"
    return cmd


def _figure(results: dict, name: str, t: int, key: str) -> float | None:
    return results.get(name, {}).get(str(t), {}).get(key)


def target_checks(report: dict, candidates: int) -> list[dict]:
    """The targets of the speed issue, each with its measured ratio (None: not measurable)."""
    res, lengths = report["results"], report["settings"]["lengths"]
    p50 = lambda name, t: _figure(res, name, t, "latency_ms_p50")  # noqa: E731
    checks = []
    lo, hi = (100, 100_000) if {100, 100_000} <= set(lengths) else (min(lengths), max(lengths))
    a, b = p50(REFERENCE, hi), p50(REFERENCE, lo)
    ratio = a / b if a and b else None
    checks.append({
        "target": f"R2LED latency at T={hi:,} at most 3x its latency at T={lo:,}",
        "measured": f"{ratio:.2f}x ({a:.1f} ms vs {b:.1f} ms)" if ratio else "not measured",
        "passed": None if ratio is None else ratio <= 3.0,
    })  # fmt: skip
    t = 10_000 if 10_000 in lengths else None
    din, ref = (p50("din-long", t), p50(REFERENCE, t)) if t else (None, None)
    why = "" if t else " (T=10,000 not in the lengths)"
    if t and din is None and "din-long" in res:
        why = f" (din-long {res['din-long'][str(t)].get('skipped') or 'not measured'})"
    checks.append({
        "target": "at T=10,000 R2LED at least 20x faster than din-long",
        "measured": f"{din / ref:.1f}x ({din:.1f} ms vs {ref:.1f} ms)" if din and ref else "not measured" + why,
        "passed": None if not (din and ref) else din / ref >= 20.0,
    })  # fmt: skip
    for other in ("eta", "sim-hard"):
        ratios = {t: p50(REFERENCE, t) / p50(other, t) for t in lengths if p50(REFERENCE, t) and p50(other, t)}
        checks.append({
            "target": f"R2LED latency at most 1.5x {other}'s at every T",
            "measured": ", ".join(f"T={t:,}: {r:.2f}x" for t, r in ratios.items()) or f"not measured ({other} not run)",
            "passed": (all(r <= 1.5 for r in ratios.values()) and len(ratios) == len(lengths)) if ratios else None,
        })  # fmt: skip
    rc = report.get("retrieval_check")
    if rc:
        t, ctd, ct = rc["t"], rc["candidates_x_t_x_d"], rc["candidates_x_t"]
        retrieval, request = rc["largest_float_elements_retrieval"], rc["largest_float_elements_request"]
        peak = _figure(res, REFERENCE, t, "peak_mb")
        checks.append({
            "target": "no (candidates, T, d) float tensor built by R2LED's retrieval",
            "measured": (
                f"T={t:,}: largest float tensor {retrieval:,} elements in the retrieval ({retrieval / ct:.2g} per "
                f"(candidate, behaviour) pair), {request:,} in the whole request, vs {ctd:,} in one (candidates, T, d) "
                f"tensor; request peak {peak:,.1f} MB vs {ctd * 4 / 2**20:,.1f} MB for that tensor in float32"
            ),
            "passed": retrieval < ctd,
        })  # fmt: skip
    return checks


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def _cell(value: float | None, ref: float | None, fmt: str, skipped: str | None) -> str:
    if value is None:
        if skipped:
            return "not run (memory)" if "GB" in skipped or "memory" in skipped else "not run (time)" if " s " in skipped else "not run"
        return "—"
    text = format(value, fmt)
    return f"{text} ({value / ref:.2f}x)" if ref else text


def _table(report: dict, key: str, fmt: str, skipped_key: str) -> list[str]:
    res, lengths = report["results"], report["settings"]["lengths"]
    lines = ["| model | " + " | ".join(f"T={t:,}" for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, per_t in res.items():
        cells = []
        for t in lengths:
            e = per_t.get(str(t), {})
            ref = _figure(res, REFERENCE, t, key)
            cells.append(_cell(e.get(key), ref, fmt, e.get(skipped_key)))
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def speed_markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    ref_cfg = s["model_configs"].get(REFERENCE, {})
    lines = [
        "# Speed: R2LED against the lifelong baselines",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['platform']}",
        f"- software: torch {m['torch']}, numpy {m['numpy']}, Python {m['python']}; torch threads {m['torch_threads']}, "
        f"OMP_WAIT_POLICY {m['omp_wait_policy']}",
        f"- load average (1, 5, 15 min) before: {m['load_average_before']}, after: {m['load_average_after']}",
        f"- data: synthetic catalogue of {s['items']:,} items, 3-level SIDs ({' x '.join(map(str, s['sid_codebooks']))}) "
        "from a hidden topic hierarchy; histories Zipf-skewed within 3 topics per user, 10 % exploration",
        "- mean distinct items per request history: "
        + ", ".join(f"T={int(t):,}: {d['mean_distinct_items']:,.0f}" for t, d in report["data"].items()),
        f"- models: d = 32, short window 20; R2LED k = {ref_cfg.get('k', 20)} x 3 routes, rho = {ref_cfg.get('rho', 0.75)}; "
        "baselines with a retrieval budget keep k = 60",
        f"- serving: one request = one history of length T x {s['candidates']} candidates (the history shared by the "
        f"candidate rows as an expand-ed view), eval mode, no_grad, per-item caches warm; {s['warmup']} warm-up requests, "
        f"then median and p95 over {s['repeats']} requests of different users; each timed round makes one request "
        "for every (model, T) pair (T ascending, models shuffled within a T), so load changes hit all alike",
        f"- training: forward + backward + Adam on {s['train_batch']} samples with their own histories; a warm-up step, "
        f"then the median of {s['train_steps']} steps",
        "- peak memory: the extra bytes torch allocates during one request (one training step), from torch.profiler's "
        "allocation events (profile_memory=True) on an untimed call, plus the peak of numpy and Python allocations "
        "(tracemalloc) in the same call; parameters, optimizer state, caches and inputs exist before and are not counted",
        f"- limits: a run is not started when its memory or time, extrapolated linearly in T from the previous length, "
        f"exceeds {s['memory_limit_gb']:g} GB or {s['time_limit_s']:g} s per call; reasons are listed below",
        "",
        "Every figure is followed by its ratio to R2LED at the same T (model / R2LED): above 1 the model is slower "
        "or bigger, except for throughput, where above 1 it is faster.",
        "",
        "## Serving latency, median (ms per request)",
        "",
        *_table(report, "latency_ms_p50", ".1f", "serve_skipped"),
        "",
        "## Serving latency, p95 (ms per request)",
        "",
        *_table(report, "latency_ms_p95", ".1f", "serve_skipped"),
        "",
        "## Serving CPU time, median (ms per request, all threads)",
        "",
        *_table(report, "cpu_ms_p50", ".1f", "serve_skipped"),
        "",
        "## Training throughput (samples/s)",
        "",
        *_table(report, "train_samples_per_s", ",.0f", "train_skipped"),
        "",
        "## Peak memory of one request (MB)",
        "",
        *_table(report, "peak_mb", ",.1f", "serve_skipped"),
        "",
        "## Peak memory of one training step (MB)",
        "",
        *_table(report, "train_peak_mb", ",.1f", "train_skipped"),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for c in report["checks"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[c["passed"]]
        lines.append(f"| {c['target']} | {c['measured']} | {met} |")
    reasons = [
        f"- {name}, T={int(t):,}: {e['skipped']}" for name, per_t in report["results"].items() for t, e in per_t.items() if e.get("skipped")
    ]
    notes = [f"- {name}, T={int(t):,}: {n}" for name, per_t in report["results"].items() for t, e in per_t.items() for n in e.get("notes", [])]
    copied = [f"{name}" for name, per_t in report["results"].items() if any(e.get("history_input") == "copied" for e in per_t.values())]
    lines += ["", "## Not run, and why", "", *(reasons or ["- every model ran at every length"])]
    if notes:
        lines += ["", "## Stopped early", "", *notes]
    lines += ["", "## Notes", ""]
    if copied:
        lines.append(f"- history copied once per candidate row (the model cannot take a shared view, or on purpose): {', '.join(copied)}")
    if BATCH_PATH in report["results"]:
        lines.append(
            f"- `{BATCH_PATH}` is the same R2LED model given the history copied per candidate, so that its retrieval "
            "scores every (candidate, behaviour) pair as in training: it shows what the shared-history serving path "
            "(`R2LED.serve` with `R2LED.retrieve_routes_shared`, the same scores) buys."
        )
    lines.append("- latency is wall-clock time on a machine shared with other work: see the load averages above; the "
                 "CPU-time table is less sensitive to it.")
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out: Path) -> None:
    from r2led.bench.plots import line_plot

    _write_json(report, out / "speed.json")
    tmp = out / f".speed.md.tmp-{os.getpid()}"
    tmp.write_text(speed_markdown(report))
    tmp.replace(out / "speed.md")
    series = {}
    for name, per_t in report["results"].items():
        series[name] = [(int(t), e["latency_ms_p50"]) for t, e in per_t.items() if e.get("latency_ms_p50") is not None]
    m, s = report["machine"], report["settings"]
    line_plot(
        series,
        out / "latency.png",
        xlabel="history length T",
        ylabel=f"serving latency per request, median (ms), {s['candidates']} candidates",
        title="Serving latency against history length",
        logx=True,
        logy=True,
        highlight=REFERENCE,
        notes=[f"{m['cpu']}, torch {m['torch']}, {m['torch_threads']} threads; {report['date']}", "missing points: not run (see speed.md)"],
    )


def print_summary(report: dict, console: Console) -> None:
    res, lengths = report["results"], report["settings"]["lengths"]
    table = Table(title="Serving latency p50 (ms) and training throughput (samples/s); (x R2LED)", title_justify="left")
    table.add_column("model")
    for t in lengths:
        table.add_column(f"T={t:,}", justify="right")
    for name, per_t in res.items():
        row = []
        for t in lengths:
            e = per_t.get(str(t), {})
            lat = _cell(e.get("latency_ms_p50"), _figure(res, REFERENCE, t, "latency_ms_p50"), ".1f", e.get("serve_skipped"))
            thr = _cell(e.get("train_samples_per_s"), _figure(res, REFERENCE, t, "train_samples_per_s"), ",.0f", e.get("train_skipped"))
            row.append(f"{lat}\n{thr}" if e.get("train_samples_per_s") is not None or e.get("train_skipped") else lat)
        table.add_row(name, *row)
    console.print(table)
    for c in report["checks"]:
        mark = {True: "[green]met[/]", False: "[red]NOT met[/]", None: "[yellow]not measured[/]"}[c["passed"]]
        console.print(f"{mark}  {c['target']}: {c['measured']}")
