"""train_and_evaluate(config, workdir): autoencoder pretraining, then leave-one-patient-out regression.

Layout of a workdir:
  checkpoints/ae/            autoencoder train state + Grain iterator (Orbax)
  checkpoints/loo_<k>/       fold heads (all folds of one compiled program, stacked) + iterator
  cache/features-<key>/      frozen-encoder features (keyed by store and encoder weights)
  metrics.jsonl              every logged metric
  curves/*.csv, curves/*.png learning curves
  predictions.npz            held-out predictions of every fold (and of the controls)
  per_gene.csv               per-gene r of every fold
  results.json               the metric tables (see README)
Rerunning the same command with the same workdir resumes from the latest checkpoints.

Leave-one-patient-out, fold-parallel: every fold's head is trained in one compiled program (vmap over stacked
per-fold parameters). All folds read the same shuffled batch stream; fold k's loss and BatchNorm statistics
mask out patient k's spots, so a held-out spot contributes exactly nothing to fold k's training (tested by
perturbing held-out data). `loo.folds_per_program` < number of folds runs groups of folds one after another
on the same stream (same results, less memory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from histospace_jax import checkpointing, features, metrics, models, reporting, steps
from histospace_jax.data import demo, open_store, pipeline

AXIS = "batch"


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ data


def resolve_stores(config, workdir: str) -> tuple[str, str | None, dict]:
    """(regression store, autoencoder pretraining store or None, dataset description)."""
    d = config.data
    if d.store:
        ae_store = config.ae.store or None
        return d.store, ae_store, {"name": os.path.basename(os.path.normpath(d.store)), "synthetic": None}
    spec = demo.DemoSpec(
        n_patients=d.demo.n_patients, sections_per_patient=d.demo.sections_per_patient,
        grid=tuple(d.demo.grid), n_genes=d.demo.n_genes, n_pretrain_patients=d.demo.n_pretrain_patients,
        pretrain_grid=tuple(d.demo.pretrain_grid), noise_sd=d.demo.noise_sd, seed=d.demo.seed)
    root = d.demo_root or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                       "histospace_jax", "demo")
    log(f"Using the built-in SYNTHETIC demo data ({spec.key()}) under {root}")
    reg, pre = demo.build_demo(root, spec)
    return reg, (config.ae.store or pre), {"name": "demo (synthetic)", "synthetic": True}


def _model_kwargs(config) -> dict:
    m = config.model
    return dict(variant=m.variant, encoder_features=tuple(m.encoder_features))


def _replicated_step(fn, **kw):
    return steps.pmap_step(fn, axis_name=AXIS, **kw)


# ------------------------------------------------------------------------------------------------ autoencoder


def pretrain_autoencoder(config, workdir: str, store_path: str, writer: reporting.MetricWriter) -> dict:
    """Trains (or resumes, or loads) the autoencoder; returns {'variables': encoder vars, 'summary': ...}."""
    c = config.ae
    ae = models.Autoencoder(upconv_impl=config.model.upconv_impl, axis_name=AXIS, **_model_kwargs(config))
    ts_ = config.data.tile_size
    tx = steps.make_ae_optimizer(c.learning_rate, c.weight_decay)
    state = steps.create_train_state(ae, jax.random.PRNGKey(config.seed), jnp.zeros((1, ts_, ts_, 3)), tx)

    if c.checkpoint:
        ckpt = checkpointing.Checkpointer(c.checkpoint)
        restored, meta = ckpt.restore(None, checkpointing.state_dict(state))
        state = checkpointing.load_state_dict(state, restored)
        log(f"[ae] loaded autoencoder from {c.checkpoint} (step {int(state.step)})")
        return {"variables": _encoder_variables(state), "summary": {"loaded_from": c.checkpoint, **meta}}

    store = open_store(store_path)
    n = store.n_spots
    rng = np.random.default_rng(config.seed)
    perm = rng.permutation(n)
    n_val = int(round(c.val_fraction * n)) if n > 20 else 0
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    bs = c.batch_size
    n_dev = jax.local_device_count()
    steps_per_epoch = len(train_rows) // bs
    if steps_per_epoch == 0:
        raise ValueError(f"{store_path}: {len(train_rows)} training tiles is fewer than ae.batch_size={bs}")
    total = c.epochs * steps_per_epoch
    source = pipeline.ArraySource({"image": pipeline.LazyStoreColumn(store_path, "tiles")}, train_rows)
    loader = pipeline.train_loader(source, global_batch_size=bs, seed=config.seed, num_epochs=c.epochs,
                                   worker_count=config.data.worker_count)
    it = iter(loader)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints", "ae"), config.checkpoint.max_to_keep)
    curve: list[dict] = []
    start = 0
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(None, checkpointing.state_dict(state), data_iterator=it)
        state = checkpointing.load_state_dict(state, restored)
        curve = meta.get("curve", [])
        start = int(state.step)
        log(f"[ae] resumed from step {start}/{total}")
    train_step = _replicated_step(steps.ae_train_step)
    eval_step = _replicated_step(steps.ae_eval_step, donate_state=False)
    rstate = steps.replicate(state)
    progress = reporting.Progress("ae", total, bs, start)
    run_sum, run_n = 0.0, 0
    for step in range(start + 1, total + 1):
        batch = steps.shard_batch(next(it), n_dev)
        rstate, m = train_step(rstate, {"image": batch["image"]})
        run_sum += float(m["loss"][0])
        run_n += 1
        if step % config.log_every_steps == 0 or step == total:
            log(progress.line(step, loss=run_sum / run_n))
            writer.write("ae_train", step, mse=run_sum / run_n)
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            val = _ae_mse(eval_step, rstate, store_path, val_rows, config) if n_val else float("nan")
            curve.append({"epoch": epoch, "train_mse": run_sum / max(run_n, 1), "val_mse": val})
            writer.write("ae_epoch", step, epoch=epoch, train_mse=run_sum / max(run_n, 1), val_mse=val)
            log(f"[ae] epoch {epoch}/{c.epochs} train_mse={run_sum / max(run_n, 1):.5f} val_mse={val:.5f}")
            run_sum, run_n = 0.0, 0
        if step % config.checkpoint.every_steps == 0 or step % steps_per_epoch == 0:
            ckpt.save(step, checkpointing.state_dict(steps.unreplicate(rstate)), data_iterator=it,
                      meta={"curve": curve, "total_steps": total})
    state = steps.unreplicate(rstate)
    ckpt.close()
    summary = {"store": store_path, "variant": config.model.variant, "epochs": c.epochs, "steps": total,
               "n_train_tiles": int(len(train_rows)), "n_val_tiles": int(n_val),
               "final_train_mse": curve[-1]["train_mse"] if curve else None,
               "final_val_mse": curve[-1]["val_mse"] if curve else None, "curve": curve}
    if curve and jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "curves"), exist_ok=True)
        reporting.write_csv_atomic(os.path.join(workdir, "curves", "ae.csv"), curve)
        ep = [r["epoch"] for r in curve]
        reporting.plot_curves(os.path.join(workdir, "curves", "ae.png"),
                              {"train MSE": (ep, [r["train_mse"] for r in curve]),
                               "validation MSE": (ep, [r["val_mse"] for r in curve])},
                              title=f"Autoencoder ({config.model.variant})", xlabel="epoch", ylabel="MSE",
                              logy=True)
    return {"variables": _encoder_variables(state), "summary": summary, "state": state}


def _ae_mse(eval_step, rstate, store_path, rows, config) -> float:
    n_dev = jax.local_device_count()
    source = pipeline.ArraySource({"image": pipeline.LazyStoreColumn(store_path, "tiles")}, rows)
    sse = count = 0.0
    for batch in pipeline.ordered_batches(source, config.eval_batch_size, pad_to_multiple=n_dev):
        out = eval_step(rstate, steps.shard_batch({"image": batch["image"], "mask": batch["mask"]}, n_dev))
        sse += float(out["sse"][0])
        count += float(out["count"][0])
    return sse / max(count, 1.0)


def _encoder_variables(ae_state) -> dict:
    v = {"params": ae_state.params["encoder"]}
    if ae_state.batch_stats:
        v["batch_stats"] = ae_state.batch_stats["encoder"]
    return jax.tree_util.tree_map(np.asarray, v)


def random_encoder_variables(config, seed: int) -> dict:
    """An untrained encoder (the control that shows what pretraining buys)."""
    enc = models.Encoder(**_model_kwargs(config))
    ts_ = config.data.tile_size
    v = enc.init(jax.random.PRNGKey(seed), jnp.zeros((1, ts_, ts_, 3)))
    return jax.tree_util.tree_map(np.asarray, dict(v))


# ------------------------------------------------------------------------------------------------ LOO


@dataclasses.dataclass
class FoldPlan:
    patients: list[str]          # all patients in the store
    spot_patient: np.ndarray     # [N] index into patients
    folds: list[int]             # patient indices held out, one per fold


def plan_folds(store, only: str = "") -> FoldPlan:
    patients, pidx = pipeline.patient_indices(store)
    if len(patients) < 2:
        raise ValueError(f"{store.path}: leave-one-patient-out needs >= 2 patients, found {patients}")
    wanted = [p for p in only.split(",") if p] if only else patients
    unknown = [p for p in wanted if p not in patients]
    if unknown:
        raise ValueError(f"loo.patients names {unknown}, not in {store.path} (patients: {patients})")
    return FoldPlan(patients, pidx, [patients.index(p) for p in wanted])


def make_fold_train_step(huber_delta: float):
    """pmap(vmap over folds) of regression_train_step; fold k masks out its held-out patient's rows."""

    def step(states, batch, fold_patients):
        def one(state, held_out):
            b = {k: v for k, v in batch.items() if k in ("features", "image", "expression")}
            b["mask"] = batch["patient_idx"] != held_out
            return steps.regression_train_step(state, b, huber_delta=huber_delta, axis_name=AXIS)

        return jax.vmap(one)(states, fold_patients)

    return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


