"""Held-out metrics of every fold with its controls, and the summary over folds. Pure functions of arrays.

Every predictor (the model and each control) gets the same metric block: per-gene r (mean, median, genes
without a defined r), depth-adjusted per-gene r, per-spot r, MSE, per-gene R² against the training mean
profile (mean and the share of genes with R² > 0), and genes significant at the FDR by the independent-spots
t-test. The model also gets what needs more than one number per gene: per-section r, significance by
permuting blocks of the spot grid (which respects spatial autocorrelation), a bootstrap interval of its
per-gene r over sections (or blocks), and whether it failed (collapsed).

A fold fails when its predictions are constant across spots for more than FAILED_CONSTANT_FRACTION of the genes,
or when no gene has a defined r. For trained heads (the model and TRAINED_CONTROLS) a gene whose predicted spread
is under metrics.FLAT_SPREAD of its measured spread also counts as constant: a collapsed head still varies by
rounding. The closed-form controls keep exact constancy: a depth line with a near-zero slope for a gene that does
not follow depth is their fit, not a collapse. The summary over folds is then undefined (NaN) for that predictor
and carries the failed folds: a mean over the surviving folds alone is never reported.
"""

from __future__ import annotations

import numpy as np

from histospace_jax import context, controls, metrics, stats

FAILED_CONSTANT_FRACTION = 0.05
TRAINED_CONTROLS = ("untrained_head", "random_encoder", "model_unsmoothed")
RANDOM_ENCODER = "random_encoder"
# fold_results' per-gene arrays, which go to per_gene.csv, not results.json.
PER_GENE_ARRAYS = ("per_gene_r", "per_gene_depth_adjusted_r", "per_gene_q_spatial", "per_gene_q_depth_adjusted_spatial",
                   "per_gene_r_controls", "per_gene_depth_adjusted_r_controls")
SUMMARY_KEYS = ("per_gene_pearson", "per_gene_pearson_median", "depth_adjusted_per_gene_pearson",
                "n_genes_significant", "per_spot_pearson", "mse", "r2_mean", "share_genes_r2_positive")


def random_encoder_control_names(n_draws: int) -> list[str]:
    """The random-encoder control's name for each of its draws: random_encoder, random_encoder_2, ..."""
    return [RANDOM_ENCODER] + [f"{RANDOM_ENCODER}_{k}" for k in range(2, n_draws + 1)]


def is_trained_control(name: str) -> bool:
    """Heads trained by gradient descent (their collapse test counts flat genes, see the module docstring)."""
    return name in TRAINED_CONTROLS or name.startswith(RANDOM_ENCODER + "_")


def random_encoder_draws(fold_metrics: list[dict], seeds: list[int]) -> dict:
    """Per fold, the random-encoder control over its independent draws (one untrained encoder per seed, each
    with its own heads): per-gene r of each draw, which draws failed (collapsed), their mean and SD (NaN when any
    draw failed: never a mean over the surviving draws), and how many paired intervals put the model above or
    below. One draw's verdict says nothing about another encoder's: "model BELOW" against one draw and "not
    resolved" against the next is a tie, not a loss."""
    names = random_encoder_control_names(len(seeds))
    out = {"seeds": [int(s) for s in seeds], "controls": names, "folds": {}}
    for f in fold_metrics:
        if not all(n in f["controls"] for n in names):
            continue
        r = [float(f["controls"][n]["per_gene_pearson"]) for n in names]
        failed = [bool(f["controls"][n].get("failed")) for n in names]
        readings = [metrics.interval_reading(*f["model_minus_control"][n]["ci95"]) for n in names]
        out["folds"][f["held_out"]] = {
            "per_gene_pearson": r, "failed": failed, "mean": _mean_over_folds(r, failed),
            "sd": float(np.std(r, ddof=1)) if len(r) > 1 and not any(failed) else float("nan"),
            "model_per_gene_pearson": float(f["per_gene_pearson"]),
            "readings": readings,
            "n_model_above": readings.count("model above"), "n_model_below": readings.count("model BELOW")}
    return out


def log_library_size(obs: dict) -> np.ndarray | None:
    """Each spot's log library size (floored at 1 UMI), or None for a store that does not keep it."""
    if "library_size" not in obs:
        return None
    return np.log(np.maximum(np.asarray(obs["library_size"], np.float64), 1.0))


