"""Neighbourhood context (histospace_jax/context.py): who neighbours whom on the grids of the field's platforms,
the context vectors against brute-force sums, and heads that use what only the context carries."""

import numpy as np
import pytest

from histospace_jax import context
from histospace_jax.errors import BadInputError


def _brute_neighbours(x, y, groups, radius):
    """Independent reference: all pairwise distances, spacing = median nearest-neighbour distance per group."""
    out = []
    for i in range(len(x)):
        same = np.flatnonzero(groups == groups[i])
        d_all = np.hypot(x[same][:, None] - x[same][None], y[same][:, None] - y[same][None])
        np.fill_diagonal(d_all, np.inf)
        spacing = np.median(d_all.min(1))
        d = np.hypot(x[same] - x[i], y[same] - y[i])
        out.append(sorted(int(j) for j in same[(d <= radius * spacing + 1e-9) & (same != i)]))
    return out


def _as_lists(table):
    return [sorted(int(j) for j in row if j >= 0) for row in table]


def test_square_st_grid_has_8_neighbours_inside_5_on_edges_3_in_corners():
    ax, ay = np.meshgrid(np.arange(5), np.arange(4))
    x, y = ax.ravel() * 200.0 + 31, ay.ravel() * 200.0 + 7  # ST: spots 200 um apart
    table = context.neighbour_table(x, y)
    count = (table >= 0).sum(1).reshape(4, 5)
    assert count[1, 1] == count[2, 3] == 8 and count[0, 2] == count[3, 2] == count[1, 0] == 5
    assert count[0, 0] == count[3, 4] == 3
    assert table.shape == (20, 8)
    assert _as_lists(table) == _brute_neighbours(x, y, np.zeros(20), 1.5)
    # Two rings: the 5 x 5 block around a spot (x^2 + y^2 <= 8 < 2.9^2), cut by the edge of the 4 x 5 array.
    far = context.neighbour_table(x, y, radius=2.9)
    assert (far[7] >= 0).sum() == 4 * 5 - 1  # row 1, column 2: rows 0-3, columns 0-4
    assert _as_lists(far) == _brute_neighbours(x, y, np.zeros(20), 2.9)


def test_hexagonal_visium_grid_has_6_neighbours_and_sections_never_mix():
    rows, cols = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    x = (cols * 100.0 + (rows % 2) * 50.0).ravel()  # Visium: centres 100 um apart on a hexagonal lattice
    y = (rows * 100.0 * np.sqrt(3) / 2).ravel()
    # A second section at the very same pixel positions (its own slide).
    x2, y2 = np.concatenate([x, x]), np.concatenate([y, y])
    sections = np.repeat(np.array(["s1", "s2"]), 36)
    table = context.neighbour_table(x2, y2, sections)
    count = (table >= 0).sum(1)
    interior = [r * 6 + c for r in range(1, 5) for c in range(1, 5)]
    assert set(count[interior]) == {6}
    assert all(np.all(row[row >= 0] < 36) for row in table[:36]) and all(np.all(row[row >= 0] >= 36)
                                                                         for row in table[36:])
    assert _as_lists(table) == _brute_neighbours(x2, y2, sections, 1.5)