def make_fold_predict():
    def predict(states, batch):
        b = {k: v for k, v in batch.items() if k in ("features", "image")}
        return jax.vmap(lambda s: steps.predict_step(s, b))(states)

    return jax.pmap(predict, axis_name=AXIS)


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _head_model(config, n_genes: int) -> models.HistoSpace:
    m = config.model
    return models.HistoSpace(n_genes=n_genes, conv_features=tuple(m.head_conv_features),
                             fc_features=tuple(m.head_fc_features), dropout_rate=m.dropout_rate,
                             axis_name=AXIS, **_model_kwargs(config))


def train_folds(config, workdir: str, *, columns: dict, expression: np.ndarray, plan: FoldPlan,
                encoder_variables: dict, fold_group: list[int], tag: str, writer) -> dict:
    """Trains the heads of `fold_group` (fold numbers) in one program; returns held-out and untrained preds."""
    c = config.train
    n, g = expression.shape
    model = _head_model(config, g)
    tx = steps.make_regression_optimizer(c.learning_rate, c.weight_decay)
    held = np.array([plan.folds[f] for f in fold_group], np.int32)
    init_states = [steps.create_regression_state(model, jax.random.PRNGKey(config.seed * 1000 + int(f) + 1),
                                                 encoder_variables, tx, config.data.tile_size)
                   for f in fold_group]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *init_states)
    n_dev = jax.local_device_count()
    bs = c.batch_size
    steps_per_epoch = n // bs
    if steps_per_epoch == 0:
        raise ValueError(f"{n} spots is fewer than train.batch_size={bs}")
    total = c.epochs * steps_per_epoch
    source = pipeline.ArraySource(columns, patient_idx=plan.spot_patient)
    predict = make_fold_predict()

    def predict_all(rstates):
        preds = np.zeros((len(fold_group), n, g), np.float32)
        for batch in pipeline.ordered_batches(source, config.eval_batch_size, pad_to_multiple=n_dev):
            b = {k: v for k, v in batch.items() if k in ("features", "image")}
            out = np.asarray(predict(rstates, steps.shard_batch(b, n_dev)))  # [D, F, b, G]
            out = out.transpose(1, 0, 2, 3).reshape(len(fold_group), -1, g)
            real = batch["mask"] > 0
            preds[:, batch["index"][real]] = out[:, real]
        return preds

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints", f"loo_{tag}"),
                                      config.checkpoint.max_to_keep)
    loader = pipeline.train_loader(source, global_batch_size=bs, seed=config.seed + 1, num_epochs=c.epochs,
                                   worker_count=config.data.worker_count)
    it = iter(loader)
    rstates = steps.replicate(stacked)
    untrained = predict_all(rstates)
    curve: list[dict] = []
    start = 0
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(None, checkpointing.state_dict(_stack_host(stacked)), data_iterator=it)
        host = checkpointing.load_state_dict(_stack_host(stacked), restored)
        rstates = steps.replicate(host)
        curve = meta.get("curve", [])
        start = int(meta.get("step", 0))
        log(f"[loo {tag}] resumed from step {start}/{total}")
    train_step = make_fold_train_step(c.huber_delta)
    progress = reporting.Progress(f"loo {tag}", total, bs, start)
    run = np.zeros(len(fold_group))
    run_n = 0
    for step in range(start + 1, total + 1):
        batch = next(it)
        b = {k: batch[k] for k in columns}
        b["patient_idx"] = batch["patient_idx"]
        rstates, m = train_step(rstates, steps.shard_batch(b, n_dev), held)
        run += np.asarray(m["loss"][0])
        run_n += 1
        if step % config.log_every_steps == 0 or step == total:
            log(progress.line(step, huber=float(run.mean() / run_n)))
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            for k, f in enumerate(fold_group):
                curve.append({"epoch": epoch, "fold": plan.patients[plan.folds[f]], "train_huber": run[k] / run_n})
                writer.write("loo_epoch", step, epoch=epoch, fold=plan.patients[plan.folds[f]],
                             train_huber=run[k] / run_n)
            run[:] = 0
            run_n = 0
        if step % config.checkpoint.every_steps == 0 or step % steps_per_epoch == 0:
            ckpt.save(step, checkpointing.state_dict(steps.unreplicate(rstates)), data_iterator=it,
                      meta={"curve": curve, "step": step, "total_steps": total})
    ckpt.close()
    return {"preds": predict_all(rstates), "untrained": untrained, "curve": curve}