def sampling_scale(manifest: dict) -> float | None:
    """The counts-per-`scale` of a store whose expression is log1p (natural log) of library-size-normalised counts
    (as `prepare` writes by default), or None for any other expression (the synthetic demo, another log base): the
    sampling controls need the counts the expression came from."""
    e = manifest.get("expression", {}) if isinstance(manifest, dict) else {}
    if e.get("normalisation") != "library_size" or e.get("log") != "log1p" or e.get("log_base", "e") != "e":
        return None
    return float(e.get("scale", 1e4))


def depth_adjusted_r(truth: np.ndarray, pred: np.ndarray, log_depth: np.ndarray | None) -> np.ndarray:
    """metrics.depth_adjusted_pearson_per_gene, [G]; all NaN for a store that keeps no library sizes."""
    if log_depth is None:
        return np.full(np.shape(truth)[1], np.nan)
    return metrics.depth_adjusted_pearson_per_gene(truth, pred, log_depth)


def predictor_metrics(truth: np.ndarray, pred: np.ndarray, reference: np.ndarray, log_depth: np.ndarray | None,
                      fdr: float, trained: bool = True) -> dict:
    """The metric block of one predictor on one held-out set. `reference` is the training mean profile [G].
    `trained`: a trained head, whose flat genes (spread under metrics.FLAT_SPREAD of the measured) count as
    constant; otherwise only exactly constant genes do."""
    out = metrics.full_regression_metrics(truth, pred, fdr)
    out["depth_adjusted_per_gene_pearson"] = metrics.nanmean_or_nan(depth_adjusted_r(truth, pred, log_depth))
    r2 = metrics.r2_per_gene(truth, pred, reference)
    out["r2_mean"] = metrics.nanmean_or_nan(r2)
    out["share_genes_r2_positive"] = metrics.share_positive(r2)
    constant = metrics.constant_gene_fraction(pred, y_true=truth if trained else None)
    out["constant_gene_fraction"] = constant
    reasons = []
    if constant > FAILED_CONSTANT_FRACTION:
        flat = (f" (a spread under {metrics.FLAT_SPREAD:.1%} of the measured spread counts as constant)"
                if trained else "")
        reasons.append(f"predictions constant across spots for {constant:.0%} of genes{flat}")
    if out["n_genes_undefined_r"] >= truth.shape[1]:
        reasons.append("no gene has a defined per-gene r")
    out["failed"] = bool(reasons)
    if reasons:
        out["failure"] = "; ".join(reasons)
    return out


def mean_profile_metrics(truth: np.ndarray, reference: np.ndarray, log_depth: np.ndarray | None,
                         fdr: float) -> dict:
    """The metric block of the image-blind baseline, the training mean profile `reference` [G] at every spot.
    Constant by design: it is the reference every other predictor is read against, never a failed predictor
    (and its R² against itself is exactly 0)."""
    out = predictor_metrics(truth, np.broadcast_to(reference, truth.shape).copy(), reference, log_depth, fdr,
                            trained=False)
    out["failed"] = False
    out.pop("failure", None)
    return out


def inner_validation_score(expression: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
                           pred: np.ndarray) -> dict:
    """How a fold's heads do on its inner-validation spots (training patients only), in units every recipe
    shares: MSE per gene in standard deviations of the fold's training rows (so 1.0 is about what the
    training mean scores), the training mean's own MSE there, and the mean per-gene r. Settings are compared on
    this, never on the held-out patient. The heads' epochs were chosen on these spots, so the score is a little
    optimistic for every setting alike."""
    mean, sd = metrics.gene_mean_and_sd(expression[train_rows])
    truth = np.asarray(expression[val_rows], np.float64)
    return {"n_spots": int(len(val_rows)),
            "mse_sd_units": float(np.mean(((truth - np.asarray(pred, np.float64)) / sd) ** 2)),
            "mean_profile_mse_sd_units": float(np.mean(((truth - mean) / sd) ** 2)),
            "per_gene_pearson": metrics.nanmean_or_nan(metrics.pearson_per_gene(truth, pred))}


# Sections are the most independent units to resample, but a percentile bootstrap over a handful of them is no
# 95% interval: over 3 sections it excludes 0 about whenever the three agree in sign, which a gap of zero does a
# quarter of the time. Below this many sections the units are the grid blocks of all of them (dozens), whose
# resamples also vary how much of each section is drawn.
MIN_SECTION_UNITS = 10


