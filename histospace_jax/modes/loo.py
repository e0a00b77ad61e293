"""Mode loo: leave-one-patient-out with controls (the paper's protocol); loo.hold_out=section holds out one
section per fold instead (leave-one-section-out: within-patient figures, labelled as such everywhere).

Layout of a workdir:
  checkpoints/ae[_<fold>]/   autoencoder train state + Grain iterator (Orbax); one per fold when it learns from
                             the store itself (training patients only)
  checkpoints/loo_<tag>/     every fold's heads (one compiled program, stacked; best-epoch copies) + iterator
  cache/features-<key>/      frozen-encoder features (keyed by store and encoder weights)
  metrics.jsonl              every logged metric
  curves/*.csv, curves/*.png learning curves
  predictions.npz            held-out predictions of every fold (and of the controls)
  predictions.h5ad           the same for scanpy/squidpy (X = prediction, layers truth and controls, obsm spatial,
                             uns spatial with each section's image), when anndata is installed
  per_gene.csv               per fold and gene: r and depth-adjusted r of the model (with spatial q-values) and
                             of every control, the noise ceilings, the neighbour reference and the gene's r with
                             depth in the held-out and the training patients
  results.json, report.md    the metric tables (see README)
`loo.folds_per_program` < number of folds runs groups of folds one after another on the same stream (same
results, less memory).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import (atomic, autoencoder, builders, clustering, config as config_lib, console, evaluation,
                            features, folds, metrics, plots, spatial_anndata)
from histospace_jax import counting_base
from histospace_jax.data import open_store
from histospace_jax.data.store import require_same_tile_scale
from histospace_jax.errors import BadInputError
from histospace_jax.model_export import dir_bytes

METRIC_NOTES = {
    "per_gene_pearson": "r across the held-out patient's spots for each gene, mean over genes; genes "
                        "constant in truth or prediction are excluded (count in n_genes_undefined_r)",
    "n_genes_significant": "genes with r > 0 significant at FDR fdr: one-sided t-test of H0 rho = 0 "
                           "(n - 2 df), Benjamini-Hochberg over the genes with a defined r",
    "per_spot_pearson": "the HistoSPACE paper's metric: r across genes within a spot, mean over spots; "
                        "compare with controls.mean_predictor (training-mean profile for every spot)",
    "depth_adjusted_per_gene_pearson": "per gene, truth and prediction residualised on a cubic in the spot's log "
                                       "library size within the held-out patient, then r: signal beyond sequencing "
                                       "depth",
    "controls": "mean_predictor: training patients' mean profile for every spot (image-blind; per-gene r "
                "undefined). random_encoder: the same heads on a randomly initialised, untrained encoder (what "
                "pretraining buys); random_encoder_2, ...: further draws (loo.random_encoder_draws, seeds counting "
                "up from loo.random_encoder_seed; random_encoder_draws sums them up). trivial_image: ridge on "
                "colour and H/E/D statistics of each tile. linear_probe: ridge on the top 256 principal "
                "components of the pooled frozen features. depth_oracle: per gene, a line in log library size. "
                "image_depth: the same lines at the log library size a ridge on the "
                "pooled frozen features predicts. depth_oracle_sampling and image_depth_sampling (stores of "
                "log1p counts per 10k): the same two depths through the counting model instead of the lines, each "
                "gene at its training share of the library, E[log1p(scale c / L)] for c ~ Poisson(L share). "
                "untrained_head (paper recipe only): the heads at initialisation. All "
                "fitted on the training patients only. With neighbour smoothing (model.smoothing; the standard recipe "
                "chooses each fold's weight on inner validation) the fold's model and image-based controls are "
                "smoothed alike over adjacent spots (training.smoothing); model_unsmoothed is the model before it",
    "neighbour_reference": "not a predictor: each held-out spot's expression 'predicted' by the mean measured "
                           "expression of its adjacent spots (same section), per-gene r and depth-adjusted r over "
                           "the spots with a neighbour; how much of the patient's (gene-specific) expression "
                           "neighbouring spots share, beside the noise ceiling",
    "depth_relation": "not a predictor: each gene's r with log library size (both centred within each section) in "
                      "the held-out patient and in the fold's training patients; the genes whose relation "
                      "reverses between them (|r| >= min_abs_r on both sides, opposite signs) and the model's "
                      "per-gene r on them against the rest; per gene in per_gene.csv (held_out_depth_r, "
                      "training_depth_r)",
    "n_genes_significant_depth_adjusted_spatial": "genes whose depth-adjusted r is significant at FDR fdr: the "
                                                  "block permutation of n_genes_significant_spatial on the "
                                                  "residuals of truth and prediction on a cubic in log "
                                                  "library size",
    "genes_beyond_depth": "per held-out patient, the genes that pass that test, best first (at most 10), with the "
                          "controls' depth-adjusted r, the neighbour reference and the noise ceiling for each; "
                          "above_noise_ceiling marks a gene whose r exceeds its depth-adjusted noise ceiling (more "
                          "than the held-out counts agree with themselves: chance, not signal), "
                          "n_above_noise_ceiling counts them among all passing genes; every gene's figures are in "
                          "per_gene.csv",
    "failed": "a fold whose predictions are constant for more than 5% of genes, or with no defined per-gene r; "
              "the summary over folds is then undefined (NaN), never a mean over the surviving folds",
    "summary": "unweighted mean over folds (NaN when any fold failed or has no value)",
}


def _loss_summary(config) -> dict:
    """The heads' loss and the scale its delta is in (per-gene SDs of the fold's training rows when standardised)."""
    standardised = config.train.standardise_targets == "on"
    return {"name": "huber", "delta": builders.huber_delta(config),
            "units": "standard deviations of each gene on the fold's training rows" if standardised
            else "log-normalised expression", "targets": config.train.standardise_targets}


def one_shared_encoder(config, inputs) -> bool:
    """Whether every fold reads one encoder (ae.checkpoint, ae.store or ae.transductive) rather than its own."""
    return bool(config.ae.checkpoint or inputs.ae_store or config.ae.transductive)


def fold_encoders(config, workdir: str, store, inputs, plan) -> tuple[list[dict], list[int], dict]:
    """The frozen encoder(s) the folds' heads learn from: (encoder variables, encoder index per fold, what
    each autoencoder saw). One shared encoder from ae.checkpoint, ae.store (the demo's separate pretraining
    images) or, when the user asks (ae.transductive), every tile of the store; otherwise one autoencoder per
    fold on its training patients' tiles, so no encoder has seen the patient its fold is tested on."""
    if config.ae.checkpoint or inputs.ae_store:
        if inputs.ae_store:
            require_same_tile_scale(store, open_store(inputs.ae_store), "config.ae.store")
        seen = f"the separate image store {inputs.ae_store}" if inputs.ae_store else ""
        if inputs.ae_store and os.path.realpath(inputs.ae_store) == os.path.realpath(inputs.store):
            console.log("WARNING: ae.store is the regression store itself: the autoencoder learns from every tile "
                        "of it, held-out patients' included (as ae.transductive=True; results.json records it)")
            seen = f"every tile of {inputs.store}, held-out patients included (ae.store is the regression store)"
        ae = autoencoder.pretrain(config, workdir, inputs.ae_store or inputs.store, inputs.writer, seen=seen)
        return [ae["variables"]], [0] * len(plan.folds), {"shared": ae["summary"]}
    if one_shared_encoder(config, inputs):  # of its reasons, only ae.transductive is left
        console.log("WARNING: ae.transductive=True: pretraining the autoencoder on every tile of this store, held-out "
                    "patients' included (unsupervised; results.json records it)")
        ae = autoencoder.pretrain(config, workdir, inputs.store, inputs.writer,
                                  seen=f"every tile of {inputs.store}, held-out patients included (transductive)")
        return [ae["variables"]], [0] * len(plan.folds), {"shared": ae["summary"]}
    encoders, summaries = [], {}
    for f in range(len(plan.folds)):
        name = plan.name(f)
        rows = plan.training_rows(f)
        ae = autoencoder.pretrain(config, workdir, inputs.store, inputs.writer, rows=rows, name=f"ae {name}",
                                  seen=f"the {len(rows)} tiles of the training patients of the fold holding out "
                                       f"{name}")
        encoders.append(ae["variables"])
        summaries[name] = ae["summary"]
    return encoders, list(range(len(plan.folds))), summaries