def _stack_host(stacked):
    return jax.tree_util.tree_map(np.asarray, stacked)


def run_loo(config, workdir: str, store, encoder_variables: dict, writer, *, tag: str = "main") -> dict:
    """Leave-one-patient-out over the store; returns per-fold predictions and controls."""
    plan = plan_folds(store, config.loo.patients)
    expression = np.asarray(store.expression, np.float32)
    if config.loo.feature_cache:
        feats, path = features.cached_features(os.path.join(workdir, "cache"), store, encoder_variables,
                                               variant=config.model.variant,
                                               encoder_features=tuple(config.model.encoder_features),
                                               batch_size=config.eval_batch_size, log=log)
        columns = {"features": feats, "expression": expression}
    else:
        columns = {"image": pipeline.LazyStoreColumn(store.path, "tiles"), "expression": expression}
    per_program = config.loo.folds_per_program or len(plan.folds)
    groups = [list(range(i, min(i + per_program, len(plan.folds)))) for i in range(0, len(plan.folds), per_program)]
    out = {"plan": plan, "preds": {}, "untrained": {}, "curve": []}
    for gi, group in enumerate(groups):
        res = train_folds(config, workdir, columns=columns, expression=expression, plan=plan,
                          encoder_variables=encoder_variables, fold_group=group,
                          tag=f"{tag}_{gi}" if len(groups) > 1 else tag, writer=writer)
        for k, f in enumerate(group):
            rows = np.flatnonzero(plan.spot_patient == plan.folds[f])
            out["preds"][f] = res["preds"][k, rows]
            out["untrained"][f] = res["untrained"][k, rows]
        out["curve"].extend(res["curve"])
    return out


