"""Mode loo: leave-one-patient-out with controls (the paper's protocol).

Layout of a workdir:
  checkpoints/ae/            autoencoder train state + Grain iterator (Orbax)
  checkpoints/loo_<tag>/     fold heads (all folds of one compiled program, stacked) + iterator
  cache/features-<key>/      frozen-encoder features (keyed by store and encoder weights)
  metrics.jsonl              every logged metric
  curves/*.csv, curves/*.png learning curves
  predictions.npz            held-out predictions of every fold (and of the controls)
  per_gene.csv               per-gene r of every fold
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
                            features, folds, metrics, plots)
from histospace_jax.data import open_store, pipeline
from histospace_jax.errors import BadInputError
from histospace_jax.model_export import dir_bytes

METRIC_NOTES = {
    "per_gene_pearson": "r across the held-out patient's spots for each gene, mean over genes; genes "
                        "constant in truth or prediction are excluded (count in n_genes_undefined_r)",
    "n_genes_significant": "genes with r > 0 significant at FDR fdr: one-sided t-test of H0 rho = 0 "
                           "(n - 2 df), Benjamini-Hochberg over the genes with a defined r",
    "per_spot_pearson": "the HistoSPACE paper's metric: r across genes within a spot, mean over spots; "
                        "compare with controls.mean_predictor (training-mean profile for every spot)",
    "controls": "mean_predictor: training patients' mean profile for every spot (image-blind; per-gene r "
                "undefined). untrained_head: the head at initialisation. random_encoder: the same head "
                "trained on features of a randomly initialised, untrained encoder (what pretraining buys)",
    "summary": "unweighted mean over folds",
}


def train_all_folds(config, workdir: str, store, encoder_variables: dict, writer, *, tag: str = "main") -> dict:
    """Leave-one-patient-out over the store; returns the plan and per-fold held-out predictions (trained and
    untrained) and the loss curve."""
    plan = folds.plan_leave_one_patient_out(store, config.loo.patients)
    expression = np.asarray(store.expression, np.float32)
    if config.loo.feature_cache:
        feats = features.for_config(config, workdir, store, encoder_variables)
        columns = {"features": feats, "expression": expression}
    else:
        columns = {"image": pipeline.LazyStoreColumn(store.path, "tiles"), "expression": expression}
    per_program = config.loo.folds_per_program or len(plan.folds)
    groups = [list(range(i, min(i + per_program, len(plan.folds)))) for i in range(0, len(plan.folds), per_program)]
    out = {"plan": plan, "preds": {}, "untrained": {}, "curve": []}
    for gi, group in enumerate(groups):
        res = folds.train_heads(config, workdir, columns=columns, expression=expression, plan=plan,
                                encoder_variables=encoder_variables, fold_group=group,
                                tag=f"loo_{tag}_{gi}" if len(groups) > 1 else f"loo_{tag}", writer=writer)
        for k, f in enumerate(group):
            rows = plan.held_out_rows(f)
            out["preds"][f] = res["preds"][k, rows]
            out["untrained"][f] = res["untrained"][k, rows]
        out["curve"].extend(res["curve"])
    return out


def _write_files(workdir: str, genes, loo: dict, fold_metrics: list[dict], extra_controls: dict) -> None:
    atomic.write_csv(
        os.path.join(workdir, "per_gene.csv"),
        [{"fold": f["held_out"], "gene": gname, "pearson_r": float(r),
          **{f"{c}_r": float(f["per_gene_r_controls"][c][i]) for c in f["per_gene_r_controls"]}}
         for f in fold_metrics for i, (gname, r) in enumerate(zip(genes, f["per_gene_r"]))])
    plan = loo["plan"]
    arrays = {}
    for k in range(len(plan.folds)):
        name = plan.name(k)
        arrays[f"rows_{name}"] = plan.held_out_rows(k)
        arrays[f"pred_{name}"] = loo["preds"][k]
        for cname, ctrl in extra_controls.items():
            arrays[f"{cname}_{name}"] = ctrl["preds"][k]
    atomic.write_npz(os.path.join(workdir, "predictions.npz"), genes=np.array(genes), **arrays)
    if loo["curve"]:
        atomic.write_csv(os.path.join(workdir, "curves", "loo.csv"), loo["curve"])
        series = {}
        for r in loo["curve"]:
            xs, ys = series.setdefault(f"held out {r['fold']}", ([], []))
            xs.append(r["epoch"])
            ys.append(r["train_huber"])
        plots.plot_curves(os.path.join(workdir, "curves", "loo.png"), series,
                          title="Regression head: training Huber loss per fold", xlabel="epoch", ylabel="Huber loss",
                          logy=True)


def _extras(config, workdir: str, store, loo: dict, expression: np.ndarray, ae: dict) -> dict:
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
                                truth[:, gi], pred[:, gi], title="Leave-one-patient-out: held-out predictions")
        figures["spatial_maps"] = "figures/loo_spatial_maps.png"
    t = config.data.tile_size
    hv = builders.histospace(config, len(store.genes)).init(jax.random.PRNGKey(0), jnp.zeros((1, t, t, 3)))
    ckpt_dir = os.path.join(workdir, "checkpoints", "loo_main")
    extra["model"] = {"encoder_params": builders.count_params(ae["variables"]["params"]),
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
    if inputs.ae_store is None and not config.ae.checkpoint:
        console.log("WARNING: no ae.store or ae.checkpoint given: pretraining the autoencoder on this store's tiles "
                    "(unsupervised, no expression; held-out patients' images included)")
    ae = autoencoder.pretrain(config, workdir, inputs.ae_store or inputs.store, inputs.writer)
    loo = train_all_folds(config, workdir, store, ae["variables"], inputs.writer)
    extra_controls = {}
    if config_lib.random_encoder_control_on(config):
        console.log("[loo] control: the same heads on a randomly initialised (untrained) encoder")
        extra_controls["random_encoder"] = train_all_folds(
            config, workdir, store, builders.random_encoder_variables(config, config.loo.random_encoder_seed),
            inputs.writer, tag="random_encoder")
    expression = np.asarray(store.expression, np.float32)
    fold_metrics = evaluation.fold_results(loo["plan"], loo["preds"], loo["untrained"], expression,
                                           {k: v["preds"] for k, v in extra_controls.items()}, fdr=config.loo.fdr)
    extra = _extras(config, workdir, store, loo, expression, ae)
    genes = store.genes
    results = {
        "mode": "loo",
        "dataset": {**inputs.dataset, "store": store.path, "n_spots": store.n_spots, "n_genes": len(genes),
                    "patients": loo["plan"].patients,
                    "synthetic": store.synthetic if inputs.dataset.get("synthetic") is None
                    else inputs.dataset["synthetic"]},
        "metric_notes": METRIC_NOTES,
        "folds": [{k: v for k, v in f.items() if k not in ("per_gene_r", "per_gene_r_controls")}
                  for f in fold_metrics],
        "summary": evaluation.summarise(fold_metrics),
        "autoencoder": {k: v for k, v in ae["summary"].items() if k != "curve"},
        **extra,
    }
    if jax.process_index() == 0:
        _write_files(workdir, genes, loo, fold_metrics, extra_controls)
    return results, {"per_gene": [(f["held_out"], f["per_gene_r"]) for f in fold_metrics], "genes": genes}