def test_jittered_st_spots_find_all_8_neighbours_on_their_fitted_grid():
    """Printed ST spots sit off their grid places (HER2ST: ~7% of the spacing). Around the measured centres a
    1.5-spacing radius misses many diagonal neighbours; on the grid that the array coordinates imply (an affine
    fit, here of a rotated, scaled grid) it finds all 8 again, the same as on the exact grid."""
    rng = np.random.default_rng(0)
    ax, ay = np.meshgrid(np.arange(12), np.arange(10))
    ax, ay = ax.ravel().astype(float), ay.ravel().astype(float)
    angle, pitch = 0.1, 291.0
    exact_x = pitch * (np.cos(angle) * ax - np.sin(angle) * ay) + 500
    exact_y = pitch * (np.sin(angle) * ax + np.cos(angle) * ay) + 300
    px, py = exact_x + rng.normal(0, 20, ax.shape), exact_y + rng.normal(0, 20, ax.shape)
    interior = (ax > 0) & (ax < 11) & (ay > 0) & (ay < 9)
    jittered = (context.neighbour_table(px, py) >= 0).sum(1)
    assert np.median(jittered[interior]) < 8  # the fault this fixes
    gx, gy = context.grid_positions(px, py, ax, ay)
    assert np.sqrt(np.mean((gx - exact_x) ** 2 + (gy - exact_y) ** 2)) < 10.0  # well under the 28 px of jitter
    fitted = context.neighbour_table(gx, gy)
    assert _as_lists(fitted) == _as_lists(context.neighbour_table(exact_x, exact_y))
    assert set((fitted >= 0).sum(1)[interior]) == {8}
    # Through obs: sections fitted separately, and section_table of a subset of rows keeps the grid.
    obs = {"pixel_x": np.concatenate([px, px + 7]), "pixel_y": np.concatenate([py, py]),
           "array_x": np.concatenate([ax, ax]), "array_y": np.concatenate([ay, ay]),
           "section": np.repeat(np.array(["a", "b"]), len(ax))}
    both = context.neighbour_table(*context.obs_positions(obs), obs["section"])
    assert _as_lists(both[:len(ax)]) == _as_lists(fitted)
    rows = np.flatnonzero((obs["array_x"] < 6) & (obs["section"] == "b"))
    sub = context.section_table(obs, rows, context.DEFAULT_RADIUS)
    assert set((sub >= 0).sum(1)[(ax[rows - len(ax)] > 0) & (ax[rows - len(ax)] < 5)
                                 & (ay[rows - len(ax)] > 0) & (ay[rows - len(ax)] < 9)]) == {8}


def test_hexagonal_array_coordinates_fit_and_unrelated_ones_are_ignored():
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    array_col = (2 * cols + rows % 2).ravel().astype(float)  # Visium: array_col steps by 2 within a row
    array_row = rows.ravel().astype(float)
    x = (cols * 100.0 + (rows % 2) * 50.0).ravel()
    y = (rows * 100.0 * np.sqrt(3) / 2).ravel()
    gx, gy = context.grid_positions(x, y, array_col, array_row)
    np.testing.assert_allclose(np.stack([gx, gy]), np.stack([x, y]), atol=1e-6)
    # Array coordinates that are not these spots' grid (shuffled): the pixel centres are kept.
    shuffled = np.random.default_rng(1).permutation(len(x))
    kx, ky = context.grid_positions(x, y, array_col[shuffled], array_row[shuffled])
    np.testing.assert_array_equal(np.stack([kx, ky]), np.stack([x, y]))
    # No array coordinates, or too few spots: the pixel centres.
    np.testing.assert_array_equal(np.stack(context.grid_positions(x, y)), np.stack([x, y]))
    np.testing.assert_array_equal(np.stack(context.grid_positions(x[:2], y[:2], array_col[:2], array_row[:2])),
                                  np.stack([x[:2], y[:2]]))


def test_context_is_the_mean_of_the_neighbours_pooled_features_and_a_lone_spot_keeps_its_own():
    rng = np.random.default_rng(0)
    x = np.array([0.0, 1.0, 2.0, 0.0, 50.0])
    y = np.array([0.0, 0.0, 0.0, 1.0, 50.0])
    sections = np.array(["a", "a", "a", "a", "b"])  # the spot of section b is alone
    feats = rng.normal(size=(2, 5, 3, 3, 4)).astype(np.float32)  # [V, N, h, w, C]
    ctx = context.store_context([feats], {"pixel_x": x, "pixel_y": y, "section": sections})
    assert ctx.shape == (1, 2, 5, 4)
    pooled = feats.mean(axis=(2, 3))
    # spacing 1, radius 1.5: 0 ~ 1, 3 (and not 2); 1 ~ 0, 2, 3 (sqrt 2); 2 ~ 1; 3 ~ 0, 1
    expected = np.stack([(pooled[:, 1] + pooled[:, 3]) / 2, (pooled[:, 0] + pooled[:, 2] + pooled[:, 3]) / 3,
                         pooled[:, 1], (pooled[:, 0] + pooled[:, 1]) / 2, pooled[:, 4]], 1)
    np.testing.assert_allclose(ctx[0], expected, rtol=1e-5, atol=1e-6)
    d = context.describe(context.neighbour_table(x, y, sections), 1.5)
    assert d["n_without_neighbours"] == 1 and d["neighbours_max"] == 3