# ------------------------------------------------------------------------------------------------ results


def fold_results(store, loo: dict, expression: np.ndarray, extra_controls: dict | None = None) -> list[dict]:
    plan: FoldPlan = loo["plan"]
    out = []
    for f, p in enumerate(plan.folds):
        rows = np.flatnonzero(plan.spot_patient == p)
        train_rows = np.flatnonzero(plan.spot_patient != p)
        truth = expression[rows]
        model = metrics.regression_metrics(truth, loo["preds"][f])
        baseline = metrics.regression_metrics(truth, metrics.mean_profile_prediction(expression[train_rows],
                                                                                     len(rows)))
        controls = {"mean_predictor": baseline,
                    "untrained_head": metrics.regression_metrics(truth, loo["untrained"][f])}
        for name, ctrl in (extra_controls or {}).items():
            controls[name] = metrics.regression_metrics(truth, ctrl["preds"][f])
        out.append({"held_out": plan.patients[p], "n_spots": int(len(rows)), **model,
                    "baseline": {"per_spot_pearson": baseline["per_spot_pearson"], "mse": baseline["mse"]},
                    "controls": controls,
                    "per_gene_r": metrics.pearson_per_gene(truth, loo["preds"][f])})
    return out


def summarise(folds: list[dict]) -> dict:
    """Means over folds (each held-out patient weighs the same)."""
    def mean(get):
        return metrics.nanmean_or_nan([get(f) for f in folds])

    summary = {k: mean(lambda f, k=k: f[k]) for k in
               ("per_gene_pearson", "per_gene_pearson_median", "per_spot_pearson", "mse")}
    summary["baseline_per_spot_pearson"] = mean(lambda f: f["baseline"]["per_spot_pearson"])
    summary["baseline_mse"] = mean(lambda f: f["baseline"]["mse"])
    summary["controls"] = {name: {k: mean(lambda f, k=k, name=name: f["controls"][name][k])
                                  for k in ("per_gene_pearson", "per_spot_pearson", "mse")}
                           for name in folds[0]["controls"]}
    return summary


