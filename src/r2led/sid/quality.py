"""Quality report of a SID assignment: collisions, per-level code usage and entropy.

``sid_quality(codes, codebook)`` returns (all counts over items 1..N)::

    n_items, n_sids          items, distinct full SIDs
    unique_sid_rate          fraction of items whose full SID no other item has
    collision_rate           fraction of items that share their full SID (1 - unique_sid_rate)
    max_items_per_sid        largest number of items sharing one SID
    mean_items_per_sid       items / distinct SIDs (over SIDs that are used)
    levels[l]                codebook_size, used_codes, dead_codes (codebook_size - used),
                             utilisation (used / codebook_size), entropy (bits, of the level's
                             code usage), entropy_max (log2 K), perplexity (2^entropy: the
                             number of equally used codes with that entropy), prefix_vocab
                             (distinct prefixes c_1..c_l)
    neighbours               (given the embeddings) per level l: the share of an item's k
                             nearest embedding neighbours (cosine) that share its prefix
                             c_1..c_l, and the share a random item would (chance); see
                             ``neighbour_agreement``

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
        "collision_rate": round(float((per_item > 1).mean()), 6),
        "max_items_per_sid": int(counts.max()),
        "mean_items_per_sid": round(float(counts.mean()), 4),
    }


def level_stats(codes: np.ndarray, codebook: list[int]) -> list[dict]:
    """Per level: codebook size, used and dead codes, usage entropy (bits), prefix vocabulary."""
    out = []
    for level, k in enumerate(codebook):
        usage = np.bincount(codes[:, level], minlength=k)  # (K,)
        used = int((usage > 0).sum())
        entropy = entropy_bits(usage)
        out.append(
            {
                "codebook_size": int(k),
                "used_codes": used,
                "dead_codes": int(k) - used,
                "utilisation": round(used / k, 4) if k > 0 else 0.0,
                "entropy": round(entropy, 4),
                "entropy_max": round(float(np.log2(k)), 4) if k > 0 else 0.0,
                "perplexity": round(float(2.0**entropy), 3),
                "prefix_vocab": int(len(np.unique(codes[:, : level + 1], axis=0))),
            }
        )
    return out


NEIGHBOURS = 10  # k nearest embedding neighbours per item
NEIGHBOUR_QUERIES = 5000  # items whose neighbours are looked up (all of them in smaller catalogues)


def neighbour_agreement(
    vectors: np.ndarray, codes: np.ndarray, k: int = NEIGHBOURS, queries: int = NEIGHBOUR_QUERIES, seed: int = 0
) -> list[dict]:
    """Does a SID prefix group what the embedding space puts together?

    vectors (N, D) and codes (N, L) of the same items. For up to ``queries`` items (a seeded
    sample when N is larger), their ``k`` nearest other items by cosine similarity (exact,
    faiss); per level l: ``agreement``, the share of those neighbours whose prefix c_1..c_l
    equals the item's, and ``chance``, the share for neighbours drawn at random,
    sum_g n_g (n_g - 1) / (N (N - 1)) over the prefix groups g.
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    n = x.shape[0]
    if n < 2:
        return []
    k = min(k, n - 1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    rng = np.random.default_rng(seed)
    q = np.arange(n) if n <= queries else np.sort(rng.choice(n, queries, replace=False))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, nb = index.search(x[q], k + 1)  # (Q, k+1), usually the item itself first
    # drop the item itself (or, for exact duplicates listed before it, the last column)
    keep = nb != q[:, None]
    keep[keep.all(1), -1] = False
    nb = nb[keep].reshape(len(q), k)  # (Q, k)
    out = []
    for level in range(codes.shape[1]):
        _, group = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
        group = group.reshape(-1)  # (N,) prefix group of each item
        sizes = np.bincount(group).astype(np.float64)
        out.append(
            {
                "level": level + 1,
                "agreement": round(float((group[nb] == group[q][:, None]).mean()), 4),
                "chance": round(float((sizes * (sizes - 1)).sum() / (n * (n - 1))), 4),
            }
        )
    return out


def sid_quality(codes: np.ndarray, codebook: list[int], vectors: np.ndarray | None = None) -> dict:
    """The quality report of codes (N, L) for items 1..N; codebook: K_l per level; with the
    items' embeddings ``vectors`` (N, D), also the neighbourhood agreement."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != len(codebook):
        raise ValueError(f"codes of shape {codes.shape} do not match {len(codebook)} codebook sizes")
    report = {"n_items": int(codes.shape[0]), **collision_stats(codes), "levels": level_stats(codes, codebook)}
    if vectors is not None:
        report["neighbours"] = {
            "k": min(NEIGHBOURS, max(codes.shape[0] - 1, 0)),
            "levels": neighbour_agreement(vectors, codes),
        }
    return report
