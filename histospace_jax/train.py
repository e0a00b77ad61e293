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
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from histospace_jax import checkpointing, features, guards, metrics, models, reporting, steps
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


DEMO_HEAD_EPOCHS = 3  # keeps the README demo within ~10 minutes on a 2-core CPU
REAL_HEAD_EPOCHS = 10


def apply_schedule_defaults(config) -> None:
    """Resolves train.epochs = 0 ("auto"): REAL_HEAD_EPOCHS on a user's store, DEMO_HEAD_EPOCHS on the demo."""
    if config.train.epochs <= 0:
        demo = not config.data.store
        config.train.epochs = DEMO_HEAD_EPOCHS if demo else REAL_HEAD_EPOCHS
        log(f"train.epochs=auto -> {config.train.epochs} ({'synthetic demo' if demo else 'real store'}); "
            "set --config.train.epochs=N to choose")


def random_encoder_control_on(config) -> bool:
    value = config.loo.random_encoder_control
    if isinstance(value, bool):
        return value
    value = str(value).lower()
    if value == "auto":
        return bool(config.data.store)
    if value in ("on", "off"):
        return value == "on"
    raise ValueError(f"loo.random_encoder_control={value!r}: use 'on', 'off' or 'auto'")


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
    # Settings the checkpoint depends on; resuming under different ones raises guards.ConfigMismatchError.
    compat = guards.compat_signature(config, guards.AE_KEYS, n_train_rows=int(len(train_rows)))
    curve: list[dict] = []
    start = 0
    run_sum, run_n = 0.0, 0
    if ckpt.latest_step() is not None:
        guards.check_compatible(ckpt.directory, ckpt.latest_step(), compat)
        restored, meta = ckpt.restore(None, checkpointing.state_dict(state), data_iterator=it)
        guards.check_restored_like(restored, checkpointing.state_dict(state), ckpt.directory, ckpt.latest_step())
        state = checkpointing.load_state_dict(state, restored)
        curve = meta.get("curve", [])
        # The running mean since the last epoch boundary, so the resumed curve equals the uninterrupted one.
        run_sum, run_n = float(meta.get("run_sum", 0.0)), int(meta.get("run_n", 0))
        start = int(state.step)
        log(f"[ae] resumed from step {start}/{total}")
    train_step = _replicated_step(steps.ae_train_step)
    eval_step = _replicated_step(steps.ae_eval_step, donate_state=False)
    rstate = steps.replicate(state)
    progress = reporting.Progress("ae", total, bs, start)

    def save(step):
        host = checkpointing.state_dict(steps.unreplicate(rstate))
        guards.check_finite_state(host, phase="ae", step=step, checkpointer=ckpt)
        ckpt.save(step, host, data_iterator=it,
                  meta={"curve": curve, "total_steps": total, "run_sum": run_sum, "run_n": run_n,
                        "compat": compat})

    for step in range(start + 1, total + 1):
        raw = next(it)
        batch = steps.shard_batch(raw, n_dev)
        rstate, m = train_step(rstate, {"image": batch["image"]})
        loss = guards.inject_nan("ae_nan", float(m["loss"][0]), step)
        guards.check_finite_loss(loss, phase="ae", step=step, batch_rows=raw["index"], store=store_path,
                                 checkpointer=ckpt, fix=f"ae.learning_rate={c.learning_rate}")
        guards.fault("ae_step", step)
        run_sum += loss
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
        saved = step % config.checkpoint.every_steps == 0 or step % steps_per_epoch == 0
        if saved:
            save(step)
        guards.fault("ae_saved", step)
        guards.fault("ae_sigterm", step)
        if guards.stop_requested(step, ckpt):
            if not saved:
                save(step)
            ckpt.close()
            raise guards.Preempted("autoencoder pretraining", step, ckpt.directory)
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
    enc = models.Encoder(config.model.variant, tuple(config.model.encoder_features))
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
    run = np.zeros(len(fold_group))
    run_n = 0
    held_names = [plan.patients[p] for p in held]
    # Settings the checkpoint depends on; resuming under different ones raises guards.ConfigMismatchError.
    compat = guards.compat_signature(config, guards.HEAD_KEYS, n_rows=int(n), n_genes=int(g), held_out=held_names,
                                     encoder=guards.tree_digest(encoder_variables))
    if ckpt.latest_step() is not None:
        guards.check_compatible(ckpt.directory, ckpt.latest_step(), compat)
        restored, meta = ckpt.restore(None, checkpointing.state_dict(_stack_host(stacked)), data_iterator=it)
        guards.check_restored_like(restored, checkpointing.state_dict(_stack_host(stacked)), ckpt.directory,
                                   ckpt.latest_step())
        host = checkpointing.load_state_dict(_stack_host(stacked), restored)
        rstates = steps.replicate(host)
        curve = meta.get("curve", [])
        start = int(meta.get("step", 0))
        # Running loss sums since the last epoch boundary, so the resumed curve equals the uninterrupted one.
        if "run" in meta:
            run, run_n = np.asarray(meta["run"], np.float64), int(meta["run_n"])
        log(f"[loo {tag}] resumed from step {start}/{total}")
    train_step = make_fold_train_step(c.huber_delta)
    progress = reporting.Progress(f"loo {tag}", total, bs, start)

    def save(step):
        host = checkpointing.state_dict(steps.unreplicate(rstates))
        guards.check_finite_state(host, phase=f"loo {tag}", step=step, checkpointer=ckpt)
        ckpt.save(step, host, data_iterator=it,
                  meta={"curve": curve, "step": step, "total_steps": total, "run": [float(x) for x in run],
                        "run_n": run_n, "compat": compat})

    for step in range(start + 1, total + 1):
        batch = next(it)
        b = {k: batch[k] for k in columns}
        b["patient_idx"] = batch["patient_idx"]
        rstates, m = train_step(rstates, steps.shard_batch(b, n_dev), held)
        loss = guards.inject_nan("loo_nan", np.asarray(m["loss"][0], np.float64), step, f"{tag}/{step}")
        guards.check_finite_loss(loss, phase=f"loo {tag}", step=step, batch_rows=batch["index"],
                                 store=_columns_source(columns), checkpointer=ckpt, labels=held_names,
                                 fix=f"train.learning_rate={c.learning_rate}")
        guards.fault("loo_step", step, f"{tag}/{step}")
        run += loss
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
        saved = step % config.checkpoint.every_steps == 0 or step % steps_per_epoch == 0
        if saved:
            save(step)
        guards.fault("loo_saved", step, f"{tag}/{step}")
        guards.fault("loo_sigterm", step, f"{tag}/{step}")
        if guards.stop_requested(step, ckpt):
            if not saved:
                save(step)
            ckpt.close()
            raise guards.Preempted(f"leave-one-patient-out training ({tag})", step, ckpt.directory)
    ckpt.close()
    out = {"preds": predict_all(rstates), "untrained": untrained, "curve": curve}
    guards.fault("after_fold_group", tag)
    return out