def write_loo_outputs(config, workdir: str, store, dataset: dict, loo: dict, folds: list[dict],
                      ae_summary: dict, elapsed: float) -> dict:
    summary = summarise(folds)
    genes = store.genes
    results = {
        "dataset": {**dataset, "store": store.path, "n_spots": store.n_spots, "n_genes": len(genes),
                    "patients": loo["plan"].patients,
                    "synthetic": store.synthetic if dataset.get("synthetic") is None else dataset["synthetic"]},
        "metric_notes": {
            "per_gene_pearson": "r across the held-out patient's spots for each gene, mean over genes; genes "
                                "constant in truth or prediction are excluded (count in n_genes_undefined_r)",
            "per_spot_pearson": "the HistoSPACE paper's metric: r across genes within a spot, mean over spots; "
                                "compare with baseline (training-mean profile for every spot)",
            "summary": "unweighted mean over folds",
        },
        "folds": [{k: v for k, v in f.items() if k != "per_gene_r"} for f in folds],
        "summary": summary,
        "autoencoder": {k: v for k, v in ae_summary.items() if k != "curve"},
        "config": config.to_dict(),
        "elapsed_s": round(elapsed, 1),
    }
    if jax.process_index() != 0:
        return results
    checkpointing.write_json_atomic(os.path.join(workdir, "results.json"), results)
    reporting.write_csv_atomic(
        os.path.join(workdir, "per_gene.csv"),
        [{"fold": f["held_out"], "gene": gname, "pearson_r": float(r)}
         for f in folds for gname, r in zip(genes, f["per_gene_r"])])
    plan = loo["plan"]
    arrays = {}
    for k, p in enumerate(plan.folds):
        arrays[f"rows_{plan.patients[p]}"] = np.flatnonzero(plan.spot_patient == p)
        arrays[f"pred_{plan.patients[p]}"] = loo["preds"][k]
    checkpointing.save_npz_atomic(os.path.join(workdir, "predictions.npz"), genes=np.array(genes), **arrays)
    if loo["curve"]:
        reporting.write_csv_atomic(os.path.join(workdir, "curves", "loo.csv"), loo["curve"])
        series = {}
        for r in loo["curve"]:
            xs, ys = series.setdefault(f"held out {r['fold']}", ([], []))
            xs.append(r["epoch"])
            ys.append(r["train_huber"])
        reporting.plot_curves(os.path.join(workdir, "curves", "loo.png"), series,
                              title="Regression head: training Huber loss per fold", xlabel="epoch",
                              ylabel="Huber loss", logy=True)
    return results


