"""controls.py against hand computation, independent SciPy/NumPy references and simulated data with known truth."""

import numpy as np
import pytest
import scipy.stats
from scipy import ndimage

from histospace_jax import controls, metrics, stats

# ------------------------------------------------------------------------------------------- colour features


def _feature(features, name):
    return features[:, controls.COLOUR_FEATURE_NAMES.index(name)]


def test_colour_features_of_white_glass():
    tiles = np.full((2, 16, 16, 3), 255, np.uint8)
    f = controls.tile_colour_features(tiles)
    assert f.shape == (2, 31) and len(controls.COLOUR_FEATURE_NAMES) == 31
    for ch in "RGB":
        for s in ("mean", "p10", "p50", "p90"):
            np.testing.assert_allclose(_feature(f, f"{ch}_{s}"), 1.0)
        np.testing.assert_allclose(_feature(f, f"{ch}_std"), 0.0, atol=1e-7)
    for ch in "HED":  # glass has zero optical density, so no stain
        for s in controls._SUMMARIES:
            np.testing.assert_allclose(_feature(f, f"{ch}_{s}"), 0.0, atol=1e-6)
    np.testing.assert_allclose(_feature(f, "background_fraction"), 1.0)


def test_colour_features_recover_pure_haematoxylin():
    # Build a tile whose every pixel is haematoxylin at concentration 0.8 (OD = 0.8 * unit H colour), using the
    # OD convention od = -ln((I + 1) / 256), i.e. I = 256 exp(-od) - 1, rounded to uint8.
    h = np.array([0.65, 0.70, 0.29])
    h = h / np.linalg.norm(h)
    rgb = np.rint(256.0 * np.exp(-0.8 * h) - 1.0).astype(np.uint8)
    tiles = np.broadcast_to(rgb, (3, 8, 8, 3)).copy()
    f = controls.tile_colour_features(tiles)
    # Independent deconvolution: solve od = c @ M for c per pixel with numpy's solver on the published matrix.
    m = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    c = np.linalg.solve(m.T, od)
    np.testing.assert_allclose(_feature(f, "H_mean"), c[0], rtol=1e-5)
    np.testing.assert_allclose(_feature(f, "E_mean"), c[1], atol=1e-5)
    np.testing.assert_allclose(_feature(f, "D_mean"), c[2], atol=1e-5)
    assert _feature(f, "H_mean")[0] == pytest.approx(0.8, abs=0.03)  # only uint8 rounding separates it from 0.8
    assert abs(_feature(f, "E_mean")[0]) < 0.03 and abs(_feature(f, "D_mean")[0]) < 0.03
    np.testing.assert_allclose(_feature(f, "R_mean"), rgb[0] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(_feature(f, "background_fraction"), 0.0)


def test_colour_features_half_white_half_black_by_hand():
    tile = np.zeros((1, 10, 10, 3), np.uint8)
    tile[0, :5] = 255
    f = controls.tile_colour_features(tile)
    assert _feature(f, "G_mean")[0] == pytest.approx(0.5)
    assert _feature(f, "G_std")[0] == pytest.approx(0.5)
    assert _feature(f, "G_p10")[0] == pytest.approx(0.0)
    assert _feature(f, "G_p90")[0] == pytest.approx(1.0)
    assert _feature(f, "background_fraction")[0] == pytest.approx(0.5)


def test_colour_features_do_not_depend_on_chunking():
    tiles = np.random.default_rng(0).integers(0, 256, (7, 12, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(controls.tile_colour_features(tiles, chunk=2), controls.tile_colour_features(tiles))
    single = controls.tile_colour_features(tiles[3:4])
    np.testing.assert_array_equal(single[0], controls.tile_colour_features(tiles)[3])
    with pytest.raises(ValueError):
        controls.tile_colour_features(tiles.astype(np.float32))


# ----------------------------------------------------------------------------------------------------- ridge


def _ridge_by_normal_equations(x, y, alpha):
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std
    beta = np.linalg.solve(xs.T @ xs + alpha * np.eye(x.shape[1]), xs.T @ (y - y.mean(0)))
    return lambda xn: y.mean(0) + ((xn - mean) / std) @ beta


def test_colour_statistics_of_a_store_follow_the_rows_asked_for_in_their_order():
    """features.colour_statistics reads a store in ascending chunks but returns the rows in the order asked (the
    external test asks for its training and test rows of two stores)."""
    from histospace_jax import features

    class Tiles:  # a store's tile array that, like a chunked on-disk array, is read with ascending row lists
        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def __getitem__(self, rows):
            assert np.all(np.diff(rows) > 0), "rows read out of order"
            return self.a[rows]

    tiles = np.random.default_rng(3).integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    store = type("Store", (), {"tiles": Tiles(tiles), "n_spots": 9})()
    rows = np.array([7, 2, 5, 0, 8])
    np.testing.assert_array_equal(features.colour_statistics(store, rows, chunk=2),
                                  controls.tile_colour_features(tiles[rows]))
    np.testing.assert_array_equal(features.colour_statistics(store), controls.tile_colour_features(tiles))


def test_shown_tiles_reads_the_shown_sections_in_row_order_and_leaves_the_rest_white():
    """features.shown_tiles: the H&E under the spatial maps of leave-one-patient-out and the external test. The
    tiles of the first `max_sections` sections of `rows` (in their order of appearance) come from the store in the
    order of `rows`; the other sections' stay white and are never read."""
    from histospace_jax import features

    class Tiles:
        def __init__(self, a):
            self.a, self.shape, self.read = a, a.shape, []

        def __getitem__(self, rows):
            assert np.all(np.diff(rows) > 0), "rows read out of order"
            self.read += list(rows)
            return self.a[rows]

    tiles = np.random.default_rng(4).integers(0, 255, size=(8, 4, 4, 3), dtype=np.uint8)
    sections = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    store = type("Store", (), {"tiles": Tiles(tiles), "obs": {"section": sections}})()
    rows = np.array([5, 0, 2, 7, 4])  # sections c, a, b, d, c: the first two shown are c and a
    got = features.shown_tiles(store, rows, max_sections=2)
    np.testing.assert_array_equal(got[[0, 1, 4]], tiles[[5, 0, 4]])
    assert np.all(got[[2, 3]] == 255) and sorted(store.tiles.read) == [0, 4, 5]


def test_ridge_matches_normal_equations_primal_and_dual():
    rng = np.random.default_rng(0)
    for n, p in [(9, 3), (5, 12)]:  # P <= N uses the primal system, P > N the dual
        x = rng.normal(size=(n, p)) * rng.uniform(0.5, 5, p) + rng.normal(size=p)
        y = rng.normal(size=(n, 2))
        x_new = rng.normal(size=(4, p))
        model = controls.ridge_fit(x, y, 0.7)
        np.testing.assert_allclose(controls.ridge_predict(model, x_new), _ridge_by_normal_equations(x, y, 0.7)(x_new),
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(controls.ridge_predict(model, x), x @ model.coef + model.intercept)


def test_ridge_without_penalty_recovers_exact_linear_map():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)) * [1, 10, 0.1, 3, 1]
    b = rng.normal(size=(5, 3))
    y = x @ b + [1.0, -2.0, 0.5]
    model = controls.ridge_fit(x, y, 1e-10)
    np.testing.assert_allclose(model.coef, b, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(model.intercept, [1.0, -2.0, 0.5], atol=1e-8)
    # A large penalty shrinks towards the mean prediction.
    big = controls.ridge_fit(x, y, 1e8)
    np.testing.assert_allclose(controls.ridge_predict(big, x), np.broadcast_to(y.mean(0), y.shape), atol=1e-3)


def test_ridge_unstandardised_penalises_raw_centred_coefficients():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3)) * [1, 4, 0.2]
    y = rng.normal(size=12)
    xc = x - x.mean(0)
    beta = np.linalg.solve(xc.T @ xc + 2.0 * np.eye(3), xc.T @ (y - y.mean()))
    model = controls.ridge_fit(x, y, 2.0, standardise=False)
    np.testing.assert_allclose(model.coef[:, 0], beta, rtol=1e-10)


def test_choose_ridge_alpha_table_matches_brute_force_leave_one_group_out():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 4))
    y = x @ rng.normal(size=(4, 3)) + rng.normal(size=(60, 3)) * 2
    groups = np.repeat([7, 8, 9], 20)
    alphas = [0.1, 10.0, 1000.0]
    best, table = controls.choose_ridge_alpha(x, y, groups, alphas)
    for a, alpha in enumerate(alphas):
        rs, mses = [], []
        for g in (7, 8, 9):
            val = groups == g
            pred = controls.ridge_predict(controls.ridge_fit(x[~val], y[~val], alpha), x[val])
            rs.append(np.nanmean(metrics.pearson_per_gene(y[val], pred)))
            mses.append(np.mean((y[val] - pred) ** 2))
        assert table["mean_r"][a] == pytest.approx(np.mean(rs), rel=1e-8)
        assert table["mse"][a] == pytest.approx(np.mean(mses), rel=1e-8)
    assert best == alphas[int(np.nanargmax(table["mean_r"]))]
    assert table["n_groups"] == 3