def _stack_host(stacked):
    return jax.tree_util.tree_map(np.asarray, stacked)


def _columns_source(columns: dict) -> str:
    """Where a batch's rows come from, for error messages."""
    for col in columns.values():
        if isinstance(col, pipeline.LazyStoreColumn):
            return f"the store {col.store_path}"
    return "the training store (row = store row; features from the cache)"


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


def fold_results(store, loo: dict, expression: np.ndarray, extra_controls: dict | None = None,
                 fdr: float = 0.05) -> list[dict]:
    """Per fold: the model's metrics and every control's (mean-profile predictor, untrained head, and each of
    `extra_controls`, e.g. the random-encoder run), each with the FDR significance count."""
    plan: FoldPlan = loo["plan"]
    out = []
    for f, p in enumerate(plan.folds):
        rows = np.flatnonzero(plan.spot_patient == p)
        train_rows = np.flatnonzero(plan.spot_patient != p)
        truth = expression[rows]
        model = metrics.full_regression_metrics(truth, loo["preds"][f], fdr)
        baseline = metrics.full_regression_metrics(
            truth, metrics.mean_profile_prediction(expression[train_rows], len(rows)), fdr)
        controls = {"mean_predictor": baseline,
                    "untrained_head": metrics.full_regression_metrics(truth, loo["untrained"][f], fdr)}
        control_r = {}
        for name, ctrl in (extra_controls or {}).items():
            controls[name] = metrics.full_regression_metrics(truth, ctrl["preds"][f], fdr)
            control_r[name] = metrics.pearson_per_gene(truth, ctrl["preds"][f])
        out.append({"held_out": plan.patients[p], "n_spots": int(len(rows)), **model,
                    "baseline": {"per_spot_pearson": baseline["per_spot_pearson"], "mse": baseline["mse"]},
                    "controls": controls,
                    "per_gene_r": metrics.pearson_per_gene(truth, loo["preds"][f]),
                    "per_gene_r_controls": control_r})
    return out


SUMMARY_KEYS = ("per_gene_pearson", "per_gene_pearson_median", "n_genes_significant", "per_spot_pearson", "mse")


