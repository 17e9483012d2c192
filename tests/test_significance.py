"""DeLong's test against a direct computation."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from r2led.bench.significance import delong_test


def naive_delong(y, a, b):
    """O(m n) reference: placement values from pairwise comparisons."""
    from scipy.stats import norm

    out = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out.append((psi.mean(), psi.mean(1), psi.mean(0)))
    v10 = np.stack([o[1] for o in out])
    v01 = np.stack([o[2] for o in out])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    z = (out[0][0] - out[1][0]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return out[0][0], out[1][0], 2 * norm.sf(abs(z))


def test_delong_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    a = np.round(y * 0.8 + rng.normal(size=400), 1)
    b = np.round(y * 0.5 + rng.normal(size=400), 1)
    got = delong_test(y, a, b)
    auc_a, auc_b, p = naive_delong(y, a, b)
    assert got["auc_a"] == pytest.approx(roc_auc_score(y, a)) == pytest.approx(auc_a)
    assert got["auc_b"] == pytest.approx(auc_b)
    assert got["p"] == pytest.approx(p, rel=1e-9)


def test_clear_difference_is_significant_and_identical_is_not():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 5000)
    strong = y + rng.normal(size=5000)
    weak = y * 0.2 + rng.normal(size=5000)
    assert delong_test(y, strong, weak)["p"] < 1e-10
    assert delong_test(y, strong, strong)["p"] == 1.0