def test_bad_positions_are_named():
    with pytest.raises(BadInputError, match="position 2"):
        context.neighbour_table(np.array([0.0, 1.0, np.nan]), np.zeros(3))
    with pytest.raises(BadInputError, match="section s1.*distinct spot positions"):
        context.neighbour_table(np.zeros(4), np.zeros(4), np.array(["s1"] * 4))


def test_head_requires_its_context_and_uses_it():
    import jax
    import jax.numpy as jnp

    from histospace_jax import models

    m = models.HistoSpace(n_genes=3, encoder_features=(4, 4, 8), conv_features=(8,), fc_features=(16,),
                          use_context=True)
    v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), context=m.sample_context())
    # The flattened conv output (2 x 2 x 8 encoder features pooled to 1 x 1 x 8) and the context (8) feed the
    # first FC layer.
    assert v["params"]["head"]["fc0"]["kernel"].shape == (8 + 8, 16)
    tiles = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
    a = m.apply(v, tiles, context=jnp.zeros((2, 8)))
    b = m.apply(v, tiles, context=jnp.ones((2, 8)))
    assert not np.allclose(a, b)  # (the output layer is LeCun-initialised here, so the context reaches it)
    with pytest.raises(ValueError, match="neighbourhood context"):
        m.apply(v, tiles)
    plain = models.HistoSpace(n_genes=3, encoder_features=(4, 4, 8), conv_features=(8,), fc_features=(16,))
    pv = plain.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="no neighbourhood context input"):
        plain.apply(pv, tiles, context=jnp.zeros((2, 8)))


def test_heads_learn_what_only_the_context_carries(tmp_path):
    """Features are noise; the expression of gene 0 is a function of the context alone. Heads with context
    predict it on a held-out patient; heads without context cannot."""
    from histospace_jax import builders, folds, metric_log
    from tests.test_experiments import tiny_config

    rng = np.random.default_rng(0)
    n_per, g = 40, 3
    n = 3 * n_per
    feats = rng.normal(size=(1, 1, n, 2, 2, 8)).astype(np.float32)
    ctx = rng.normal(size=(1, 1, n, 8)).astype(np.float32)
    expr = rng.normal(size=(n, g)).astype(np.float32) * 0.1
    expr[:, 0] += 2.0 * ctx[0, 0, :, 0] - ctx[0, 0, :, 1]
    patient = np.repeat(np.arange(3), n_per)
    plan = folds.FoldPlan(patients=["P0", "P1", "P2"], spot_patient=patient, folds=[0])
    r = {}
    for setting in ("neighbours", "none"):
        config = tiny_config()
        config.model.context = setting
        config.model.dropout_rate = 0.0
        config.train.select_epoch, config.train.standardise_targets, config.model.output_init = "off", "on", "zeros"
        config.train.epochs, config.train.learning_rate = 40, 3e-3
        config.train.ensemble = 1
        enc = builders.random_encoder_variables(config, 0)
        data = folds.HeadData(names=["P0"], train_rows=[plan.training_rows(0)], val_rows=[np.zeros(0, np.int64)],
                              encoder_of_fold=[0], features=feats, expression=expr, encoder_variables=[enc],
                              context=ctx if setting == "neighbours" else None)
        writer = metric_log.MetricWriter(str(tmp_path / setting / "metrics.jsonl"))
        res = folds.train_heads(config, str(tmp_path / setting), data, tag="loo_c", writer=writer)
        pred = res["predict"]([plan.held_out_rows(0)])[0]
        r[setting] = np.corrcoef(pred[:, 0], expr[plan.held_out_rows(0), 0])[0, 1]
    assert r["neighbours"] > 0.8 and abs(r["none"]) < 0.4, r
    config = tiny_config()
    config.model.context = "neighbours"
    with pytest.raises(ValueError, match="has no neighbourhood context"):
        folds.train_heads(config, str(tmp_path / "x"), folds.HeadData(
            names=["P0"], train_rows=[plan.training_rows(0)], val_rows=[np.zeros(0, np.int64)], encoder_of_fold=[0],
            features=feats, expression=expr, encoder_variables=[enc]), tag="loo_x", writer=writer)


