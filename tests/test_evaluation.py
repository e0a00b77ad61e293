"""Fold results and their summary: a collapsed fold is marked failed and never averaged away; the reviewer's
controls are fitted on training patients only."""

import numpy as np
import pytest

from histospace_jax import console, context, controls, evaluation, folds, metrics


def _plan_and_data(seed=0, n_per=30, g=6):
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(3), n_per).astype(np.int32)
    n = len(patient)
    plan = folds.FoldPlan(["A", "B", "C"], patient, [0, 1, 2])
    signal = rng.normal(size=(n, 1))
    expr = (signal @ rng.normal(size=(1, g)) + 0.5 * rng.normal(size=(n, g))).astype(np.float32) + 2.0
    obs = {"section": np.array([f"s{p}" for p in patient]), "patient": np.array(["ABC"[p] for p in patient]),
           "array_x": np.tile(np.arange(6), n // 6), "array_y": np.repeat(np.arange(n // 6), 6),
           "library_size": rng.uniform(500, 5000, n)}
    return plan, expr, obs, signal


def test_collapsed_fold_is_failed_and_the_summary_is_undefined():
    plan, expr, obs, _ = _plan_and_data()
    preds = {f: expr[plan.held_out_rows(f)] + 0.1 for f in range(3)}
    rows_b = plan.held_out_rows(1)
    preds[1] = np.broadcast_to(expr[rows_b].mean(0), (len(rows_b), expr.shape[1])).copy()  # collapsed: constant
    out = evaluation.fold_results(plan, preds, None, expr, obs)
    assert [f["failed"] for f in out] == [False, True, False]
    assert "constant across spots for 100% of genes" in out[1]["failure"]
    s = evaluation.summarise(out)
    assert s["n_folds_failed"] == 1 and s["failed_folds"] == ["B"]
    assert np.isnan(s["per_gene_pearson"])  # never the mean over the two surviving folds
    assert np.isnan(s["mse"])
    # Without the failure the summary is the plain mean over folds.
    preds[1] = expr[rows_b] + 0.1
    s = evaluation.summarise(evaluation.fold_results(plan, preds, None, expr, obs))
    assert s["n_folds_failed"] == 0 and np.isclose(s["per_gene_pearson"], 1.0)


def test_metric_block_matches_independent_computation():
    plan, expr, obs, _ = _plan_and_data()
    rng = np.random.default_rng(1)
    preds = {f: expr[plan.held_out_rows(f)] + rng.normal(size=(30, 6)) for f in range(3)}
    out = evaluation.fold_results(plan, preds, None, expr, obs)
    f0 = out[0]
    rows, tr = plan.held_out_rows(0), plan.training_rows(0)
    truth, pred = expr[rows].astype(np.float64), preds[0]
    r = [np.corrcoef(truth[:, g], pred[:, g])[0, 1] for g in range(6)]
    assert np.isclose(f0["per_gene_pearson"], np.mean(r))
    ref = expr[tr].mean(0)
    r2 = 1 - ((truth - pred) ** 2).sum(0) / ((truth - ref) ** 2).sum(0)
    assert np.isclose(f0["r2_mean"], r2.mean()) and np.isclose(f0["share_genes_r2_positive"], np.mean(r2 > 0))
    assert set(f0["controls"]) == {"mean_predictor"} and not f0["controls"]["mean_predictor"]["failed"]
    assert f0["per_section_pearson"].keys() == {"s0"}
    assert f0["n_genes_significant_spatial"] <= 6


def test_inner_validation_score_is_in_training_standard_deviations():
    """Hand computation: one gene constant on the training rows (its SD floored to 1), a perfect prediction
    of one gene and a reversed one of another."""
    expr = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 2.0], [2.0, 5.0, 4.0],  # training rows 0-2
                     [4.0, 7.0, 1.0], [0.0, 3.0, 3.0]])                 # inner-validation rows 3-4
    pred = np.array([[4.0, 5.0, 3.0], [0.0, 5.0, 1.0]])
    out = evaluation.inner_validation_score(expr, np.arange(3), np.array([3, 4]), pred)
    sd0 = np.sqrt(2 / 3)  # gene 0 on training rows: values 1, 3, 2
    sd2 = np.sqrt(8 / 3)  # gene 2: 0, 2, 4
    err = [[0, 2 / 1.0, 2 / sd2], [0, 2 / 1.0, 2 / sd2]]
    assert np.isclose(out["mse_sd_units"], np.mean(np.square(err)))
    mean_err = [[2 / sd0, 2.0, -1 / sd2], [-2 / sd0, -2.0, 1 / sd2]]
    assert np.isclose(out["mean_profile_mse_sd_units"], np.mean(np.square(mean_err)))
    # gene 0 r = 1, gene 2 r = -1, gene 1 undefined (constant prediction): mean over the defined ones
    assert np.isclose(out["per_gene_pearson"], 0.0) and out["n_spots"] == 2
    assert np.isclose(evaluation.inner_validation_score(expr, np.arange(3), np.array([3, 4]),
                                                        expr[[3, 4]])["mse_sd_units"], 0.0)