def test_choose_ridge_alpha_prefers_small_penalty_for_clean_linear_signal_and_falls_back_to_halves():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 20))
    y = x @ rng.normal(size=(20, 5)) + 0.05 * rng.normal(size=(200, 5))
    best, _ = controls.choose_ridge_alpha(x, y, np.arange(200) % 4)
    assert best <= 1.0
    one, t_one = controls.choose_ridge_alpha(x, y, np.zeros(200))
    halves, t_halves = controls.choose_ridge_alpha(x, y, np.arange(200) >= 100)
    assert t_one["n_groups"] == 2 and one == halves
    np.testing.assert_allclose(t_one["mean_r"], t_halves["mean_r"])
    blocks = np.arange(200) % 5
    _, t_fb = controls.choose_ridge_alpha(x, y, np.zeros(200), fallback_groups=blocks)
    assert t_fb["n_groups"] == 5


def test_choose_ridge_alpha_follows_the_scale_of_unstandardised_inputs_beyond_1e4():
    """Unstandardised inputs scaled by c move the best penalty by c^2 (the ridge solution of (c x, y) at c^2 alpha
    is that of (x, y) at alpha, scaled). The linear probe ridges unstandardised principal-component scores whose
    best penalty lies above 1e4 on real stores; a grid that ended there clipped it."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 30))
    y = x @ (0.2 * rng.normal(size=(30, 4))) + rng.normal(size=(120, 4))
    groups = np.arange(120) % 4
    best, table = controls.choose_ridge_alpha(x, y, groups, standardise=False)
    scaled, table_scaled = controls.choose_ridge_alpha(100 * x, y, groups, standardise=False)
    assert 1 < best < 1e4 and scaled == pytest.approx(best * 1e4) and scaled > 1e4
    # The same validation scores, shifted by 8 half-decades along the grid.
    np.testing.assert_allclose(table_scaled["mean_r"][8:], table["mean_r"][:-8], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ PCA, pooling


def test_pooled_feature_maps_by_hand():
    f = np.arange(2 * 8 * 4 * 3, dtype=np.float32).reshape(2, 8, 4, 3)
    out = controls.pooled_feature_maps(f)
    assert out.shape == (2, 16 * 3 + 2 * 3)
    # Cell (row 1, col 2) of sample 1, channel 2: rows 2-3, column 2 of the 8 x 4 map.
    cell = f[1, 2:4, 2:3, 2].mean()
    assert out[1, (1 * 4 + 2) * 3 + 2] == pytest.approx(cell)
    np.testing.assert_allclose(out[:, 48:51], f.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(out[:, 51:54], f.std(axis=(1, 2)), rtol=1e-6)
    # A 6 x 8 map has no 4 x 4 grid: the largest grid dividing it, 2 x 2, is used.
    g = np.arange(6 * 8 * 2, dtype=np.float32).reshape(1, 6, 8, 2)
    small = controls.pooled_feature_maps(g)
    assert small.shape == (1, 4 * 2 + 2 * 2)
    assert small[0, (1 * 2 + 0) * 2 + 1] == pytest.approx(g[0, 3:6, 0:4, 1].mean())


def test_pca_of_known_low_rank_matrix_matches_numpy_svd():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 10)) + rng.normal(size=10) * 5
    model = controls.fit_pca(x, 3)
    z = controls.pca_transform(model, x)
    np.testing.assert_allclose(z @ model.components + model.mean, x, atol=1e-9)  # rank 3 is reconstructed
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(model.explained_variance, s[:3] ** 2 / 49, rtol=1e-9)
    np.testing.assert_allclose(model.components.T @ model.components, vt[:3].T @ vt[:3], atol=1e-9)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.diag(model.explained_variance), atol=1e-8)
    assert controls.fit_pca(x[:5], 100).components.shape == (4, 10)  # capped at n_rows - 1


# ------------------------------------------------------------------------------------------------- controls


def test_depth_oracle_matches_linregress_per_gene():
    rng = np.random.default_rng(6)
    d_train, d_test = rng.normal(8, 1, 40), rng.normal(8, 1, 7)
    y = np.outer(d_train, [0.5, -0.2, 0.0]) + rng.normal(size=(40, 3))
    pred = controls.depth_oracle(d_train, y, d_test)
    for g in range(3):
        fit = scipy.stats.linregress(d_train, y[:, g])
        np.testing.assert_allclose(pred[:, g], fit.intercept + fit.slope * d_test, rtol=1e-10)


def test_image_depth_is_the_depth_oracle_at_the_depth_read_from_features():
    """Features that carry the spot's depth: the control predicts the held-out log depth, then evaluates the
    depth oracle's per-gene lines there; written out with numpy (standardise, SVD, ridge with the chosen alpha)."""
    rng = np.random.default_rng(22)
    n_train, n_test = 120, 40
    depth = rng.normal(7.5, 0.6, n_train + n_test)
    maps = rng.normal(size=(n_train + n_test, 4, 4, 3))
    maps[..., 0] += depth[:, None, None] - 7.5
    y = np.outer(depth, [0.8, -0.3, 0.1]) + 0.3 * rng.normal(size=(n_train + n_test, 3))
    groups = np.arange(n_train) % 4
    tr, te = slice(0, n_train), slice(n_train, None)
    pred, alpha = controls.image_depth(*controls.probe_scores(maps[tr], maps[te], n_components=8), depth[tr], y[tr],
                                       groups)
    assert alpha in controls.DEFAULT_ALPHAS
    pooled = controls.pooled_feature_maps(maps)
    mu, sd = pooled[tr].mean(0), pooled[tr].std(0)
    z = (pooled - mu) / np.where(sd > 0, sd, 1.0)
    _, _, vt = np.linalg.svd(z[tr] - z[tr].mean(0), full_matrices=False)
    scores = (z - z[tr].mean(0)) @ vt[:8].T  # the component signs cancel in the ridge fit below
    s_tr, d_tr = scores[tr], depth[tr]
    s_mean, d_mean = s_tr.mean(0), d_tr.mean()
    w = np.linalg.solve((s_tr - s_mean).T @ (s_tr - s_mean) + alpha * np.eye(8), (s_tr - s_mean).T @ (d_tr - d_mean))
    depth_hat = d_mean + (scores[te] - s_mean) @ w
    assert np.corrcoef(depth_hat, depth[te])[0, 1] > 0.8
    np.testing.assert_allclose(pred, controls.depth_oracle(depth[tr], y[tr], depth_hat), rtol=1e-6, atol=1e-8)