def test_smoothing_blends_each_prediction_with_the_mean_of_its_neighbours_by_hand():
    """Spots 0-3 in a square of side 1 plus a lone spot of another section: with radius 1.5 every spot of the
    square neighbours the other three (the diagonal is sqrt 2); the lone spot keeps its own prediction."""
    x = np.array([0.0, 1.0, 0.0, 1.0, 50.0])
    y = np.array([0.0, 0.0, 1.0, 1.0, 50.0])
    sections = np.array(["a", "a", "a", "a", "b"])
    pred = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 60.0], [7.0, 70.0]], np.float32)
    got = context.smooth_rows(pred, {"pixel_x": x, "pixel_y": y, "section": sections}, np.arange(5), 1.5, 0.25)
    # spot 0: 0.25 * 1 + 0.75 * (2 + 3 + 6) / 3 = 0.25 + 2.75 = 3.0; spot 3: 0.25 * 6 + 0.75 * 2 = 3.0
    expected = np.array([[3.0, 30.0], [0.5 + 0.75 * 10 / 3, 5.0 + 75.0 / 3], [0.75 + 2.25, 7.5 + 22.5],
                         [3.0, 30.0], [7.0, 70.0]])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32
    # Only the given rows neighbour each other: rows 0 and 3 alone are 1.41 apart, one spacing, so neighbours.
    two = context.smooth_rows(pred[[0, 3]], {"pixel_x": x, "pixel_y": y, "section": sections}, np.array([0, 3]),
                              1.5, 0.25)
    np.testing.assert_allclose(two, [[0.25 + 4.5, 2.5 + 45.0], [1.5 + 0.75, 15.0 + 7.5]], rtol=1e-6)
    np.testing.assert_array_equal(context.smooth_rows(pred, {"pixel_x": x, "pixel_y": y, "section": sections},
                                                      np.arange(5), 1.5, 1.0), pred)


def test_smoothing_a_window_of_rows_equals_smoothing_the_whole_slide():
    """predict smooths a slide a batch at a time from a window of the first pass: the same numbers."""
    ax, ay = np.meshgrid(np.arange(7), np.arange(5))
    x, y = ax.ravel() * 100.0, ay.ravel() * 100.0
    pred = np.random.default_rng(0).normal(size=(35, 3)).astype(np.float32)
    table = context.neighbour_table(x, y, radius=1.5)
    whole = context.smooth_predictions(pred, table, 0.4)
    rows = np.arange(14, 21)  # the third grid row; its neighbours lie in rows 2-4
    near = table[rows]
    lo, hi = int(near[near >= 0].min()), int(near.max()) + 1
    assert (lo, hi) == (7, 28)
    window = context.smooth_predictions(pred[lo:hi], np.where(near >= 0, near - lo, -1), 0.4, rows=rows - lo)
    np.testing.assert_allclose(window, whole[rows], rtol=1e-6)
    # Independent reference: brute-force distances.
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    adj = (d <= 150.0) & (d > 0)
    np.testing.assert_allclose(whole, 0.4 * pred + 0.6 * (adj @ pred) / adj.sum(1, keepdims=True), rtol=1e-5,
                               atol=1e-6)