def test_reviewer_controls_never_see_the_held_out_patient():
    plan, expr, obs, signal = _plan_and_data()
    colour = np.concatenate([signal, np.random.default_rng(2).normal(size=(len(signal), 3))], 1)
    maps = np.random.default_rng(3).normal(size=(len(signal), 4, 4, 2)).astype(np.float32)
    maps[..., 0] += signal[:, :, None]
    preds, alphas, depth_read = evaluation.reviewer_controls(plan, expr, obs, colour, [maps], [0, 0, 0])
    assert set(preds) == {"trivial_image", "linear_probe", "depth_oracle", "image_depth"}
    assert set(depth_read) == set("ABC") and all(-1 <= v <= 1 for v in depth_read.values())
    assert set(alphas["linear_probe"]) == set(alphas["image_depth"]) == set("ABC")
    # The colour features carry the signal: the trivial control predicts the held-out patient well.
    r = metrics.pearson_per_gene(expr[plan.held_out_rows(0)], preds["trivial_image"][0])
    assert np.nanmean(r) > 0.6
    # Changing the held-out patient's expression changes nothing the controls predict for it.
    e2 = expr.copy()
    e2[plan.held_out_rows(0)] = -50.0
    preds2, _, _ = evaluation.reviewer_controls(plan, e2, obs, colour, [maps], [0, 0, 0])
    for name in preds:
        np.testing.assert_array_equal(preds[name][0], preds2[name][0])


def test_sampling_controls_use_the_training_shares_and_the_two_depths():
    """With the store's counts-per scale, depth_oracle_sampling is the counting model at each held-out spot's
    true depth and image_depth_sampling at the depth image_depth read from the features, both from the shares
    of the training patients' counts (by hand: total count over total library); the held-out patient's
    expression changes neither."""
    plan, expr, obs, signal = _plan_and_data()
    expr = np.abs(expr)  # log1p values are never negative
    maps = np.random.default_rng(3).normal(size=(len(signal), 4, 4, 2)).astype(np.float32)
    maps[..., 0] += np.log(obs["library_size"])[:, None, None]
    colour = np.random.default_rng(4).normal(size=(len(signal), 3))
    preds, _, depth_read = evaluation.reviewer_controls(plan, expr, obs, colour, [maps], [0, 0, 0], sampling=1e4)
    assert set(preds) == {"trivial_image", "linear_probe", "depth_oracle", "image_depth", "depth_oracle_sampling",
                          "image_depth_sampling"}
    lib = obs["library_size"]
    for f in range(3):
        tr, te = plan.training_rows(f), plan.held_out_rows(f)
        counts = np.rint(np.expm1(expr[tr].astype(np.float64)) * lib[tr, None] / 1e4)
        shares = counts.sum(0) / lib[tr].sum()
        np.testing.assert_allclose(preds["depth_oracle_sampling"][f],
                                   controls.sampling_expectation(np.log(lib[te]), shares), rtol=1e-12)
        # image_depth's lines are the depth oracle's at the image's depth: invert them to read that depth.
        lines = np.polyfit(np.log(lib[tr]), expr[tr].astype(np.float64), 1)
        depth_from_image = (preds["image_depth"][f][:, 0] - lines[1, 0]) / lines[0, 0]
        np.testing.assert_allclose(preds["image_depth_sampling"][f],
                                   controls.sampling_expectation(depth_from_image, shares), rtol=1e-6, atol=1e-9)
        # The diagnostic: how well that depth follows the measured one on the held-out spots.
        assert np.isclose(depth_read[plan.name(f)], np.corrcoef(depth_from_image, np.log(lib[te]))[0, 1], atol=1e-6)
    e2 = expr.copy()
    e2[plan.held_out_rows(0)] = 7.0
    preds2, _, _ = evaluation.reviewer_controls(plan, e2, obs, colour, [maps], [0, 0, 0], sampling=1e4)
    for name in ("depth_oracle_sampling", "image_depth_sampling"):
        np.testing.assert_array_equal(preds[name][0], preds2[name][0])


def test_sampling_scale_only_for_log1p_of_library_normalised_counts():
    prepared = {"expression": {"normalisation": "library_size", "scale": 1e4, "log": "log1p", "log_base": "e"}}
    assert evaluation.sampling_scale(prepared) == 1e4
    assert evaluation.sampling_scale({"expression": {**prepared["expression"], "scale": 1e6}}) == 1e6
    assert evaluation.sampling_scale({"expression": {**prepared["expression"], "log_base": "2"}}) is None
    assert evaluation.sampling_scale({"expression": {**prepared["expression"], "log": "none"}}) is None
    assert evaluation.sampling_scale({"expression": {"normalisation": "synthetic log-scale expression"}}) is None
    assert evaluation.sampling_scale({}) is None