def bootstrap_units(obs_rows: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(units, 4x4-spot grid blocks, what the units are) of held-out spots: the sections when there are at least
    MIN_SECTION_UNITS, else the grid blocks of every section."""
    sections = np.asarray(obs_rows["section"])
    blocks = controls.grid_blocks(obs_rows["array_x"], obs_rows["array_y"], sections)
    if len(np.unique(sections)) >= MIN_SECTION_UNITS:
        return sections, blocks, "sections"
    return blocks, blocks, "grid blocks"


def model_extras(truth: np.ndarray, pred: np.ndarray, obs_rows: dict, fdr: float, seed: int,
                 log_depth: np.ndarray | None = None) -> tuple[dict, dict]:
    """Per-section r, spatial block-permutation significance (of per-gene r and, with `log_depth`, of
    depth-adjusted r) and the bootstrap interval of per-gene r. Returns (the fold's numbers, per-gene arrays
    {"q_spatial", "q_depth_adjusted_spatial"}: Benjamini-Hochberg q-values of the two permutation tests)."""
    units, blocks, unit_kind = bootstrap_units(obs_rows)
    # The normal reading of the permutation null: Monte-Carlo p-values of 200 permutations floor at 1/201, too
    # coarse for Benjamini-Hochberg to pass the few genes that carry signal among 1,000+ (controls docstring).
    # Blocks move within their own section: sections differ in their per-gene mean (batch, stain), and a null
    # that carried blocks across sections would count those offsets' chance agreement as signal.
    sections = np.asarray(obs_rows["section"])
    p = controls.block_permutation_pvalues(truth, pred, blocks, n_perm=200, seed=seed, null="normal",
                                           strata=sections)
    q = stats.benjamini_hochberg(p)
    q_adj = depth_adjusted_spatial_q(truth, pred, blocks, log_depth, seed, sections)
    ci = controls.bootstrap_mean_gene_r(truth, pred, units, n_boot=200, seed=seed)
    numbers = {"per_section_pearson": metrics.per_section_pearson(truth, pred, sections),
               "n_genes_significant_spatial": _n_below(q, fdr),
               "n_genes_significant_depth_adjusted_spatial": _n_below(q_adj, fdr) if log_depth is not None else None,
               "spatial_test": "one-sided block permutation (4x4-spot blocks of the grid, moved within their section; "
                               "200 permutations; p from "
                               "a normal with each gene's permutation mean and SD), Benjamini-Hochberg; "
                               "depth-adjusted: the same on the residuals of truth and prediction on a cubic in "
                               "log library size",
               "per_gene_pearson_ci95": [ci["low"], ci["high"]],
               "ci_units": f"{ci['n_units']} {unit_kind}"}
    return numbers, {"q_spatial": q, "q_depth_adjusted_spatial": q_adj}


def depth_adjusted_spatial_q(truth: np.ndarray, pred: np.ndarray, blocks: np.ndarray,
                             log_depth: np.ndarray | None, seed: int, sections: np.ndarray) -> np.ndarray:
    """Per gene, the Benjamini-Hochberg q-value of its depth-adjusted r: the block permutation test on the
    residuals of truth and prediction on a cubic in log depth (which genes a predictor knows beyond sequencing depth, with
    spatial autocorrelation respected; blocks move within their `sections`, as the model's test's do); NaN without
    depth."""
    if log_depth is None:
        return np.full(truth.shape[1], np.nan)
    p = controls.block_permutation_pvalues(metrics.depth_residuals(truth, log_depth),
                                           metrics.depth_residuals(pred, log_depth), blocks, n_perm=200, seed=seed,
                                           null="normal", strata=sections)
    return stats.benjamini_hochberg(p)


def _n_below(q: np.ndarray, fdr: float) -> int:
    return int(np.sum(np.isfinite(q) & (q <= fdr)))


def model_minus_controls(truth: np.ndarray, pred: np.ndarray, others: dict, obs_rows: dict, seed: int) -> dict:
    """Per control of `others` {name: predictions}: the model's mean per-gene r minus the control's, with its
    paired 95% bootstrap interval over the same units as the model's own interval: whether "the model beats this
    control" holds beyond the variation between sections (or blocks)."""
    units, _, unit_kind = bootstrap_units(obs_rows)
    gaps = controls.bootstrap_gene_r_differences(truth, pred, others, units, n_boot=200, seed=seed)
    return {name: {"per_gene_pearson": d["difference"], "ci95": [d["low"], d["high"]],
                   "ci_units": f"{d['n_units']} {unit_kind}"} for name, d in gaps.items()}


def fold_results(plan, preds: dict, untrained: dict | None, expression: np.ndarray, obs: dict,
                 extra_controls: dict | None = None, fdr: float = 0.05, seed: int = 0) -> list[dict]:
    """Per fold of `plan`: the model's metric block and extras, and every control's block (mean-profile
    predictor, untrained head, and each of `extra_controls` {name: {fold: predictions}})."""
    log_depth = log_library_size(obs)
    out = []
    for f in range(len(plan.folds)):
        rows, train_rows = plan.held_out_rows(f), plan.training_rows(f)
        result = held_out_results(
            expression[rows], preds[f], expression[train_rows].astype(np.float64).mean(0),
            None if log_depth is None else log_depth[rows],
            {k: np.asarray(obs[k])[rows] for k in ("section", "array_x", "array_y")},
            None if untrained is None else untrained[f], {k: c[f] for k, c in (extra_controls or {}).items()},
            fdr, seed)
        out.append({"held_out": plan.name(f), "n_spots": int(len(rows)), **result})
    return out


def held_out_results(truth: np.ndarray, pred: np.ndarray, reference: np.ndarray, log_depth: np.ndarray | None,
                     obs_rows: dict, untrained: np.ndarray | None = None, extra_controls: dict | None = None,
                     fdr: float = 0.05, seed: int = 0) -> dict:
    """One held-out set's results (a leave-one-patient-out fold, an external test set): the model's metric block
    and extras, the model minus each control with its paired interval, every control's block (mean-profile
    predictor from `reference`, the training mean [G]; the untrained head; each of `extra_controls` {name:
    predictions}) and the per-gene arrays (PER_GENE_ARRAYS). `obs_rows`: the held-out spots' section, array_x and
    array_y; `log_depth`: their log library sizes, or None."""
    extra_controls = extra_controls or {}
    block = lambda p, trained=True: predictor_metrics(truth, p, reference, log_depth, fdr, trained)  # noqa: E731
    model = block(pred)
    numbers, gene_q = model_extras(truth, pred, obs_rows, fdr, seed, log_depth)
    obs_blocks, sections = bootstrap_units(obs_rows)[1], np.asarray(obs_rows["section"])
    model.update(numbers)
    baseline = mean_profile_metrics(truth, reference, log_depth, fdr)
    controls_ = {"mean_predictor": baseline}
    if untrained is not None:
        controls_["untrained_head"] = block(untrained)
    control_r, control_adj = {}, {}
    for name, ctrl in extra_controls.items():
        controls_[name] = block(ctrl, is_trained_control(name))
        control_r[name] = metrics.pearson_per_gene(truth, ctrl)
        control_adj[name] = depth_adjusted_r(truth, ctrl, log_depth)
        if log_depth is not None:
            # The same test as the model's, so "the model knows N genes beyond depth" has its controls' N beside it.
            controls_[name]["n_genes_significant_depth_adjusted_spatial"] = _n_below(
                depth_adjusted_spatial_q(truth, ctrl, obs_blocks, log_depth, seed, sections), fdr)
    gaps = model_minus_controls(truth, pred, extra_controls, obs_rows, seed)
    return {**model, "model_minus_control": gaps,
            "baseline": {"per_spot_pearson": baseline["per_spot_pearson"], "mse": baseline["mse"]},
            "controls": controls_,
            "per_gene_r": metrics.pearson_per_gene(truth, pred),
            "per_gene_depth_adjusted_r": depth_adjusted_r(truth, pred, log_depth),
            "per_gene_q_spatial": gene_q["q_spatial"],
            "per_gene_q_depth_adjusted_spatial": gene_q["q_depth_adjusted_spatial"],
            "per_gene_r_controls": control_r,
            "per_gene_depth_adjusted_r_controls": control_adj}


def _mean_over_folds(values: list[float], failed: list[bool]) -> float:
    """The plain mean: NaN when any fold failed or has no value (never a mean over the survivors)."""
    v = np.asarray(values, np.float64)
    if any(failed) or not np.isfinite(v).all():
        return float("nan")
    return float(v.mean())


def summarise(folds: list[dict]) -> dict:
    """Means over folds (each held-out patient weighs the same), with the failed folds named first."""
    failed = [f["held_out"] for f in folds if f.get("failed")]
    summary = {"n_folds": len(folds), "n_folds_failed": len(failed), "failed_folds": failed}
    flags = [bool(f.get("failed")) for f in folds]
    for k in SUMMARY_KEYS:
        summary[k] = _mean_over_folds([f.get(k, float("nan")) for f in folds], flags)
    summary["baseline_per_spot_pearson"] = _mean_over_folds([f["baseline"]["per_spot_pearson"] for f in folds],
                                                            [False] * len(folds))
    summary["baseline_mse"] = _mean_over_folds([f["baseline"]["mse"] for f in folds], [False] * len(folds))
    summary["controls"] = {}
    for name in folds[0]["controls"]:
        blocks = [f["controls"][name] for f in folds]
        cflags = [bool(b.get("failed")) for b in blocks]
        summary["controls"][name] = {
            "n_folds_failed": int(sum(cflags)),
            **{k: _mean_over_folds([b.get(k, float("nan")) for b in blocks], cflags) for k in SUMMARY_KEYS}}
    return summary


def top_genes(genes, r, best: bool, k: int = 10) -> list:
    """The k genes with the highest (or lowest) defined r, as [gene, r] pairs."""
    r = np.asarray(r, np.float64)
    ok = np.flatnonzero(np.isfinite(r))
    order = ok[np.argsort(-r[ok] if best else r[ok], kind="stable")][:k]
    return [[genes[i], float(r[i])] for i in order]


def alpha_groups(obs: dict, rows: np.ndarray) -> np.ndarray:
    """Groups of training rows for choosing a control's ridge penalty by leave-one-group-out: sections when
    there are at least 3, else blocks of the spot grid (neighbouring spots are too alike to validate on)."""
    sections = np.asarray(obs["section"])[rows]
    if len(np.unique(sections)) >= 3:
        return np.unique(sections, return_inverse=True)[1]
    return controls.grid_blocks(np.asarray(obs["array_x"])[rows], np.asarray(obs["array_y"])[rows], sections)


def reviewer_controls(plan, expression: np.ndarray, obs: dict, colour_features: np.ndarray,
                      feature_maps: list[np.ndarray], encoder_of_fold: list[int], sampling: float | None = None
                      ) -> tuple[dict, dict, dict]:
    """The controls a sceptical reviewer asks for, per fold, fitted on the training patients only:
    trivial_image (ridge on colour and H/E/D statistics of each tile), linear_probe (ridge on the top principal
    components of the same frozen features the heads see, pooled) and, when the store keeps each spot's
    library size, depth_oracle (per gene, a line in log library size) and image_depth (the same lines at the
    log library size the linear probe's ridge reads from the features); with `sampling` (the store's
    counts-per scale, `sampling_scale`) also depth_oracle_sampling and image_depth_sampling: the same two depths
    through the counting model (controls.sampling_depth_oracle) instead of the lines. Penalties are chosen by
    leave-one-group-out on the training rows. Returns ({control: {fold: predictions}}, {control: {fold name:
    alpha}}, {fold name: r between the log library size the image_depth ridge reads from the held-out tiles and
    the measured one} (empty without library sizes; a diagnostic, nothing is chosen on it))."""
    preds = {"trivial_image": {}, "linear_probe": {}}
    alphas = {"trivial_image": {}, "linear_probe": {}}
    depth_read = {}
    log_depth = log_library_size(obs)
    has_depth = log_depth is not None
    with_sampling = has_depth and sampling is not None
    if has_depth:
        preds["depth_oracle"], preds["image_depth"], alphas["image_depth"] = {}, {}, {}
    if with_sampling:
        preds["depth_oracle_sampling"], preds["image_depth_sampling"] = {}, {}
        library = np.asarray(obs["library_size"], np.float64)
    for f in range(len(plan.folds)):
        tr, te = plan.training_rows(f), plan.held_out_rows(f)
        y = expression[tr].astype(np.float64)
        groups = alpha_groups(obs, tr)
        a, _ = controls.choose_ridge_alpha(colour_features[tr], y, groups)
        preds["trivial_image"][f] = controls.ridge_predict(controls.ridge_fit(colour_features[tr], y, a),
                                                           colour_features[te])
        alphas["trivial_image"][plan.name(f)] = float(a)
        maps = feature_maps[encoder_of_fold[f]]
        # One PCA per fold serves the linear probe and image_depth.
        z_train, z_test = controls.probe_scores(maps[tr], maps[te])
        preds["linear_probe"][f], a = controls.ridge_on_scores(z_train, z_test, y, groups)
        alphas["linear_probe"][plan.name(f)] = float(a)
        if has_depth:
            preds["depth_oracle"][f] = controls.depth_oracle(log_depth[tr], y, log_depth[te])
            depth_from_image, a = controls.image_log_depth(z_train, z_test, log_depth[tr], groups)
            preds["image_depth"][f] = controls.depth_oracle(log_depth[tr], y, depth_from_image)
            alphas["image_depth"][plan.name(f)] = float(a)
            depth_read[plan.name(f)] = (float(np.corrcoef(depth_from_image, log_depth[te])[0, 1])
                                        if len(te) > 2 and np.ptp(log_depth[te]) > 0 else None)
            if with_sampling:
                shares = controls.library_shares(y, library[tr], sampling)
                preds["depth_oracle_sampling"][f] = controls.sampling_expectation(log_depth[te], shares, sampling)
                preds["image_depth_sampling"][f] = controls.sampling_expectation(depth_from_image, shares, sampling)
    return preds, alphas, depth_read


def noise_ceilings(plan, expression: np.ndarray, obs: dict, seed: int = 0, scale: float | None = 1e4) -> dict:
    """Per held-out patient: how well one half of its counts predicts the other (controls.noise_ceiling), from
    the counts the stored expression (log1p of counts per `scale`, `sampling_scale` of the store's manifest) and
    library sizes imply, per-gene arrays included (results.json keeps `without_per_gene` of each). Empty without
    library sizes, or when `scale` is None: expression that is not log1p counts per scale gives no counts to
    split."""
    if "library_size" not in obs or scale is None:
        return {}
    lib = np.asarray(obs["library_size"], np.float64)
    out = {}
    for f in range(len(plan.folds)):
        rows = plan.held_out_rows(f)
        out[plan.name(f)] = noise_ceiling_of(expression[rows], lib[rows], seed, scale)
    return out


def noise_ceiling_of(truth: np.ndarray, library_size, seed: int, scale: float) -> dict:
    """controls.noise_ceiling of some spots ([N, G] log1p counts per `scale`, their [N] library sizes), from the
    counts the expression and library sizes imply."""
    lib = np.asarray(library_size, np.float64)
    counts = controls.counts_from_expression(truth, lib, scale)
    return controls.noise_ceiling(counts, lib, seed=seed, scale=scale)  # it rounds the library sizes itself


def without_per_gene(block: dict) -> dict:
    """A reference's block without its per-gene arrays (the keys ending "per_gene"), as results.json keeps it."""
    return {k: v for k, v in block.items() if not k.endswith("per_gene")}


def neighbour_reference(truth: np.ndarray, table: np.ndarray, log_depth: np.ndarray | None) -> dict:
    """How much of a held-out patient's expression its neighbouring spots share: each spot "predicted" by the
    mean measured expression of its adjacent spots (`table`, [N, K] row indices into `truth`, -1 padded, as
    context.section_table gives), scored like a prediction over the spots that have a neighbour. It reads the
    held-out measurements, so it is a reference, not a control. The default 300 um tile covers much of its neighbours'
    tissue, so where the neighbours' own counts say little about a spot's gene-specific expression (low
    depth-adjusted r), an image model is unlikely to say much more.
    Returns {"per_gene_pearson", "depth_adjusted_per_gene_pearson" (means over genes), "r_per_gene",
    "depth_adjusted_r_per_gene" ([G]), "n_spots_used", "n_without_neighbours"}."""
    truth = np.asarray(truth, np.float64)
    has = (np.asarray(table) >= 0).any(axis=1)
    out = {"n_spots_used": int(has.sum()), "n_without_neighbours": int((~has).sum())}
    if has.sum() < 3:
        r = adj = np.full(truth.shape[1], np.nan)
    else:
        pred = context.neighbour_mean(truth, table)[has]
        r = metrics.pearson_per_gene(truth[has], pred)
        adj = depth_adjusted_r(truth[has], pred, None if log_depth is None else log_depth[has])
    return {**out, "per_gene_pearson": metrics.nanmean_or_nan(r),
            "depth_adjusted_per_gene_pearson": metrics.nanmean_or_nan(adj), "r_per_gene": r,
            "depth_adjusted_r_per_gene": adj}


def neighbour_references(plan, expression: np.ndarray, obs: dict) -> dict:
    """neighbour_reference_of every held-out patient (per-gene arrays included)."""
    log_depth = log_library_size(obs)
    out = {}
    for f in range(len(plan.folds)):
        rows = plan.held_out_rows(f)
        out[plan.name(f)] = neighbour_reference_of(np.asarray(expression)[rows], obs, rows,
                                                   None if log_depth is None else log_depth[rows])
    return out


def neighbour_reference_of(truth: np.ndarray, obs: dict, rows: np.ndarray, log_depth: np.ndarray | None) -> dict:
    """neighbour_reference of store rows `rows` (their expression `truth` and log depths), neighbours within
    context.DEFAULT_RADIUS spot spacings in the same section (the adjacent ring), plus that radius."""
    table = context.section_table(obs, rows, context.DEFAULT_RADIUS)
    return {**neighbour_reference(truth, table, log_depth), "radius_spacings": context.DEFAULT_RADIUS}


# |r| with log library size below this is no relation to depth to speak of, reversed or not.
DEPTH_RELATION_MIN_R = 0.1


def within_section_depth_r(expression: np.ndarray, log_depth: np.ndarray, sections) -> np.ndarray:
    """[N, G], [N], [N] -> [G]: each gene's r with the spots' log library size, both centred within each section
    first (sections differ in depth for technical reasons, and so does a gene's mean), NaN for a gene constant
    within every section."""
    original = np.asarray(expression, np.float64)
    x = original.copy()
    d = np.array(log_depth, np.float64).reshape(-1)
    sections = np.asarray(sections).astype(str)
    for s in np.unique(sections):
        m = sections == s
        x[m] -= x[m].mean(axis=0)
        d[m] -= d[m].mean()
    # A gene constant within every section centres to round-off (the mean of equal floats is not always exact).
    r = metrics.pearson_per_gene(x, np.broadcast_to(d[:, None], x.shape))
    return np.where(metrics.round_off_columns(x, original), np.nan, r)


def depth_relation(truth_held: np.ndarray, log_depth_held, sections_held, truth_train: np.ndarray,
                   log_depth_train, sections_train, model_r: np.ndarray, patients_train=None) -> dict:
    """How each gene follows sequencing depth in the held-out patient and in the training patients
    (within_section_depth_r), and the model's per-gene r on the genes whose relation reverses between them (|r| >=
    DEPTH_RELATION_MIN_R on both sides, opposite signs) against the rest. Log-normalised expression is a curved
    function of depth: on a shallow section most counts are 0 or 1, so nearly every gene rises with depth, while
    on a deep one a gene of tissue the counts avoid (stroma on a tumour-rich array) falls with it. Heads learn
    the training patients' relation; where it reverses they predict the gene backwards. It reads the held-out
    counts: a reference, not a predictor. With `patients_train` ([N_train] patient of each training row), also
    `training_patients`: the same per training patient, closest regime first (training_patient_depth_relations)."""
    r_held = within_section_depth_r(truth_held, log_depth_held, sections_held)
    r_train = within_section_depth_r(truth_train, log_depth_train, sections_train)
    both, reverses = _reversed(r_held, r_train)
    model_r = np.asarray(model_r, np.float64)
    per_patient = ({} if patients_train is None else {"training_patients": training_patient_depth_relations(
        r_held, truth_train, log_depth_train, sections_train, patients_train)})
    return {"held_out_median_library_size": float(np.median(np.exp(log_depth_held))),
            "training_median_library_size": float(np.median(np.exp(log_depth_train))),
            "share_genes_rising_with_depth": {"held_out": metrics.nanmean_or_nan(np.where(np.isfinite(r_held),
                                                                                          r_held > 0, np.nan)),
                                              "training": metrics.nanmean_or_nan(np.where(np.isfinite(r_train),
                                                                                          r_train > 0, np.nan))},
            "n_genes_reversed": int(reverses.sum()), "n_genes_compared": int(both.sum()),
            "min_abs_r": DEPTH_RELATION_MIN_R,
            "model_per_gene_pearson_reversed": metrics.nanmean_or_nan(model_r[reverses]),
            "model_per_gene_pearson_rest": metrics.nanmean_or_nan(model_r[both & ~reverses]), **per_patient,
            "held_out_depth_r_per_gene": r_held, "training_depth_r_per_gene": r_train}


def _reversed(r_held: np.ndarray, r_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genes with both r defined, genes whose relation to depth reverses: |r| >= DEPTH_RELATION_MIN_R on both
    sides, opposite signs)."""
    both = np.isfinite(r_held) & np.isfinite(r_train)
    return both, (both & (np.abs(r_held) >= DEPTH_RELATION_MIN_R) & (np.abs(r_train) >= DEPTH_RELATION_MIN_R)
                  & (np.sign(r_held) != np.sign(r_train)))


def training_patient_depth_relations(r_held: np.ndarray, truth_train: np.ndarray, log_depth_train, sections_train,
                                     patients_train) -> dict:
    """Per training patient: its median library size, share of genes rising with depth, the genes whose relation
    reverses against the held-out patient's (`r_held`, within_section_depth_r) and `agreement_r`, the r over genes
    between the held-out patient's and this patient's per-gene r with depth: which training patients count in the
    held-out patient's regime (1 alike, negative opposite). Closest first. A pooled relation over many training
    patients can hide that a few share the held-out patient's regime and the rest do not."""
    patients_train = np.asarray(patients_train).astype(str)
    d = np.asarray(log_depth_train, np.float64).reshape(-1)
    sections_train = np.asarray(sections_train)
    out = {}
    for p in np.unique(patients_train):
        m = patients_train == p
        r_p = within_section_depth_r(np.asarray(truth_train)[m], d[m], sections_train[m])
        both, reverses = _reversed(r_held, r_p)
        agree = (float(np.corrcoef(r_held[both], r_p[both])[0, 1])
                 if both.sum() > 2 and np.ptp(r_held[both]) > 0 and np.ptp(r_p[both]) > 0 else float("nan"))
        out[str(p)] = {"median_library_size": float(np.median(np.exp(d[m]))),
                       "share_genes_rising_with_depth": metrics.nanmean_or_nan(np.where(np.isfinite(r_p), r_p > 0,
                                                                                        np.nan)),
                       "n_genes_reversed": int(reverses.sum()), "agreement_r": agree}
    return dict(sorted(out.items(), key=lambda kv: -np.nan_to_num(kv[1]["agreement_r"], nan=-2.0)))


def depth_relations(plan, expression: np.ndarray, obs: dict, fold_metrics: list[dict]) -> dict:
    """depth_relation of every held-out patient against its fold's training patients (per-gene arrays included);
    empty for a store that keeps no library sizes."""
    log_depth = log_library_size(obs)
    if log_depth is None:
        return {}
    sections = np.asarray(obs["section"]).astype(str)
    out = {}
    for f, fm in enumerate(fold_metrics):
        held, train = plan.held_out_rows(f), plan.training_rows(f)
        out[fm["held_out"]] = depth_relation(expression[held], log_depth[held], sections[held], expression[train],
                                             log_depth[train], sections[train], fm["per_gene_r"],
                                             np.asarray(obs["patient"])[train] if "patient" in obs else None)
    return out


def genes_beyond_depth(genes, fold_metrics: list[dict], ceilings: dict, neighbours: dict, fdr: float = 0.05,
                       k: int = 10) -> dict:
    """Per held-out patient, the genes the model predicts beyond sequencing depth: those whose depth-adjusted r
    passes the spatial block-permutation test at `fdr`, best first, at most `k`, each with its depth-adjusted r,
    q-value, the controls' depth-adjusted r, the depth-adjusted noise ceiling and neighbour reference. With
    1,000+ genes the best depth-adjusted r of a model that knows nothing is ~0.2 on 300 spots, so a
    top list without the test would name genes by chance; where none passes, the list is empty and says so.

    A passing gene whose r exceeds its depth-adjusted noise ceiling agrees with the measurement more than the
    held-out counts agree with themselves (a binomial split of them), which no real predictor can do in
    expectation: `above_noise_ceiling` marks it and `n_above_noise_ceiling` counts such genes among all passing
    ones, so a reader does not take them for signal (None where the patient has no ceiling)."""
    out = {}
    for f in fold_metrics:
        name = f["held_out"]
        adj = np.asarray(f["per_gene_depth_adjusted_r"], np.float64)
        q = np.asarray(f["per_gene_q_depth_adjusted_spatial"], np.float64)
        passing = np.flatnonzero(np.isfinite(q) & (q <= fdr) & np.isfinite(adj))
        order = passing[np.argsort(-adj[passing], kind="stable")][:k]
        nc, nb = ceilings.get(name, {}), neighbours.get(name, {})
        ceiling = nc.get("depth_adjusted_ceiling_r_per_gene")
        above = None
        if ceiling is not None:  # a gene without a ceiling (NaN) is never above it
            ceiling = np.asarray(ceiling, np.float64)
            above = adj > np.where(np.isfinite(ceiling), ceiling, np.inf)
        out[name] = {
            "n_significant": int(len(passing)), "fdr": fdr,
            "n_above_noise_ceiling": None if above is None else int(above[passing].sum()),
            "controls_n_significant": {c: b["n_genes_significant_depth_adjusted_spatial"]
                                       for c, b in f["controls"].items()
                                       if b.get("n_genes_significant_depth_adjusted_spatial") is not None},
            "genes": [{"gene": genes[i], "depth_adjusted_r": float(adj[i]), "q": float(q[i]),
                       "controls_depth_adjusted_r": {c: _value_at(v, i) for c, v in
                                                     f["per_gene_depth_adjusted_r_controls"].items()},
                       "noise_ceiling_depth_adjusted_r": _value_at(ceiling, i),
                       "neighbour_reference_depth_adjusted_r": _value_at(nb.get("depth_adjusted_r_per_gene"), i),
                       "above_noise_ceiling": None if above is None or not np.isfinite(ceiling[i])
                       else bool(above[i])}
                      for i in order]}
    return out


def _value_at(values, i: int) -> float:
    """Entry i of a per-gene array, NaN where the reference is missing (a store without library sizes)."""
    return float(np.asarray(values, np.float64)[i]) if values is not None else float("nan")