def fold_counting_bases(store, plan, feats, encoder_of_fold: list[int], train_rows: list[np.ndarray],
                        scale: float) -> tuple[list, list, dict]:
    """Per fold, the counting base (counting_base.fit) of its inner-training rows and of all its training rows,
    from the untransformed view of its encoder's features, and what results.json records of them: the depth
    ridge's alpha and how well the full base reads the held-out spots' depth (r of log library size, a
    diagnostic: nothing is chosen on it)."""
    expression = np.asarray(store.expression, np.float32)
    library = np.asarray(store.obs["library_size"], np.float64)
    n = len(expression)
    pooled = [counting_base.pooled_rows(m, np.arange(n)) for m in _first_view(feats)]
    inner, full, summary = [], [], {}
    for f in range(len(plan.folds)):
        p = pooled[encoder_of_fold[f]]
        bases = []
        for rows in (train_rows[f], plan.training_rows(f)):
            bases.append(counting_base.fit(p[rows], expression[rows], library[rows],
                                           evaluation.alpha_groups(store.obs, rows), scale))
        inner.append((bases[0], p))
        full.append((bases[1], p))
        held = plan.held_out_rows(f)
        read = counting_base.image_log_depth(bases[1], p[held])
        measured = np.log(np.maximum(library[held], 1.0))
        summary[plan.name(f)] = {"depth_ridge_alpha": bases[1].alpha,
                                 "held_out_depth_r": float(np.corrcoef(read, measured)[0, 1]) if len(held) > 2
                                 else None}
    return inner, full, summary


