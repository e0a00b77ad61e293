"""Autoencoder pretraining (or loading a pretrained one): the frozen encoder every head is trained on."""

from __future__ import annotations

import os

import jax
import numpy as np

from histospace_jax import atomic, builders, checkpointing, console, loop, plots, steps, xla_tuning
from histospace_jax.data import open_store, pipeline
from histospace_jax.errors import ConfigError


def load(config) -> dict:
    """The autoencoder of config.ae.checkpoint (an Orbax directory such as WORKDIR/checkpoints/ae)."""
    state = builders.autoencoder_state(config)
    ckpt = checkpointing.Checkpointer(config.ae.checkpoint, read_only=True)
    restored, meta = ckpt.restore(None, checkpointing.state_dict(state))
    ckpt.close()
    state = checkpointing.load_state_dict(state, restored)
    console.log(f"[ae] loaded autoencoder from {config.ae.checkpoint} (step {int(state.step)})")
    meta.pop("curve", None)
    return {"variables": builders.encoder_variables_of(state),
            "summary": {"loaded_from": config.ae.checkpoint, **meta}}


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows) of an image store of n tiles; none held out below 21 tiles."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n)) if n > 20 else 0
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def reconstruction_mse(eval_step, rstate, store_path: str, rows: np.ndarray, batch_size: int) -> float:
    n_dev = jax.local_device_count()
    source = pipeline.ArraySource({"image": pipeline.LazyStoreColumn(store_path, "tiles")}, rows)
    sse = count = 0.0
    for batch in pipeline.ordered_batches(source, batch_size, pad_to_multiple=n_dev):
        out = eval_step(rstate, steps.shard_batch({"image": batch["image"], "mask": batch["mask"]}, n_dev))
        sse += float(out["sse"][0])
        count += float(out["count"][0])
    return sse / max(count, 1.0)


class _EpochEval(loop.Hook):
    """Validation MSE at every epoch end; the training MSE in metrics.jsonl at log steps."""

    def __init__(self, config, store_path, val_rows, writer):
        self.config, self.store_path, self.val_rows, self.writer = config, store_path, val_rows, writer
        self.eval_step = steps.pmap_step(steps.ae_eval_step, axis_name=builders.AXIS, donate_state=False,
                                         compiler_options=xla_tuning.conv_step_options())

    def on_log(self, lp, step, mean_loss):
        self.writer.write("ae_train", step, loop=lp.spec.name, mse=mean_loss)

    def on_epoch_end(self, lp, epoch, step, mean_loss):
        val = (reconstruction_mse(self.eval_step, lp.rstate, self.store_path, self.val_rows,
                                  self.config.eval_batch_size) if len(self.val_rows) else float("nan"))
        self.writer.write("ae_epoch", step, loop=lp.spec.name, epoch=epoch, train_mse=mean_loss, val_mse=val)
        console.log(f"[{lp.spec.name}] epoch {epoch}/{self.config.ae.epochs} train_mse={mean_loss:.5f} "
                    f"val_mse={val:.5f}")
        return [{"epoch": epoch, "train_mse": mean_loss, "val_mse": val}]


def pretrain(config, workdir: str, store_path: str, writer, *, rows: np.ndarray | None = None, name: str = "ae",
             seen: str = "") -> dict:
    """Trains (or resumes, or with config.ae.checkpoint loads) the autoencoder on the tiles of `store_path`
    (only `rows` of it when given; checkpoints under WORKDIR/checkpoints/<name with _ for spaces>).
    Returns {'variables': encoder variables, 'summary': ..., 'state': the trained autoencoder state}.
    `seen` says in words which tiles it learnt from (results.json reports it)."""
    if config.ae.checkpoint:
        return load(config)
    c = config.ae
    state = builders.autoencoder_state(config)
    store = open_store(store_path)
    all_rows = np.arange(store.n_spots) if rows is None else np.asarray(rows)
    n = len(all_rows)
    val_pos, train_pos = validation_split(n, c.val_fraction, config.seed)
    val_rows, train_rows = all_rows[val_pos], all_rows[train_pos]
    steps_per_epoch = len(train_rows) // c.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{store_path}: {len(train_rows)} training tiles is fewer than ae.batch_size={c.batch_size}; "
                         "lower --config.ae.batch_size or pretrain on a larger image store (--config.ae.store)")
    total = c.epochs * steps_per_epoch
    source = pipeline.ArraySource({"image": pipeline.LazyStoreColumn(store_path, "tiles")}, train_rows)
    iterator = iter(pipeline.train_loader(source, global_batch_size=c.batch_size, seed=config.seed,
                                          num_epochs=c.epochs, worker_count=config.data.worker_count))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints", name.replace(" ", "_")),
                                      config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save)
    compat = checkpointing.compat_signature(config, checkpointing.AE_KEYS, n_train_rows=int(len(train_rows)),
                                            store=store.fingerprint,
                                            rows_digest=checkpointing.rows_digest(train_rows, val_rows))
    train_step = steps.pmap_step(steps.ae_train_step, axis_name=builders.AXIS,
                                 compiler_options=xla_tuning.conv_step_options())
    n_dev = jax.local_device_count()

    def step_fn(rstate, batch):
        return train_step(rstate, steps.shard_batch({"image": batch["image"]}, n_dev))

    spec = loop.LoopSpec(name=name, total_steps=total, steps_per_epoch=steps_per_epoch, items_per_step=c.batch_size,
                         log_every=config.log_every_steps, checkpoint_every=config.checkpoint.every_steps,
                         data_source=store_path, fix_hint=f"ae.learning_rate={c.learning_rate}")
    state, curve = loop.run(state, step_fn, iterator, spec=spec, checkpointer=ckpt, compat=compat, writer=writer,
                            hooks=[_EpochEval(config, store_path, val_rows, writer)])
    summary = {"store": store_path, "tiles_seen": seen or f"all {n} tiles of {store_path}",
               "variant": config.model.variant, "epochs": c.epochs, "steps": total,
               "n_train_tiles": int(len(train_rows)), "n_val_tiles": int(len(val_rows)),
               "final_train_mse": curve[-1]["train_mse"] if curve else None,
               "final_val_mse": curve[-1]["val_mse"] if curve else None, "curve": curve}
    if curve and jax.process_index() == 0:
        stem = name.replace(" ", "_")
        atomic.write_csv(os.path.join(workdir, "curves", f"{stem}.csv"), curve)
        ep = [r["epoch"] for r in curve]
        plots.plot_curves(os.path.join(workdir, "curves", f"{stem}.png"),
                          {"train MSE": (ep, [r["train_mse"] for r in curve]),
                           "validation MSE": (ep, [r["val_mse"] for r in curve])},
                          title=f"Autoencoder ({config.model.variant})", xlabel="epoch", ylabel="MSE", logy=True)
    return {"variables": builders.encoder_variables_of(state), "summary": summary, "state": state}