def summarise(folds: list[dict]) -> dict:
    """Means over folds (each held-out patient weighs the same)."""
    def mean(get):
        return metrics.nanmean_or_nan([get(f) for f in folds])

    summary = {k: mean(lambda f, k=k: f[k]) for k in SUMMARY_KEYS}
    summary["baseline_per_spot_pearson"] = mean(lambda f: f["baseline"]["per_spot_pearson"])
    summary["baseline_mse"] = mean(lambda f: f["baseline"]["mse"])
    summary["controls"] = {name: {k: mean(lambda f, k=k, name=name: f["controls"][name].get(k, float("nan")))
                                  for k in SUMMARY_KEYS}
                           for name in folds[0]["controls"]}
    return summary


def write_loo_outputs(config, workdir: str, store, dataset: dict, loo: dict, folds: list[dict],
                      ae_summary: dict, elapsed: float, *, extra_controls: dict | None = None,
                      extra: dict | None = None) -> dict:
    summary = summarise(folds)
    genes = store.genes
    results = {
        "mode": "loo",
        "dataset": {**dataset, "store": store.path, "n_spots": store.n_spots, "n_genes": len(genes),
                    "patients": loo["plan"].patients,
                    "synthetic": store.synthetic if dataset.get("synthetic") is None else dataset["synthetic"]},
        "metric_notes": {
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
        },
        "folds": [{k: v for k, v in f.items() if k not in ("per_gene_r", "per_gene_r_controls")} for f in folds],
        "summary": summary,
        "autoencoder": {k: v for k, v in ae_summary.items() if k != "curve"},
        **(extra or {}),
        "config": config.to_dict(),
        "elapsed_s": round(elapsed, 1),
    }
    if jax.process_index() != 0:
        return results
    checkpointing.write_json_atomic(os.path.join(workdir, "results.json"), results)
    reporting.write_csv_atomic(
        os.path.join(workdir, "per_gene.csv"),
        [{"fold": f["held_out"], "gene": gname, "pearson_r": float(r),
          **{f"{c}_r": float(f["per_gene_r_controls"][c][i]) for c in f["per_gene_r_controls"]}}
         for f in folds for i, (gname, r) in enumerate(zip(genes, f["per_gene_r"]))])
    plan = loo["plan"]
    arrays = {}
    for k, p in enumerate(plan.folds):
        arrays[f"rows_{plan.patients[p]}"] = np.flatnonzero(plan.spot_patient == p)
        arrays[f"pred_{plan.patients[p]}"] = loo["preds"][k]
        for name, ctrl in (extra_controls or {}).items():
            arrays[f"{name}_{plan.patients[p]}"] = ctrl["preds"][k]
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
    """Model and controls side by side: per fold and the mean over folds."""
    header = ["held out", "predictor", "spots", "gene r", "gene r med", "sig genes", "spot r", "MSE"]
    rows = []
    entries = [(f["held_out"], f["n_spots"], f) for f in results["folds"]]
    entries.append(("MEAN", sum(f["n_spots"] for f in results["folds"]), results["summary"]))
    for name, n, block in entries:
        for pred_name, m in [("model", block)] + list(block["controls"].items()):
            sig = m.get("n_genes_significant", float("nan"))
            sig_s = f"{sig:.1f}" if isinstance(sig, float) else str(sig)
            if "n_genes_tested" in m:
                sig_s += f"/{m['n_genes_tested']}"
            rows.append([name, pred_name, n, m["per_gene_pearson"], m.get("per_gene_pearson_median", float("nan")),
                         sig_s, m["per_spot_pearson"], m["mse"]])
    title = f"Leave-one-patient-out on {results['dataset']['name']}"
    if results["dataset"].get("synthetic"):
        title += "  [SYNTHETIC DATA]"
    return title + "\n" + reporting.format_table(rows, header)


