"""Train states, optimizers and the jit/pmap-able train, eval and predict steps.

Every step is a pure function `(state, batch, ...) -> (new_state, metrics)` or `-> outputs`: no globals, no I/O.
Batches are dicts of arrays:
  'image'      uint8 [B, T, T, 3] tiles (scaled to [0, 1] inside the step), or
  'features'   float32 [B, 16, 16, 128] precomputed frozen-encoder outputs (the feature cache),
  'expression' float32 [B, G] targets,
  'mask'       optional [B] weights (1 = row counts, 0 = padding or a held-out patient's spot).

Data parallelism: pass `axis_name` and map the step with `jax.pmap(..., axis_name=...)` over a leading device
axis. Each device's loss is its local sum divided by the *global* row count, and gradients are summed across
devices, so the update equals the single-device update on the whole batch. The model must be built with the
same `axis_name` so BatchNorm statistics are global too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from histospace_jax import losses
from histospace_jax.models import to_unit_range


class TrainState(train_state.TrainState):
    """flax TrainState plus BatchNorm statistics and a PRNG key (dropout)."""

    batch_stats: Any = None
    key: jax.Array | None = None


def _variables(state: TrainState, params=None) -> dict:
    v = {"params": state.params if params is None else params}
    if state.batch_stats:
        v["batch_stats"] = state.batch_stats
    return v


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _dropout_key(state: TrainState):
    # The same key on every device: models.example_dropout draws each example's mask from its global position.
    return jax.random.fold_in(state.key, state.step)


# ----------------------------------------------------------------------------------------------- optimizers


def _one_per_setting(build):
    """`build` returning the same optimizer object for the same settings, so compiled_opt_init compiles its init
    once; settings that cannot be hashed (an array learning rate) get a new one."""
    cached = functools.lru_cache(maxsize=16)(build)

    @functools.wraps(build)
    def make(*args, **kwargs):
        try:
            return cached(*args, **kwargs)
        except TypeError:
            return build(*args, **kwargs)
    return make


@_one_per_setting
def make_ae_optimizer(learning_rate: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(learning_rate)


def frozen_encoder_labels(params) -> Any:
    """'frozen' for every leaf under params['encoder'], 'trainable' elsewhere."""
    return {k: jax.tree_util.tree_map(lambda _: "frozen" if k == "encoder" else "trainable", v)
            for k, v in params.items()}


@_one_per_setting
def make_regression_optimizer(learning_rate: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam(W) on the head; the encoder's updates are set to zero.

    `stop_gradient` alone is not enough: decoupled weight decay would still shrink the encoder's weights.
    """
    head_tx = optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(learning_rate)
    return optax.multi_transform({"trainable": head_tx, "frozen": optax.set_to_zero()}, frozen_encoder_labels)


# ----------------------------------------------------------------------------------------------- states


@functools.lru_cache(maxsize=16)
def compiled_init(model):
    """`model.init`, compiled once per module (modules are hashable)."""
    return jax.jit(model.init)


@functools.lru_cache(maxsize=16)
def compiled_opt_init(tx):
    """`tx.init`, compiled once per optimizer. Op by op, Adam's moments for a HistoSpace state took ~0.25 s on a
    2-core CPU, and a leave-one-patient-out run initialises ~40 heads (every member of every fold, again for the
    refit and for each control, and again on a resume)."""
    return jax.jit(tx.init)


def _state(model, tx, params, batch_stats, key) -> TrainState:
    """TrainState.create's state, with the optimizer's init compiled."""
    return TrainState(step=0, apply_fn=model.apply, params=params, tx=tx, opt_state=compiled_opt_init(tx)(params),
                      batch_stats=batch_stats, key=key)


def create_train_state(model, key, sample_input, tx, *, init_kwargs=None) -> TrainState:
    init_key, state_key = jax.random.split(key)
    variables = compiled_init(model)(init_key, sample_input, **(init_kwargs or {}))
    return _state(model, tx, variables["params"], variables.get("batch_stats", {}), state_key)


