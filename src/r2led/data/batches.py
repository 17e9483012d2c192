"""Batches: sample indices -> tensors, with histories sliced from the store on the fly.

A batch is padded to its own longest history (capped at ``t_max``), not to ``t_max``.
Training batches are bucketed by history length: samples are shuffled, then sorted by length
inside chunks of ``bucket`` batches, so one batch holds similar lengths and padding is small;
the batches themselves are shuffled again so that lengths do not trend over an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from r2led.data.store import LifelongStore


@dataclass
class Batch:
    """Model input. Shapes: B samples, L = the batch's longest history (left-padded)."""

    user: torch.Tensor  # (B,) long     user id (for GAUC and serving caches)
    user_feats: torch.Tensor  # (B, F) long  categorical user features
    target: torch.Tensor  # (B,) long     target item id
    hist_items: torch.Tensor  # (B, L) long  history item ids, 0 = padding, most recent last
    hist_signal: torch.Tensor  # (B, L) long behaviour signal (e.g. rating), 0 = padding
    hist_mask: torch.Tensor  # (B, L) bool  True where a behaviour is present
    label: torch.Tensor  # (B,) float

    def __len__(self) -> int:
        return int(self.target.shape[0])


def make_batch(store: LifelongStore, sample_idx: np.ndarray, t_max: int) -> Batch:
    """Gather samples ``sample_idx`` of ``store`` into a ``Batch`` (vectorised)."""
    s = store.sample_arrays
    user = s["user"][sample_idx].astype(np.int64)
    window = store.history(user, s["pos"][sample_idx], t_max)
    return Batch(
        user=torch.from_numpy(user),
        user_feats=torch.from_numpy(store.user_features[user]),
        target=torch.from_numpy(s["target"][sample_idx].astype(np.int64)),
        hist_items=torch.from_numpy(window.items),
        hist_signal=torch.from_numpy(window.signal),
        hist_mask=torch.from_numpy(window.mask),
        label=torch.from_numpy(s["label"][sample_idx].astype(np.float32)),
    )


def batch_order(
    lengths: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int,
    bucket: int = 32,
    max_tokens: int | None = None,
) -> list[np.ndarray]:
    """Positions into ``lengths`` grouped into batches (bucketed by length when shuffling).

    ``max_tokens`` (unshuffled only, e.g. evaluation): a batch also ends before its
    ``size x longest history`` would exceed it, so that batch memory is bounded whatever
    ``T_max`` is (a batch holds at least one sample).
    """
    n = len(lengths)
    if not shuffle:
        if max_tokens is None:
            return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        return _token_bounded(np.asarray(lengths), batch_size, max_tokens)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    chunk = batch_size * max(bucket, 1)
    batches = []
    for i in range(0, n, chunk):
        part = perm[i : i + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _token_bounded(lengths: np.ndarray, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Consecutive batches of at most ``batch_size`` samples and ``max_tokens`` padded tokens."""
    batches, i, n = [], 0, len(lengths)
    while i < n:
        part = lengths[i : i + batch_size]
        width = np.maximum(np.maximum.accumulate(part), 1)  # (b,) padded width with the first j+1 samples
        fits = width * np.arange(1, len(part) + 1) <= max_tokens
        size = len(part) if fits.all() else max(1, int(np.argmin(fits)))  # up to the first that does not fit
        batches.append(np.arange(i, i + size))
        i += size
    return batches


class BatchIterator:
    """Iterates a split (or any index array) of a store as ``Batch`` objects.

    Under distributed training each rank iterates its own shard of the store (equal sizes, so
    equal step counts); the iterator itself does not shard.
    ``max_tokens`` bounds unshuffled batches by ``size x longest history`` (evaluation).
    """

    def __init__(
        self,
        store: LifelongStore,
        sample_idx: np.ndarray,
        batch_size: int,
        t_max: int,
        shuffle: bool = False,
        seed: int = 0,
        bucket: int = 32,
        max_tokens: int | None = None,
    ):
        self.store, self.sample_idx = store, np.asarray(sample_idx)
        self.batch_size, self.t_max = batch_size, t_max
        self.shuffle, self.seed, self.bucket = shuffle, seed, bucket
        self.max_tokens = max_tokens
        self.epoch = 0

    def batch_positions(self) -> list[np.ndarray]:
        """This epoch's batches, as positions into ``sample_idx``, in iteration order."""
        lengths = self.store.history_lengths(self.sample_idx, self.t_max)
        return batch_order(lengths, self.batch_size, self.shuffle, self.seed + self.epoch, self.bucket, self.max_tokens)

    def __len__(self) -> int:
        return len(self.batch_positions())

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Batch]:
        """The batches from position ``start`` of this epoch's order on (a resumed run's data
        position); the ones before it are not built."""
        for positions in self.batch_positions()[start:]:
            yield make_batch(self.store, self.sample_idx[positions], self.t_max)