def test_linear_probe_and_trivial_image_control_learn_linear_signals():
    rng = np.random.default_rng(7)
    n = 240
    feats = rng.normal(size=(n, 8, 8, 6)).astype(np.float32)
    w = rng.normal(size=(6, 4))
    y = feats.mean(axis=(1, 2)) @ w * 8 + 0.1 * rng.normal(size=(n, 4))
    groups = np.arange(n) % 3
    pred, alpha = controls.linear_probe(feats[:180], y[:180], groups[:180], feats[180:], n_components=40)
    assert pred.shape == (60, 4) and alpha in controls.DEFAULT_ALPHAS
    assert np.all(metrics.pearson_per_gene(y[180:], pred) > 0.8)

    level = rng.integers(40, 250, n)
    tiles = np.broadcast_to(level[:, None, None, None], (n, 8, 8, 3)).astype(np.uint8)
    y2 = np.column_stack([level / 255.0, -np.log((level + 1) / 256.0)]) + 0.01 * rng.normal(size=(n, 2))
    pred2, alpha2 = controls.trivial_image_control(tiles[:180], y2[:180], groups[:180], tiles[180:])
    assert alpha2 in controls.DEFAULT_ALPHAS
    assert np.all(metrics.pearson_per_gene(y2[180:], pred2) > 0.95)