def _with_base(bases, f: int, rows: np.ndarray, pred, weight: float | None = None):
    """`pred` plus the fold's counting base at `rows` (output_base=counting), or blended with it at `weight`
    (model.counting_blend); unchanged without bases."""
    if bases is None or pred is None:
        return pred
    return counting_base.combine(pred, _counting_at(bases, f, rows), weight)


def _counting_at(bases, f: int, rows: np.ndarray) -> np.ndarray:
    base, pooled = bases[f]
    return counting_base.predict(base, pooled[rows])


def counting_blend_summary(weights: tuple | None, choices: dict, random_encoder: dict) -> dict | None:
    """results.json's record of the blend with the counting model (None when off)."""
    if weights is None:
        return None
    return {"what": "the final prediction is (1 - weight) x the heads' + weight x the counting model at the depth "
                    "a ridge reads from the frozen features (image_depth_sampling), the weight of the candidates "
                    "with the lowest inner-validation MSE (training SDs²) per fold; the random-encoder control "
                    "chooses its own with its own features",
            "candidates": list(weights), "per_fold": choices,
            "random_encoder_weight": {name: c["weight"] for name, c in random_encoder.items()}}


def output_base_summary(scale: float | None, per_fold: dict | None) -> dict:
    """results.json's record of what the heads' output was added to."""
    if scale is None:
        return {"base": "mean", "what": "the heads' output is added to the training mean (they learn everything)"}
    return {"base": "counting", "scale": scale, "per_fold": per_fold,
            "what": "each prediction is the counting model at the depth a ridge reads from the frozen features "
                    "(the training patients' library shares; the image_depth_sampling control) plus the heads' "
                    "output; the heads learnt expression minus the counting model at each training spot's "
                    "measured depth with its own patient's shares"}


