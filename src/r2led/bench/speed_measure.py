"""The speed benchmark's measurements: peak memory, timing, limits extrapolated from shorter
runs, the serving modes (warm, cold, batch path, floor), and the interleaved serving and
training phases (see ``Phase``).

What is measured, and how, is in the docstring of ``r2led.bench.speed``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from r2led.bench.speed_workload import REFERENCE, TRAIN_T_MAX, Catalogue, Workload, make_workload
from r2led.train.trainer import train_step

CALIBRATION_T = 32  # first, tiny length every model runs at, to extrapolate from
FLOOR = "floor"  # the unavoidable work alone (``Floor``)
MODES = {
    "warm": "{}",  # the request API on a state built and kept before the request
    "cold": "{} (cold)",  # the request API on a state built inside the request
    "batch": "{} (batch path)",  # the batch path on C rows sharing the history: what bench speed timed before
}


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
            return (
                f"not run: needs ~{_gb(need)} GB > {_gb(memory_limit)} GB limit "
                f"(extrapolated from {_mb(self.peak)} MB at T={self.t:,})"
            )
        if self.seconds * scale > time_limit:
            return (
                f"not run: ~{self.seconds * scale:,.0f} s per call > {time_limit:g} s limit "
                f"(extrapolated from {self.seconds:.2f} s at T={self.t:,})"
            )
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
    mode: str | None = None  # "warm", "cold", "batch" or "floor"
    state_mb: float | None = None  # memory of one user's kept state (warm mode), the model's index included
    append_us: float | None = None  # median time of one append to a kept state (warm mode), its index included
    peak_mb: float | None = None  # extra memory of one request
    train_samples_per_s: float | None = None
    train_step_ms: float | None = None
    train_peak_mb: float | None = None  # extra memory of one training step
    serve_skipped: str | None = None
    train_skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        reasons = [
            f"{what}: {why}" for what, why in (("serving", self.serve_skipped), ("training", self.train_skipped)) if why
        ]
        out["skipped"] = "; ".join(reasons) or None
        return out


@dataclass
class Contender:
    """A model (or the floor) in one serving mode, with its optimizer when its training is
    measured, and what its runs so far predict."""

    name: str  # as reported: "sim-hard", "sim-hard (cold)", "sim-hard (batch path)", "floor"
    model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer | None  # None: serving only
    mode: str = "warm"
    max_t: int | None = None  # longest history it is run at (the batch path's strawman stops early)
    floor: Floor | None = None
    serve: Track = field(default_factory=Track)
    train: Track = field(default_factory=Track)

    def request(self, work: Workload, i: int) -> object:
        """One serving request ``i`` of ``work`` in this contender's mode."""
        hist, signal, feats, cands = work.requests[i % len(work.requests)]
        if self.mode == "floor":
            return self.floor.call(work, i)
        if self.mode == "warm":
            return self.model.score_request(work.state(i), cands)
        if self.mode == "cold":
            return self.model.score_request(self.model.new_user_state(hist, signal, feats), cands)
        with torch.inference_mode():
            return self.model(work.request(i, shared=True))

    def append_seconds(self, work: Workload, n: int = 200) -> float:
        """Median time of one ``UserState.append`` to a state of this length with the model's
        index built (warm mode); the state is a copy, so the requests' states stay at length T."""
        hist, signal, feats, cands = work.requests[0]
        state = self.model.new_user_state(hist, signal, feats)
        self.model.score_request(state, cands)  # builds the index, which every append updates
        items, signals = work.requests[1 % len(work.requests)][0][:n], work.requests[1 % len(work.requests)][1][:n]
        times = []
        for item, sig in zip(items.tolist(), signals.tolist(), strict=False):
            start = time.perf_counter()
            state.append(item, sig)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def state_bytes(self, work: Workload) -> int:
        """One user's kept state with this model's index (warm mode), in bytes."""
        if self.mode != "warm":
            return 0
        state = work.state(0)
        self.model.score_request(state, work.requests[0][3])  # the index is built on first use
        index = state.index_for(self.model)
        own = state.items.nbytes + state.signals.nbytes + state.counts.nbytes
        return own + (index.nbytes() if index is not None else 0)