# ------------------------------------------------------------------------------------------ block permutation


def test_grid_blocks_by_hand():
    x = np.array([0, 3, 4, 7, 0, 0, 8])
    y = np.array([0, 3, 0, 3, 4, 0, 0])
    sec = np.array(["a", "a", "a", "a", "a", "b", "a"])
    ids = controls.grid_blocks(x, y, sec, block=4)
    assert ids[0] == ids[1]  # same 4 x 4 square of section a
    assert ids[2] == ids[3] != ids[0]
    assert len({ids[0], ids[4], ids[5], ids[6], ids[2]}) == 5  # other squares, and section b is its own block
    assert sorted(set(ids.tolist())) == list(range(5))


def _square_grid(side, block):
    xs, ys = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return controls.grid_blocks(xs.ravel(), ys.ravel(), np.zeros(side * side), block=block)


def _smooth_unrelated_fields(rng, side, genes):
    """Truth and prediction: two independent, spatially smooth random fields on a side x side grid."""
    def field():
        return ndimage.gaussian_filter(rng.normal(size=(side, side, genes)), sigma=(1.5, 1.5, 0),
                                       mode="wrap").reshape(side * side, genes)

    return field(), field()


def test_perfect_predictor_gets_the_smallest_permutation_pvalue():
    rng = np.random.default_rng(8)
    y = rng.normal(size=(400, 30))
    p = controls.block_permutation_pvalues(y, 2 * y + 1, _square_grid(20, 4), n_perm=99)
    np.testing.assert_allclose(p, 1 / 100)
    assert controls.n_significant_fdr(p, 0.05) == 30


def test_independent_predictor_pvalues_are_roughly_uniform():
    rng = np.random.default_rng(9)
    y, pred = rng.normal(size=(400, 1000)), rng.normal(size=(400, 1000))
    p = controls.block_permutation_pvalues(y, pred, _square_grid(20, 4), n_perm=99)
    assert p.min() >= 1 / 100 and p.max() <= 1.0
    assert abs(np.mean(p) - 0.5) < 0.04
    assert 0.02 < np.mean(p <= 0.05) < 0.09
    assert controls.n_significant_fdr(p, 0.05) <= 5


