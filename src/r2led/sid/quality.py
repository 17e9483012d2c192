"""Quality report of a SID assignment: collisions, per-level code usage and entropy.

``sid_quality(codes, codebook)`` returns (all counts over items 1..N)::

    n_items, n_sids          items, distinct full SIDs
    unique_sid_rate          fraction of items whose full SID no other item has
    max_items_per_sid        largest number of items sharing one SID
    mean_items_per_sid       items / distinct SIDs (over SIDs that are used)
    levels[l]                codebook_size, used_codes, dead_codes (codebook_size - used),
                             entropy (bits, of the level's code usage), entropy_max (log2 K),
                             prefix_vocab (distinct prefixes c_1..c_l)

The build adds timings, the quantizer's residual variance per level and its reconstruction
error (see ``r2led.sid.build``).
"""

from __future__ import annotations

import numpy as np


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a usage histogram (zeros ignored)."""
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def collision_stats(codes: np.ndarray) -> dict:
    """unique_sid_rate, max/mean items per SID and the number of distinct SIDs of codes (N, L)."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    per_item = counts[inverse.reshape(-1)]  # (N,) how many items share this item's SID
    return {
        "n_sids": int(len(counts)),
        "unique_sid_rate": round(float((per_item == 1).mean()), 6),
        "max_items_per_sid": int(counts.max()),
        "mean_items_per_sid": round(float(counts.mean()), 4),
    }


def level_stats(codes: np.ndarray, codebook: list[int]) -> list[dict]:
    """Per level: codebook size, used and dead codes, usage entropy (bits), prefix vocabulary."""
    out = []
    for level, k in enumerate(codebook):
        usage = np.bincount(codes[:, level], minlength=k)  # (K,)
        used = int((usage > 0).sum())
        out.append(
            {
                "codebook_size": int(k),
                "used_codes": used,
                "dead_codes": int(k) - used,
                "entropy": round(entropy_bits(usage), 4),
                "entropy_max": round(float(np.log2(k)), 4) if k > 0 else 0.0,
                "prefix_vocab": int(len(np.unique(codes[:, : level + 1], axis=0))),
            }
        )
    return out


def sid_quality(codes: np.ndarray, codebook: list[int]) -> dict:
    """The quality report of codes (N, L) for items 1..N; codebook: K_l per level."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != len(codebook):
        raise ValueError(f"codes of shape {codes.shape} do not match {len(codebook)} codebook sizes")
    return {"n_items": int(codes.shape[0]), **collision_stats(codes), "levels": level_stats(codes, codebook)}
