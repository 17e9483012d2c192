"""Memory guard: estimate what a training run needs before allocating it, and refuse in time.

``--set model.k=100000`` once ran until the kernel killed it at 23.7 GB. ``check_memory`` is
called by the trainer before the model and the first batch exist: it estimates the peak
memory of the configuration on this store and raises a one-line ``ConfigError`` (exit code 2)
with the estimate when that exceeds the memory available (``MemAvailable`` in
``/proc/meminfo``, or the cgroup's limit when lower, shared by the local DDP processes), unless
``--max-memory`` says how much to allow.

The estimate, in bytes, is the sum of

- model state: 16 B per parameter (weights, gradients, Adam's two moments) plus the per-item
  buffers (category, tags, SID prefix tokens: int64);
- the sample table held in memory (user, pos, target, label, split, rank);
- the larger of one training step and one evaluation batch, each
  ``batch x (L x per-behaviour bytes + slots x per-slot bytes)`` where L is the longest history
  a batch can hold (``min(train.t_max, longest history in the store)``) and slots are the
  behaviours a model attends to after selection (``routes x model.k`` retrieved plus the
  ``model.short_len`` recent ones);
- a fixed allowance for the runtime's working memory during a step.

Per-behaviour and per-slot bytes were measured (peak RSS of two training steps and of one
evaluation batch, one process per point, synthetic store with 3,000 behaviours per user,
B = 128, T in {500, 2000}, k in {20, 1000, 4000}, d in {32, 64}; evaluation at B = 512) and
are stated below. On those 29 points estimate / measured lies between 0.95 and 1.6; on a full
ml-100k epoch (R2LED and DIN over the whole history, default settings) it is 0.8 to 1.4.

``tune_allocator`` sets glibc's malloc up for training: a step allocates and frees the same
few-MB activation buffers every time, and with glibc's defaults they are mapped and unmapped
(or the heap trimmed) each step, so every step page-faults them in again (about 1,100 minor
faults per R2LED step on ml-1m). Kept, they are reused (about 90 per step, measured).
"""

from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from r2led.config import RunConfig
from r2led.errors import ConfigError

GB = 1e9
EVAL_TOKENS = 1 << 22  # an evaluation batch holds at most this many (padded) history tokens
STEP_OVERHEAD = 96 * 2**20  # allocator arenas, autograd and thread workspaces of one step (measured ~80 MB)
INDEX_BYTES = 64  # per history slot: the batch's int64 items/signal, mask and the window's index arrays
# Per history slot and per unit of d, the float activations (and their gradients) a model keeps
# for the whole window; models not listed read only the short window and the retrieved slots.
HISTORY_BYTES_PER_DIM = {"avgpool": 5, "eta": 3, "sdim": 4, "twin": 7, "sim-soft": 14}
# DIN's activation unit runs its MLP (hidden sizes independent of d) on every behaviour.
HISTORY_BYTES_FIXED = {"din-long": 2400}
_SHORT_OR_RETRIEVAL = {"r2led", "din", "sim-hard"}  # read the full window only as integers
# R2LED compiles its numba route kernels on the first batch (~110 MB measured at any T and k).
MODEL_FIXED_BYTES = {"r2led": 110 * 2**20}
SLOT_BYTES_PER_DIM = 44  # per attended slot and unit of d: gathered embeddings, attention, gradients
DENSE_SQUARES = {"sim-soft": 20}  # d x d weight matrices beyond the head (default 8)
SAMPLE_ROW_BYTES = 48  # the sample table's six columns
EVAL_SHARE = 0.35  # evaluation keeps no activations for backward (measured 0.35 for din-long and sim-soft)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a configuration needs, in bytes, by part."""

    model: int  # parameters, gradients, Adam state, per-item buffers
    data: int  # the sample table
    train_step: int  # one training batch: inputs, activations, gradients
    eval_batch: int  # one evaluation batch (no gradients)
    overhead: int
    batch: int  # rows in the largest training batch
    length: int  # L: history slots per row
    slots: int  # attended slots per row (retrieved + short window)

    @property
    def total(self) -> int:
        return self.model + self.data + max(self.train_step, self.eval_batch) + self.overhead

    def summary(self) -> str:
        step = "training batch" if self.train_step >= self.eval_batch else "evaluation batch"
        return (
            f"{self.total / GB:.1f} GB (model and Adam state {self.model / GB:.2f} GB, {step} of {self.batch:,} rows x "
            f"{self.length:,} behaviours + {self.slots:,} attended {max(self.train_step, self.eval_batch) / GB:.1f} GB)"
        )


