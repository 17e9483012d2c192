"""Residual quantizers: item embeddings (N, D) -> hierarchical codes (N, L).

- ``rq-kmeans`` (default): level 1 clusters the embeddings with k-means, level l clusters the
  residuals left by levels 1..l-1 (faiss k-means, seeded). No training beyond k-means.
- ``rq-kmeans-balanced``: the same, with size-balanced k-means at every level: no code holds
  more than ceil(N / K) items (``balanced_kmeans``), so that codes are used evenly and fewer
  items share a SID.
- ``rq-vae`` and ``rq-vae-sinkhorn``: a residual-quantized autoencoder, in ``r2led.sid.rq_vae``
  (which builds on the k-means here). ``r2led.sid.build.quantize`` picks one by name.

Codebook sizes may differ per level (``[16, 16, 32]``). Both quantizers report how much of
the embeddings' variance each level leaves unexplained, so that levels can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from r2led.errors import DataError

BALANCED_ITERATIONS = 10  # capacity-constrained assignment / centroid update rounds
KMEANS_NITER = 25
NREDO = 5  # k-means restarts, best objective kept: one run often merges two true clusters
SINGLE_THREAD_WORK = 1 << 24  # n * k below which k-means runs on one thread


@dataclass
class Quantization:
    """Codes of items 1..N and the quantizer's own quality measures."""

    codes: np.ndarray  # (N, L) int64, level l's code in [0, K_l)
    residual_variance: list[float]  # per level l: fraction of variance left after levels 1..l
    reconstruction_error: float  # fraction of the input's variance the quantizer fails to rebuild
    params: dict = field(default_factory=dict)  # quantizer hyper-parameters, for meta.json


def total_variance(x: np.ndarray) -> float:
    """Sum of squared deviations from the mean: the denominator of every 'variance left' figure."""
    x = x.astype(np.float64, copy=False)
    return float(((x - x.mean(axis=0)) ** 2).sum())


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = KMEANS_NITER) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means of rows of x (n, d) into k clusters; returns (centroids (k, d), assignment (n,)).

    faiss re-seeds empty clusters by splitting large ones, so every code is used whenever the
    points allow it (at least k distinct rows).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise DataError(f"k-means: {n} points cannot fill a codebook of {k} codes")
    # min_points_per_centroid=1: small catalogues are clustered on purpose; no faiss warning.
    km = faiss.Kmeans(d, k, niter=niter, nredo=NREDO, seed=seed, verbose=False, min_points_per_centroid=1)
    # Small problems run on one OpenMP thread: busy-waiting OpenMP threads on a shared machine
    # made them up to 10x slower. The choice depends on the size only, never on the load, so
    # that the codes do not either.
    threads = faiss.omp_get_max_threads()
    if n * k < SINGLE_THREAD_WORK:
        faiss.omp_set_num_threads(1)
    try:
        km.train(x)
        _, assign = km.index.search(x, 1)  # (n, 1)
    finally:
        faiss.omp_set_num_threads(threads)
    return km.centroids.copy(), assign.ravel().astype(np.int64)


def balanced_assignment(x: np.ndarray, centroids: np.ndarray, capacity: int) -> np.ndarray:
    """Assign rows of x (n, d) to centroids (k, d), at most ``capacity`` rows per centroid.

    Greedy by regret: rows whose nearest centroid is much closer than their second choice
    pick first, each taking its nearest centroid that still has room. Returns (n,) int64.
    Needs k * capacity >= n.
    """
    n, k = x.shape[0], centroids.shape[0]
    if k * capacity < n:
        raise ValueError(f"{k} centroids x capacity {capacity} cannot hold {n} rows")
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    dist = (x64**2).sum(1, keepdims=True) - 2 * x64 @ c64.T + (c64**2).sum(1)  # (n, k)
    prefs = np.argsort(dist, axis=1, kind="stable")  # (n, k) nearest first
    rows = np.arange(n)
    regret = dist[rows, prefs[:, 1]] - dist[rows, prefs[:, 0]] if k > 1 else np.zeros(n)
    order = np.argsort(-regret, kind="stable")
    return _walk_preferences(np.ascontiguousarray(prefs), np.ascontiguousarray(order), int(capacity), int(k))


@njit(cache=True)
def _walk_preferences(prefs: np.ndarray, order: np.ndarray, capacity: int, k: int) -> np.ndarray:
    """Each row in ``order`` takes its first preferred centroid (prefs (n, k)) with room left."""
    load = np.zeros(k, dtype=np.int64)
    out = np.empty(prefs.shape[0], dtype=np.int64)
    for i in order:
        for c in prefs[i]:
            if load[c] < capacity:
                load[c] += 1
                out[i] = c
                break
    return out


def balanced_kmeans(
    x: np.ndarray, k: int, seed: int, niter: int = KMEANS_NITER, rounds: int = BALANCED_ITERATIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Size-balanced k-means of x (n, d): faiss k-means, then ``rounds`` of capacity-constrained
    assignment (``balanced_assignment``, capacity ceil(n / k)) and centroid update. Returns
    (centroids (k, d), assignment (n,)); every cluster holds at most ceil(n / k) rows."""
    centroids, _ = kmeans(x, k, seed=seed, niter=niter)
    x = np.ascontiguousarray(x, dtype=np.float32)
    capacity = -(-x.shape[0] // k)
    assign = balanced_assignment(x, centroids, capacity)
    for _ in range(rounds):
        sums = np.zeros((k, x.shape[1]), dtype=np.float64)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        used = counts > 0
        centroids = centroids.astype(np.float64)
        centroids[used] = sums[used] / counts[used, None]
        centroids = centroids.astype(np.float32)
        new = balanced_assignment(x, centroids, capacity)
        if np.array_equal(new, assign):
            break
        assign = new
    return centroids, assign


def rq_kmeans(
    x: np.ndarray, codebook: list[int], seed: int = 0, niter: int = KMEANS_NITER, balanced: bool = False
) -> Quantization:
    """Residual k-means: level l clusters what levels 1..l-1 left unexplained.

    x: (N, D) float32; codebook: K_l per level. Returns codes (N, L) int64 and the fraction of
    variance left after each level. Deterministic for a seed (each level uses seed + l).
    ``balanced``: size-balanced k-means at every level (``balanced_kmeans``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    residual = x.copy()  # (N, D)
    denom = max(total_variance(x), 1e-12)
    codes = np.zeros((x.shape[0], len(codebook)), dtype=np.int64)  # (N, L)
    left = []
    cluster = balanced_kmeans if balanced else kmeans
    for level, k in enumerate(codebook):
        centroids, assign = cluster(residual, k, seed=seed + level, niter=niter)
        codes[:, level] = assign
        residual -= centroids[assign]  # (N, D)
        left.append(round(float((residual.astype(np.float64) ** 2).sum()) / denom, 6))
    params = {"niter": niter, "nredo": NREDO}
    if balanced:
        params.update(balanced=True, balanced_rounds=BALANCED_ITERATIONS)
    return Quantization(codes, left, left[-1], params)


def append_unique_level(codes: np.ndarray) -> np.ndarray:
    """Add a last level numbering the items that share a SID (0, 1, 2, ... in item order).

    codes: (N, L) -> (N, L+1); afterwards every row is distinct.
    """
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)  # (N,) group id of each item's SID
    order = np.argsort(inverse, kind="stable")  # items grouped by SID, item order within a group
    sorted_groups = inverse[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_groups))[0] + 1]  # first row of each group
    rank_sorted = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = rank_sorted
    return np.hstack([codes, rank[:, None]])