class Floor:
    """The unavoidable work of one R2LED request, timed alone: one pass over the user's
    state (the popcount of every candidate against every distinct item's signature,
    ``route_kernels.scan_similarities``) and the refinement's dense products (DIN's unit over
    the R k route slots and the short window, the route fusion and the head) on inputs
    gathered beforehand. No retrieval logic, no gathering, no Python beyond the calls."""

    def __init__(self, model):
        self.model = model
        self._inputs: dict[tuple[int, int], tuple] = {}

    def prepare(self, work: Workload, i: int) -> tuple:
        key = (work.t, i % len(work.requests))
        if key not in self._inputs:
            m = self.model
            _, _, _, cands = work.requests[i % len(work.requests)]
            state = work.state(i)
            cand = torch.from_numpy(cands)
            with torch.inference_mode():
                m.score_request(state, cands)
                index = state.index_for(m)
                words = m._signature_words()
                slot_sig = index.signatures(words, m.cache_generation)
                positions, taken = m.request_routes(state, cand)
                items, _ = m.serving_tables()
                hist, sig = torch.from_numpy(state.items), torch.from_numpy(state.signals)
                flat = positions.view(-1)
                r_rows = m.request_behaviours("route_attention", hist[flat], sig[flat])
                s_rows = m.request_behaviours("short_attention", *m.request_short(state, m.cfg.short_len))
                user = m.request_user_repr(state, len(cand)).contiguous()
            self._inputs[key] = (
                words[cands],
                np.ascontiguousarray(slot_sig),
                items[cand].contiguous(),
                r_rows.view(*positions.shape, -1).contiguous(),
                taken,
                s_rows.contiguous(),
                user,
            )
        return self._inputs[key]

    def call(self, work: Workload, i: int):
        from r2led.models import route_kernels

        target_sig, slot_sig, target, r_rows, taken, s_rows, user = self.prepare(work, i)
        m = self.model
        sims = np.empty(len(slot_sig), np.int16)
        route_kernels.scan_similarities(target_sig, slot_sig, sims)
        with torch.inference_mode():
            routes, mass = m._serve_attention(m.route_attention, target, r_rows, taken, m.cfg.route_mass)
            s_mask = torch.ones(len(s_rows), dtype=torch.bool)
            r_short, _ = m._serve_attention(m.short_attention, target, s_rows, s_mask)
            t = target[:, :-1]
            z = m.route_fusion(t, routes, taken.any(-1), mass)
            return m.head(torch.cat([user, t, z, r_short, t * z], dim=-1))


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

    def __enter__(self) -> FloatTensorSizes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


# ---- calibration and the interleaved phases ------------------------------------------------
def calibrate(contenders: list[Contender], cat: Catalogue, candidates: int, batch: int, seed: int) -> None:
    """Every model runs once at a tiny length, to extrapolate its first real run from."""
    work = make_workload(cat, CALIBRATION_T, 1, candidates, batch, seed)
    for c in contenders:
        if c.model is not None:
            c.model.eval()
        try:
            c.request(work, 0)  # compiles, fills caches
            (_, peak), seconds = _timed(lambda c=c: peak_allocated(lambda: c.request(work, 0)))
            c.serve.t, c.serve.peak, c.serve.seconds = work.t, peak + c.state_bytes(work) * len(work.users), seconds
        except Exception as exc:  # noqa: BLE001 - the model is reported as not run, the others go on
            c.serve.stopped = _failure(exc, work.t)
        if c.optimizer is not None:
            c.model.train()
            try:
                train_step(c.model, c.model, c.optimizer, work.train)  # creates the optimizer state
                (_, peak), seconds = _timed(
                    lambda c=c: peak_allocated(lambda: train_step(c.model, c.model, c.optimizer, work.train))
                )
                c.train.t, c.train.peak, c.train.seconds = work.t, peak, seconds
            except Exception as exc:  # noqa: BLE001
                c.train.stopped = _failure(exc, work.t)
            c.model.eval()


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
            c.request(work, i)
        else:
            train_step(c.model, c.model, c.optimizer, work.train)

    def _skip(self, entry: Entry, reason: str) -> None:
        if self.kind == "serving":
            entry.serve_skipped = reason
        else:
            entry.train_skipped = reason

    def run(self, contenders: list[Contender], workloads: dict[int, Workload], results: dict, progress, task) -> None:
        for c in contenders:
            if c.model is not None:
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
                        results[c.name][str(t)].notes.append(
                            f"{self.kind} stopped after {len(walls)} of {self.rounds}: {_failure(exc, t)}"
                        )
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
                self._skip(
                    entry, f"not run: stopped at a shorter length ({entry.notes[-1] if entry.notes else 'see notes'})"
                )
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
        if not reason and self.kind == "serving" and c.max_t is not None and work.t > c.max_t:
            reason = f"not run: the strawman is timed up to T={c.max_t:,} only"
        if not reason and self.kind == "training" and work.t > TRAIN_T_MAX:
            reason = (
                f"not run: training is measured up to T={TRAIN_T_MAX:,} (a batch of histories that long would not fit)"
            )
        if reason:
            self._skip(entry, reason)
            progress.advance(task, self.units)
            return False
        try:
            seconds = math.inf
            for i in range(self.warmup):  # first calls: caches, optimizer state
                _, took = _timed(lambda i=i: self.call(c, work, i))
                seconds = min(seconds, took)
                progress.advance(task)
                if took > self.time_limit:
                    raise _TooSlow(took)
            _, peak = peak_allocated(lambda: self.call(c, work, self.warmup))
            progress.advance(task)
            state = c.state_bytes(work) if self.kind == "serving" else 0
            if self.kind == "serving" and c.mode == "warm":  # every user's state is built before the timed rounds
                for i in range(len(work.users)):
                    c.request(work, i)
            if self.kind == "serving" and c.mode == "floor":  # the floor's inputs are gathered untimed
                for i in range(len(work.requests)):
                    c.floor.prepare(work, i)
        except _TooSlow as slow:
            track.stopped = (
                f"not run: a warm-up call took {slow.seconds:.1f} s > {self.time_limit:g} s limit at T={work.t:,}"
            )
        except Exception as exc:  # noqa: BLE001 - recorded in the report, the other models go on
            track.stopped = _failure(exc, work.t)
            progress.console.print(f"[yellow]{c.name}, {self.kind} at T={work.t:,}: {track.stopped}")
        if track.stopped:
            self._skip(entry, track.stopped)
            progress.advance(task, self.rounds + 1)
            return False
        track.t, track.peak, track.seconds = work.t, peak + state * len(work.users), seconds
        if self.kind == "serving":
            entry.peak_mb = peak / 2**20
            entry.mode = c.mode
            entry.state_mb = state / 2**20 if c.mode == "warm" else None
            entry.append_us = c.append_seconds(work) * 1e6 if c.mode == "warm" else None
        else:
            entry.train_peak_mb = peak / 2**20
        return True