def train_all_folds(config, workdir: str, store, plan, encoders: list[dict], encoder_of_fold: list[int], writer, *,
                    tag: str = "main", feats: np.ndarray | None = None, base_scale: float | None = None,
                    blend_weights: tuple | None = None) -> dict:
    """Every fold's heads (train.ensemble per fold) on the frozen features ([E, V, N, h, w, C], computed from
    `encoders` when not given); returns per-fold held-out predictions of the trained and the untrained heads,
    the curves, best epochs and inner-validation splits. With `base_scale` (counting_base.scale_for) the heads
    learn counting_base.residual_targets and every prediction is the fold's counting base plus theirs. With
    `blend_weights` (counting_base.blend_weights) each fold's predictions are blended with its counting model at
    the weight its inner validation chooses (before the smoothing, which is chosen on the blended ones)."""
    expression = np.asarray(store.expression, np.float32)
    if feats is None:
        feats = encoder_features(config, workdir, store, encoders)
    ctx = folds.store_context(config, list(feats), store.obs)
    splits = {}
    train_rows, val_rows = [], []
    for f in range(len(plan.folds)):
        tr, va, how = folds.training_split(config, store.obs, plan.training_rows(f))
        train_rows.append(tr)
        val_rows.append(va)
        splits[plan.name(f)] = how
    per_program = config.loo.folds_per_program or folds.auto_folds_per_program(
        config, len(plan.folds), expression.shape[1], encoders[0], log=console.log)
    groups = [list(range(i, min(i + per_program, len(plan.folds)))) for i in range(0, len(plan.folds), per_program)]
    out = {"plan": plan, "preds": {}, "unsmoothed": {}, "smoothing": {}, "untrained": {}, "curve": [],
           "best_epoch": {}, "inner_validation": splits, "inner_validation_score": {}, "refit": False,
           "live_units": {}, "output_base": None, "counting_blend": {}}
    targets, inner_bases, full_bases = expression, None, None
    if base_scale is not None:
        targets = counting_base.residual_targets(expression, store.obs["library_size"], store.obs["patient"],
                                                 base_scale)
    if base_scale is not None or blend_weights is not None:
        inner_bases, full_bases, out["output_base"] = fold_counting_bases(
            store, plan, feats, encoder_of_fold, train_rows,
            base_scale or evaluation.sampling_scale(store.manifest))
    sd_of = lambda f: metrics.gene_mean_and_sd(expression[train_rows[f]])[1]  # noqa: E731
    for gi, group in enumerate(groups):
        data = folds.HeadData(names=[plan.name(f) for f in group], train_rows=[train_rows[f] for f in group],
                              val_rows=[val_rows[f] for f in group],
                              encoder_of_fold=[encoder_of_fold[f] for f in group], features=feats,
                              expression=targets, encoder_variables=encoders, context=ctx,
                              source=store.fingerprint)
        res = folds.train_heads(config, workdir, data, tag=f"loo_{tag}_{gi}" if len(groups) > 1 else f"loo_{tag}",
                                writer=writer)
        held = [plan.held_out_rows(f) for f in group]
        out["refit"] = res["refit"]
        # Scored before any refit: refitted heads have learnt from the inner-validation rows. The same
        # predictions choose each fold's smoothing, and the score is of the smoothed ones.
        selected = (res["selected_predict"]([val_rows[f] for f in group]) if any(len(val_rows[f]) for f in group)
                    else [None] * len(group))
        weight = {}
        if blend_weights is not None:
            for f, p in zip(group, selected):
                if p is None or not len(val_rows[f]):
                    choice = counting_base.unvalidated_blend()
                else:
                    choice = counting_base.choose_blend(
                        expression[val_rows[f]], p, _counting_at(inner_bases, f, val_rows[f]),
                        sd_of(f), blend_weights)
                out["counting_blend"][plan.name(f)] = choice
                weight[f] = choice["weight"]
            console.log(f"[loo {tag}] blend with the counting model, weight chosen on inner validation: " + ", ".join(
                f"{plan.name(f)} {weight[f]:g}" for f in group))
        selected = [_with_base(inner_bases, f, val_rows[f], p, weight.get(f)) for f, p in zip(group, selected)]
        for f, p in zip(group, selected):
            choice = folds.choose_smoothing(config, store.obs, expression, train_rows[f], val_rows[f], p)
            out["smoothing"][plan.name(f)] = choice
            if p is not None and len(p):
                smoothed = folds.smooth_predictions(store.obs, val_rows[f], p, choice)
                out["inner_validation_score"][plan.name(f)] = evaluation.inner_validation_score(
                    expression, train_rows[f], val_rows[f], smoothed)
        for f, rows, p in zip(group, held, res["predict"](held)):
            p = _with_base(full_bases, f, rows, p, weight.get(f))
            out["unsmoothed"][f] = p
            out["preds"][f] = folds.smooth_predictions(store.obs, rows, p, out["smoothing"][plan.name(f)])
        # With a zero output layer the untrained heads predict the training mean: not worth a pass.
        untrained = res["untrained"](held) if config.model.output_init != "zeros" else [None] * len(group)
        for f, rows, p in zip(group, held, untrained):
            p = _with_base(full_bases, f, rows, p, weight.get(f))
            out["untrained"][f] = folds.smooth_predictions(store.obs, rows, p, out["smoothing"][plan.name(f)])
        out["curve"].extend(res["curve"])
        out["best_epoch"].update(res["best_epoch"])
        out["live_units"].update(res["live_units"])
    return out


