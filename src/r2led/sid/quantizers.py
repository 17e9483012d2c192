"""Residual quantizers: item embeddings (N, D) -> hierarchical codes (N, L).

- ``rq-kmeans`` (default): level 1 clusters the embeddings with k-means, level l clusters the
  residuals left by levels 1..l-1 (faiss k-means, seeded). No training beyond k-means.
- ``rq-vae``: a residual-quantized autoencoder (see ``r2led.sid.rq_vae``).

Codebook sizes may differ per level (``[16, 16, 32]``). Both quantizers report how much of
the embeddings' variance each level leaves unexplained, so that levels can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from r2led.errors import ConfigError, DataError

QUANTIZERS = ("rq-kmeans", "rq-vae")
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


def rq_kmeans(x: np.ndarray, codebook: list[int], seed: int = 0, niter: int = KMEANS_NITER) -> Quantization:
    """Residual k-means: level l clusters what levels 1..l-1 left unexplained.

    x: (N, D) float32; codebook: K_l per level. Returns codes (N, L) int64 and the fraction of
    variance left after each level. Deterministic for a seed (each level uses seed + l).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    residual = x.copy()  # (N, D)
    denom = max(total_variance(x), 1e-12)
    codes = np.zeros((x.shape[0], len(codebook)), dtype=np.int64)  # (N, L)
    left = []
    for level, k in enumerate(codebook):
        centroids, assign = kmeans(residual, k, seed=seed + level, niter=niter)
        codes[:, level] = assign
        residual -= centroids[assign]  # (N, D)
        left.append(round(float((residual.astype(np.float64) ** 2).sum()) / denom, 6))
    return Quantization(codes, left, left[-1], {"niter": niter, "nredo": NREDO})


def quantize(
    x: np.ndarray, quantizer: str, codebook: list[int], seed: int = 0, progress: bool = False
) -> Quantization:
    """Codes (N, L) for embeddings x (N, D) with the named quantizer (see ``QUANTIZERS``)."""
    if quantizer == "rq-kmeans":
        return rq_kmeans(x, codebook, seed=seed)
    if quantizer == "rq-vae":
        from r2led.sid.rq_vae import RqVaeConfig, train_rq_vae

        return train_rq_vae(x, codebook, RqVaeConfig(seed=seed), progress=progress)
    raise ConfigError(f"unknown quantizer {quantizer!r}; expected one of {', '.join(QUANTIZERS)}")


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
