"""stats.py against printed tables, closed forms, hand-worked examples and independent SciPy routines."""

import math

import numpy as np
import pytest
import scipy.stats

from histospace_jax import metrics, stats


def _r_for_t(t: float, df: int) -> float:
    """The Pearson r whose t statistic over df + 2 pairs is t (inverse of t = r sqrt(df / (1 - r^2)))."""
    return t / math.sqrt(t * t + df)


@pytest.mark.parametrize("t, df, two_sided", [
    (2.228, 10, 0.05),    # t table: t_{0.975, 10} = 2.228
    (2.086, 20, 0.05),    # t_{0.975, 20} = 2.086
    (3.169, 10, 0.01),    # t_{0.995, 10} = 3.169
    (1.725, 20, 0.10),    # t_{0.95, 20} = 1.725
])
def test_pearson_pvalues_match_t_table(t, df, two_sided):
    r = _r_for_t(t, df)
    assert stats.pearson_pvalues(r, df + 2, "two-sided") == pytest.approx(two_sided, abs=2e-4)
    assert stats.pearson_pvalues(r, df + 2) == pytest.approx(two_sided / 2, abs=1e-4)
    assert stats.pearson_pvalues(-r, df + 2) == pytest.approx(1 - two_sided / 2, abs=1e-4)


@pytest.mark.parametrize("t", [-2.0, 0.0, 0.5, 3.0, 40.0])
def test_pearson_pvalues_df1_is_cauchy(t):
    # n = 3 pairs -> 1 df, where Student's t is the Cauchy distribution: P(T > t) = 1/2 - atan(t) / pi.
    assert stats.pearson_pvalues(_r_for_t(t, 1), 3) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)


def test_pearson_pvalues_agree_with_scipy_pearsonr():
    rng = np.random.default_rng(1)
    a = rng.normal(size=12)
    b = a + rng.normal(size=12)
    res = scipy.stats.pearsonr(a, b, alternative="greater")
    assert stats.pearson_pvalues(res.statistic, 12) == pytest.approx(res.pvalue, rel=1e-9)
    two = scipy.stats.pearsonr(a, b)
    assert stats.pearson_pvalues(two.statistic, 12, "two-sided") == pytest.approx(two.pvalue, rel=1e-9)


def test_pearson_pvalues_edges():
    p = stats.pearson_pvalues([np.nan, 1.0, -1.0, 0.0], 10)
    assert np.isnan(p[0]) and p[1] == 0.0 and p[2] == 1.0 and p[3] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 3 pairs"):
        stats.pearson_pvalues(0.5, 2)
    with pytest.raises(ValueError, match="alternative"):
        stats.pearson_pvalues(0.5, 10, "less")


def test_benjamini_hochberg_hand_example():
    # Sorted p: .001 .008 .039 .041 .042 .06 .074 .205 .212 .216 (m = 10). p * m / rank:
    #           .01  .04  .13  .1025 .084 .1 .1057 .25625 .2356 .216; q = running minimum from the right:
    #           .01  .04  .084 .084 .084 .1 .1057 .216 .216 .216. At alpha = 0.05 two hypotheses are rejected.
    p = np.array([0.042, 0.001, 0.205, 0.008, 0.039, 0.06, 0.074, 0.041, 0.212, 0.216])
    expected = [0.084, 0.01, 0.216, 0.04, 0.084, 0.1, 0.74 / 7, 0.084, 0.216, 0.216]
    q = stats.benjamini_hochberg(p)
    np.testing.assert_allclose(q, expected, rtol=1e-12)
    assert int(np.sum(q <= 0.05)) == 2
    q_nan = stats.benjamini_hochberg(np.r_[p, np.nan])  # NaN is not a test: m stays 10
    assert np.isnan(q_nan[-1]) and np.allclose(q_nan[:-1], expected)
    assert np.isnan(stats.benjamini_hochberg([np.nan, np.nan])).all()


