"""Multi-process training on an existing engine: ``torchrun`` + DistributedDataParallel.

The rules (``docs/scale.md`` shows the launch on one or several nodes):

- **Engine.** ``torchrun`` starts the ranks; ``Distributed.from_env`` joins the process group
  (gloo: the trainer keeps its tensors on the CPU) from torchrun's environment.
- **Batch and learning rate.** The global batch is ``train.batch_size`` whatever the number of
  ranks: each rank takes ``batch_size / world`` samples a step and DDP averages the gradients,
  so a step is the single-process step on a batch of the same size, and ``train.lr`` is kept
  as it is. ``local_batch_size`` logs the rule.
- **Sample shards.** Each rank reads only its contiguous shard of every split of the sample
  table (``LifelongStore.sample_view``); the sequences are memory-mapped and shared by all.
- **Evaluation** runs on every rank over its shard; ``Distributed.gather`` brings the
  predictions (with labels and users) to rank 0, in split order, for the metrics.
- **Threads.** Torch threads default to the usable cores divided by the ranks on the node, and
  the OpenMP wait policy is passive (set in ``r2led/__init__.py``, before torch loads), so a
  busy core never makes spinning threads wait on each other.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from r2led.data.protocol import SPLITS
from r2led.data.store import LifelongStore

log = logging.getLogger("r2led.train")


@dataclass
class Distributed:
    """This process's place among the ranks (``world == 1`` without torchrun)."""

    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")  # the trainer keeps every tensor on the CPU; nccl would refuse them
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_flag(self, value: bool) -> bool:
        if self.world == 1:
            return value
        flag = torch.tensor([int(value)])
        dist.broadcast(flag, 0)
        return bool(flag.item())

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module`` (in place)."""
        if self.world == 1:
            return
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)

    def gather(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Every rank's 1-D ``arrays`` concatenated in rank order (returned on every rank)."""
        if self.world == 1:
            return list(arrays)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(arrays[0])], dtype=torch.long))
        sizes = [int(s.item()) for s in sizes]
        width = max(max(sizes), 1)
        out = []
        for a in arrays:
            local = torch.zeros(width, dtype=torch.float64)
            local[: len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float64))
            parts = [torch.zeros(width, dtype=torch.float64) for _ in range(self.world)]
            dist.all_gather(parts, local)
            out.append(
                np.concatenate([p[:n].numpy() for p, n in zip(parts, sizes, strict=False)]).astype(np.asarray(a).dtype)
            )
        return out


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None, d: Distributed) -> int:
    """Set torch's intra-op threads: ``threads``, else usable cores / ranks on this node."""
    n = threads or max(1, usable_cores() // max(d.local_world, 1))
    torch.set_num_threads(n)
    return n


def local_batch_size(batch_size: int, d: Distributed) -> int:
    """Samples per rank and step so that the global batch stays ``batch_size`` (logged)."""
    if d.world == 1:
        return batch_size
    local = max(1, batch_size // d.world)
    if d.main:
        log.info(
            "DDP: %d ranks x %d samples = global batch %d (train.batch_size %d); lr unchanged, gradients averaged",
            d.world,
            local,
            local * d.world,
            batch_size,
        )
    return local


def shard(lo: int, hi: int, d: Distributed, equal: bool = False) -> tuple[int, int]:
    """This rank's contiguous part of rows ``[lo, hi)``; ``equal``: every rank the same size
    (the last ``(hi - lo) % world`` rows are dropped), as training steps must match."""
    n = hi - lo
    if equal:
        per = n // d.world
        return lo + d.rank * per, lo + (d.rank + 1) * per
    return lo + n * d.rank // d.world, lo + n * (d.rank + 1) // d.world


def shard_store(
    store: LifelongStore, d: Distributed, max_train: int | None = None, max_eval: int | None = None
) -> LifelongStore:
    """A view of ``store`` holding only this rank's shard of each split of the sample table.

    Splits are contiguous row ranges of ``samples.parquet`` (train, then valid, then test);
    ``max_train`` / ``max_eval`` cut each split to its first rows before sharding, as the
    single-process trainer does. The train shards are equal in size.
    """
    counts = [int(store.manifest["samples"][s]) for s in SPLITS]
    starts = np.concatenate([[0], np.cumsum(counts)])
    ranges = []
    for k, name in enumerate(SPLITS):
        lo, hi = int(starts[k]), int(starts[k + 1])
        limit = max_train if name == "train" else max_eval
        if limit is not None:
            hi = min(hi, lo + limit)
        ranges.append(shard(lo, hi, d, equal=name == "train"))
    return store.sample_view(ranges)