def encoder_features(config, workdir: str, store, encoders: list[dict]):
    """Every encoder's features of the store: [E, V, N, h, w, C] in memory when they fit
    (train.features_in_memory), else one features.FeatureStream per encoder on its on-disk cache."""
    resident = features.resident_choice(config, store, len(encoders), log=console.log)
    feats = [features.for_config(config, workdir, store, enc, resident=resident) for enc in encoders]
    return np.stack(feats) if resident else feats


def _first_view(feats):
    """Each encoder's untransformed view, [N, h, w, C] (in memory, or read from the cache on indexing)."""
    return [f[0] if isinstance(f, np.ndarray) else f.view(0) for f in feats]


def per_gene_rows(genes, fold_metrics: list[dict], held_out_mean: dict, ceilings: dict, neighbours: dict,
                  depth_relations: dict | None = None) -> list:
    """per_gene.csv: one row per held-out patient and gene. The model's per-gene r and depth-adjusted r with their
    spatial block-permutation q-values, every control's two r, and beside them the gene's references in that
    patient: the noise ceilings, the neighbour reference and the gene's r with log library size in the held-out and
    in the training patients (NaN where the store keeps no library sizes)."""
    nan = np.full(len(genes), np.nan)
    rows = []
    for f in fold_metrics:
        name = f["held_out"]
        nc, nb = ceilings.get(name, {}), neighbours.get(name, {})
        dr = (depth_relations or {}).get(name, {})
        cols = {"held_out_mean_expression": held_out_mean[name], "pearson_r": f["per_gene_r"],
                "depth_adjusted_r": f["per_gene_depth_adjusted_r"], "q_spatial": f["per_gene_q_spatial"],
                "q_depth_adjusted_spatial": f["per_gene_q_depth_adjusted_spatial"]}
        for c in f["per_gene_r_controls"]:
            cols[f"{c}_r"] = f["per_gene_r_controls"][c]
            cols[f"{c}_depth_adjusted_r"] = f["per_gene_depth_adjusted_r_controls"][c]
        cols.update({"noise_ceiling_r": nc.get("ceiling_r_per_gene", nan),
                     "noise_ceiling_depth_adjusted_r": nc.get("depth_adjusted_ceiling_r_per_gene", nan),
                     "neighbour_reference_r": nb.get("r_per_gene", nan),
                     "neighbour_reference_depth_adjusted_r": nb.get("depth_adjusted_r_per_gene", nan),
                     "held_out_depth_r": dr.get("held_out_depth_r_per_gene", nan),
                     "training_depth_r": dr.get("training_depth_r_per_gene", nan)})
        rows += [{"fold": name, "gene": g, **{k: float(v[i]) for k, v in cols.items()}} for i, g in enumerate(genes)]
    return rows


def _write_files(workdir: str, genes, loo: dict, fold_metrics: list[dict], extra_controls: dict,
                 gene_rows: list) -> None:
    atomic.write_csv(os.path.join(workdir, "per_gene.csv"), gene_rows)
    plan = loo["plan"]
    arrays = {}
    for k in range(len(plan.folds)):
        name = plan.name(k)
        arrays[f"rows_{name}"] = plan.held_out_rows(k)
        arrays[f"pred_{name}"] = loo["preds"][k]
        for cname, ctrl in extra_controls.items():
            arrays[f"{cname}_{name}"] = np.asarray(ctrl[k], np.float32)
    atomic.write_npz(os.path.join(workdir, "predictions.npz"), genes=np.array(genes), **arrays)
    if loo["curve"]:
        atomic.write_csv(os.path.join(workdir, "curves", "loo.csv"), loo["curve"])
        plots.plot_curves(os.path.join(workdir, "curves", "loo.png"),
                          plots.huber_series(loo["curve"], "held out {fold}"),
                          title="Regression head: training Huber loss per fold", xlabel="epoch", ylabel="Huber loss",
                          logy=True)


