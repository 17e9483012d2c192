"""Paired significance tests and intervals on the same test rows.

``delong_test`` compares two correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson 1988) with
the fast midrank algorithm of Sun & Xu (2014): O(n log n) per predictor. It treats rows as
independent.

``UserBootstrap`` resamples *users* (with replacement, all of a drawn user's rows together):
test rows are clustered by user, so the row-level DeLong variance is too small. Every
replicate draws per-user multiplicities ``w_u ~ Multinomial(U, 1/U)``; a row's weight is its
user's ``w_u``, and the replicate's AUC is the weighted AUC

    AUC_r = sum_{i pos, j neg} w_i w_j [s_i > s_j] + 0.5 [s_i = s_j]  /  (W_pos W_neg)

which equals the AUC of the data set built by repeating each user's rows ``w_u`` times. It is
computed for all replicates at once from one sort of the scores: per tie group of scores, the
weighted positive and negative counts (a sparse (groups x users) count matrix times the
(users x replicates) multiplicities), then a cumulative sum over groups. O(n log n + R n) per
predictor; 97,002 rows x 1,000 replicates take about 2 s on one core. The same replicates (the
same seeded user draws) serve every run, so differences between runs are paired.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp
from scipy.stats import norm, rankdata

CI_LEVEL = 0.95


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


def user_multiplicities(n_users: int, replicates: int, seed: int) -> np.ndarray:
    """(R, U) how many times each user is drawn in each replicate (each row sums to U)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=replicates).astype(np.float64)


def percentile_ci(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (R,)."""
    tail = (1.0 - level) / 2
    lo, hi = np.nanquantile(np.asarray(values, dtype=np.float64), [tail, 1.0 - tail])
    return float(lo), float(hi)


class UserBootstrap:
    """User-clustered bootstrap of ROC AUC on fixed rows (see the module docstring).

    label (n,) 0/1 and user (n,) ids of the rows; ``replicates`` user draws from ``seed``.
    ``auc(score)`` gives the (R,) replicate AUCs of a predictor; calls with the same object
    share the draws, so ``auc(a) - auc(b)`` is the paired bootstrap of the difference.
    """

    def __init__(self, label: np.ndarray, user: np.ndarray, replicates: int = 1000, seed: int = 0, chunk: int = 128):
        label = np.asarray(label).astype(bool)
        if label.ndim != 1 or len(label) != len(user):
            raise ValueError(f"label {np.shape(label)} and user {np.shape(user)} must be 1-d of the same length")
        if label.all() or not label.any():
            raise ValueError("the bootstrap AUC needs both classes among the rows")
        if replicates < 1:
            raise ValueError(f"replicates must be at least 1, got {replicates}")
        self.label = label
        _, self.user_index = np.unique(np.asarray(user), return_inverse=True)  # (n,) in [0, U)
        self.user_index = self.user_index.reshape(-1)
        self.n_users = int(self.user_index.max()) + 1
        self.replicates, self.seed, self.chunk = int(replicates), int(seed), int(chunk)
        self.weights = user_multiplicities(self.n_users, self.replicates, self.seed)  # (R, U)
        self._done: dict[bytes, np.ndarray] = {}  # replicate AUCs by the scores' digest

    def auc(self, score: np.ndarray) -> np.ndarray:
        """(R,) AUC of ``score`` (n,) in each replicate (remembered: the reference of many
        comparisons is computed once)."""
        score = np.asarray(score, dtype=np.float64)
        if score.shape != self.label.shape:
            raise ValueError(f"{score.shape[0] if score.ndim else 0} scores for {len(self.label)} rows")
        key = hashlib.sha256(score.tobytes()).digest()
        if key not in self._done:
            self._done[key] = self._replicate_aucs(score)
        return self._done[key].copy()

    def _replicate_aucs(self, score: np.ndarray) -> np.ndarray:
        order = np.argsort(score, kind="stable")
        s = score[order]
        group = np.r_[0, np.cumsum(np.diff(s) != 0)]  # (n,) tie group of each sorted row, ascending
        n_groups = int(group[-1]) + 1
        users = self.user_index[order]  # (n,)
        pos = self.label[order]  # (n,)
        # (G, U) rows of each user in each tie group, per class: sparse, n non-zeros in all
        count_pos = sp.csr_matrix((np.ones(int(pos.sum())), (group[pos], users[pos])), shape=(n_groups, self.n_users))
        count_neg = sp.csr_matrix(
            (np.ones(int((~pos).sum())), (group[~pos], users[~pos])), shape=(n_groups, self.n_users)
        )
        out = np.empty(self.replicates)
        for a in range(0, self.replicates, self.chunk):
            w = np.ascontiguousarray(self.weights[a : a + self.chunk].T)  # (U, r) user multiplicities
            wp = count_pos @ w  # (G, r) positive weight per tie group
            wn = count_neg @ w  # (G, r) negative weight per tie group
            below = np.cumsum(wn, axis=0) - wn  # (G, r) negative weight strictly below each group
            num = (wp * (below + 0.5 * wn)).sum(0)
            den = wp.sum(0) * wn.sum(0)
            out[a : a + self.chunk] = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
        return out


def pooled_auc(boot: UserBootstrap, scores: list[np.ndarray]) -> np.ndarray:
    """(R,) replicate AUCs of a row pooled over seeds: the mean over its seeds' predictions
    (one (n,) array per seed), every seed on the same resampled users."""
    if not scores:
        raise ValueError("no predictions to pool")
    return np.mean([boot.auc(s) for s in scores], axis=0)


def clustered_comparison(
    boot: UserBootstrap, reference: list[np.ndarray], other: list[np.ndarray], level: float = CI_LEVEL
) -> dict:
    """User-clustered CIs of ``other``'s seed-mean AUC and of ``reference - other``.

    Pooling over seeds: in every replicate, each run's AUC on the resampled users is computed
    and averaged over that row's seeds; the difference is the reference's seed mean minus the
    other's, on the same draw. ``separable`` is True when the difference's CI excludes 0.
    """
    ref, oth = pooled_auc(boot, reference), pooled_auc(boot, other)
    diff = ref - oth
    lo, hi = percentile_ci(diff, level)
    return {
        "auc_ci": list(percentile_ci(oth, level)),
        "diff_vs_reference": float(
            np.mean([_plain_auc(boot.label, s) for s in reference])
            - np.mean([_plain_auc(boot.label, s) for s in other])
        ),
        "diff_ci": [lo, hi],
        "separable": bool(lo > 0 or hi < 0),
    }


def _plain_auc(label: np.ndarray, score: np.ndarray) -> float:
    """The AUC on the rows as they are (no resampling), with ties counted half."""
    return _structural_components(np.asarray(score)[label], np.asarray(score)[~label])[0]