def summary_table(results: dict) -> str:
    rows = []
    for f in results["folds"]:
        rows.append([f["held_out"], f["n_spots"], f["per_gene_pearson"], f["per_spot_pearson"], f["mse"],
                     f["baseline"]["per_spot_pearson"], f["baseline"]["mse"],
                     f["controls"]["untrained_head"]["per_gene_pearson"]])
    s = results["summary"]
    rows.append(["MEAN", sum(f["n_spots"] for f in results["folds"]), s["per_gene_pearson"],
                 s["per_spot_pearson"], s["mse"], s["baseline_per_spot_pearson"], s["baseline_mse"],
                 s["controls"]["untrained_head"]["per_gene_pearson"]])
    header = ["held out", "spots", "gene r", "spot r", "MSE", "base spot r", "base MSE", "untrained gene r"]
    title = f"Leave-one-patient-out on {results['dataset']['name']}"
    if results["dataset"].get("synthetic"):
        title += "  [SYNTHETIC DATA]"
    return title + "\n" + reporting.format_table(rows, header)


# ------------------------------------------------------------------------------------------------ entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    writer = reporting.MetricWriter(os.path.join(workdir, "metrics.jsonl"), enabled=jax.process_index() == 0)
    log(f"histospace_jax: mode={config.mode} workdir={workdir} devices={jax.local_device_count()} "
        f"({jax.devices()[0].platform}) processes={jax.process_count()}")
    store_path, ae_store, dataset = resolve_stores(config, workdir)
    if config.mode == "pretrain_ae":
        ae = pretrain_autoencoder(config, workdir, ae_store or store_path, writer)
        results = {"dataset": dataset, "autoencoder": ae["summary"], "config": config.to_dict(),
                   "elapsed_s": round(time.time() - t0, 1)}
        if jax.process_index() == 0:
            checkpointing.write_json_atomic(os.path.join(workdir, "results.json"), results)
        return results
    if config.mode != "loo":
        raise ValueError(f"unknown mode {config.mode!r}; use 'loo' or 'pretrain_ae'")
    store = open_store(store_path)
    if not store.genes:
        raise ValueError(f"{store_path}: has no expression (image-only store); LOO needs a spot store")
    if ae_store is None and not config.ae.checkpoint:
        log("WARNING: no ae.store or ae.checkpoint given: pretraining the autoencoder on this store's tiles "
            "(unsupervised, no expression; held-out patients' images included)")
    ae = pretrain_autoencoder(config, workdir, ae_store or store_path, writer)
    loo = run_loo(config, workdir, store, ae["variables"], writer)
    expression = np.asarray(store.expression, np.float32)
    folds = fold_results(store, loo, expression)
    results = write_loo_outputs(config, workdir, store, dataset, loo, folds, ae["summary"], time.time() - t0)
    log(summary_table(results))
    log(f"results: {os.path.join(workdir, 'results.json')} ({time.time() - t0:.0f} s)")
    return results