def _write_h5ad(workdir: str, store, loo: dict, expression: np.ndarray, extra_controls: dict) -> None:
    """WORKDIR/predictions.h5ad: every held-out spot once (fold order, as in predictions.npz), its prediction as
    X beside the truth and the controls as layers, on its section's image."""
    plan = loo["plan"]
    fold_ids = range(len(plan.folds))
    rows = np.concatenate([plan.held_out_rows(k) for k in fold_ids])
    obs = {name: store.obs[name][rows] for name in ("spot_id", "section", "patient", "array_x", "array_y", "label")
           if name in store.obs}
    obs["fold"] = np.concatenate([[plan.name(k)] * len(plan.held_out_rows(k)) for k in fold_ids])
    obs["store_row"] = rows
    layers = {"truth": expression[rows]}
    layers.update({name: np.concatenate([np.asarray(ctrl[k], np.float32) for k in fold_ids])
                   for name, ctrl in extra_controls.items()})
    notes = {"X": "prediction of the fold that held out the spot's patient",
             "truth": "measured expression (the store's normalised values)",
             "controls": METRIC_NOTES["controls"], "store": store.path}
    xy = np.stack([store.obs["pixel_x"][rows], store.obs["pixel_y"][rows]], axis=1)
    try:
        spatial_anndata.write_spatial_h5ad(
            os.path.join(workdir, "predictions.h5ad"), X=np.concatenate([loo["preds"][k] for k in fold_ids]),
            genes=store.genes, obs=obs, spatial_xy=xy, library_images=spatial_anndata.store_libraries(store, rows),
            layers=layers, uns_extra={"histospace": {"mode": "loo", **notes}})
    except spatial_anndata.AnnDataMissing as e:
        console.log(f"[loo] predictions.h5ad not written: {e}")
    except (OSError, ValueError, MemoryError) as e:
        # An optional copy of predictions.npz: failing it must not lose the results of a whole LOO run.
        console.log(f"[loo] WARNING: predictions.h5ad not written ({type(e).__name__}: {e}); predictions.npz "
                    "holds the same predictions")


def _extras(config, workdir: str, store, loo: dict, expression: np.ndarray, encoder_variables: dict) -> dict:
    """Pathology clustering of the held-out predictions, spatial maps of named genes, model size."""
    plan = loo["plan"]
    rows = np.concatenate([plan.held_out_rows(f) for f in range(len(plan.folds))])
    pred = np.concatenate([loo["preds"][f] for f in range(len(plan.folds))])
    truth = expression[rows]
    extra = {"clustering": clustering.pathology_clustering(
        workdir, store.obs, rows, pred, truth=truth, cancer_labels=config.clustering.cancer_labels,
        seed=config.seed, prefix="loo_clustering")}
    figures = {}
    named = [g for g in config.external.map_genes.split(",") if g in store.genes]
    if not named:
        r = metrics.pearson_per_gene(truth, pred)
        named = [store.genes[i] for i in np.argsort(-np.nan_to_num(r, nan=-2))[:2]]
    if jax.process_index() == 0:
        gi = [store.genes.index(g) for g in named]
        plots.plot_spatial_maps(os.path.join(workdir, "figures", "loo_spatial_maps.png"), store.obs, rows, named,
                                truth[:, gi], pred[:, gi], title=f"{console.protocol_title({'unit': config.loo.hold_out})}: held-out predictions",
                                tiles=features.shown_tiles(store, rows))
        figures["spatial_maps"] = "figures/loo_spatial_maps.png"
    t = config.data.tile_size
    model = builders.histospace(config, len(store.genes))
    hv = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, t, t, 3)),
                                           context=model.sample_context()))
    ckpt_dir = os.path.join(workdir, "checkpoints", "loo_main")
    extra["model"] = {"encoder_params": builders.count_params(encoder_variables["params"]),
                      "head_params": builders.count_params(hv["params"]["head"]),
                      "loo_checkpoint_dir": ckpt_dir,
                      "loo_checkpoint_bytes": dir_bytes(ckpt_dir),
                      "loo_checkpoint_note": "all folds' heads stacked, plus the frozen encoder and the data "
                                             "iterator, up to checkpoint.max_to_keep steps"}
    extra["figures"] = figures
    return extra


