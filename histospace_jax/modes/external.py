"""Mode external: train one head on all (or external.train_patients) spots of data.store, evaluate on
external.store (or on data.store's external.test_patients) on the genes both stores share, with
leave-one-patient-out's controls fitted on the training rows and its results for a held-out set
(evaluation.held_out_results: the metric block, a collapsed model marked failed, the bootstrap interval and the
model's paired interval against each control) and references of the test set; spatial maps of named genes; an
overlap check of the two stores (patients, image hashes, tile hashes); exports the deployable model for
predict."""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np

from histospace_jax import (atomic, autoencoder, builders, checkpointing, clustering, config as config_lib, console,
                            controls, counting_base, evaluation, features, folds, metrics, model_export, plots)
from histospace_jax.data import open_store
from histospace_jax.data.store import require_same_tile_scale
from histospace_jax.errors import BadInputError, ConfigError

# HER2ST patients E-H are the STNet patients below (same tissue, re-released): evaluating a HER2ST-trained
# model on STNet (or the reverse) on those patients is not an external test.
HER2ST_STNET_SAME_PATIENT = {"E": "BC23567", "F": "BC23810", "G": "BC23903", "H": "BC24044"}


def _canonical_patient(p: str, manifest: dict) -> str:
    if manifest.get("source_format") == "her2st" and p in HER2ST_STNET_SAME_PATIENT:
        return HER2ST_STNET_SAME_PATIENT[p]
    return p


def tile_hashes(store, rows: np.ndarray, batch: int = 256) -> list[str]:
    out = []
    for a in range(0, len(rows), batch):
        for t in store.tiles[rows[a:a + batch]]:
            out.append(hashlib.sha1(np.ascontiguousarray(t).tobytes()).hexdigest())
    return out


def compare_stores(store_a, rows_a: np.ndarray, store_b, rows_b: np.ndarray) -> dict:
    """Shared patients (HER2ST E-H == STNet BC23567/BC23810/BC23903/BC24044), shared source images (manifest
    sha256) and identical tiles between the training rows of A and the evaluation rows of B.
    Returns the overlap and, per B row, whether it overlaps."""
    ma, mb = store_a.manifest, store_b.manifest
    pa = {_canonical_patient(p, ma) for p in set(store_a.obs["patient"][rows_a].tolist())}
    pb_rows = np.array([_canonical_patient(p, mb) for p in store_b.obs["patient"][rows_b]])
    shared_patients = sorted(pa & set(pb_rows.tolist()))
    sec_a = set(store_a.obs["section"][rows_a].tolist())
    hashes_a = {s.get("image_sha256") for s in ma.get("sections", []) if s.get("section") in sec_a} - {None, ""}
    sec_hash_b = {s.get("section"): s.get("image_sha256") for s in mb.get("sections", [])}
    shared_image_sections = sorted({s for s in set(store_b.obs["section"][rows_b].tolist())
                                    if sec_hash_b.get(s) and sec_hash_b.get(s) in hashes_a})
    ha = set(tile_hashes(store_a, rows_a))
    hb = tile_hashes(store_b, rows_b)
    same_tile = np.array([h in ha for h in hb], bool)
    overlap_row = (np.isin(pb_rows, shared_patients) | np.isin(store_b.obs["section"][rows_b], shared_image_sections)
                   | same_tile)
    return {"shared_patients": shared_patients, "shared_image_sections_of_B": shared_image_sections,
            "identical_tiles": int(same_tile.sum()), "overlapping_B_spots": int(overlap_row.sum()),
            "compared": "patient ids (HER2ST E-H mapped to STNet ids), source image sha256 from the manifests, "
                        "sha1 of every tile", "_rows": overlap_row}


def _select_patients(store, wanted: str, what: str) -> np.ndarray:
    if not wanted:
        return np.arange(store.n_spots)
    names = [p for p in wanted.split(",") if p]
    unknown = [p for p in names if p not in store.patients]
    if unknown:
        raise ConfigError(f"{what}={wanted!r}: patients {unknown} are not in {store.path} "
                          f"(patients: {store.patients})")
    return np.flatnonzero(np.isin(store.obs["patient"], names))