def test_block_permutation_controls_false_positives_of_smooth_unrelated_maps():
    # Truth and prediction are independent, spatially smooth random fields: the t test (independent spots)
    # calls many genes significant; the block permutation null keeps the smoothness and calls far fewer.
    side = 30
    y, pred = _smooth_unrelated_fields(np.random.default_rng(10), side, 300)
    r = metrics.pearson_per_gene(y, pred)
    t_rate = np.mean(stats.pearson_pvalues(r, side * side) < 0.05)
    p = controls.block_permutation_pvalues(y, pred, _square_grid(side, 5), n_perm=199)
    perm_rate = np.mean(p < 0.05)
    assert t_rate > 0.2  # the t test is badly anti-conservative here
    assert perm_rate < 0.5 * t_rate
    assert controls.n_significant_fdr(p) < 0.25 * stats.n_significant_positive(r, side * side)


def test_block_permutation_marks_constant_genes_undefined_and_handles_uneven_blocks():
    rng = np.random.default_rng(11)
    y = rng.normal(size=(97, 3))
    pred = y + rng.normal(size=(97, 3))
    pred[:, 1] = 4.0
    blocks = rng.integers(0, 13, 97)  # uneven sizes
    p = controls.block_permutation_pvalues(y, pred, blocks, n_perm=50, seed=1)
    assert np.isnan(p[1]) and np.all(np.isfinite(p[[0, 2]]))
    np.testing.assert_array_equal(p, controls.block_permutation_pvalues(y, pred, blocks, n_perm=50, seed=1))


def test_block_permutation_within_sections_ignores_section_offsets_that_agree_by_chance():
    """Three 16 x 16 sections; truth and prediction independent, each with its own per-gene offset per section
    (batch effects, stain). Moving blocks across sections counts the offsets' chance agreement as signal; moving
    them only within their section (strata) gives ~uniform p-values and passes no gene."""
    rng = np.random.default_rng(14)
    side, n_sections, g = 16, 3, 400
    xs, ys = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    section = np.repeat(np.arange(n_sections), side * side)
    blocks = controls.grid_blocks(np.tile(xs.ravel(), n_sections), np.tile(ys.ravel(), n_sections), section)
    y = rng.normal(size=(n_sections, g))[section] + rng.normal(size=(len(section), g))
    pred = rng.normal(size=(n_sections, g))[section] + rng.normal(size=(len(section), g))
    mixed = controls.block_permutation_pvalues(y, pred, blocks, n_perm=200, null="normal")
    within = controls.block_permutation_pvalues(y, pred, blocks, n_perm=200, null="normal", strata=section)
    assert np.mean(mixed < 0.05) > 0.2 and controls.n_significant_fdr(mixed, 0.05) > 50
    assert 0.02 < np.mean(within < 0.05) < 0.09 and controls.n_significant_fdr(within, 0.05) <= 2
    # A real signal still passes within sections.
    knows = pred.copy()
    knows[:, :5] = y[:, :5] + 0.5 * rng.normal(size=(len(section), 5))
    p = controls.block_permutation_pvalues(y, knows, blocks, n_perm=200, null="normal", strata=section)
    assert np.all(p[:5] < 1e-6)
    # One stratum is the plain test, draw for draw; a block that spans two strata is refused.
    one = np.zeros(side * side)
    np.testing.assert_array_equal(
        controls.block_permutation_pvalues(y[:256], pred[:256], blocks[:256], n_perm=50, seed=3, strata=one),
        controls.block_permutation_pvalues(y[:256], pred[:256], blocks[:256], n_perm=50, seed=3))
    with pytest.raises(ValueError, match="a block spans two strata"):
        controls.block_permutation_pvalues(y[:256], pred[:256], np.zeros(256), n_perm=5, strata=np.arange(256) % 2)
    with pytest.raises(ValueError, match="strata has 255 labels for 256 spots"):
        controls.block_permutation_pvalues(y[:256], pred[:256], blocks[:256], n_perm=5, strata=one[:255])


# ------------------------------------------------------------------------------------------------- bootstrap


def test_pooled_r_from_unit_sums_matches_explicit_pooling():
    rng = np.random.default_rng(12)
    y, pred = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    units = rng.integers(0, 6, 50)
    sums = controls._unit_sums(y, pred, units, 6)
    weights = np.array([[2.0, 0, 1, 0, 3, 0], [1, 1, 1, 1, 1, 1]])
    r = controls._pooled_r(weights, sums)
    for b, w in enumerate(weights):
        idx = np.concatenate([np.flatnonzero(units == u).repeat(1) for u in range(6) for _ in range(int(w[u]))])
        np.testing.assert_allclose(r[b], metrics.pearson_per_gene(y[idx], pred[idx]), rtol=1e-9)


