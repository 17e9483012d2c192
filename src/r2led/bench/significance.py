"""Paired significance tests on the same test rows.

``delong_test`` compares two correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson 1988) with
the fast midrank algorithm of Sun & Xu (2014): O(n log n) per predictor.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata


def _structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and its placement values for one predictor (pos: scores of positives, neg: of negatives)."""
    m, n = len(pos), len(neg)
    all_ranks = rankdata(np.concatenate([pos, neg]))  # midranks over both classes
    pos_ranks = rankdata(pos)
    neg_ranks = rankdata(neg)
    auc = (all_ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (all_ranks[:m] - pos_ranks) / n  # per positive: share of negatives ranked below
    v01 = 1.0 - (all_ranks[m:] - neg_ranks) / m  # per negative: share of positives ranked above
    return auc, v10, v01


def delong_test(label: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, float]:
    """Two-sided DeLong test of AUC(a) == AUC(b) on the same rows.

    Returns {"auc_a", "auc_b", "z", "p"}; p is 1.0 when the two predictors are identical.
    """
    label = np.asarray(label).astype(bool)
    if label.all() or not label.any():
        raise ValueError("DeLong's test needs both classes among the rows")
    comps = [_structural_components(np.asarray(s)[label], np.asarray(s)[~label]) for s in (score_a, score_b)]
    aucs = np.array([c[0] for c in comps])
    v10 = np.stack([c[1] for c in comps])  # (2, m)
    v01 = np.stack([c[2] for c in comps])  # (2, n)
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 0:
        return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "z": 0.0, "p": 1.0}
    z = diff / np.sqrt(var)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "z": float(z), "p": float(2 * norm.sf(abs(z)))}
