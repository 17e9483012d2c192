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


# ---- user-clustered bootstrap --------------------------------------------------------------------
from r2led.bench.significance import (  # noqa: E402
    UserBootstrap,
    _structural_components,
    clustered_comparison,
    percentile_ci,
    user_multiplicities,
)


def clustered_rows(n_users=60, seed=0, user_effect=1.0):
    """Users with 1-12 rows each; a per-user offset in both labels and scores clusters the rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, n_users)
    user = np.repeat(np.arange(n_users) * 7 + 3, sizes)  # ids need not be 0..U-1
    offset = rng.normal(0, user_effect, n_users)[np.repeat(np.arange(n_users), sizes)]
    y = (rng.random(len(user)) < 1 / (1 + np.exp(-offset))).astype(int)
    a = np.round(y * 0.8 + offset + rng.normal(size=len(user)), 1)  # rounded: ties
    b = np.round(y * 0.6 + offset + rng.normal(size=len(user)), 1)
    return y, user, a, b


def slow_bootstrap_auc(y, user, score, counts):
    """Reference: build each replicate's data set by repeating every user's rows w_u times."""
    ids = np.unique(user)
    out = []
    for w in counts:
        rows = np.concatenate([np.repeat(np.nonzero(user == u)[0], int(k)) for u, k in zip(ids, w, strict=False)])
        out.append(roc_auc_score(y[rows], score[rows]))
    return np.array(out)


def test_bootstrap_auc_equals_the_auc_of_the_resampled_data_set():
    y, user, a, b = clustered_rows()
    boot = UserBootstrap(y, user, replicates=40, seed=3, chunk=7)  # chunk not dividing R
    counts = user_multiplicities(len(np.unique(user)), 40, 3)
    assert np.array_equal(boot.weights, counts) and (counts.sum(1) == len(np.unique(user))).all()
    np.testing.assert_allclose(boot.auc(a), slow_bootstrap_auc(y, user, a, counts), rtol=0, atol=1e-12)
    np.testing.assert_allclose(boot.auc(b), slow_bootstrap_auc(y, user, b, counts), rtol=0, atol=1e-12)
    # the same seed draws the same users; another seed does not
    assert np.array_equal(UserBootstrap(y, user, 40, seed=3).auc(a), boot.auc(a))
    assert not np.array_equal(UserBootstrap(y, user, 40, seed=4).auc(a), boot.auc(a))


def test_bootstrap_with_one_row_per_user_matches_delong_standard_error():
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.integers(0, 2, n)
    s = y * 0.9 + rng.normal(size=n)
    boot = UserBootstrap(y, np.arange(n), replicates=2000, seed=0)
    se_boot = boot.auc(s).std(ddof=1)
    _, v10, v01 = _structural_components(s[y == 1], s[y == 0])
    se_delong = np.sqrt(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))
    assert se_boot == pytest.approx(se_delong, rel=0.08)


def test_clustered_rows_widen_the_interval_of_a_difference():
    # 300 users x 20 rows; the two predictors differ per user (a user-level nuisance), so the
    # rows of a user move together and DeLong's row-level variance is too small
    rng = np.random.default_rng(1)
    n_users, per = 300, 20
    user = np.repeat(np.arange(n_users), per)
    y = rng.integers(0, 2, len(user))
    tilt = rng.normal(0, 0.8, n_users)[user]
    a = y + rng.normal(size=len(user)) + tilt * y
    b = y + rng.normal(size=len(user)) - tilt * y
    boot = UserBootstrap(y, user, replicates=1000, seed=0)
    se_boot = (boot.auc(a) - boot.auc(b)).std(ddof=1)
    z = delong_test(y, a, b)["z"]
    se_delong = abs(roc_auc_score(y, a) - roc_auc_score(y, b)) / abs(z)
    assert se_boot > 1.5 * se_delong


def test_clustered_comparison_pools_seeds_and_says_when_a_difference_is_separable():
    rng = np.random.default_rng(2)
    n_users, per = 400, 10
    user = np.repeat(np.arange(n_users), per)
    y = rng.integers(0, 2, len(user))
    strong = [y * 1.5 + rng.normal(size=len(user)) for _ in range(3)]
    weak = [y * 0.5 + rng.normal(size=len(user)) for _ in range(2)]  # seed counts may differ
    twin = [s + 1e-9 * rng.normal(size=len(user)) for s in strong]
    boot = UserBootstrap(y, user, replicates=500, seed=0)
    far = clustered_comparison(boot, strong, weak)
    near = clustered_comparison(boot, strong, twin)
    assert far["separable"] and far["diff_ci"][0] > 0
    assert not near["separable"] and near["diff_ci"][0] <= 0 <= near["diff_ci"][1]
    expected = np.mean([roc_auc_score(y, s) for s in strong]) - np.mean([roc_auc_score(y, s) for s in weak])
    assert far["diff_vs_reference"] == pytest.approx(expected, abs=1e-12)
    pooled = np.mean([boot.auc(s) for s in weak], axis=0)
    assert far["auc_ci"] == pytest.approx(list(percentile_ci(pooled)))
    lo, hi = far["auc_ci"]
    assert lo < np.mean([roc_auc_score(y, s) for s in weak]) < hi


def test_percentile_ci_is_the_central_interval():
    assert percentile_ci(np.arange(1001.0)) == pytest.approx((25.0, 975.0))


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        UserBootstrap(np.ones(5), np.arange(5))
    boot = UserBootstrap(np.array([0, 1, 0, 1]), np.arange(4), replicates=3)
    with pytest.raises(ValueError, match="3 scores for 4 rows"):
        boot.auc(np.zeros(3))