def _units_data(rng, n_units, per_unit=20, genes=50):
    strength = rng.uniform(0.2, 1.5, n_units).repeat(per_unit)[:, None]
    y = rng.normal(size=(n_units * per_unit, genes))
    pred = strength * y + rng.normal(size=y.shape)
    return y, pred, np.arange(n_units).repeat(per_unit)


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_units():
    rng = np.random.default_rng(13)
    few = controls.bootstrap_mean_gene_r(*_units_data(rng, 10), n_boot=300)
    many = controls.bootstrap_mean_gene_r(*_units_data(rng, 80), n_boot=300)
    for out in (few, many):
        assert out["low"] < out["mean_r"] < out["high"]
    assert few["n_units"] == 10 and many["n_units"] == 80
    assert (many["high"] - many["low"]) < 0.6 * (few["high"] - few["low"])
    again = controls.bootstrap_mean_gene_r(*_units_data(np.random.default_rng(13), 10), n_boot=300)
    assert again == few  # seeded
    one = controls.bootstrap_mean_gene_r(*_units_data(rng, 1))
    assert np.isnan(one["low"]) and np.isfinite(one["mean_r"])


def test_paired_difference_interval_matches_explicit_pooling_of_the_same_draws():
    rng = np.random.default_rng(15)
    y, weak, units = _units_data(rng, 12, per_unit=8, genes=6)
    strong = y + 0.3 * rng.normal(size=y.shape)
    out = controls.bootstrap_gene_r_difference(y, strong, weak, units, n_boot=70, seed=4)
    # Reference: the draws the function makes (64 per batch from one seeded generator), each pooled spot by spot.
    draw_rng, diffs = np.random.default_rng(4), []
    for b in (64, 6):
        for draw in draw_rng.integers(0, 12, size=(b, 12)):
            idx = np.concatenate([np.flatnonzero(units == u) for u in draw])
            diffs.append(np.mean(metrics.pearson_per_gene(y[idx], strong[idx]))
                         - np.mean(metrics.pearson_per_gene(y[idx], weak[idx])))
    np.testing.assert_allclose([out["low"], out["high"]], np.percentile(diffs, [2.5, 97.5]), rtol=1e-9)
    assert out["difference"] == pytest.approx(np.mean(metrics.pearson_per_gene(y, strong))
                                              - np.mean(metrics.pearson_per_gene(y, weak)))
    assert 0 < out["low"] < out["difference"] < out["high"] and out["n_units"] == 12
    same = controls.bootstrap_gene_r_difference(y, weak, weak, units, n_boot=20)
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    flipped = controls.bootstrap_gene_r_difference(y, weak, strong, units, n_boot=70, seed=4)
    np.testing.assert_allclose([flipped["low"], flipped["high"]], [-out["high"], -out["low"]], rtol=1e-9)
    assert np.isnan(controls.bootstrap_gene_r_difference(y, strong, weak, np.zeros(len(y)))["low"])
    with pytest.raises(ValueError, match="y_pred"):
        controls.bootstrap_gene_r_difference(y, strong[:, :5], weak, units)


# ---------------------------------------------------------------------------------------------- noise ceiling


def test_noise_ceiling_near_zero_for_constant_rates_and_near_one_for_varying_rates():
    rng = np.random.default_rng(14)
    n, genes, depth = 500, 100, 5000
    base = rng.uniform(0.0005, 0.005, genes)
    flat = rng.poisson(base * depth, size=(n, genes))
    lib = flat.sum(1) + rng.poisson((1 - base.sum()) * depth, n)
    out = controls.noise_ceiling(flat, lib, seed=0)
    assert abs(out["split_half_r_mean"]) < 0.03
    assert out["n_spots_used"] == n

    rates = base * np.exp(rng.normal(0, 1.5, (n, genes)))
    varying = rng.poisson(rates * depth)
    lib = varying.sum(1) + rng.poisson(depth, n)
    out = controls.noise_ceiling(varying, lib, seed=0)
    assert out["split_half_r_mean"] > 0.85
    r = out["split_half_r_per_gene"]
    np.testing.assert_allclose(out["spearman_brown_r_per_gene"], 2 * r / (1 + r))
    assert out["spearman_brown_r_mean"] == pytest.approx(np.nanmean(2 * r / (1 + r)))
    assert out["spearman_brown_r_mean"] > out["split_half_r_mean"]


def _documented_halves(counts, lib, seed: int):
    """noise_ceiling's documented split written out: genes thinned first, then the rest of the library, with the
    same generator; each half normalised with its own library."""
    rng = np.random.default_rng(seed)
    c1 = rng.binomial(counts, 0.5)
    lib1 = c1.sum(1) + rng.binomial(lib - counts.sum(1), 0.5)
    lib2 = lib - lib1
    return np.log1p(c1 / lib1[:, None] * 1e4), np.log1p((counts - c1) / lib2[:, None] * 1e4)