def run(config, workdir: str, inputs) -> tuple[dict, dict]:
    store = open_store(inputs.store)
    if not store.genes:
        raise BadInputError(f"{inputs.store}: has no expression (image-only store); leave-one-patient-out needs a "
                            "spot store from `python -m histospace_jax.prepare` with --format=stnet|her2st|visium")
    real_store, section_patients = store, None
    if config.loo.hold_out == "section":
        store, section_patients = folds.sections_as_patients(store)
        console.log(f"[loo] loo.hold_out=section: leave-one-section-out over {len(section_patients)} sections; each "
                    "held-out section's patient has its other sections in training, so these figures are "
                    "within-patient, not what a new patient's slide gets (loo.hold_out=patient)")
    plan = folds.plan_leave_one_patient_out(store, config.loo.patients,
                                            "patients" if section_patients is None else "sections")
    shared = one_shared_encoder(config, inputs)
    features.require_cache_space(
        config, workdir, [store],
        {"one shared autoencoder" if shared else "autoencoders, one per fold": 1 if shared else len(plan.folds),
         "untrained (random-encoder control)": (config.loo.random_encoder_draws
                                                if config_lib.random_encoder_control_on(config) else 0)},
        log=console.log)
    encoders, encoder_of_fold, ae_summaries = fold_encoders(config, workdir, store, inputs, plan)
    if config.loo.evaluate_on == "inner_validation":
        # Each fold's encoder stays the one of its patient split (it saw the training patients' tiles, as in
        # a held-out run); everything else learns from and is scored on the inner split only.
        plan = folds.inner_validation_plan(config, store.obs, plan)
        for summary in ae_summaries.values():
            summary["tiles_seen"] += ("; the inner-validation spots that loo.evaluate_on=inner_validation scores "
                                      "are among them (unsupervised), which a held-out patient's tiles never are")
        console.log("[loo] loo.evaluate_on=inner_validation: every fold is scored on its inner-validation spots "
                    "(training patients only); no held-out patient is read")
    feats = encoder_features(config, workdir, store, encoders)
    base_scale = counting_base.scale_for(config, store.manifest, store.obs, store.path)
    blend_weights = counting_base.blend_weights(config, store.manifest, store.obs, store.path)
    loo = train_all_folds(config, workdir, store, plan, encoders, encoder_of_fold, inputs.writer, feats=feats,
                          base_scale=base_scale, blend_weights=blend_weights)
    expression = np.asarray(store.expression, np.float32)
    controls, random_smoothing, random_blend = {}, {}, {}
    draw_seeds = ([config.loo.random_encoder_seed + k for k in range(config.loo.random_encoder_draws)]
                  if config_lib.random_encoder_control_on(config) else [])
    for k, (name, seed) in enumerate(zip(evaluation.random_encoder_control_names(len(draw_seeds)), draw_seeds)):
        console.log(f"[loo] control {name}: the same heads on a randomly initialised (untrained) encoder, seed {seed}")
        random_run = train_all_folds(config, workdir, store, plan, [builders.random_encoder_variables(config, seed)],
                                     [0] * len(plan.folds), inputs.writer, tag=name, base_scale=base_scale,
                                     blend_weights=blend_weights)
        controls[name] = random_run["preds"]
        random_blend.update({fold if k == 0 else f"{fold} ({name})": choice
                             for fold, choice in random_run["counting_blend"].items()})
        random_smoothing.update({fold if k == 0 else f"{fold} ({name})": choice
                                 for fold, choice in random_run["smoothing"].items()})
    console.log("[loo] controls: trivial image statistics, linear probe on the frozen features, sequencing depth")
    reviewer, alphas, depth_read = evaluation.reviewer_controls(plan, expression, store.obs,
                                                                features.colour_statistics(store),
                                                                _first_view(feats), encoder_of_fold,
                                                                sampling=evaluation.sampling_scale(store.manifest))
    # The reviewer's controls take their fold's smoothing as the model chose it (the random-encoder control
    # chose its own on its own inner validation).
    for name in folds.SMOOTHED_CONTROLS:
        if name in reviewer:
            reviewer[name] = {f: folds.smooth_predictions(store.obs, plan.held_out_rows(f), p,
                                                          loo["smoothing"][plan.name(f)])
                              for f, p in reviewer[name].items()}
    controls.update(reviewer)
    if builders.smoothing(config) is not None:
        controls["model_unsmoothed"] = loo["unsmoothed"]
    del feats
    # With the output layer starting at zero, the untrained head predicts the training mean: the mean-profile
    # control already. It is reported only where it differs (output_init=lecun, the paper's recipe).
    untrained = loo["untrained"] if config.model.output_init != "zeros" else None
    fold_metrics = evaluation.fold_results(plan, loo["preds"], untrained, expression, store.obs, controls,
                                           fdr=config.loo.fdr, seed=config.seed)
    extra = _extras(config, workdir, store, loo, expression, encoders[0])
    genes = store.genes
    ceilings = evaluation.noise_ceilings(plan, expression, store.obs, config.seed,
                                         evaluation.sampling_scale(store.manifest))
    neighbours = evaluation.neighbour_references(plan, expression, store.obs)
    depth_relations = evaluation.depth_relations(plan, expression, store.obs, fold_metrics)
    results = {
        "mode": "loo",
        "dataset": {**inputs.dataset, "store": store.path, "n_spots": store.n_spots, "n_genes": len(genes),
                    "patients": real_store.patients,
                    "synthetic": store.synthetic if inputs.dataset.get("synthetic") is None
                    else inputs.dataset["synthetic"]},
        "metric_notes": METRIC_NOTES,
        "folds": [{k: v for k, v in f.items() if k not in evaluation.PER_GENE_ARRAYS} for f in fold_metrics],
        "summary": evaluation.summarise(fold_metrics),
        "autoencoder": {name: {k: v for k, v in summ.items() if k != "curve"} for name, summ in ae_summaries.items()},
        "evaluated_on": config.loo.evaluate_on,
        "held_out_unit": ({"unit": "section", "patient_of_section": section_patients,
                           "note": "leave-one-section-out: each held-out section's patient has other sections in "
                                   "training; within-patient figures, not new-patient ones"}
                          if section_patients is not None else {"unit": "patient"}),
        "training": {"recipe": config.recipe, "loss": _loss_summary(config),
                     "output_base": output_base_summary(base_scale, loo["output_base"]),
                     "counting_blend": counting_blend_summary(blend_weights, loo["counting_blend"], random_blend),
                     "best_epoch": loo["best_epoch"],
                     "refit": loo["refit"], "live_units": loo["live_units"],
                     "inner_validation": (loo["inner_validation"] if section_patients is None else
                                          {k: v.replace(" by patients", " by whole sections")
                                           for k, v in loo["inner_validation"].items()}),
                     "inner_validation_score": loo["inner_validation_score"], "control_ridge_alpha": alphas,
                     "image_depth_read_r": depth_read,
                     "context": folds.context_summary(config, store.obs),
                     "smoothing": folds.smoothing_summary(
                         loo["smoothing"], store.obs,
                         {plan.name(f): plan.held_out_rows(f) for f in range(len(plan.folds))}, random_smoothing),
                     "augmentation": {"views": features.n_views(config), "stain_jitter": features.stain_jitter(config)}},
        "noise_ceiling": {k: evaluation.without_per_gene(v) for k, v in ceilings.items()},
        "neighbour_reference": {k: evaluation.without_per_gene(v) for k, v in neighbours.items()},
        "depth_relation": {k: evaluation.without_per_gene(v) for k, v in depth_relations.items()},
        **({"random_encoder_draws": evaluation.random_encoder_draws(fold_metrics, draw_seeds)} if draw_seeds else {}),
        "genes_beyond_depth": (evaluation.genes_beyond_depth(genes, fold_metrics, ceilings, neighbours,
                                                             config.loo.fdr)
                               if "library_size" in store.obs else None),
        "gene_selection": store.manifest.get("gene_selection", {}).get("pooled_over", "not recorded by the store"),
        **extra,
    }
    if jax.process_index() == 0:
        held_out_mean = {plan.name(f): expression[plan.held_out_rows(f)].astype(np.float64).mean(0)
                         for f in range(len(plan.folds))}
        _write_files(workdir, genes, loo, fold_metrics, controls,
                     per_gene_rows(genes, fold_metrics, held_out_mean, ceilings, neighbours, depth_relations))
        _write_h5ad(workdir, real_store, loo, expression, controls)
    return results, {"per_gene": [(f["held_out"], f["per_gene_r"]) for f in fold_metrics], "genes": genes}