def _parameters(cfg: RunConfig, manifest: dict, sid_vocab: list[int]) -> int:
    """Parameters of the model: every embedding table exactly, the dense layers closely."""
    m = cfg.model
    d = m.dim
    rows = (
        int(manifest["items"])
        + 1
        + int(manifest["categories"])
        + int(manifest["tags"])
        + int(manifest["signal_max"])
        + 1
    )
    rows += sum(int(v) for v in manifest["user_features"].values()) + sum(sid_vocab)
    embeddings = rows * d
    # Head MLP on [user features, history profile, up to ~6 representation vectors], and the
    # d x d projections of the attention blocks (fitted on each model's count at d = 256).
    width = len(manifest["user_features"]) * d + int(manifest["signal_max"]) + 1 + 6 * d
    head, prev = 0, width
    for hidden in [*m.mlp, 1]:
        head += prev * hidden + hidden
        prev = hidden
    return embeddings + head + DENSE_SQUARES.get(m.name, 8) * d * d


def estimate_memory(
    cfg: RunConfig, manifest: dict, sid_vocab: list[int] | None = None, world: int = 1
) -> MemoryEstimate:
    """Peak memory of training ``cfg`` on the store described by ``manifest`` (one process).

    ``sid_vocab``: the SID table's vocabulary sizes when the model uses one. ``world``: DDP
    processes, each training on ``batch_size`` rows of its own.
    """
    m, t = cfg.model, cfg.train
    sid_vocab = list(sid_vocab or [])
    d = m.dim
    longest = max((int(h.get("max", 0)) for h in manifest["history"].values()), default=0)
    length = max(1, min(t.t_max, longest))
    samples = manifest["samples"]
    n_train = int(samples.get("train", 0))
    if t.max_train_samples:
        n_train = min(n_train, t.max_train_samples)
    n_eval = max(int(samples.get("valid", 0)), int(samples.get("test", 0)))
    if t.max_eval_samples:
        n_eval = min(n_eval, t.max_eval_samples)
    batch = max(1, min(t.batch_size, -(-n_train // world) if n_train else t.batch_size))
    eval_batch = max(1, min(t.eval_batch_size, n_eval or t.eval_batch_size))

    k = int(getattr(m, "k", 0) or 0)
    routes = 1
    if "routes" in type(m).model_fields:  # one retrieval route per SID level (or the given number)
        routes = int(getattr(m, "routes", None) or len(sid_vocab) or 3)
    slots = routes * k + min(m.short_len, length)
    name = m.name
    per_behaviour = INDEX_BYTES + HISTORY_BYTES_PER_DIM.get(name, 0) * d + HISTORY_BYTES_FIXED.get(name, 0)
    if name not in HISTORY_BYTES_PER_DIM and name not in HISTORY_BYTES_FIXED and name not in _SHORT_OR_RETRIEVAL:
        per_behaviour += (
            max(HISTORY_BYTES_FIXED.values()) + max(HISTORY_BYTES_PER_DIM.values()) * d
        )  # unknown: assume the most
    per_slot = SLOT_BYTES_PER_DIM * d
    train_step = batch * (length * per_behaviour + slots * per_slot)
    eval_per_behaviour = INDEX_BYTES + EVAL_SHARE * (per_behaviour - INDEX_BYTES)
    eval_batch = max(1, min(eval_batch, EVAL_TOKENS // length))  # the trainer's token cap (predict)
    eval_bytes = eval_batch * (length * eval_per_behaviour + slots * EVAL_SHARE * per_slot)

    params = _parameters(cfg, manifest, sid_vocab)
    buffers = (int(manifest["items"]) + 1) * (2 + int(manifest.get("max_tags", 1)) + len(sid_vocab)) * 8
    n_samples = sum(int(v) for v in samples.values())
    return MemoryEstimate(
        model=16 * params + buffers,
        data=n_samples * SAMPLE_ROW_BYTES,
        train_step=int(train_step),
        eval_batch=int(eval_bytes),
        overhead=STEP_OVERHEAD + MODEL_FIXED_BYTES.get(name, 0),
        batch=batch,
        length=length,
        slots=slots,
    )


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """``"8GB"`` -> 8e9 bytes, ``"512MiB"`` -> 512 * 2**20, ``"1e9"``/``123`` -> bytes."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _SIZE.match(str(text))
        if match is None:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"--max-memory {text!r}: expected a size such as 8GB, 512MiB or 2e9") from None
        else:
            number, unit, binary, _ = match.groups()
            base = 1024 if binary else 1000
            value = float(number) * base ** "_kmgt".index(unit.lower() or "_")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"--max-memory {text!r}: must be a positive size such as 8GB")
    return int(value)


def _cgroup_headroom() -> int | None:
    """Bytes the process's cgroup (v2) still allows, or None when unlimited / unknown."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        root = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def available_memory() -> int:
    """Memory this process can still take: MemAvailable, or the cgroup's headroom when lower."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        import psutil

        avail = int(psutil.virtual_memory().available)
    headroom = _cgroup_headroom()
    return min(avail, headroom) if headroom is not None else avail


def check_memory(
    cfg: RunConfig,
    manifest: dict,
    sid_vocab: list[int] | None = None,
    max_memory: str | int | None = None,
    world: int = 1,
    local: int = 1,
) -> MemoryEstimate:
    """Refuse (``ConfigError``, one line with the estimate) a run that will not fit in memory.

    ``max_memory``: the budget to allow instead of the memory available now (``"8GB"``).
    ``world`` / ``local``: the ranks in all and on this node (the trainer's ``Distributed``).
    """
    est = estimate_memory(cfg, manifest, sid_vocab, world=world)
    if max_memory is not None:
        budget, source = parse_size(max_memory), "--max-memory"
    else:
        budget, source = (
            available_memory() // max(local, 1),
            "available" + (f" per process ({local} here)" if local > 1 else ""),
        )
    if est.total > budget:
        raise ConfigError(
            f"this run needs about {est.summary()}, more than the {budget / GB:.1f} GB {source}; lower "
            f"{_knobs(cfg, est)}, or pass --max-memory {max(1, round(est.total * 1.2 / GB))}GB to try anyway"
        )
    return est


def _knobs(cfg: RunConfig, est: MemoryEstimate) -> str:
    """The settings that drive the largest part of the estimate, the biggest first."""
    if est.model > max(est.train_step, est.eval_batch):
        return "model.dim"
    batch = "train.eval_batch_size" if est.eval_batch > est.train_step else "train.batch_size"
    history = ["train.t_max"] if est.length > 1 else []
    retrieved = ["model.k"] if getattr(cfg.model, "k", 0) else []
    knobs = [*retrieved, *history] if est.slots > est.length else [*history, *retrieved]
    knobs = [knobs[0], batch, "model.dim", *knobs[1:]] if knobs else [batch, "model.dim"]
    return ", ".join(knobs[:-1]) + " or " + knobs[-1]


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # blocks below this come from the heap (glibc's largest allowed value)
TRIM_THRESHOLD = 2**30  # free memory at the heap's top kept up to this, instead of returned


def tune_allocator() -> bool:
    """Let glibc's malloc keep and reuse what a training step frees (see the module
    docstring): allocations under 32 MB from the heap, and up to 1 GB of freed heap kept.
    Measured on ml-1m (40 R2LED training steps, 1 thread, one process each, twice): peak RSS
    802-842 MB tuned against 795-799 MB untuned, and 1-3 % more samples/s on an idle machine
    (more under load, when page faults cost more). Returns whether it applied (False off glibc,
    e.g. macOS or musl: nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