def test_noise_ceiling_follows_documented_binomial_split():
    rng = np.random.default_rng(16)
    counts = rng.poisson(rng.uniform(0.5, 20, (80, 1)) * rng.uniform(0.2, 1, 5))
    lib = counts.sum(1) + rng.integers(0, 3000, 80)
    e1, e2 = _documented_halves(counts, lib, seed=3)
    ref = [scipy.stats.pearsonr(e1[:, g], e2[:, g])[0] for g in range(5)]
    out = controls.noise_ceiling(counts, lib, seed=3)
    np.testing.assert_allclose(out["split_half_r_per_gene"], ref, rtol=1e-9)
    ref = np.array(ref)
    np.testing.assert_allclose(out["ceiling_r_per_gene"], np.sqrt(np.clip(2 * ref / (1 + ref), 0, 1)))


def test_depth_adjusted_noise_ceiling_removes_shared_depth():
    """Constant true rates, depth varying tenfold across spots: log1p of sparse counts follows depth in both
    halves, so the plain split-half r is positive, while the depth-adjusted one is about 0. Its value is the
    documented computation written out: both halves residualised on a cubic in log library, then r."""
    rng = np.random.default_rng(21)
    n, genes = 400, 60
    depth = np.exp(rng.uniform(np.log(300), np.log(3000), n))
    rate = rng.uniform(0.0005, 0.004, genes)
    counts = rng.poisson(depth[:, None] * rate)
    lib = counts.sum(1) + rng.poisson(depth * (1 - rate.sum()))
    out = controls.noise_ceiling(counts, lib, seed=5)
    assert out["split_half_r_mean"] > 0.05
    assert abs(out["depth_adjusted_split_half_r_mean"]) < 0.02

    e1, e2 = _documented_halves(counts, lib, seed=5)
    res = [e - np.polyval(np.polyfit(np.log(lib), e, 3), np.log(lib)[:, None]) for e in (e1, e2)]
    ref = np.array([scipy.stats.pearsonr(res[0][:, g], res[1][:, g])[0] for g in range(genes)])
    np.testing.assert_allclose(out["depth_adjusted_split_half_r_per_gene"], ref, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(out["depth_adjusted_ceiling_r_per_gene"], np.sqrt(np.clip(2 * ref / (1 + ref), 0, 1)))


def test_noise_ceiling_rejects_inconsistent_library():
    with pytest.raises(ValueError):
        controls.noise_ceiling(np.array([[5, 5], [1, 2]]), np.array([8, 100]))


def test_counts_from_expression_inverts_log_normalisation():
    rng = np.random.default_rng(15)
    counts = rng.poisson(3.0, size=(20, 6))
    lib = counts.sum(1) + rng.integers(1000, 50000, 20)
    expression = np.log1p(counts / lib[:, None] * 1e4).astype(np.float32)
    np.testing.assert_array_equal(controls.counts_from_expression(expression, lib), counts)


def test_normal_null_resolves_pvalues_below_the_monte_carlo_floor():
    """Among 1,000 unrelated genes, 5 that the prediction knows: the Monte-Carlo p of 99 permutations floors at
    0.01, which Benjamini-Hochberg over 1,005 genes cannot pass; the normal reading of the same permutations
    gives them p far below the floor, and they pass while the unrelated genes keep a ~uniform p."""
    rng = np.random.default_rng(12)
    n, g = 400, 1005
    y = rng.normal(size=(n, g))
    pred = rng.normal(size=(n, g))
    pred[:, :5] = y[:, :5] + 0.5 * rng.normal(size=(n, 5))
    blocks = _square_grid(20, 4)
    mc = controls.block_permutation_pvalues(y, pred, blocks, n_perm=99)
    normal = controls.block_permutation_pvalues(y, pred, blocks, n_perm=99, null="normal")
    assert np.all(mc[:5] == 1 / 100) and controls.n_significant_fdr(mc, 0.05) == 0
    assert np.all(normal[:5] < 1e-6) and controls.n_significant_fdr(normal, 0.05) == 5
    # Where the Monte-Carlo p is resolved (the unrelated genes), the normal reading agrees with it, taken from
    # 20 times as many permutations.
    fine = controls.block_permutation_pvalues(y[:, 5:], pred[:, 5:], blocks, n_perm=1999, seed=1)
    # Off by no more on average than the Monte-Carlo p of the same 99 permutations.
    assert np.abs(normal[5:] - fine).mean() <= np.abs(mc[5:] - fine).mean() < 0.04
    assert 0.03 < np.mean(normal[5:] <= 0.05) < 0.08


def test_normal_null_keeps_the_false_positives_of_smooth_unrelated_maps_down():
    side = 30
    y, pred = _smooth_unrelated_fields(np.random.default_rng(13), side, 300)
    r = metrics.pearson_per_gene(y, pred)
    t_rate = np.mean(stats.pearson_pvalues(r, side * side) < 0.05)
    p = controls.block_permutation_pvalues(y, pred, _square_grid(side, 5), n_perm=199, null="normal")
    assert t_rate > 0.2 and np.mean(p < 0.05) < 0.5 * t_rate
    with pytest.raises(ValueError, match="null must be one of"):
        controls.block_permutation_pvalues(y, pred, _square_grid(side, 5), n_perm=9, null="exact")


# ------------------------------------------------------------------------------------------- counting model


def _poisson_expectation_by_sum(lam, a):
    """E[log1p(a c)] for c ~ Poisson(lam), summed with scipy's pmf far into the tail."""
    c = np.arange(0, int(lam + 40 * np.sqrt(lam) + 60))
    return float(np.sum(scipy.stats.poisson.pmf(c, lam) * np.log1p(a * c)))


def test_sampling_expectation_matches_a_poisson_sum_on_both_sides_of_the_exact_range():
    depth = np.array([50.0, 300.0, 2000.0, 30000.0])
    share = np.array([0.0, 1e-5, 1e-3, 0.0033, 0.0334, 0.05, 0.2])  # means from 0 to 6,000, across 100
    got = controls.sampling_expectation(np.log(depth), share, scale=1e4)
    want = [[_poisson_expectation_by_sum(d * s, 1e4 / d) for s in share] for d in depth]
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert np.all(got[:, 0] == 0.0)
    # Deeper spots show more of every expressed gene (fewer zeros), approaching log1p(scale * share).
    assert np.all(np.diff(got[:, 1:], axis=0) > 0)
    np.testing.assert_allclose(controls.sampling_expectation([np.log(1e9)], share, 1e4)[0], np.log1p(1e4 * share),
                               rtol=1e-4)
    with pytest.raises(ValueError, match="shares must be >= 0"):
        controls.sampling_expectation([5.0], [-0.1])
    with pytest.raises(ValueError, match="finite"):
        controls.sampling_expectation([np.nan], [0.1])


def test_library_shares_are_total_counts_over_total_library():
    counts = np.array([[3, 0, 10], [1, 2, 0], [0, 0, 5]])
    library = np.array([100.0, 40.0, 400.0])
    expression = np.log1p(counts / library[:, None] * 1e4)
    np.testing.assert_allclose(controls.library_shares(expression, library), counts.sum(0) / 540.0, rtol=1e-12)
    with pytest.raises(ValueError, match="sum to 0"):
        controls.library_shares(expression, np.zeros(3))


def test_sampling_depth_oracle_transfers_depth_where_training_lines_do_not():
    """Counts drawn at fixed library shares, a deep training patient and a shallow held-out one: the lines the
    depth oracle fits on the deep patient are nearly flat for the abundant genes and miss how counting lowers
    every gene of a shallow spot; the counting model needs no fitting and predicts the held-out means."""
    rng = np.random.default_rng(31)
    shares = np.geomspace(2e-5, 2e-2, 40)
    lib_train, lib_test = rng.uniform(5000, 40000, 400), rng.uniform(150, 1500, 300)
    # A tissue factor that tilts half the genes with depth in the training patient only.
    tilt = np.where(np.arange(40) % 2 == 0, 1.0, -1.0) * 0.4
    z = (np.log(lib_train) - np.log(lib_train).mean()) / np.log(lib_train).std()
    train_shares = shares * np.exp(np.outer(z, tilt))
    def log_norm(counts, lib):
        return np.log1p(counts / lib[:, None] * 1e4)
    x_train = log_norm(rng.poisson(lib_train[:, None] * train_shares), lib_train)
    x_test = log_norm(rng.poisson(lib_test[:, None] * shares), lib_test)
    sampling = controls.sampling_depth_oracle(x_train, lib_train, np.log(lib_test))
    lines = controls.depth_oracle(np.log(lib_train), x_train, np.log(lib_test))
    r_sampling = np.nanmean(metrics.pearson_per_gene(x_test, sampling))
    r_lines = np.nanmean(metrics.pearson_per_gene(x_test, lines))
    assert r_sampling > r_lines + 0.1, (r_sampling, r_lines)
    # Trained where shares do not move with depth, the expectation averaged over the held-out spots matches their
    # means within their noise.
    untilted = log_norm(rng.poisson(lib_train[:, None] * shares), lib_train)
    expected = controls.sampling_depth_oracle(untilted, lib_train, np.log(lib_test))
    standard_error = x_test.std(0) / np.sqrt(len(x_test))
    assert np.all(np.abs(expected.mean(0) - x_test.mean(0)) < 4 * standard_error + 1e-3)