def test_n_significant_positive_against_scipy():
    n = 30
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(n, 5))
    pred = truth.copy()
    pred[:, 0] = truth[:, 0] + rng.normal(size=n) * 0.1      # strong positive: significant
    pred[:, 1] = -truth[:, 1]                                # perfect negative: not counted
    pred[:, 2] = rng.normal(size=n)                          # noise
    pred[:, 3] = 1.0                                         # constant: r undefined, not tested
    tested = [0, 1, 2, 4]
    p = [scipy.stats.pearsonr(truth[:, g], pred[:, g], alternative="greater").pvalue for g in tested]
    r = [scipy.stats.pearsonr(truth[:, g], pred[:, g]).statistic for g in tested]
    q = scipy.stats.false_discovery_control(p, method="bh")
    expected = int(np.sum((q <= 0.05) & (np.array(r) > 0)))
    assert stats.n_significant_positive(metrics.pearson_per_gene(truth, pred), n) == expected
    sig = metrics.gene_significance(truth, pred)
    assert sig == {"n_genes_significant": expected, "n_genes_tested": 4, "fdr": 0.05}
    assert expected == 2  # genes 0 and 4 (identical); the noise gene is not significant with this seed


def test_contingency_table_hand_example():
    table, ca, cb = stats.contingency_table([0, 0, 1, 1, 1], [1, 1, 0, 0, 1])
    assert ca == [0, 1] and cb == [0, 1]
    assert table.tolist() == [[0, 2], [2, 1]]
    table, ca, cb = stats.contingency_table(["a", "b", "a"], [2, 2, 3])
    assert ca == ["a", "b"] and cb == [2, 3] and table.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="differ in shape"):
        stats.contingency_table([0, 1], [0, 1, 1])


def test_adjusted_rand_index_hand_examples():
    # table [[2,1,0],[0,1,2]]: sum C(n_ij,2) = 2; rows 3+3 = 6; cols 1+1+1 = 3; C(6,2) = 15;
    # expected 6*3/15 = 1.2; max (6+3)/2 = 4.5; ARI = 0.8 / 3.3
    assert stats.adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    assert stats.adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    # [[1,1],[1,1]]: sum_ij 0, rows 1+1, cols 1+1, C(4,2)=6: expected 4/6, max 2 -> (0-2/3)/(2-2/3) = -0.5
    assert stats.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert stats.adjusted_rand_index([3, 3, 3], [1, 1, 1]) == 1.0  # both trivial
    assert np.isnan(stats.adjusted_rand_index([0], [0]))


def test_best_agreement_two_clusters():
    # classes x clusters [[0, 4], [2, 1]]: matching cluster j to class j agrees on 0 + 1 = 1 spot, the swapped
    # matching on 4 + 2 = 6.
    agree, mapping = stats.best_agreement([1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1])
    assert agree == 6 and mapping == {0: 1, 1: 0}


def test_best_agreement_is_optimal_where_greedy_is_not():
    # classes x clusters [[5, 4, 0], [4, 0, 0], [0, 0, 1]]: taking the largest cell first (class 0 <-> cluster 0)
    # reaches 5 + 0 + 1 = 6; the best one-to-one matching is 0<->1, 1<->0, 2<->2: 4 + 4 + 1 = 9.
    truth = [0] * 9 + [1] * 4 + [2]
    clusters = [0] * 5 + [1] * 4 + [0] * 4 + [2]
    agree, mapping = stats.best_agreement(truth, clusters)
    assert agree == 9 and mapping == {1: 0, 0: 1, 2: 2}


def test_best_agreement_more_clusters_than_classes():
    # classes x clusters [[3, 0, 1], [0, 2, 1]]: cluster 2 is left unmatched.
    agree, mapping = stats.best_agreement([0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 2, 1, 1, 2])
    assert agree == 5 and mapping == {0: 0, 1: 1}


def test_kmeans_separates_blobs_deterministically():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (25, 3)), rng.normal(8, 1, (15, 3))]
    labels, centres, inertia = stats.kmeans(x, 2, seed=3)
    assert labels.tolist() == [0] * 25 + [1] * 15  # cluster 0 holds the first row
    np.testing.assert_allclose(centres, [x[:25].mean(0), x[25:].mean(0)])
    within = ((x[:25] - x[:25].mean(0)) ** 2).sum() + ((x[25:] - x[25:].mean(0)) ** 2).sum()
    assert inertia == pytest.approx(within)
    again = stats.kmeans(x, 2, seed=3)
    assert np.array_equal(again[0], labels) and again[2] == inertia
    flipped = stats.kmeans(x[::-1], 2, seed=3)[0]  # renumbering follows the first row, not the winning start
    assert flipped.tolist() == [0] * 15 + [1] * 25


def test_kmeans_degenerate_inputs():
    labels, centres, inertia = stats.kmeans(np.ones((6, 3)), 2)
    assert labels.tolist() == [0] * 6 and inertia == 0.0
    with pytest.raises(ValueError, match="at least 2 rows"):
        stats.kmeans(np.ones((1, 3)), 2)