def _counting_model_settings(config, store_a, store_b) -> dict:
    """train_one_fold_on_all's base_scale, blend_weights and blend_scale for training on A. A counting model
    fitted on A predicts B only when B's expression is log1p counts per the same scale: otherwise an error, before
    any training, that names B and the setting to turn off."""
    base_scale = counting_base.scale_for(config, store_a.manifest, store_a.obs, store_a.path)
    blend_weights = counting_base.blend_weights(config, store_a.manifest, store_a.obs, store_a.path)
    scale_a = evaluation.sampling_scale(store_a.manifest)
    if (base_scale is not None or blend_weights is not None) and evaluation.sampling_scale(store_b.manifest) != scale_a:
        how, key, off = (("the counting base (model.output_base) predicts", "model.output_base", "mean")
                         if base_scale is not None else
                         ("the counting model the predictions are blended with (model.counting_blend) predicts",
                          "model.counting_blend", "none"))
        raise BadInputError(f"{store_b.path}: its expression is not log1p counts per {scale_a:g} as "
                            f"{store_a.path}'s is, which {how}; prepare both stores alike or use "
                            f"--config.{key}={off}")
    return {"base_scale": base_scale, "blend_weights": blend_weights, "blend_scale": scale_a}


def reviewer_controls(store_a, rows_a: np.ndarray, expr_a: np.ndarray, maps_a: np.ndarray, store_b,
                      rows_b: np.ndarray, maps_b: np.ndarray) -> tuple[dict, dict]:
    """Leave-one-patient-out's reviewer controls (evaluation.reviewer_controls: trivial image, linear probe and,
    with library sizes in both stores, depth_oracle and image_depth), fitted on A's training rows (`expr_a` [NA, G] on the
    shared genes, `maps_a` their frozen feature maps) and predicting B's test rows (`maps_b`): one fold whose
    training patients are A's and whose held-out patient is the test set; B's counts are never read. Returns
    ({control: test predictions}, {control: ridge penalty})."""
    na, nb = len(rows_a), len(rows_b)
    plan = folds.FoldPlan(patients=["training store", "test"], spot_patient=np.repeat([0, 1], [na, nb]), folds=[1])
    keys = [k for k in ("section", "array_x", "array_y", "library_size") if k in store_a.obs and k in store_b.obs]
    obs = {k: np.concatenate([np.asarray(store_a.obs[k])[rows_a], np.asarray(store_b.obs[k])[rows_b]]) for k in keys}
    colour = np.concatenate([features.colour_statistics(store_a, rows_a), features.colour_statistics(store_b, rows_b)])
    maps = np.concatenate([np.asarray(maps_a), np.asarray(maps_b)])
    # The test rows' expression is never read by the controls (they fit on the training rows): zeros stand in.
    expression = np.concatenate([np.asarray(expr_a, np.float32), np.zeros((nb, expr_a.shape[1]), np.float32)])
    preds, alphas, _ = evaluation.reviewer_controls(plan, expression, obs, colour, [maps], [0])
    return ({name: p[0] for name, p in preds.items()},
            {name: a["test"] for name, a in alphas.items() if "test" in a})


