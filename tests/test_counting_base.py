"""counting_base: the counting model at the image's depth as the heads' starting point, against independent
references (a ridge and PCA by NumPy, Poisson sums by SciPy, shares by hand)."""

import io

import ml_collections
import numpy as np
import pytest
import scipy.stats

from histospace_jax import config as config_lib
from histospace_jax import controls, counting_base
from histospace_jax.errors import ConfigError


def _poisson_log1p(depth: float, share: float, scale: float = 1e4) -> float:
    lam = depth * share
    c = np.arange(0, int(lam + 40 * np.sqrt(lam) + 60))
    return float(np.sum(scipy.stats.poisson.pmf(c, lam) * np.log1p(scale * c / depth)))


def _spots(n=240, g=5, seed=0):
    """Feature maps whose first channel carries each spot's log library size, and log1p CP10k expression
    drawn by Poisson at fixed shares."""
    rng = np.random.default_rng(seed)
    lib = np.exp(rng.normal(8.0, 0.6, n))
    maps = rng.normal(size=(n, 8, 8, 4))
    maps[..., 0] += 2.0 * (np.log(lib) - 8.0)[:, None, None]
    shares = rng.dirichlet(np.ones(g)) * 0.05
    counts = rng.poisson(lib[:, None] * shares)
    expr = np.log1p(1e4 * counts / lib[:, None]).astype(np.float32)
    return maps, lib, expr


def test_fit_and_predict_match_an_independent_ridge_pca_and_poisson_sum():
    maps, lib, expr = _spots()
    tr, te = np.arange(180), np.arange(180, 240)
    groups = np.arange(180) // 30
    pooled = counting_base.pooled_rows(maps, np.arange(240), chunk=50)
    np.testing.assert_allclose(pooled, controls.pooled_feature_maps(maps))  # chunking changes nothing
    base = counting_base.fit(pooled[tr], expr[tr], lib[tr], groups, 1e4)
    # Independent: standardise, PCA by NumPy's SVD, ridge in closed form at the chosen alpha on centred scores.
    p = pooled[tr]
    mu, sd = p.mean(0), p.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    x = (p - mu) / sd
    u, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    k = min(counting_base.PCA_COMPONENTS, len(tr) - 1, x.shape[1])
    z = (x - x.mean(0)) @ vt[:k].T
    y = np.log(lib[tr])
    zc = z - z.mean(0)
    coef = np.linalg.solve(zc.T @ zc + base.alpha * np.eye(k), zc.T @ (y - y.mean()))
    zt = ((pooled[te] - mu) / sd - x.mean(0)) @ vt[:k].T
    depth = (zt - z.mean(0)) @ coef + y.mean()
    np.testing.assert_allclose(counting_base.image_log_depth(base, pooled[te]), depth, atol=1e-6)
    assert np.corrcoef(depth, np.log(lib[te]))[0, 1] > 0.9  # the depth is there to read
    # Shares by hand: counts recovered from log1p CP10k, total over total library.
    counts = np.rint(np.expm1(expr[tr].astype(np.float64)) * lib[tr, None] / 1e4)
    shares = counts.sum(0) / lib[tr].sum()
    np.testing.assert_allclose(base.shares, shares, rtol=1e-9)
    got = counting_base.predict(base, pooled[te])
    for i in (0, 7, 33):
        for j in range(expr.shape[1]):
            assert got[i, j] == pytest.approx(_poisson_log1p(np.exp(depth[i]), shares[j]), abs=1e-5)
    # The same predictor as the image_depth_sampling control (one PCA, one ridge, the same alpha choice).
    z_train, z_test = controls.probe_scores(maps[tr], maps[te])
    read, alpha = controls.image_log_depth(z_train, z_test, np.log(lib[tr]), groups)
    assert alpha == base.alpha
    np.testing.assert_allclose(got, controls.sampling_expectation(read, shares, 1e4), atol=1e-9)
    # Round trip through an .npz (as model_export writes it).
    buf = io.BytesIO()
    np.savez(buf, **base.arrays())
    buf.seek(0)
    with np.load(buf) as saved:
        again = counting_base.CountingBase.from_arrays(saved)
    np.testing.assert_array_equal(counting_base.predict(again, pooled[te]), got)


