"""The deployable model directory that `predict` reads: WORKDIR/model/ with an Orbax checkpoint of the whole
HistoSpace model (encoder + head variables of every ensemble member, stacked on a leading axis) and model.json
(genes, architecture, ensemble size, test-time dihedral views, the per-gene target mean and sd that map the
heads' standardised outputs back to expression, tile size, microns per pixel, colour/stain preprocessing of
the training store). Written by the `train` and `external` modes."""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import atomic, builders, checkpointing, counting_base, features
from histospace_jax.errors import BadInputError

MODEL_JSON = "model.json"
COUNTING_NPZ = "counting_base.npz"


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def export(model_dir: str, config, states, genes: list[str], store, encoder_source: str, *, mean, sd,
           views: int, smoothing: dict | None = None, counting: counting_base.CountingBase | None = None,
           counting_weight: float | None = None) -> dict:
    """Writes `model_dir` from trained HistoSpace train states stacked over ensemble members; returns
    model.json's content (+ size). `smoothing` ({"radius", "self_weight"}, folds.exported_smoothing): how
    `predict` blends each position's prediction with its neighbours', as the training run chose. `counting`:
    the counting base the heads' output is added to (COUNTING_NPZ beside model.json), or None (training mean);
    with `counting_weight`, the counting model the heads' predictions are blended with at that weight
    (model.counting_blend) instead."""
    variables = {"params": states.params}
    if states.batch_stats:
        variables["batch_stats"] = states.batch_stats
    variables = jax.tree_util.tree_map(np.asarray, variables)
    k = int(jax.tree_util.tree_leaves(variables["params"])[0].shape[0])
    # A re-export replaces the old checkpoint (Orbax keeps step directories; a stale step 0 would be restored).
    shutil.rmtree(os.path.join(model_dir, "checkpoint"), ignore_errors=True)
    ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoint"), max_to_keep=1)
    ckpt.save(0, variables, meta={"genes": len(genes)})
    ckpt.close()
    m = store.manifest
    if counting is not None and counting_weight == 0:
        counting = None  # a blend at weight 0 is the heads alone: predict need not read depth from the tiles
    if counting is not None:
        atomic.write_npz(os.path.join(model_dir, COUNTING_NPZ), **counting.arrays())
    else:
        try:
            os.remove(os.path.join(model_dir, COUNTING_NPZ))  # a re-export without a base
        except FileNotFoundError:
            pass
    info = {
        "format": "histospace-model", "version": 2, "genes": list(genes),
        "model": {**builders.architecture(config), "smoothing": smoothing},
        "ensemble": k, "views": int(views),
        # predict jitters views 1-7 as training did, so its view average is the one the heads were validated on
        "stain_jitter": features.stain_jitter(config), "jitter_seed": int(config.seed),
        "target_mean": np.asarray(mean, np.float64).round(6).tolist(),
        "target_sd": np.asarray(sd, np.float64).round(6).tolist(),
        # "counting": a prediction is the counting model at the depth read from the untransformed view's pooled
        # features (COUNTING_NPZ) plus mean + sd * the heads' output; "mean": mean + sd * the heads' output;
        # "blend": (1 - counting_weight) x (mean + sd * the heads' output) + counting_weight x the counting model.
        "output_base": "mean" if counting is None else "counting" if counting_weight is None else "blend",
        **({"counting_weight": float(counting_weight)} if counting is not None and counting_weight is not None
           else {}),
        "tile_size": int(m.get("tile_size", config.data.tile_size)),
        "microns_per_pixel": m.get("microns_per_pixel"),
        "colour_cast": m.get("colour_cast"), "stain_normalisation": m.get("stain_normalisation"),
        "expression": m.get("expression"), "trained_on": {"store": store.path, "synthetic": store.synthetic},
        "encoder": encoder_source,
        "encoder_params": builders.count_params(variables["params"]["encoder"]) // k,
        "head_params_per_member": builders.count_params(variables["params"]["head"]) // k,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic.write_json(os.path.join(model_dir, MODEL_JSON), info)
    info["checkpoint_bytes"] = dir_bytes(model_dir)
    return info


def load_counting_base(model_dir: str, info: dict) -> counting_base.CountingBase | None:
    """The counting model of a model whose model.json says output_base "counting" or "blend" (None for "mean")."""
    if info.get("output_base", "mean") not in ("counting", "blend"):
        return None
    path = os.path.join(model_dir, COUNTING_NPZ)
    try:
        with np.load(path) as z:
            return counting_base.CountingBase.from_arrays(z)
    except (OSError, KeyError, ValueError) as e:
        raise BadInputError(f"{path}: missing or unreadable ({e}), but {MODEL_JSON} says the model adds the "
                            "counting base; export the model again.") from e


def load(model_dir: str):
    """(model.json content, HistoSpace module, variables stacked over the ensemble members) of a model
    directory."""
    info_path = os.path.join(model_dir, MODEL_JSON)
    try:
        with open(info_path) as f:
            info = json.load(f)
    except FileNotFoundError as e:
        raise BadInputError(f"{info_path}: missing; --checkpoint must be the model/ directory written by "
                            "`python -m histospace_jax.main --config=configs/train.py --workdir=W` (W/model) or by "
                            "the external mode.") from e
    except json.JSONDecodeError as e:
        raise BadInputError(f"{info_path}: not valid JSON ({e}); export the model again.") from e
    if info.get("version") != 2:
        raise BadInputError(f"{info_path}: model format version {info.get('version')}; this histospace_jax reads "
                            "version 2. Export the model again with `--config=configs/train.py`.")
    model = builders.histospace_from_architecture(info["model"], len(info["genes"]))
    t, k = int(info["tile_size"]), int(info["ensemble"])
    one = dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, t, t, 3)),
                                                 context=model.sample_context())))
    template = jax.tree_util.tree_map(lambda x: np.zeros((k,) + x.shape, x.dtype), one)
    ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoint"), read_only=True)
    variables, _ = ckpt.restore(None, template)
    ckpt.close()
    return info, model, variables