def retrieval_float_check(
    contenders, cat: Catalogue, lengths: list[int], results: dict, candidates: int, seed: int
) -> dict | None:
    """The largest float tensor R2LED builds for one request at the longest length it ran:
    in its retrieval, and in the whole request (warm state)."""
    ref = next((c for c in contenders if c.name == REFERENCE), None)
    ran = [
        t
        for t in lengths
        if results.get(REFERENCE, {}).get(str(t)) and results[REFERENCE][str(t)].latency_ms_p50 is not None
    ]
    if ref is None or not ran:
        return None
    t = max(ran)
    work = make_workload(cat, t, 1, candidates, 1, seed)
    hist, signal, feats, cands = work.requests[0]
    ref.model.eval()
    state = ref.model.new_user_state(hist, signal, feats)
    ref.model.score_request(state, cands)  # the per-item caches and the user's index, filled
    with torch.inference_mode(), FloatTensorSizes() as in_retrieval:
        ref.model.request_routes(state, torch.from_numpy(cands))
    with FloatTensorSizes() as in_request:
        ref.model.score_request(state, cands)
    return {
        "t": t,
        "candidates": candidates,
        "largest_float_elements_retrieval": in_retrieval.largest,
        "largest_float_elements_request": in_request.largest,
        "candidates_x_t": candidates * t,
        "candidates_x_t_x_d": candidates * t * ref.model.cfg.dim,
    }


def route_recall(exact: np.ndarray, n_exact: np.ndarray, approx: np.ndarray, n_approx: np.ndarray) -> float:
    """Top-k recall of an approximate retrieval: of the behaviours the exact routes take
    (positions (C, R, k), counts (C, R)), the share the approximate routes of the same
    candidate take too (in any of its routes)."""
    hits = total = 0
    for c in range(len(exact)):
        got = set(approx[c][np.arange(approx.shape[-1]) < n_approx[c][:, None]].tolist())
        want = exact[c][np.arange(exact.shape[-1]) < n_exact[c][:, None]].tolist()
        hits += sum(p in got for p in want)
        total += len(want)
    return hits / total if total else 1.0


def collaborative_recall(contenders, workloads: dict, requests: int = 5) -> dict | None:
    """Per T, the route recall (``route_recall``) of each R2LED contender with an approximate
    collaborative index (``collaborative_bands``) against its own exact search, over the first
    ``requests`` requests; None if no contender has one."""
    out = {}
    for c in contenders:
        bands = getattr(c.model, "collaborative_bands", 0) if c.mode == "warm" else 0
        if not bands:
            continue
        per_t = {}
        for t, work in workloads.items():
            recalls = []
            for i in range(min(requests, len(work.requests))):
                state, cands = work.state(i), torch.from_numpy(work.requests[i][3])
                with torch.inference_mode():
                    approx, a_taken = c.model.request_routes(state, cands)
                    c.model.collaborative_bands = 0
                    try:
                        exact, e_taken = c.model.request_routes(state, cands)
                    finally:
                        c.model.collaborative_bands = bands
                recalls.append(
                    route_recall(exact.numpy(), e_taken.sum(-1).numpy(), approx.numpy(), a_taken.sum(-1).numpy())
                )
            per_t[str(t)] = float(np.mean(recalls))
        out[c.name] = {"bands": bands, "recall": per_t}
    return out or None
