"""Fold planning and fold-parallel head training.

Every fold's head is trained in one compiled program (vmap over stacked per-fold parameters). All folds read
the same shuffled batch stream; fold k's loss and BatchNorm statistics mask out the spots of its held-out
patient, so a held-out spot contributes exactly nothing to fold k's training (tested by perturbing held-out
data). A fold whose held-out index matches no spot trains on every row (the `train` and `external` modes).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import builders, checkpointing, loop, steps
from histospace_jax.data import pipeline
from histospace_jax.errors import ConfigError

ALL_ROWS = "(none held out)"


@dataclasses.dataclass
class FoldPlan:
    patients: list[str]          # all patients in the store (plus ALL_ROWS for a fold that holds none out)
    spot_patient: np.ndarray     # [N] index into patients
    folds: list[int]             # patient indices held out, one per fold

    def held_out_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.spot_patient == self.folds[fold])

    def training_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.spot_patient != self.folds[fold])

    def name(self, fold: int) -> str:
        return self.patients[self.folds[fold]]


def plan_leave_one_patient_out(store, only: str = "") -> FoldPlan:
    patients, pidx = pipeline.patient_indices(store)
    if len(patients) < 2:
        raise ConfigError(f"{store.path}: leave-one-patient-out needs >= 2 patients, found {patients}; use a store "
                          "with several patients, or --config=configs/train.py to train on all of them")
    wanted = [p for p in only.split(",") if p] if only else patients
    unknown = [p for p in wanted if p not in patients]
    if unknown:
        raise ConfigError(f"loo.patients names {unknown}, not in {store.path} (patients: {patients})")
    return FoldPlan(patients, pidx, [patients.index(p) for p in wanted])


def plan_all_rows(n_rows: int) -> FoldPlan:
    """One fold that trains on every row and holds none out."""
    return FoldPlan(["(all)", ALL_ROWS], np.zeros(n_rows, np.int32), [1])


def make_fold_train_step(huber_delta: float):
    """pmap(vmap over folds) of regression_train_step; fold k masks out its held-out patient's rows."""

    def step(states, batch, fold_patients):
        def one(state, held_out):
            b = {k: v for k, v in batch.items() if k in ("features", "image", "expression")}
            b["mask"] = batch["patient_idx"] != held_out
            return steps.regression_train_step(state, b, huber_delta=huber_delta, axis_name=builders.AXIS)

        return jax.vmap(one)(states, fold_patients)

    return jax.pmap(step, axis_name=builders.AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


def make_fold_predict():
    def predict(states, batch):
        b = {k: v for k, v in batch.items() if k in ("features", "image")}
        return jax.vmap(lambda s: steps.predict_step(s, b))(states)

    return jax.pmap(predict, axis_name=builders.AXIS)


def predict_rows(rstates, source, n_folds: int, n_rows: int, n_genes: int, batch_size: int) -> np.ndarray:
    """Predictions [n_folds, n_rows, n_genes] of replicated stacked states for every row of `source`."""
    n_dev = jax.local_device_count()
    predict = make_fold_predict()
    preds = np.zeros((n_folds, n_rows, n_genes), np.float32)
    for batch in pipeline.ordered_batches(source, batch_size, pad_to_multiple=n_dev):
        b = {k: v for k, v in batch.items() if k in ("features", "image")}
        out = np.asarray(predict(rstates, steps.shard_batch(b, n_dev)))  # [D, F, b, G]
        out = out.transpose(1, 0, 2, 3).reshape(n_folds, -1, n_genes)
        real = batch["mask"] > 0
        preds[:, batch["index"][real]] = out[:, real]
    return preds


def data_source_name(columns: dict) -> str:
    """Where a batch's rows come from, for error messages."""
    for col in columns.values():
        if isinstance(col, pipeline.LazyStoreColumn):
            return f"the store {col.store_path}"
    return "the training store (row = store row; features from the cache)"


class _FoldCurve(loop.Hook):
    def __init__(self, names, writer):
        self.names, self.writer = names, writer

    def on_epoch_end(self, lp, epoch, step, mean_loss):
        rows = []
        for k, name in enumerate(self.names):
            rows.append({"epoch": epoch, "fold": name, "train_huber": mean_loss[k]})
            self.writer.write("loo_epoch", step, loop=lp.spec.name, epoch=epoch, fold=name, train_huber=mean_loss[k])
        return rows


def train_heads(config, workdir: str, *, columns: dict, expression: np.ndarray, plan: FoldPlan,
                encoder_variables: dict, fold_group: list[int], tag: str, writer) -> dict:
    """Trains the heads of `fold_group` (fold numbers of `plan`) in one program, resuming from
    WORKDIR/checkpoints/<tag>. Returns {'states': trained host states stacked over the group, 'preds' and
    'untrained': [len(fold_group), N, G] predictions of every row after and before training, 'curve'}."""
    c = config.train
    n, g = expression.shape
    held = np.array([plan.folds[f] for f in fold_group], np.int32)
    init_states = builders.head_states(config, g, encoder_variables, [int(f) + 1 for f in fold_group])
    stacked = jax.tree_util.tree_map(lambda *xs: np.asarray(jnp.stack(xs)), *init_states)
    n_dev = jax.local_device_count()
    steps_per_epoch = n // c.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{n} spots is fewer than train.batch_size={c.batch_size}; lower --config.train.batch_size")
    source = pipeline.ArraySource(columns, patient_idx=plan.spot_patient)
    untrained = predict_rows(steps.replicate(stacked), source, len(fold_group), n, g, config.eval_batch_size)
    iterator = iter(pipeline.train_loader(source, global_batch_size=c.batch_size, seed=config.seed + 1,
                                          num_epochs=c.epochs, worker_count=config.data.worker_count))
    names = [plan.patients[p] for p in held]
    compat = checkpointing.compat_signature(config, checkpointing.HEAD_KEYS, n_rows=int(n), n_genes=int(g),
                                            held_out=names, encoder=checkpointing.tree_digest(encoder_variables))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints", tag), config.checkpoint.max_to_keep)
    train_step = make_fold_train_step(c.huber_delta)

    def step_fn(rstates, batch):
        b = {k: batch[k] for k in columns}
        b["patient_idx"] = batch["patient_idx"]
        return train_step(rstates, steps.shard_batch(b, n_dev), held)

    name = tag.replace("_", " ", 1)  # "loo_main_0" -> "loo main_0"
    spec = loop.LoopSpec(name=name, total_steps=c.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                         items_per_step=c.batch_size, log_every=config.log_every_steps,
                         checkpoint_every=config.checkpoint.every_steps, loss_name="huber",
                         data_source=data_source_name(columns), labels=names,
                         fix_hint=f"train.learning_rate={c.learning_rate}")
    states, curve = loop.run(stacked, step_fn, iterator, spec=spec, checkpointer=ckpt, compat=compat, writer=writer,
                             hooks=[_FoldCurve(names, writer)])
    preds = predict_rows(steps.replicate(states), source, len(fold_group), n, g, config.eval_batch_size)
    return {"states": jax.tree_util.tree_map(np.asarray, states), "preds": preds, "untrained": untrained,
            "curve": curve}


def unstack(states, k: int):
    """Fold k's state out of states stacked over a fold group."""
    return jax.tree_util.tree_map(lambda x: x[k], states)


def train_one_head(config, workdir: str, feats: np.ndarray, expression: np.ndarray, encoder_variables: dict,
                   writer, tag: str):
    """One head trained on every row (fixed epochs, nothing held out). Returns (trained state, initial state,
    loss curve)."""
    n = len(expression)
    res = train_heads(config, workdir, columns={"features": feats, "expression": expression},
                      expression=expression, plan=plan_all_rows(n), encoder_variables=encoder_variables,
                      fold_group=[0], tag=tag, writer=writer)
    initial = builders.head_states(config, expression.shape[1], encoder_variables, [1])[0]
    return unstack(res["states"], 0), initial, res["curve"]


def predict_features(state, feats: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predictions of one head state on cached features."""
    fn = jax.jit(lambda s, f: steps.predict_step(s, {"features": f}))
    return np.concatenate([np.asarray(fn(state, jnp.asarray(feats[a:a + batch]))) for a in range(0, len(feats), batch)])