def test_fit_refuses_rows_that_do_not_line_up():
    maps, lib, expr = _spots(n=40)
    pooled = counting_base.pooled_rows(maps, np.arange(40))
    with pytest.raises(ValueError, match="same spots"):
        counting_base.fit(pooled, expr[:39], lib, np.arange(40) // 10, 1e4)


def test_residual_targets_use_each_patients_own_shares():
    _, lib, expr = _spots(n=60, g=3, seed=1)
    patients = np.array(["P"] * 25 + ["Q"] * 35)
    expr[25:] = np.log1p(np.expm1(expr[25:]) * 2.0)  # Q's make-up differs: twice the counts per 10k
    got = counting_base.residual_targets(expr, lib, patients, 1e4)
    assert got.dtype == np.float32 and got.shape == expr.shape
    for rows in (np.arange(25), np.arange(25, 60)):
        counts = np.expm1(expr[rows].astype(np.float64)) * lib[rows, None] / 1e4
        shares = np.rint(counts).sum(0) / lib[rows].sum()
        for i in rows[[0, 5, -1]]:
            for j in range(3):
                expected = expr[i, j] - _poisson_log1p(lib[i], shares[j])
                assert got[i, j] == pytest.approx(expected, abs=1e-4)
    # A patient's residuals never read another patient's counts: changing Q leaves P's alone.
    expr2 = expr.copy()
    expr2[25:] += 1.0
    np.testing.assert_array_equal(counting_base.residual_targets(expr2, lib, patients, 1e4)[:25], got[:25])


def _config(base: str, recipe: str = "standard"):
    c = ml_collections.ConfigDict({"recipe": recipe, "model": {"output_base": base}})
    return c


COUNTS = {"expression": {"normalisation": "library_size", "scale": 1e4, "log": "log1p", "log_base": "e"}}


def test_scale_for_follows_the_recipe_and_the_store(monkeypatch):
    obs = {"library_size": np.ones(3)}
    # Inner validation chose the training mean for the standard recipe; a recipe that chose counting gets it.
    assert counting_base.scale_for(_config("auto"), COUNTS, obs, "s") is None
    monkeypatch.setitem(config_lib.RECIPES, "standard",
                        config_lib.RECIPES["standard"]._replace(output_base="counting"))
    assert counting_base.scale_for(_config("auto"), COUNTS, obs, "s") == 1e4
    assert counting_base.scale_for(_config("counting"), COUNTS, obs, "s") == 1e4
    assert counting_base.scale_for(_config("mean"), COUNTS, obs, "s") is None
    assert counting_base.scale_for(_config("auto", "paper"), COUNTS, obs, "s") is None
    # auto on a store without counts (the synthetic demo) or without library sizes: no base, no error
    assert counting_base.scale_for(_config("auto"), {}, obs, "s") is None
    assert counting_base.scale_for(_config("auto"), COUNTS, {}, "s") is None
    # asked for explicitly, it is an error naming the store and the way out
    with pytest.raises(ConfigError, match=r"/data/demo.*output_base=mean"):
        counting_base.scale_for(_config("counting"), {}, obs, "/data/demo")
    log2 = {"expression": {**COUNTS["expression"], "log_base": "2"}}
    with pytest.raises(ConfigError, match="without library sizes"):
        counting_base.scale_for(_config("counting"), log2, {}, "s")
    bad = config_lib.get_config()
    bad.model.output_base = "depth"
    with pytest.raises(ConfigError, match="model.output_base"):
        config_lib.validate(bad)


def _blend_config(blend: str, base: str = "mean", recipe: str = "standard",
                  weights=(0.0, 0.2, 0.4, 0.6, 0.8)):
    return ml_collections.ConfigDict({"recipe": recipe, "model": {"output_base": base, "counting_blend": blend,
                                                                  "counting_blend_weights": weights}})


def test_blend_weights_follow_the_recipe_the_store_and_the_base():
    obs = {"library_size": np.ones(3)}
    assert counting_base.blend_weights(_blend_config("auto"), COUNTS, obs, "s") == (0.0, 0.2, 0.4, 0.6, 0.8)
    assert counting_base.blend_weights(_blend_config("validated", weights=(0.5,)), COUNTS, obs, "s") == (0.5,)
    assert counting_base.blend_weights(_blend_config("none"), COUNTS, obs, "s") is None
    assert counting_base.blend_weights(_blend_config("auto", recipe="paper"), COUNTS, obs, "s") is None
    # auto where it cannot apply: a store without counts or library sizes, or a counting base (added in full)
    assert counting_base.blend_weights(_blend_config("auto"), {}, obs, "s") is None
    assert counting_base.blend_weights(_blend_config("auto"), COUNTS, {}, "s") is None
    assert counting_base.blend_weights(_blend_config("auto", base="counting"), COUNTS, obs, "s") is None
    # asked for explicitly there, an error that names the store or the clash, and the way out
    with pytest.raises(ConfigError, match=r"/data/demo.*counting_blend=none"):
        counting_base.blend_weights(_blend_config("validated"), {}, obs, "/data/demo")
    with pytest.raises(ConfigError, match="output_base=counting already adds it"):
        counting_base.blend_weights(_blend_config("validated", base="counting"), COUNTS, obs, "s")
    for key, value in (("counting_blend", "always"), ("counting_blend_weights", (0.5, 1.5))):
        bad = config_lib.get_config()
        bad.model[key] = value
        with pytest.raises(ConfigError, match=f"model.{key}"):
            config_lib.validate(bad)


def test_choose_blend_takes_the_weight_with_the_lowest_mse_in_training_sds():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(40, 6))
    heads = truth + rng.normal(scale=1.0, size=truth.shape)
    counting = truth + rng.normal(scale=0.7, size=truth.shape)
    sd = rng.uniform(0.5, 2.0, size=6)
    weights = (0.0, 0.25, 0.5, 0.75, 1.0)
    got = counting_base.choose_blend(truth, heads, counting, sd, weights)
    by_hand = {}
    for w in weights:
        total = 0.0
        for i in range(40):
            for j in range(6):
                total += (((1 - w) * heads[i, j] + w * counting[i, j] - truth[i, j]) / sd[j]) ** 2
        by_hand[w] = total / 240
    assert got["weight"] == min(by_hand, key=by_hand.get) and got["n_spots"] == 40
    for w in weights:
        assert got["inner_validation_mse"][f"{w:g}"] == pytest.approx(by_hand[w], rel=1e-12)
        pred = (1 - w) * heads + w * counting
        r = np.mean([np.corrcoef(truth[:, j], pred[:, j])[0, 1] for j in range(6)])
        assert got["inner_validation_per_gene_r"][f"{w:g}"] == pytest.approx(r, rel=1e-9)
    # noise variances 1 and 0.49 put the optimum near 1 / (1 + 0.49) = 0.67, strictly inside the grid
    assert got["weight"] in (0.5, 0.75)
    # a tie goes to the smaller weight (less of the counting model)
    zeros = np.zeros_like(truth)
    assert counting_base.choose_blend(truth, zeros, zeros, sd, (0.6, 0.2))["weight"] == 0.2
    np.testing.assert_allclose(counting_base.blend(heads, counting, 0.25), 0.75 * heads + 0.25 * counting)
