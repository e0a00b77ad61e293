"""Checkpoints: the only module that talks to Orbax.

A checkpoint holds, together and at the same step, the train state (any pytree of arrays), the Grain
iterator position and a small JSON of progress (`meta`), so a resumed job continues with exactly the next
batch. Orbax writes each step into a temporary directory and renames it when complete: a killed job leaves
either the previous checkpoint or the new one, never a half-written one.

Resuming is guarded: `meta['compat']` records the settings a checkpoint depends on (`compat_signature`), and
`Checkpointer.restore_checked` refuses a checkpoint written under other settings (ConfigMismatchError) or
with other array shapes (Orbax alone would silently restore the stored shapes). A state with NaN/Inf
parameters is never saved, so the last checkpoint is always a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from histospace_jax import workdir
from histospace_jax.errors import CheckpointError, ConfigMismatchError, NonFiniteError

# Config keys that decide what a checkpoint holds (prefix match on dotted keys). Everything else (logging,
# checkpoint cadence, eval batch size, paths, workers, distribution, reporting) may change between runs.
AE_KEYS = ("seed", "data.tile_size", "model.variant", "model.encoder_features", "model.upconv_impl",
           "ae.epochs", "ae.batch_size", "ae.learning_rate", "ae.weight_decay", "ae.val_fraction")
HEAD_KEYS = ("seed", "recipe", "data.tile_size", "model.", "train.")
# Paths, where the features are read from (memory or the on-disk cache: the same batches either way), and the
# smoothing of finished predictions and their blend with the counting model (neither touches what the heads learn).
_NEVER = ("ae.store", "ae.checkpoint", "train.features_in_memory", "model.smoothing", "model.smoothing_weight",
          "model.smoothing_weights", "model.smoothing_radius", "model.counting_blend", "model.counting_blend_weights")
# Facts about the data a checkpoint learnt from (the store's fingerprint, digests of its rows), recorded since
# checkpoints name their data: one written before records none and is judged on its settings alone.
DATA_FACTS = ("store", "rows_digest")
# Settings added after checkpoints were already being written, with the value that reproduces the old behaviour:
# a checkpoint that does not record one was written with that value, so it resumes under it.
ADDED_LATER = {"model.context": "none", "model.context_radius": 1.5, "train.head_seed": None,
               "train.stain_jitter": 0.0, "train.refit": "off", "model.output_base": "mean",
               "train.inner_split": "sections", "train.feature_cache_dtype": "auto"}


class Checkpointer:
    """`async_save`: a save returns once the state is copied to host memory and the data iterator's position is
    written; the arrays are written in the background while training goes on (the next save, a restore or
    `close` waits for it). Jobs of several processes save synchronously: every process must agree on each
    commit, and a background write would have to be coordinated across them. A SIGKILL during a background
    write loses that checkpoint only: the previous one stays, and a rerun resumes from it exactly."""

    def __init__(self, directory: str, max_to_keep: int = 2, *, read_only: bool = False, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        self._async = bool(async_save) and not read_only and jax.process_count() == 1
        options = (ocp.CheckpointManagerOptions(read_only=True) if read_only else
                   ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                enable_async_checkpointing=self._async))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The last committed step (after the write in flight, if any, is committed)."""
        if self._async:
            self.wait()
        return self._manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """Multi-process jobs: True at the step all processes agreed to stop at (JAX's preemption sync)."""
        return bool(self._manager.reached_preemption(step))

    def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None) -> None:
        bad = nonfinite_leaves(state)
        if bad:
            last = self.latest_step()
            raise NonFiniteError(
                f"parameters became NaN/Inf by step {step} ({len(bad)} arrays, e.g. {bad[:3]}); training stopped "
                f"and this state was NOT saved. Last good checkpoint: {self.directory} step {last}. Fix: lower the "
                "learning rate or check the input data, then rerun (resumes from that checkpoint).")
        # Orbax copies the arrays to host memory before save() returns, so a donating step that overwrites the
        # caller's buffers right after cannot change what is written (tested).
        arrays = _to_numpy_tree(state)
        # The new step is written in full before an old one is deleted. A few MiB beyond the arrays for the
        # iterator state, metadata and the file system's blocks.
        workdir.ensure_free_space(self.directory, sum(int(np.asarray(x).nbytes) for x in
                                                      jax.tree_util.tree_leaves(arrays)) + (8 << 20),
                                  f"the checkpoint of step {step}")
        items = {"state": ocp.args.StandardSave(arrays), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)  # written before save() returns
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not self._async:
            self._manager.wait_until_finished()

    def wait(self) -> None:
        """Blocks until the last save is committed (renamed into place)."""
        self._manager.wait_until_finished()

    def restore(self, step: int | None, template: Any, *, data_iterator=None) -> tuple[Any, dict]:
        """Restores into the structure of `template` (same pytree, same shapes); returns (state, meta)."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore.")
        items = {"state": ocp.args.StandardRestore(_to_numpy_tree(template)), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.directory} (step {step}): does not match the current configuration ({e}). It was written "
                "by a run with a different model or data; use a new --workdir or delete that directory."
            ) from e
        return restored["state"], dict(restored["meta"] or {})

    def read_meta(self, step: int) -> dict:
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                        or {})
        except Exception as e:  # unreadable meta: the checkpoint cannot be trusted
            raise CheckpointError(f"{self.directory} (step {step}): cannot read the checkpoint ({e}); use a new "
                                  "--workdir or delete that directory.") from e

    def restore_checked(self, template: Any, compat: dict, *, data_iterator=None) -> tuple[Any, dict]:
        """The latest checkpoint, refused (with every differing setting or shape named) when it was written under
        other settings than `compat` or holds other array shapes than `template`."""
        step = self.latest_step()
        check_compatible(self.directory, step, self.read_meta(step), compat)
        restored, meta = self.restore(step, template, data_iterator=data_iterator)
        check_restored_like(restored, template, self.directory, step)
        return restored, meta

    def close(self) -> None:
        self._manager.close()


def _to_numpy_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def state_dict(state) -> dict:
    """A flax TrainState as a plain nested dict of arrays (static fields dropped), for Orbax."""
    return flax.serialization.to_state_dict(state)


def load_state_dict(template, restored: dict):
    return flax.serialization.from_state_dict(template, restored)


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the array leaves of `tree` holding NaN or Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


# ------------------------------------------------------------------------------------------------ compatibility


def _plain(v):
    return json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compat_signature(config, keys: tuple[str, ...], **extra) -> dict:
    """The settings (dotted key -> JSON value) a checkpoint depends on, plus `extra` facts (e.g. row counts)."""
    flat = _flat(config.to_dict())
    sig = {k: v for k, v in flat.items()
           if any(k == p or (p.endswith(".") and k.startswith(p)) for p in keys) and k not in _NEVER}
    sig.update(extra)
    return _plain(sig)


def rows_digest(*row_sets) -> str:
    """SHA-1 of one or more sets of row indices (order kept): which rows of a store a checkpoint learnt from,
    where their count alone would let a run with other rows of the same size resume it."""
    h = hashlib.sha1()
    for rows in row_sets:
        h.update(np.ascontiguousarray(np.asarray(rows, np.int64)).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def tree_digest(tree) -> str:
    """SHA-1 of a pytree's array bytes (e.g. the frozen encoder a head checkpoint was trained on)."""
    h = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def check_compatible(directory: str, step: int, meta: dict, current: dict) -> None:
    """Raises ConfigMismatchError naming every setting that differs between `meta['compat']` and `current`.
    Checkpoints without a recorded signature are accepted (the shape check still applies)."""
    saved = meta.get("compat")
    if saved is None:
        return
    saved = {**{k: v for k, v in ADDED_LATER.items() if k in current}, **saved}
    current = {k: v for k, v in current.items() if k in saved or k not in DATA_FACTS}
    differing = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing]
    if diff:
        data = [k for k in differing if k in DATA_FACTS]
        raise ConfigMismatchError(
            f"{directory} (step {step}) was written with different settings: " + "; ".join(diff) + ". "
            + (f"({' and '.join(data)}: it learnt from another store, or a store prepared again, or other rows of "
               "it, than this run reads.) " if data else "") +
            "Resuming would mix two configurations. Fix: rerun with the original settings, or use a new "
            "--workdir, or delete that checkpoint directory to start this part again.")


def check_restored_like(restored, template, directory: str, step) -> None:
    """Orbax restores a stored array with its stored shape even when the template's differs; refuse that."""
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    want = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(template)[0]}
    diff = [f"{k}: checkpoint {got.get(k)} vs now {want.get(k)}" for k in sorted(set(got) | set(want))
            if got.get(k) != want.get(k)]
    if diff:
        raise CheckpointError(
            f"{directory} (step {step}): array shapes differ from the current model ({len(diff)}, e.g. "
            f"{'; '.join(diff[:3])}); it was written by a run with a different model or data. Use a new "
            "--workdir or delete that directory.")