def run(config, workdir: str, inputs) -> tuple[dict, dict]:
    """Train on store A (all, or config.external.train_patients), evaluate on store B (config.external.store,
    default A itself with config.external.test_patients) on the shared genes."""
    e = config.external
    store_a_path, ae_store, writer = inputs.store, inputs.ae_store, inputs.writer
    store_a = open_store(store_a_path)
    store_b = open_store(e.store or store_a_path)
    require_same_tile_scale(store_a, store_b, "config.external.store")
    counting_settings = _counting_model_settings(config, store_a, store_b)
    rows_a = _select_patients(store_a, e.train_patients, "external.train_patients")
    rows_b = _select_patients(store_b, e.test_patients, "external.test_patients")
    genes = [g for g in store_a.genes if g in set(store_b.genes)]
    if not genes:
        raise BadInputError(f"{store_a.path} and {store_b.path} share no genes; prepare B with "
                            f"--genes_from={store_a.path}")
    warnings = []
    overlap = compare_stores(store_a, rows_a, store_b, rows_b)
    over_rows = overlap.pop("_rows")
    if overlap["overlapping_B_spots"]:
        msg = (f"WARNING: the test set overlaps the training set: {overlap['overlapping_B_spots']} of "
               f"{len(rows_b)} evaluation spots (shared patients {overlap['shared_patients']}, shared images "
               f"{overlap['shared_image_sections_of_B']}, identical tiles {overlap['identical_tiles']})")
        if e.exclude_overlap:
            msg += "; they are left out of the evaluation (external.exclude_overlap=True)"
            rows_b = rows_b[~over_rows]
        else:
            msg += "; they are KEPT (external.exclude_overlap=False): the result is not an external test"
        console.log(msg)
        warnings.append(msg)
    if len(rows_b) < 3:
        raise BadInputError(f"{store_b.path}: only {len(rows_b)} evaluation spots left after removing the overlap "
                            "with the training set; test on other patients or another store")
    ga, gb = store_a.gene_index(genes), store_b.gene_index(genes)
    expr_a = np.asarray(store_a.expression, np.float32)[rows_a][:, ga]
    truth = np.asarray(store_b.expression, np.float32)[rows_b][:, gb]
    console.log(f"[external] train {store_a.path} ({len(rows_a)} spots) -> test {store_b.path} "
                f"({len(rows_b)} spots), {len(genes)} shared genes")

    if ae_store:
        require_same_tile_scale(store_a, open_store(ae_store), "config.ae.store")
    # Every encoder caches every spot of both stores (one store when the test rows are A's own patients).
    features.require_cache_space(
        config, workdir, [store_a] if store_b.path == store_a.path else [store_a, store_b],
        {"autoencoder": 1, "untrained (random-encoder control)": (config.loo.random_encoder_draws
                                                                  if config_lib.random_encoder_control_on(config)
                                                                  else 0)},
        log=console.log)
    if ae_store or config.ae.checkpoint:
        seen = f"the separate image store {ae_store}" if ae_store else ""
        if ae_store and os.path.realpath(ae_store) == os.path.realpath(store_b.path):
            console.log("WARNING: ae.store is the test store itself: the autoencoder learns from every tile of it, "
                        "the test patients' included (results.json records it)")
            seen = f"every tile of {ae_store}, the test patients' included (ae.store is the test store)"
        elif ae_store and os.path.realpath(ae_store) == os.path.realpath(store_a.path):
            seen = f"every tile of the training store {ae_store}"
        ae = autoencoder.pretrain(config, workdir, ae_store or store_a_path, writer, seen=seen)
    elif config.ae.transductive:
        console.log(f"WARNING: ae.transductive=True: pretraining the autoencoder on every tile of {store_a_path}, "
                    "the test patients' included where they are in it (unsupervised; results.json records it)")
        ae = autoencoder.pretrain(config, workdir, store_a_path, writer,
                                  seen=f"every tile of {store_a_path} (transductive)")
    else:
        # Only the training rows' tiles, as leave-one-patient-out's folds do: with train and test patients in one
        # store (external.train_patients / test_patients), every tile of it would include the test patients'.
        ae = autoencoder.pretrain(config, workdir, store_a_path, writer, rows=rows_a,
                                  seen=f"the {len(rows_a)} tiles of the training patients "
                                       f"{sorted(str(p) for p in set(np.asarray(store_a.obs['patient'])[rows_a]))} "
                                       f"of {store_a_path}")

    def feats_of(store, variables):
        return features.for_config(config, workdir, store, variables)

    def inputs_of(variables):
        """Features and neighbourhood context (None without) of the training and the test rows. Neighbours come
        from every spot of each store: a spot left out of the evaluation is still tissue beside the others."""
        full_a, full_b = feats_of(store_a, variables), feats_of(store_b, variables)
        ctx_a, ctx_b = (folds.store_context(config, [f], s.obs) for f, s in ((full_a, store_a), (full_b, store_b)))
        return (full_a[:, rows_a], full_b[:, rows_b], None if ctx_a is None else ctx_a[:, :, rows_a],
                None if ctx_b is None else ctx_b[0][:, rows_b])

    fdr = config.loo.fdr
    fa, fb, ca, cb = inputs_of(ae["variables"])
    obs_a = {k: v[rows_a] for k, v in store_a.obs.items()}
    source_a = f"{store_a.fingerprint}/{checkpointing.rows_digest(rows_a, ga)}"  # the training rows and genes
    heads = folds.train_one_fold_on_all(config, workdir, obs_a, fa, expr_a, ae["variables"], writer, "external",
                                        context=ca, source=source_a, **counting_settings)
    curve = heads["curve"]
    # The test store is smoothed as inner validation on the training store chose.
    smooth = lambda p: folds.smooth_predictions(store_b.obs, rows_b, p, heads["smoothing"])  # noqa: E731
    # B's tiles pooled once, for the counting base (with output_base=counting) and its image_depth_sampling control.
    pooled_b, base_b = None, None
    if heads["counting_base"] is not None:
        pooled_b = counting_base.pooled_rows(fb[0], np.arange(len(rows_b)))
        base_b = counting_base.predict(heads["counting_base"], pooled_b)
    on_base = lambda p: counting_base.combine(p, base_b, heads["counting_weight"])  # noqa: E731
    unsmoothed = on_base(folds.ensemble_predict_features(heads["states"], fb, heads["mean"], heads["sd"], context=cb))
    pred = smooth(unsmoothed)
    # The same metric block as a leave-one-patient-out fold: depth-adjusted r, R² against the training mean and
    # a failed flag for a collapsed head (flat predictions), so the headline never hides a collapse.
    reference = expr_a.astype(np.float64).mean(0)
    log_depth_a, log_depth = (None if d is None else d[r] for d, r in (
        (evaluation.log_library_size(store_a.obs), rows_a), (evaluation.log_library_size(store_b.obs), rows_b)))
    # Every control predicts the test rows, as leave-one-patient-out's controls predict a held-out patient's, and
    # is scored by the same held_out_results: the metric block, and the model's paired interval against each.
    control_preds, image_depth_r = {}, None
    untrained = None
    if config.model.output_init != "zeros":  # with a zero output layer the untrained head IS the mean profile
        untrained = smooth(on_base(folds.ensemble_predict_features(heads["untrained_states"], fb, heads["mean"],
                                                                   heads["sd"], context=cb)))
    # loo.random_encoder_draws untrained encoders (seeds random_encoder_seed, +1, ...), each with its own heads, blend
    # weight and smoothing chosen on its own inner validation, as in leave-one-patient-out: one draw's verdict says
    # nothing about another untrained encoder's.
    draw_seeds = ([config.loo.random_encoder_seed + k for k in range(config.loo.random_encoder_draws)]
                  if config_lib.random_encoder_control_on(config) else [])
    random_weight, random_smoothing = {}, {}
    for k, (name, seed) in enumerate(zip(evaluation.random_encoder_control_names(len(draw_seeds)), draw_seeds)):
        rv = builders.random_encoder_variables(config, seed)
        ra, rb, rca, rcb = inputs_of(rv)
        rheads = folds.train_one_fold_on_all(config, workdir, obs_a, ra, expr_a, rv, writer, f"external_{name}",
                                             context=rca, source=source_a, **counting_settings)
        control_preds[name] = folds.smooth_predictions(store_b.obs, rows_b, folds.predict_with_base(
            rheads["states"], rb, rheads["mean"], rheads["sd"], rheads["counting_base"], context=rcb,
            weight=rheads["counting_weight"]), rheads["smoothing"])
        label = "test" if k == 0 else f"test ({name})"
        random_weight[label], random_smoothing[label] = rheads["counting_weight"], rheads["smoothing"]
    scale = evaluation.sampling_scale(store_a.manifest)
    with_sampling = scale is not None and scale == evaluation.sampling_scale(store_b.manifest)
    reviewer, reviewer_alphas = reviewer_controls(store_a, rows_a, expr_a, fa[0], store_b, rows_b, fb[0])
    control_preds.update({k: smooth(reviewer[k]) for k in ("trivial_image", "linear_probe") if k in reviewer})
    if log_depth is not None and log_depth_a is not None:
        # How much of the test set's per-gene r sequencing depth alone gives, from lines fitted on store A, and at
        # the depth a ridge on A's frozen features reads from B's tiles.
        control_preds["depth_oracle"] = reviewer["depth_oracle"]
        control_preds["image_depth"] = smooth(reviewer["image_depth"])
        if with_sampling:
            lib_a = np.asarray(store_a.obs["library_size"], np.float64)[rows_a]
            control_preds["depth_oracle_sampling"] = controls.sampling_depth_oracle(expr_a, lib_a, log_depth, scale)
            # The same counting model at the depth a ridge on A's frozen features reads from B's tiles: the
            # counting base itself (with output_base=counting the model is this plus the heads' output).
            base = heads["counting_base"] or counting_base.fit(
                counting_base.pooled_rows(fa[0], np.arange(len(rows_a))), expr_a, lib_a,
                evaluation.alpha_groups(obs_a, np.arange(len(rows_a))), scale)
            if pooled_b is None:
                pooled_b = counting_base.pooled_rows(fb[0], np.arange(len(rows_b)))
            sampled = base_b if base_b is not None else counting_base.predict(base, pooled_b)
            control_preds["image_depth_sampling"] = smooth(sampled)
            read = counting_base.image_log_depth(base, pooled_b)
            image_depth_r = float(np.corrcoef(read, log_depth)[0, 1])
    if builders.smoothing(config) is not None:
        control_preds["model_unsmoothed"] = unsmoothed
    obs_rows_b = {k: np.asarray(store_b.obs[k])[rows_b] for k in ("section", "array_x", "array_y")}
    held_out = evaluation.held_out_results(truth, pred, reference, log_depth, obs_rows_b, untrained, control_preds,
                                           fdr, config.seed)
    results = {"model": {k: v for k, v in held_out.items()
                         if k not in evaluation.PER_GENE_ARRAYS and k not in ("controls", "model_minus_control")},
               "controls": held_out["controls"], "model_minus_control": held_out["model_minus_control"]}
    gene_r = held_out["per_gene_r"]
    depth_relation = (None if log_depth is None or log_depth_a is None else evaluation.depth_relation(
        truth, log_depth, store_b.obs["section"][rows_b], expr_a, log_depth_a, obs_a["section"], gene_r,
        obs_a.get("patient")))
    # The test set's own references, as leave-one-patient-out gives each held-out patient: the split-half noise
    # ceiling of its counts and what its neighbouring spots' measurements share.
    scale_b = evaluation.sampling_scale(store_b.manifest)
    ceiling = (None if log_depth is None or scale_b is None else evaluation.noise_ceiling_of(
        truth, store_b.obs["library_size"][rows_b], config.seed, scale_b))
    neighbours = evaluation.neighbour_reference_of(truth, store_b.obs, rows_b, log_depth)
    # Which genes the model predicts beyond sequencing depth (the spatial test of depth-adjusted r), beside the
    # controls and the test set's references, as leave-one-patient-out lists them per held-out patient.
    beyond = (None if log_depth is None else evaluation.genes_beyond_depth(
        genes, [{"held_out": "test", **held_out}], {"test": ceiling or {}}, {"test": neighbours}, fdr))

    # Spatial maps of the named genes (those present), else the best-predicted genes.
    named = [g for g in e.map_genes.split(",") if g]
    present = [g for g in named if g in genes]
    missing = [g for g in named if g not in genes]
    if missing:
        warnings.append(f"map genes {missing} are not among the {len(genes)} shared genes")
    if not present:
        order = np.argsort(-np.nan_to_num(gene_r, nan=-2))
        present = [genes[i] for i in order[:2]]
        warnings.append(f"no named map gene available; mapping the two best-predicted genes {present}")
    gi = [genes.index(g) for g in present]
    figures = {}
    if jax.process_index() == 0:
        fname = "figures/external_spatial_maps.png"
        plots.plot_spatial_maps(os.path.join(workdir, fname), store_b.obs, rows_b, present, truth[:, gi], pred[:, gi],
                          title=f"Trained on {os.path.basename(store_a.path)} "
                                f"{e.train_patients or 'all patients'}; tested on "
                                f"{os.path.basename(store_b.path)} {e.test_patients or 'all patients'}",
                          tiles=features.shown_tiles(store_b, rows_b))
        figures["spatial_maps"] = fname
        if curve:
            atomic.write_csv(os.path.join(workdir, "curves", "external.csv"), curve)
            plots.plot_curves(os.path.join(workdir, "figures", "external_curve.png"),
                              plots.huber_series(curve, "train Huber {fold}"),
                              title="External: head training loss (all training spots)", xlabel="epoch",
                              ylabel="Huber loss", logy=True)
            figures["curve"] = "figures/external_curve.png"
        # Per gene: r and depth-adjusted r of the model and of each trained control (NaN without library sizes).
        cols = {"pearson_r": gene_r, "depth_adjusted_r": held_out["per_gene_depth_adjusted_r"],
                "q_spatial": held_out["per_gene_q_spatial"],
                "q_depth_adjusted_spatial": held_out["per_gene_q_depth_adjusted_spatial"]}
        for k in control_preds:
            cols[f"{k}_r"] = held_out["per_gene_r_controls"][k]
            cols[f"{k}_depth_adjusted_r"] = held_out["per_gene_depth_adjusted_r_controls"][k]
        if ceiling is not None:
            cols["noise_ceiling_r"] = ceiling["ceiling_r_per_gene"]
            cols["noise_ceiling_depth_adjusted_r"] = ceiling["depth_adjusted_ceiling_r_per_gene"]
        cols["neighbour_reference_r"] = neighbours["r_per_gene"]
        cols["neighbour_reference_depth_adjusted_r"] = neighbours["depth_adjusted_r_per_gene"]
        if depth_relation is not None:
            cols["held_out_depth_r"] = depth_relation["held_out_depth_r_per_gene"]
            cols["training_depth_r"] = depth_relation["training_depth_r_per_gene"]
        rows_csv = [{"gene": g, **{k: float(v[i]) for k, v in cols.items()}} for i, g in enumerate(genes)]
        atomic.write_csv(os.path.join(workdir, "per_gene.csv"), rows_csv)
        # Every control's test predictions beside the model's, so any figure of results.json can be recomputed.
        atomic.write_npz(os.path.join(workdir, "predictions.npz"), genes=np.array(genes), rows_B=rows_b, pred=pred,
                         truth=truth, **{f"control_{k}": v for k, v in control_preds.items()})
    cluster_result = clustering.pathology_clustering(workdir, store_b.obs, rows_b, pred, truth=truth,
                                                     cancer_labels=config.clustering.cancer_labels, seed=config.seed,
                                                     prefix="external_clustering")
    model_info = {}
    if jax.process_index() == 0:
        model_info = model_export.export(os.path.join(workdir, "model"), config, heads["states"], genes, store_a,
                                         ae["summary"].get("loaded_from") or os.path.join(workdir, "checkpoints", "ae"),
                                         mean=heads["mean"], sd=heads["sd"], views=fa.shape[0],
                                         smoothing=folds.exported_smoothing(heads["smoothing"]),
                                         counting=heads["counting_base"], counting_weight=heads["counting_weight"])
    external = {
        "train": {"store": store_a.path, "patients": sorted(set(store_a.obs["patient"][rows_a].tolist())),
                  "n_spots": int(len(rows_a)), "synthetic": store_a.synthetic, "refit": heads["refit"],
                  "live_units": heads["live_units"],
                  "output_base": ({"base": "mean"} if counting_settings["base_scale"] is None else
                                  {"base": "counting", "scale": counting_settings["base_scale"],
                                   "depth_ridge_alpha": heads["counting_base"].alpha})},
        "counting_blend": (None if heads["counting_blend"] is None else
                           {"what": "the final prediction is (1 - weight) x the heads' + weight x the counting model "
                                    "at the depth a ridge on the training store's features reads from each test "
                                    "tile (image_depth_sampling), the weight chosen on inner validation of the "
                                    "training store",
                            "per_fold": {"test": heads["counting_blend"]},
                            "random_encoder_weight": random_weight}),
        # r between the log library size a ridge on A's features reads from B's tiles and B's measured one
        # (the image_depth_sampling control's depth; a diagnostic, nothing is chosen on it).
        "test_image_depth_r": image_depth_r,
        "control_ridge_alpha": reviewer_alphas,
        # How each gene follows depth in the test and the training store (evaluation.depth_relation; reads the
        # test counts: a reference, not a predictor).
        "depth_relation": None if depth_relation is None else evaluation.without_per_gene(depth_relation),
        "noise_ceiling": None if ceiling is None else evaluation.without_per_gene(ceiling),
        "neighbour_reference": evaluation.without_per_gene(neighbours),
        "genes_beyond_depth": beyond,
        "test": {"store": store_b.path, "patients": sorted(set(store_b.obs["patient"][rows_b].tolist())),
                 "n_spots": int(len(rows_b)), "synthetic": store_b.synthetic},
        "n_shared_genes": len(genes), "overlap": overlap, "warnings": warnings, **results,
        "top_genes": evaluation.top_genes(genes, gene_r, True),
        "bottom_genes": evaluation.top_genes(genes, gene_r, False),
        "map_genes": {g: float(gene_r[genes.index(g)]) for g in present},
        "clustering": cluster_result, "figures": figures, "model_export": model_info,
        "context": (None if not builders.uses_context(config) else
                    {"train": folds.context_summary(config, store_a.obs),
                     "test": folds.context_summary(config, store_b.obs)}),
        "smoothing": folds.smoothing_summary({"test": heads["smoothing"]}, store_b.obs, {"test": rows_b},
                                             random_smoothing),
        **({"random_encoder_draws": evaluation.random_encoder_draws([{"held_out": "test", **held_out}], draw_seeds)}
           if draw_seeds else {}),
        "autoencoder": {k: v for k, v in ae["summary"].items() if k != "curve"},
    }
    return ({"mode": "external", "dataset": {**inputs.dataset, "store": store_a_path}, "external": external},
            {})
