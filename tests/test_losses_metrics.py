"""Losses and metrics against hand computation and independent NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from histospace_jax import losses, metrics


def test_huber_matches_published_piecewise_formula():
    # Huber (1964): 0.5 a^2 for |a| <= delta, delta (|a| - delta / 2) otherwise.
    pred = jnp.array([[0.0, 0.5, 3.0, -2.0]])
    target = jnp.array([[0.0, 0.0, 0.0, 0.0]])
    delta = 1.0
    by_hand = [0.0, 0.125, 1.0 * (3.0 - 0.5), 1.0 * (2.0 - 0.5)]
    np.testing.assert_allclose(losses.row_huber(pred, target, delta), [np.mean(by_hand)], rtol=1e-6)
    delta = 2.5
    by_hand = [0.0, 0.125, 2.5 * (3.0 - 1.25), 0.5 * 4.0]
    np.testing.assert_allclose(losses.row_huber(pred, target, delta), [np.mean(by_hand)], rtol=1e-6)


def test_masked_sum_ignores_nan_in_masked_rows():
    rows = jnp.array([1.0, jnp.nan, 3.0])
    total, count = losses.masked_sum(rows, jnp.array([1, 0, 1]))
    assert float(total) == 4.0 and float(count) == 2.0


def test_pearson_per_gene_and_spot_against_numpy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(30, 7))
    p = y + rng.normal(size=(30, 7))
    ref_gene = [np.corrcoef(y[:, j], p[:, j])[0, 1] for j in range(7)]
    ref_spot = [np.corrcoef(y[i], p[i])[0, 1] for i in range(30)]
    np.testing.assert_allclose(metrics.pearson_per_gene(y, p), ref_gene, rtol=1e-10)
    np.testing.assert_allclose(metrics.pearson_per_spot(y, p), ref_spot, rtol=1e-10)


def test_hand_computed_pearson_and_constant_genes():
    y = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    p = np.array([[1.0, 1.0], [3.0, 2.0], [2.0, 3.0]])
    # gene 0: x=(1,2,3), y=(1,3,2): cov = 1, var = 2 each -> r = 0.5. gene 1 is constant -> undefined.
    r = metrics.pearson_per_gene(y, p)
    assert r[0] == pytest.approx(0.5)
    assert np.isnan(r[1])
    m = metrics.regression_metrics(y, p)
    assert m["per_gene_pearson"] == pytest.approx(0.5)
    assert m["n_genes_undefined_r"] == 1
    # spot rows: (1,5) vs (1,1) -> predicted constant -> undefined; (2,5) vs (3,2) -> r=-1; (3,5) vs (2,3) -> r=1
    np.testing.assert_array_equal(np.isnan(metrics.pearson_per_spot(y, p)), [True, False, False])
    assert m["per_spot_pearson"] == pytest.approx(0.0)
    assert m["mse"] == pytest.approx(np.mean((y - p) ** 2))


def test_mean_profile_baseline_scores_high_per_spot_but_undefined_per_gene():
    # Genes with very different levels: the image-blind mean profile already correlates across genes.
    rng = np.random.default_rng(1)
    levels = np.linspace(0.5, 5.0, 40)
    train = levels + rng.normal(0, 0.3, (200, 40))
    test = levels + rng.normal(0, 0.3, (50, 40))
    base = metrics.mean_profile_prediction(train, 50)
    m = metrics.regression_metrics(test, base)
    assert m["per_spot_pearson"] > 0.9
    assert np.isnan(m["per_gene_pearson"])
    assert m["n_genes_undefined_r"] == 40
