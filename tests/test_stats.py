"""stats.py against closed forms and hand-computed examples."""

import math

import numpy as np
import pytest

from histospace_jax import metrics, stats


@pytest.mark.parametrize("t", [-2.0, 0.0, 0.5, 1.0, 3.0, 40.0])
def test_t_sf_df1_is_cauchy(t):
    assert stats.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)


@pytest.mark.parametrize("t", [0.3, 2.0, 10.0])
def test_t_sf_df2_closed_form(t):
    assert stats.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_sf_critical_value_and_betainc():
    assert 2 * stats.t_sf(2.228138851986, 10) == pytest.approx(0.05, abs=1e-9)  # t_{0.975, 10}
    # I_0.4(2, 3) = P(Binomial(4, 0.4) >= 2)
    assert stats.betainc(2, 3, 0.4) == pytest.approx(1 - (0.6 ** 4 + 4 * 0.4 * 0.6 ** 3), abs=1e-12)


def test_pearson_pvalues():
    # n = 4 -> df = 2: t = r sqrt(2 / (1 - r^2)); one-sided p = t_sf(t, 2)
    r = 0.8
    t = r * math.sqrt(2 / (1 - r * r))
    assert stats.pearson_pvalues(r, 4) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert stats.pearson_pvalues(-r, 4, "two-sided") == pytest.approx(2 * stats.pearson_pvalues(r, 4), abs=1e-12)
    p = stats.pearson_pvalues([np.nan, 1.0, -1.0], 10)
    assert np.isnan(p[0]) and p[1] == 0.0 and p[2] == 1.0


def test_benjamini_hochberg_hand_example():
    # m = 10, alpha = 0.05: thresholds k * 0.005; the largest k with p_(k) <= threshold is 2.
    p = np.array([0.042, 0.001, 0.205, 0.008, 0.039, 0.06, 0.074, 0.041, 0.212, 0.216])
    q = stats.benjamini_hochberg(p)
    assert int(np.sum(q <= 0.05)) == 2
    assert q[1] == pytest.approx(0.01)    # 0.001 * 10 / 1
    assert q[3] == pytest.approx(0.04)    # 0.008 * 10 / 2
    assert q[4] == pytest.approx(0.084)   # min_j>=3 p_j 10 / j = 0.042 * 10 / 5
    q_nan = stats.benjamini_hochberg(np.r_[p, np.nan])
    assert np.isnan(q_nan[-1]) and np.allclose(q_nan[:-1], q)


def test_n_significant_positive_counts_only_positive_defined_genes():
    n = 30
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(n, 5))
    pred = truth.copy()
    pred[:, 0] = truth[:, 0] + rng.normal(size=n) * 0.1      # strong positive: significant
    pred[:, 1] = -truth[:, 1]                                # perfect negative: not counted
    pred[:, 2] = rng.normal(size=n)                          # noise
    pred[:, 3] = 1.0                                         # constant: r undefined, not tested
    r = metrics.pearson_per_gene(truth, pred)
    q = stats.benjamini_hochberg(stats.pearson_pvalues(r, n))
    expected = int(np.sum((q <= 0.05) & (r > 0)))
    assert stats.n_significant_positive(r, n) == expected
    sig = metrics.gene_significance(truth, pred)
    assert sig["n_genes_tested"] == 4
    assert sig["n_genes_significant"] == expected
    assert 2 <= expected <= 3  # genes 0 and 4 (identical), maybe not the noise gene


def test_contingency_table_hand_example():
    table, ca, cb = stats.contingency_table([0, 0, 1, 1, 1], [1, 1, 0, 0, 1])
    assert ca == [0, 1] and cb == [0, 1]
    assert table.tolist() == [[0, 2], [2, 1]]
    table, ca, cb = stats.contingency_table(["a", "b", "a"], [2, 2, 3])
    assert ca == ["a", "b"] and table.tolist() == [[1, 1], [1, 0]]


def test_adjusted_rand_index_hand_examples():
    # table [[2,1,0],[0,1,2]]: sum C(n_ij,2) = 2; rows 3+3 = 6; cols 1+1+1 = 3; C(6,2) = 15;
    # expected 6*3/15 = 1.2; max (6+3)/2 = 4.5; ARI = 0.8 / 3.3
    assert stats.adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    assert stats.adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    # [[1,1],[1,1]]: sum_ij 0, rows 1+1, cols 1+1, C(4,2)=6: expected 4/6, max 2 -> (0-2/3)/(2-2/3) = -0.5
    assert stats.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


def test_best_agreement():
    agree, mapping = stats.best_agreement([1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1])
    assert agree == 6 and mapping == {0: 1, 1: 0}


def test_kmeans_separates_blobs_deterministically():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (25, 3)), rng.normal(8, 1, (15, 3))]
    labels, centres, inertia = stats.kmeans(x, 2, seed=3)
    assert labels[0] == 0
    assert labels.tolist() == [0] * 25 + [1] * 15
    again = stats.kmeans(x, 2, seed=3)
    assert np.array_equal(again[0], labels) and again[2] == inertia
    assert np.allclose(centres[1], x[25:].mean(0))