# ------------------------------------------------------------------------------------------------ entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    from histospace_jax import experiments, report

    t0 = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    writer = reporting.MetricWriter(os.path.join(workdir, "metrics.jsonl"), enabled=jax.process_index() == 0)
    log(f"histospace_jax: mode={config.mode} workdir={workdir} devices={jax.local_device_count()} "
        f"({jax.devices()[0].platform}) processes={jax.process_count()}")
    store_path, ae_store, dataset = resolve_stores(config, workdir)
    apply_schedule_defaults(config)
    if config.mode == "pretrain_ae":
        ae = pretrain_autoencoder(config, workdir, ae_store or store_path, writer)
        results = {"mode": "pretrain_ae", "dataset": dataset, "autoencoder": ae["summary"],
                   "config": config.to_dict(), "elapsed_s": round(time.time() - t0, 1)}
        if jax.process_index() == 0:
            checkpointing.write_json_atomic(os.path.join(workdir, "results.json"), results)
            report.write_report(workdir, results)
        return results
    if config.mode == "ae_study":
        study = experiments.run_ae_study(config, workdir, ae_store or store_path, writer)
        results = {"mode": "ae_study", "dataset": dataset, "ae_study": study, "config": config.to_dict(),
                   "elapsed_s": round(time.time() - t0, 1)}
        if jax.process_index() == 0:
            checkpointing.write_json_atomic(os.path.join(workdir, "results.json"), results)
            report.write_report(workdir, results)
        log(report.ae_study_table(results))
        return results
    if config.mode == "external":
        ext = experiments.run_external(config, workdir, store_path, ae_store, dataset, writer)
        results = {"mode": "external", "dataset": {**dataset, "store": store_path}, "external": ext,
                   "config": config.to_dict(), "elapsed_s": round(time.time() - t0, 1)}
        if jax.process_index() == 0:
            checkpointing.write_json_atomic(os.path.join(workdir, "results.json"), results)
            report.write_report(workdir, results)
        log(report.external_table(results))
        log(f"results: {os.path.join(workdir, 'results.json')} ({time.time() - t0:.0f} s)")
        return results
    if config.mode != "loo":
        raise ValueError(f"unknown mode {config.mode!r}; use 'loo', 'pretrain_ae', 'ae_study' or 'external'")
    store = open_store(store_path)
    if not store.genes:
        raise ValueError(f"{store_path}: has no expression (image-only store); LOO needs a spot store")
    if ae_store is None and not config.ae.checkpoint:
        log("WARNING: no ae.store or ae.checkpoint given: pretraining the autoencoder on this store's tiles "
            "(unsupervised, no expression; held-out patients' images included)")
    ae = pretrain_autoencoder(config, workdir, ae_store or store_path, writer)
    loo = run_loo(config, workdir, store, ae["variables"], writer)
    extra_controls = {}
    if random_encoder_control_on(config):
        log("[loo] control: the same heads on a randomly initialised (untrained) encoder")
        extra_controls["random_encoder"] = run_loo(
            config, workdir, store, random_encoder_variables(config, config.loo.random_encoder_seed), writer,
            tag="random_encoder")
    expression = np.asarray(store.expression, np.float32)
    folds = fold_results(store, loo, expression, extra_controls, fdr=config.loo.get("fdr", 0.05))
    extra = loo_extras(config, workdir, store, loo, expression, ae)
    results = write_loo_outputs(config, workdir, store, dataset, loo, folds, ae["summary"], time.time() - t0,
                                extra_controls=extra_controls, extra=extra)
    if jax.process_index() == 0:
        report.write_report(workdir, results, per_gene=[(f["held_out"], f["per_gene_r"]) for f in folds],
                            genes=store.genes)
    log(summary_table(results))
    log(f"results: {os.path.join(workdir, 'results.json')} ({time.time() - t0:.0f} s)")
    return results


def loo_extras(config, workdir: str, store, loo: dict, expression: np.ndarray, ae: dict) -> dict:
    """Pathology clustering of the held-out predictions, spatial maps of named genes, model size."""
    from histospace_jax import experiments

    plan: FoldPlan = loo["plan"]
    rows = np.concatenate([np.flatnonzero(plan.spot_patient == p) for p in plan.folds])
    pred = np.concatenate([loo["preds"][f] for f in range(len(plan.folds))])
    truth = expression[rows]
    extra = {"clustering": experiments.pathology_clustering(
        workdir, store.obs, rows, pred, truth=truth, cancer_labels=config.clustering.cancer_labels,
        seed=config.seed, prefix="loo_clustering")}
    figures = {}
    named = [g for g in config.external.map_genes.split(",") if g in store.genes]
    if not named:
        r = metrics.pearson_per_gene(truth, pred)
        named = [store.genes[i] for i in np.argsort(-np.nan_to_num(r, nan=-2))[:2]]
    if jax.process_index() == 0:
        gi = [store.genes.index(g) for g in named]
        experiments.plot_spatial_maps(os.path.join(workdir, "figures", "loo_spatial_maps.png"), store.obs, rows,
                                      named, truth[:, gi], pred[:, gi],
                                      title="Leave-one-patient-out: held-out predictions")
        figures["spatial_maps"] = "figures/loo_spatial_maps.png"
    head = _head_model(config, len(store.genes))
    ts_ = config.data.tile_size
    hv = head.init(jax.random.PRNGKey(0), jnp.zeros((1, ts_, ts_, 3)))
    ckpt_dir = os.path.join(workdir, "checkpoints", "loo_main")
    extra["model"] = {"encoder_params": experiments.count_params(ae["variables"]["params"]),
                      "head_params": experiments.count_params(hv["params"]["head"]),
                      "loo_checkpoint_dir": ckpt_dir,
                      "loo_checkpoint_bytes": experiments.dir_bytes(ckpt_dir),
                      "loo_checkpoint_note": "all folds' heads stacked, plus the frozen encoder and the data "
                                             "iterator, up to checkpoint.max_to_keep steps"}
    extra["figures"] = figures
    return extra