def test_gene_ranking_averages_defined_folds_and_leaves_out_genes_without_r():
    """report.md's top/bottom genes: a gene's mean r is over the folds where it is defined (hand computation),
    and a gene constant in every fold is left out of the ranking without a warning."""
    import warnings

    from histospace_jax import report_md
    per_gene = [("B", [0.5, np.nan, 0.1, -0.2]), ("C", [0.3, np.nan, np.nan, -0.4])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines = report_md._genes_section(["G0", "G1", "G2", "G3"], per_gene, k=2)
    text = "\n".join(lines)
    top = text.split("Top 2:")[1].split("Bottom 2:")[0]
    bottom = text.split("Bottom 2:")[1]
    assert "G0" in top and "0.4" in top and "G2" in top and "0.1" in top
    assert "G3" in bottom and "-0.3" in bottom and "G1" not in text


def test_model_minus_control_says_which_side_of_zero_its_paired_interval_lies():
    """Each fold carries the model's per-gene r minus each control's with a paired bootstrap interval over the
    held-out patient's grid blocks; the printed table and report.md read it: above, BELOW, or not resolved."""
    from histospace_jax import console, report_md

    plan, expr, obs, _ = _plan_and_data(seed=3, n_per=60, g=8)
    rng = np.random.default_rng(4)
    truth = {f: expr[plan.held_out_rows(f)] for f in range(3)}
    preds = {f: truth[f] + 1.5 * rng.normal(size=truth[f].shape) for f in range(3)}
    better = {f: truth[f] + 0.2 * rng.normal(size=truth[f].shape) for f in range(3)}
    worse = {f: truth[f] + 6.0 * rng.normal(size=truth[f].shape) for f in range(3)}
    out = evaluation.fold_results(plan, preds, None, expr, obs, {"better": better, "worse": worse})
    for f, fold in enumerate(out):
        gap = fold["model_minus_control"]["better"]
        expected = (np.mean(metrics.pearson_per_gene(truth[f], preds[f]))
                    - np.mean(metrics.pearson_per_gene(truth[f], better[f])))
        assert np.isclose(gap["per_gene_pearson"], expected)
        assert gap["ci95"][1] < 0 < fold["model_minus_control"]["worse"]["ci95"][0]
        assert gap["ci_units"] == "6 grid blocks"  # one section of 6 x 10 spots: 2 x 3 blocks of 4 x 4 cells
    results = {"folds": out}
    readings = {(r[0], r[1]): r[5] for r in console.gap_rows(results)}
    assert readings[("A", "better")] == "model BELOW" and readings[("A", "worse")] == "model above"
    assert metrics.interval_reading(-0.01, 0.02) == "not resolved"
    assert metrics.interval_reading(0.0, 0.0) == "identical"
    assert metrics.interval_reading(float("nan"), float("nan")).startswith("no interval")
    text = "\n".join(report_md._fold_details(results))
    assert "## Model against each control" in text and "| A | better |" in text and "model BELOW" in text


def test_flat_genes_fail_a_trained_head_but_not_a_closed_form_control():
    """A spread under metrics.FLAT_SPREAD of the measured one is a collapse for a trained head (the model, the
    random-encoder control) and the fit for a closed-form control (a depth line with a near-zero slope)."""
    plan, expr, obs, _ = _plan_and_data(seed=5)
    preds = {f: expr[plan.held_out_rows(f)] + 0.1 for f in range(3)}
    nearly_flat = {}
    for f in range(3):
        p = preds[f].copy()
        p[:, 0] = p[:, 0].mean() + 1e-5 * (p[:, 0] - p[:, 0].mean())  # gene 0 of 6: 17% of the genes
        nearly_flat[f] = p
    out = evaluation.fold_results(plan, nearly_flat, None, expr, obs,
                                  {"random_encoder": nearly_flat, "depth_oracle": nearly_flat})
    for fold in out:
        assert fold["failed"] and fold["constant_gene_fraction"] == 1 / 6
        assert "spread under 0.1% of the measured spread" in fold["failure"]
        assert fold["controls"]["random_encoder"]["failed"]
        oracle = fold["controls"]["depth_oracle"]
        assert not oracle["failed"] and oracle["constant_gene_fraction"] == 0.0
    assert not any(f["failed"] for f in evaluation.fold_results(plan, preds, None, expr, obs))


def test_random_encoder_draws_summarise_every_draw_and_its_verdict():
    # Three draws of the random-encoder control in one fold, with intervals placing the model above the first,
    # below the second and neither against the third; a fold without all draws (the control off) is left out.
    def fold(name, rs, cis, failed=()):
        names = evaluation.random_encoder_control_names(len(rs))
        return {"held_out": name, "per_gene_pearson": 0.2,
                "controls": {n: {"per_gene_pearson": r, "failed": n in failed} for n, r in zip(names, rs)},
                "model_minus_control": {n: {"ci95": ci} for n, ci in zip(names, cis)}}

    out = evaluation.random_encoder_draws(
        [fold("B", [0.15, 0.25, 0.2], [[0.01, 0.08], [-0.09, -0.02], [-0.01, 0.02]]),
         {"held_out": "C", "per_gene_pearson": 0.1, "controls": {}, "model_minus_control": {}}], [7, 8, 9])
    assert out["seeds"] == [7, 8, 9] and out["controls"] == ["random_encoder", "random_encoder_2", "random_encoder_3"]
    b = out["folds"]["B"]
    assert list(out["folds"]) == ["B"]
    assert b["per_gene_pearson"] == [0.15, 0.25, 0.2] and np.isclose(b["mean"], 0.2)
    assert np.isclose(b["sd"], np.std([0.15, 0.25, 0.2], ddof=1))
    assert b["readings"] == ["model above", "model BELOW", "not resolved"]
    assert (b["n_model_above"], b["n_model_below"]) == (1, 1)
    one = evaluation.random_encoder_draws([fold("B", [0.15], [[0.01, 0.08]])], [7])["folds"]["B"]
    assert np.isnan(one["sd"]) and one["n_model_above"] == 1
    lines = console.random_draw_lines({"random_encoder_draws": out})
    assert lines[1] == ("  B: control per-gene r 0.1500, 0.2500, 0.2000 (mean 0.2000, SD 0.0500); model 0.2000: "
                        "above 1 of 3, BELOW 1 of 3, not resolved 1")
    # A collapsed draw is named where its r is, and the mean and SD over draws are then undefined: never a mean
    # over the surviving draws.
    bad = evaluation.random_encoder_draws([fold("B", [0.15, 0.25], [[0.01, 0.08], [-0.09, -0.02]],
                                                failed=("random_encoder_2",))], [7, 8])
    assert bad["folds"]["B"]["failed"] == [False, True]
    assert np.isnan(bad["folds"]["B"]["mean"]) and np.isnan(bad["folds"]["B"]["sd"])
    assert console.random_draw_lines({"random_encoder_draws": bad})[1].startswith(
        "  B: control per-gene r 0.1500, 0.2500 FAILED (mean nan, SD nan); ")
    # Every draw is a trained head: its collapse test counts flat genes, as for the first draw.
    assert all(evaluation.is_trained_control(n) for n in out["controls"])
    assert not evaluation.is_trained_control("linear_probe")


def test_neighbour_reference_scores_each_spot_against_its_neighbours_measurements():
    """A smooth field is shared by neighbours (r near 1), spot-level noise is not (r near 0); a spot without a
    neighbour is left out rather than scored against its own measurement; the depth-adjusted r removes a
    field that is only depth."""
    rng = np.random.default_rng(0)
    nx = ny = 12
    x, y = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    x, y = x.ravel(), y.ravel()
    n = len(x)
    smooth = np.sin(x / 3.0) + np.cos(y / 4.0)
    noise = rng.normal(size=n)
    log_depth = 7.0 + np.sin(y / 2.0) + 0.05 * rng.normal(size=n)  # sequencing depth varies smoothly too
    depth_only = 2.0 * log_depth + 0.01 * rng.normal(size=n)  # shared by neighbours only through depth
    truth = np.stack([smooth, noise, depth_only], 1)
    # One lone spot in its own section, with an extreme value that would dominate r if it were scored on itself.
    x, y = np.append(x, 0.0), np.append(y, 0.0)
    truth = np.vstack([truth, [50.0, 50.0, 50.0]])
    log_depth = np.append(log_depth, np.log(1000.0))
    sections = np.array(["s1"] * n + ["s2"])
    obs = {"pixel_x": x * 100, "pixel_y": y * 100, "section": sections}
    table = context.section_table(obs, np.arange(n + 1), context.DEFAULT_RADIUS)
    out = evaluation.neighbour_reference(truth, table, log_depth)
    assert out["n_spots_used"] == n and out["n_without_neighbours"] == 1
    # Independent computation: the mean of the (up to 8) spots within one grid step in x and y.
    around = np.empty((n, 3))
    for i in range(n):
        m = (np.abs(x[:n] - x[i]) <= 1) & (np.abs(y[:n] - y[i]) <= 1)
        m[i] = False
        around[i] = truth[:n][m].mean(0)
    r = [np.corrcoef(truth[:n, g], around[:, g])[0, 1] for g in range(3)]
    assert r[0] > 0.9 and abs(r[1]) < 0.2 and r[2] > 0.8
    assert np.isclose(out["per_gene_pearson"], np.mean(r), atol=1e-9)
    expected_adj = metrics.depth_adjusted_pearson_per_gene(truth[:n], around, log_depth[:n])
    assert np.isclose(out["depth_adjusted_per_gene_pearson"], np.nanmean(expected_adj), atol=1e-9)
    assert expected_adj[0] > 0.5 and abs(expected_adj[2]) < 0.3  # the depth-only gene's agreement is removed


def test_neighbour_reference_is_undefined_without_neighbours():
    obs = {"pixel_x": np.array([0.0, 100.0]), "pixel_y": np.array([0.0, 0.0]), "section": np.array(["a", "b"])}
    table = context.section_table(obs, np.arange(2), context.DEFAULT_RADIUS)
    out = evaluation.neighbour_reference(np.ones((2, 2)), table, None)
    assert out["n_spots_used"] == 0 and np.isnan(out["per_gene_pearson"])


def _depth_and_gene_signal(seed=0, side=24, g=12):
    """A side x side grid (one section) whose every gene follows a smooth depth field, and whose first 4 genes
    also carry a smooth gene-specific field of their own that depth does not explain."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    x, y = x.ravel(), y.ravel()
    n = side * side
    log_depth = 7.0 + np.sin(x / 4.0) + 0.1 * rng.normal(size=n)
    own = np.stack([np.sin(y / 3.0 + k) * np.cos(x / 5.0 - k) for k in range(4)], 1)
    truth = (np.outer(log_depth, rng.uniform(0.5, 1.5, g)) + 0.3 * rng.normal(size=(n, g)))
    truth[:, :4] += own
    obs_rows = {"section": np.array(["s"] * n), "array_x": x, "array_y": y}
    return truth, log_depth, own, obs_rows, rng


def test_depth_adjusted_spatial_significance_counts_only_gene_specific_signal():
    """A prediction that knows depth alone is significant for every gene by the plain spatial test and for
    none beyond depth; one that also knows the 4 genes' own fields is significant beyond depth for those 4 only."""
    truth, log_depth, own, obs_rows, rng = _depth_and_gene_signal()
    slopes = np.linalg.lstsq(np.column_stack([np.ones_like(log_depth), log_depth]), truth, rcond=None)[0]
    depth_only = np.column_stack([np.ones_like(log_depth), log_depth]) @ slopes + 0.01 * rng.normal(size=truth.shape)
    numbers, q = evaluation.model_extras(truth, depth_only, obs_rows, 0.05, 0, log_depth)
    assert numbers["n_genes_significant_spatial"] == truth.shape[1]
    assert numbers["n_genes_significant_depth_adjusted_spatial"] == 0
    knows_genes = depth_only.copy()
    knows_genes[:, :4] += own
    numbers, q = evaluation.model_extras(truth, knows_genes, obs_rows, 0.05, 0, log_depth)
    assert numbers["n_genes_significant_depth_adjusted_spatial"] == 4
    assert np.all(q["q_depth_adjusted_spatial"][:4] <= 0.05) and np.all(q["q_depth_adjusted_spatial"][4:] > 0.05)
    # Without library sizes there is no depth test, and it says so rather than counting 0.
    numbers, q = evaluation.model_extras(truth, knows_genes, obs_rows, 0.05, 0, None)
    assert numbers["n_genes_significant_depth_adjusted_spatial"] is None
    assert np.isnan(q["q_depth_adjusted_spatial"]).all()


def test_genes_beyond_depth_lists_the_passing_genes_with_their_references():
    truth, log_depth, own, obs_rows, rng = _depth_and_gene_signal(seed=1)
    n, g = truth.shape
    plan = folds.FoldPlan(["A", "B"], np.repeat([0, 1], [n, n]).astype(np.int32), [0, 1])
    expr = np.vstack([truth, truth + 0.1]).astype(np.float32)
    obs = {"section": np.array(["a"] * n + ["b"] * n), "patient": np.array(["A"] * n + ["B"] * n),
           "array_x": np.tile(obs_rows["array_x"], 2), "array_y": np.tile(obs_rows["array_y"], 2),
           "library_size": np.tile(np.exp(log_depth), 2)}
    ld = np.log(obs["library_size"])  # as evaluation reads it back from the store's library sizes
    base = np.outer(ld[:n], np.ones(g))
    good = base + 0.05 * rng.normal(size=base.shape)
    # Genes 0-3 predicted beyond depth, less well the more noise each carries: best first.
    good[:, :4] += own + rng.normal(size=(n, 4)) * np.array([0.1, 0.4, 0.8, 1.6])
    blind = base + 0.05 * rng.normal(size=base.shape)
    preds = {0: good, 1: blind}
    probe = {0: blind, 1: blind}
    out = evaluation.fold_results(plan, preds, None, expr, obs, {"linear_probe": probe})
    ceiling = np.linspace(0.1, 0.9, g)
    ceiling[2] = np.nan  # a gene without a ceiling (too few spots in a half) is neither above nor within it
    ceilings = {"A": {"depth_adjusted_ceiling_r_per_gene": ceiling}}
    beyond = evaluation.genes_beyond_depth([f"G{i}" for i in range(g)], out, ceilings, {}, fdr=0.05)
    a, b = beyond["A"], beyond["B"]
    assert b["n_significant"] == 0 and b["genes"] == [] and b["n_above_noise_ceiling"] is None
    # The same test on the control, which knows depth alone: nothing passes.
    assert a["controls_n_significant"] == b["controls_n_significant"] == {"linear_probe": 0}
    out_good_probe = evaluation.fold_results(plan, preds, None, expr, obs, {"linear_probe": {0: good, 1: good}})
    assert evaluation.genes_beyond_depth([f"G{i}" for i in range(g)], out_good_probe, {}, {})["A"][
        "controls_n_significant"] == {"linear_probe": 4}
    assert a["n_significant"] == 4 and [x["gene"] for x in a["genes"]] == ["G0", "G1", "G2", "G3"]
    for x in a["genes"]:
        i = int(x["gene"][1:])
        # Independent NumPy: residuals on a cubic in log depth by polyfit, then r.
        res = lambda v: v - np.polyval(np.polyfit(ld[:n], v, 3), ld[:n])  # noqa: E731
        expected = np.corrcoef(res(truth[:, i]), res(good[:, i]))[0, 1]
        assert np.isclose(x["depth_adjusted_r"], expected, atol=1e-6) and x["q"] <= 0.05
        assert np.isclose(x["controls_depth_adjusted_r"]["linear_probe"],
                          np.corrcoef(res(truth[:, i]), res(blind[:, i]))[0, 1], atol=1e-6)
        if i == 2:
            assert np.isnan(x["noise_ceiling_depth_adjusted_r"]) and x["above_noise_ceiling"] is None
        else:
            assert np.isclose(x["noise_ceiling_depth_adjusted_r"], np.linspace(0.1, 0.9, g)[i])
            assert x["above_noise_ceiling"] == (expected > ceiling[i])
        assert np.isnan(x["neighbour_reference_depth_adjusted_r"])
    # G0 and G1 (r 0.83 and 0.72 against ceilings 0.10 and 0.17) are above theirs, G3 (0.25 against 0.32) is not.
    assert [x["above_noise_ceiling"] for x in a["genes"]] == [True, True, None, False]
    assert a["n_above_noise_ceiling"] == 2
    # report.md marks the two, and says how many of the passing genes can be signal; the console counts them.
    from histospace_jax import report_md
    text = "\n".join(report_md._beyond_depth_section(beyond))
    assert text.count("(**r above it**)") == 2 and "2 of the 4 score above their noise ceiling" in text
    assert "at most 2 gene(s) here can be signal" in text and "Held out B: **no gene** passes" in text
    line = console.beyond_depth_line({"genes_beyond_depth": beyond})
    assert "A 4 (G0 0.83, G1 0.72, G2 0.36, ..., 2 of them above their noise ceiling); B 0" in line
    assert all(k not in evaluation.PER_GENE_ARRAYS for k in ("per_gene_pearson", "per_gene_pearson_ci95"))


def test_noise_ceilings_read_counts_at_the_stores_scale_and_skip_other_expression():
    """The split-half ceiling recovers the counts with the store's own counts-per scale (here per million): the
    same figures as the ceiling of the true counts; read at another scale they are impossible; expression that
    is not log1p counts gets none."""
    rng = np.random.default_rng(3)
    n, g = 80, 6
    lib = rng.integers(2000, 9000, n)
    counts = rng.poisson(lib[:, None] * rng.dirichlet(np.ones(g))[None] * 0.3)
    obs = {"library_size": lib}
    plan = folds.FoldPlan(["A", "B"], np.repeat([0, 1], n // 2).astype(np.int32), [0, 1])
    per_million = np.log1p(counts / lib[:, None] * 1e6)
    got = evaluation.noise_ceilings(plan, per_million, obs, 0, 1e6)
    assert set(got) == {"A", "B"}
    for f, name in enumerate(("A", "B")):
        rows = plan.held_out_rows(f)
        truth = controls.noise_ceiling(counts[rows], lib[rows], seed=0, scale=1e6)
        np.testing.assert_allclose(got[name]["split_half_r_per_gene"], truth["split_half_r_per_gene"])
    # Read per 10k, per-million values imply 100x the counts: more molecules than the spot's library.
    with pytest.raises(ValueError, match="library_size is smaller than the sum"):
        evaluation.noise_ceilings(plan, per_million, obs, 0, 1e4)
    assert evaluation.noise_ceilings(plan, np.log1p(counts), obs, 0, None) == {}


def test_depth_relation_flags_genes_whose_relation_to_depth_reverses_between_shallow_and_deep_patients():
    """Poisson counts of a stromal gene (share rising with the spot's stroma), a tumour gene (falling) and a flat
    one, on two deep training sections whose depth follows the tissue (stroma gives fewer transcripts per spot)
    and one shallow held-out section whose depth is mostly technical. Log-normalised, the stromal gene falls with
    depth in training but rises on the shallow section, where most counts are 0 or 1: reversed. The tumour gene
    rises on both. The r itself is checked against np.corrcoef of the section-centred values, the model's means
    by hand."""
    rng = np.random.default_rng(0)

    def section(n, median_depth, tissue, technical):
        stroma = rng.uniform(size=n)  # share of the spot's area that is stroma
        depth = median_depth * np.exp(-tissue * (stroma - 0.5) + technical * rng.normal(size=n))
        shares = np.stack([1e-3 * (0.3 + stroma), 1e-3 * (1.3 - stroma), np.full(n, 1e-3)], 1)
        counts = rng.poisson(depth[:, None] * shares)
        return np.log1p(1e4 * counts / depth[:, None]), np.log(depth)

    (h, hd), (t1, d1), (t2, d2) = section(400, 600, 0.3, 0.8), section(300, 9000, 2.0, 0.3), section(300, 14000, 2.0, 0.3)
    train, train_depth = np.vstack([t1, t2]), np.concatenate([d1, d2])
    train_sections = np.array(["t1"] * 300 + ["t2"] * 300)
    model_r = np.array([-0.2, 0.5, 0.1])
    out = evaluation.depth_relation(h, hd, np.array(["h"] * 400), train, train_depth, train_sections, model_r)
    assert out["held_out_depth_r_per_gene"][0] > 0.1 and out["training_depth_r_per_gene"][0] < -0.1
    assert out["held_out_depth_r_per_gene"][1] > 0.1 and out["training_depth_r_per_gene"][1] > 0.1
    assert out["n_genes_reversed"] == 1 and out["n_genes_compared"] == 3
    assert out["model_per_gene_pearson_reversed"] == pytest.approx(-0.2)
    assert out["model_per_gene_pearson_rest"] == pytest.approx(0.3)
    assert out["share_genes_rising_with_depth"]["held_out"] == pytest.approx(1.0)
    assert out["held_out_median_library_size"] == pytest.approx(np.median(np.exp(hd)))
    # Independent: centre each training section, then np.corrcoef per gene.
    centred = np.vstack([t1 - t1.mean(0), t2 - t2.mean(0)])
    cd = np.concatenate([d1 - d1.mean(), d2 - d2.mean()])
    expected = [np.corrcoef(centred[:, g], cd)[0, 1] for g in range(3)]
    np.testing.assert_allclose(out["training_depth_r_per_gene"], expected, rtol=1e-10)
    # Centring within sections matters: pooled, the deeper section's higher means would enter r.
    pooled = [np.corrcoef(train[:, g], train_depth)[0, 1] for g in range(3)]
    assert not np.allclose(pooled, expected, atol=0.02)


def test_depth_relation_per_training_patient_puts_the_one_in_the_held_out_regime_first():
    """Two deep training patients whose depth follows the tissue and one shallow one like the held-out section:
    per training patient, the genes' r with depth (np.corrcoef on section-centred values), the reversals counted
    from them by hand, and their agreement with the held-out patient's; the shallow patient comes first, and the
    report names the patients in that order."""
    from histospace_jax import report_md

    rng = np.random.default_rng(1)
    n_genes = 40
    shares_lo, shares_slope = 1e-3 * rng.uniform(0.3, 1.3, n_genes), 1e-3 * rng.uniform(-0.8, 0.8, n_genes)

    def section(n, median_depth, tissue, technical):
        stroma = rng.uniform(size=n)
        depth = median_depth * np.exp(-tissue * (stroma - 0.5) + technical * rng.normal(size=n))
        shares = np.clip(shares_lo[None] + shares_slope[None] * (stroma[:, None] - 0.5), 1e-5, None)
        counts = rng.poisson(depth[:, None] * shares)
        return np.log1p(1e4 * counts / depth[:, None]), np.log(depth)

    h, hd = section(300, 600, 0.3, 0.8)
    parts = {"deep1": section(200, 9000, 2.0, 0.3), "deep2": section(200, 12000, 2.0, 0.3),
             "shallow": section(200, 700, 0.3, 0.8)}
    train = np.vstack([x for x, _ in parts.values()])
    depth = np.concatenate([d for _, d in parts.values()])
    patients = np.repeat(list(parts), 200)
    out = evaluation.depth_relation(h, hd, np.array(["h"] * 300), train, depth, patients, np.zeros(n_genes),
                                    patients_train=patients)
    per = out["training_patients"]
    assert list(per)[0] == "shallow" and set(per) == set(parts)

    def r_depth(x, d):
        return np.array([np.corrcoef(x[:, g] - x[:, g].mean(), d - d.mean())[0, 1] for g in range(x.shape[1])])

    r_h = r_depth(h, hd)
    for p, (x, d) in parts.items():
        r_p = r_depth(x, d)
        rev = int(np.sum((np.abs(r_h) >= 0.1) & (np.abs(r_p) >= 0.1) & (np.sign(r_h) != np.sign(r_p))))
        assert per[p]["n_genes_reversed"] == rev
        assert per[p]["agreement_r"] == pytest.approx(np.corrcoef(r_h, r_p)[0, 1], abs=1e-9)
        assert per[p]["median_library_size"] == pytest.approx(np.median(np.exp(d)))
    assert per["shallow"]["agreement_r"] > max(per["deep1"]["agreement_r"], per["deep2"]["agreement_r"])
    line = report_md._training_patient_regime_lines({"H": out})[0]
    assert line.startswith("- Held out H, its training patients by how alike") and line.index("shallow") < min(
        line.index("deep1"), line.index("deep2"))
    # One training patient: nothing to rank.
    single = evaluation.depth_relation(h, hd, np.array(["h"] * 300), train[:200], depth[:200], patients[:200],
                                       np.zeros(n_genes), patients_train=patients[:200])
    assert report_md._training_patient_regime_lines({"H": single}) == []


def test_held_out_results_against_numpy():
    """One held-out set's results, as a leave-one-patient-out fold and the external test both take them: each
    control's per-gene r and depth-adjusted r (truth and prediction residualised on a cubic in log depth), and the
    model's gap to each control in mean per-gene r, against NumPy; the paired interval over the 4x4-spot blocks."""
    rng = np.random.default_rng(5)
    n, g = 64, 6
    ax, ay = np.arange(n) % 8, np.arange(n) // 8
    log_depth = rng.normal(7, 0.5, n)
    signal = rng.normal(size=(n, g))
    truth = signal + 0.5 * log_depth[:, None] + rng.normal(size=(n, g))
    pred = signal + rng.normal(size=(n, g))
    ctrl = {"weak": 0.3 * signal + rng.normal(size=(n, g)), "depth_line": 0.5 * log_depth[:, None] + rng.normal(
        scale=0.1, size=(n, g))}
    obs_rows = {"section": np.array(["s"] * n), "array_x": ax, "array_y": ay}
    out = evaluation.held_out_results(truth, pred, truth.mean(0), log_depth, obs_rows, None, ctrl, 0.05, 0)

    def r(a, b):
        return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(g)])

    def resid(v):
        return np.stack([v[:, j] - np.polyval(np.polyfit(log_depth, v[:, j], 3), log_depth) for j in range(g)], 1)

    for name, p in ctrl.items():
        np.testing.assert_allclose(out["per_gene_r_controls"][name], r(truth, p), atol=1e-10)
        np.testing.assert_allclose(out["per_gene_depth_adjusted_r_controls"][name], r(resid(truth), resid(p)),
                                   atol=1e-8)
        gap = out["model_minus_control"][name]
        assert gap["per_gene_pearson"] == pytest.approx(r(truth, pred).mean() - r(truth, p).mean(), abs=1e-10)
        assert gap["ci_units"] == "4 grid blocks"
    assert out["model_minus_control"]["weak"]["ci95"][0] > 0  # the model shares more of the signal
    assert out["controls"]["mean_predictor"]["per_spot_pearson"] == out["baseline"]["per_spot_pearson"]
    np.testing.assert_allclose(out["per_gene_depth_adjusted_r"], r(resid(truth), resid(pred)), atol=1e-8)


def test_depth_relations_is_empty_without_library_sizes():
    class Plan:
        folds = [0]

        def held_out_rows(self, f):
            return np.arange(2)

        def training_rows(self, f):
            return np.arange(2, 4)

        def name(self, f):
            return "A"

    obs = {"section": np.array(["a", "a", "b", "b"])}
    assert evaluation.depth_relations(Plan(), np.ones((4, 2)), obs, [{"held_out": "A", "per_gene_r": [0, 0]}]) == {}


def test_depth_relation_line_names_each_patients_regime_and_leaves_out_r_without_reversed_genes():
    block = {"held_out_median_library_size": 660.9, "training_median_library_size": 9576.5, "n_genes_reversed": 88,
             "model_per_gene_pearson_reversed": -0.0122, "model_per_gene_pearson_rest": 0.2901}
    none = {**block, "n_genes_reversed": 0, "model_per_gene_pearson_reversed": float("nan")}
    line = console.depth_relation_line({"B": block, "C": none})
    assert ("B 661 UMIs/spot against 9,576 in training, 88 genes reversed (model r -0.012 on them, 0.290 on the "
            "rest); C 661 UMIs/spot against 9,576 in training, 0 genes reversed.") in line
    assert console.depth_relation_line({}) == console.depth_relation_line(None) == ""


def test_depth_helpers_at_their_edges():
    """Three edge cases, each against a hand value: a gene constant within each of two sections (0.1 in 7 spots,
    0.7 in 13; the mean of 0.1 x 7 is not exactly 0.1) has no r with depth, not a random sign; with three
    distinct depths any function of depth is a quadratic in it, so the adjustment removes it entirely; and the
    split-half ceiling reads library sizes that are not whole numbers (rounded, as the counts were)."""
    rng = np.random.default_rng(21)
    sections = np.array(["A"] * 7 + ["B"] * 13)
    expr = np.column_stack([np.where(sections == "A", 0.1, 0.7), rng.normal(size=20)])
    r = evaluation.within_section_depth_r(expr, rng.normal(size=20), sections)
    assert np.isnan(r[0]) and np.isfinite(r[1])
    depth = np.repeat(np.log([500.0, 2000.0, 9000.0]), 10)
    of_depth = np.column_stack([np.exp(depth) ** 0.3, np.sin(3 * depth)])
    np.testing.assert_allclose(metrics.depth_residuals(of_depth, depth), 0.0, atol=1e-9)
    lib = np.array([10.6, 20.7, 30.9])
    truth = np.log1p(np.array([[5, 6], [10, 11], [15, 16]]) / lib[:, None] * 1e4)
    ceiling = evaluation.noise_ceiling_of(truth, lib, 0, 1e4)
    assert ceiling["n_spots_used"] == 3