def create_regression_state(model, key, encoder_variables: dict, tx, tile_size: int = 128) -> TrainState:
    """HistoSpace state with the head freshly initialised and the encoder taken from `encoder_variables`
    ({'params': ..., 'batch_stats': ...} of an Encoder, e.g. the pretrained autoencoder's encoder)."""
    sample = jnp.zeros((1, tile_size, tile_size, 3), jnp.float32)
    context = model.sample_context() if hasattr(model, "sample_context") else None
    init_key, state_key = jax.random.split(key)
    variables = compiled_init(model)(init_key, sample, **({"context": context} if context is not None else {}))
    params = flax.core.unfreeze(variables["params"])
    params["encoder"] = encoder_variables["params"]
    batch_stats = flax.core.unfreeze(variables.get("batch_stats", {}))
    if encoder_variables.get("batch_stats"):
        batch_stats["encoder"] = encoder_variables["batch_stats"]
    return _state(model, tx, params, batch_stats, state_key)


# ----------------------------------------------------------------------------------------------- autoencoder


def ae_train_step(state: TrainState, batch: dict, *, axis_name: str | None = None):
    """One autoencoder step on MSE between the tile (in [0, 1]) and its reconstruction."""
    images = to_unit_range(batch["image"])
    global_count = _psum(jnp.asarray(images.size, jnp.float32), axis_name)

    def loss_fn(params):
        recon, updates = state.apply_fn(_variables(state, params), images, train=True, mutable=["batch_stats"])
        local_sum = jnp.square(recon - images).sum()
        return local_sum / global_count, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads, loss = _psum((grads, loss), axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    return state, {"loss": loss}


def ae_eval_step(state: TrainState, batch: dict, *, axis_name: str | None = None):
    """Summed squared error and element count on BatchNorm running averages (masked rows excluded)."""
    images = to_unit_range(batch["image"])
    recon = state.apply_fn(_variables(state), images, train=False)
    sse, rows = losses.masked_sum(losses.row_mse(recon, images), batch.get("mask"))
    per_row = images[0].size
    return _psum({"sse": sse * per_row, "count": rows * per_row}, axis_name)


def ae_reconstruct(state: TrainState, images_uint8):
    return state.apply_fn(_variables(state), to_unit_range(images_uint8), train=False)


# ----------------------------------------------------------------------------------------------- regression


def _zero_masked_rows(batch: dict) -> dict:
    """Replaces masked rows' inputs and targets by zeros.

    Masking the loss is not enough: a NaN or huge value in a masked row still poisons gradients through the
    backward pass of `where` (0 * NaN = NaN in a weight gradient). Zeroed rows contribute exactly nothing.
    """
    if "mask" not in batch:
        return batch
    keep = batch["mask"].astype(bool)
    out = dict(batch)
    for k in ("image", "features", "context", "expression"):
        if k in batch:
            shape = (-1,) + (1,) * (batch[k].ndim - 1)
            out[k] = jnp.where(keep.reshape(shape), batch[k], jnp.zeros((), batch[k].dtype))
    return out


def _regression_forward(state, params, batch, train: bool, rngs=None, mutable=False, **apply_kwargs):
    mask = batch.get("mask")
    context = batch.get("context")  # only for models with neighbourhood context
    if "features" in batch:
        return state.apply_fn(_variables(state, params), batch["features"], train, mask, context,
                              method="from_features", rngs=rngs, mutable=mutable, **apply_kwargs)
    return state.apply_fn(_variables(state, params), to_unit_range(batch["image"]), train, mask, context,
                          rngs=rngs, mutable=mutable, **apply_kwargs)


def regression_train_step(state: TrainState, batch: dict, *, huber_delta: float = 1.0,
                          axis_name: str | None = None):
    """One step of the regression head on the mean Huber loss; the encoder stays frozen.

    Frozen means: its output is behind stop_gradient (HistoSpace), its BatchNorm uses running averages, and
    the optimizer (make_regression_optimizer) zeroes its updates. Only the head's batch statistics change.
    """
    row_count = jnp.asarray(batch["expression"].shape[0], jnp.float32)
    count = batch["mask"].astype(bool).sum().astype(jnp.float32) if "mask" in batch else row_count
    global_count = jnp.maximum(_psum(count, axis_name), 1.0)
    rngs = {"dropout": _dropout_key(state)}
    batch = _zero_masked_rows(batch)

    def loss_fn(params):
        pred, updates = _regression_forward(state, params, batch, True, rngs=rngs, mutable=["batch_stats"])
        local_sum, _ = losses.masked_sum(losses.row_huber(pred, batch["expression"], huber_delta), batch.get("mask"))
        return local_sum / global_count, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads, loss = _psum((grads, loss), axis_name)
    new_stats = flax.core.unfreeze(state.batch_stats)
    new_stats["head"] = updates["batch_stats"]["head"]  # the encoder's running averages never change
    state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    return state, {"loss": loss}


def predict_step(state: TrainState, batch: dict):
    """Predicted expression [B, G] (inference: BatchNorm on running averages)."""
    return _regression_forward(state, state.params, batch, False)


def _is_hidden_fc(module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, flax.linen.Dense) and (module.name or "").startswith("fc")


def predict_with_hidden_step(state: TrainState, batch: dict):
    """(predicted expression [B, G], the head's last hidden FC layer before its ReLU [B, U]), inference mode.

    A hidden unit whose value is <= 0 on every spot is dead: its ReLU passes nothing forward and no gradient
    back, so it can never recover. A head whose units all die predicts its output bias for every spot (the
    collapse standardised targets with a lecun-initialised output layer produced on real patients)."""
    pred, captured = _regression_forward(state, state.params, batch, False, mutable=["intermediates"],
                                         capture_intermediates=_is_hidden_fc)
    layers = {}
    for path, value in jax.tree_util.tree_flatten_with_path(captured["intermediates"])[0]:
        names = [getattr(k, "key", None) for k in path]
        fc = [n for n in names if isinstance(n, str) and n.startswith("fc") and n[2:].isdigit()]
        if fc:
            layers[int(fc[-1][2:])] = value
    return pred, layers[max(layers)]


def encode_step(encoder, variables: dict, images_uint8):
    """Frozen-encoder features of uint8 tiles (BatchNorm on running averages): what the feature cache holds.
    `encoder` is a models.Encoder, `variables` its {'params', 'batch_stats'}."""
    return encoder.apply(variables, to_unit_range(images_uint8), train=False)


# ----------------------------------------------------------------------------------------------- parallel


def pmap_step(step_fn: Callable, axis_name: str = "batch", donate_state: bool = True,
              compiler_options: dict | None = None, **static_kwargs):
    """Maps a step over all local devices; inputs carry a leading device axis (see shard_batch).

    `compiler_options` (XLA options for this program only, e.g. xla_tuning.conv_step_options()) are applied by
    compiling it explicitly, once per input signature, since pmap itself does not take them. With several processes
    they are not applied: a pmap lowered ahead of time expects global arrays, while each process calls it with
    its local shard.
    """
    fn = functools.partial(step_fn, axis_name=axis_name, **static_kwargs)
    return with_compiler_options(jax.pmap(fn, axis_name=axis_name, donate_argnums=(0,) if donate_state else ()),
                                 compiler_options)


def with_compiler_options(mapped: Callable, compiler_options: dict | None) -> Callable:
    """A pmapped function compiled with `compiler_options` (once per input signature; see pmap_step), or
    `mapped` itself without options or with several processes. Its arguments must all be arrays (no static
    arguments)."""
    if compiler_options and jax.process_count() == 1:
        return _WithCompilerOptions(mapped, dict(compiler_options))
    return mapped


class _WithCompilerOptions:
    def __init__(self, mapped, options: dict):
        self._mapped, self._options, self._compiled = mapped, options, {}

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, tuple((np.shape(x), np.result_type(x)) for x in leaves))
        if key not in self._compiled:
            self._compiled[key] = self._mapped.lower(*args).compile(compiler_options=self._options)
        return self._compiled[key](*args)


def shard_batch(batch: dict, n_devices: int) -> dict:
    """[B, ...] -> [n_devices, B / n_devices, ...] for every array in the batch."""
    def split(x):
        if x.shape[0] % n_devices:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over {n_devices} devices; "
                             "choose a batch size divisible by the device count")
        return x.reshape((n_devices, x.shape[0] // n_devices) + x.shape[1:])
    return jax.tree_util.tree_map(split, batch)


def replicate(tree, n_devices: int | None = None):
    """A copy of every leaf per local device (leading axis), the input layout pmap expects for state."""
    n = n_devices or jax.local_device_count()
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def unreplicate(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)
