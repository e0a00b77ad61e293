"""Mode ae_study: the paper's three autoencoder variants (pool; +ReLU; +ReLU+BN) trained on the same tiles, each
into WORKDIR/ae_<variant>/ (resumable): MSE curves, reconstruction grids and final MSE per variant."""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import atomic, autoencoder, builders, console, plots, steps
from histospace_jax.data import open_store
from histospace_jax.model_export import dir_bytes

PAPER_AE_MSE = {"pool": 0.0048, "relu": 0.0034, "relu_bn": 0.002}


def with_changes(config, **updates):
    """A copy of `config` with dotted keys changed, e.g. with_changes(c, **{"model.variant": "pool"})."""
    c = copy.deepcopy(config)
    for key, value in updates.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def run(config, workdir: str, inputs) -> tuple[dict, dict]:
    image_store = inputs.ae_store or inputs.store
    variants = list(config.ae_study.variants)
    results, curves, recons = {}, {}, {}
    store = open_store(image_store)
    n = store.n_spots
    # The same validation tiles autoencoder.pretrain holds out (same seed, same split).
    val_rows, _ = autoencoder.validation_split(n, config.ae.val_fraction, config.seed)
    n_val = len(val_rows)
    if not n_val:
        val_rows = np.arange(min(n, 8))
    show = val_rows[np.linspace(0, len(val_rows) - 1, min(config.ae_study.n_grid_tiles, len(val_rows))).astype(int)]
    images = store.tiles[show]
    reconstruct = jax.jit(steps.ae_reconstruct)
    for v in variants:
        c = with_changes(config, **{"model.variant": v, "ae.checkpoint": ""})
        sub = os.path.join(workdir, f"ae_{v}")
        os.makedirs(sub, exist_ok=True)
        console.log(f"[ae_study] variant {v} -> {sub}")
        res = autoencoder.pretrain(c, sub, image_store, inputs.writer)
        summ = {k: val for k, val in res["summary"].items() if k != "curve"}
        summ["encoder_params"] = builders.count_params(res["variables"]["params"])
        state = res["state"]
        summ["autoencoder_params"] = builders.count_params(state.params)
        recon = np.asarray(reconstruct(state, jnp.asarray(images)))
        recons[v] = recon
        summ["grid_mse"] = float(np.mean((recon - images / 255.0) ** 2))
        summ["paper_mse_iciar"] = PAPER_AE_MSE.get(v)
        summ["checkpoint_bytes"] = dir_bytes(os.path.join(sub, "checkpoints", "ae"))
        results[v] = summ
        curves[v] = res["summary"].get("curve", [])
    if jax.process_index() == 0:
        rows = [{"variant": v, **r} for v in variants for r in curves[v]]
        if rows:
            atomic.write_csv(os.path.join(workdir, "curves", "ae_study.csv"), rows,
                             ["variant", "epoch", "train_mse", "val_mse"])
            series = {}
            for v in variants:
                ep = [r["epoch"] for r in curves[v]]
                series[f"{v} train"] = (ep, [r["train_mse"] for r in curves[v]])
                series[f"{v} validation"] = (ep, [r["val_mse"] for r in curves[v]])
            plots.plot_curves(os.path.join(workdir, "figures", "ae_study_curves.png"), series,
                              title="Autoencoder variants: reconstruction MSE", xlabel="epoch", ylabel="MSE", logy=True)
        plots.plot_reconstructions(os.path.join(workdir, "figures", "ae_study_reconstructions.png"), images, recons,
                                   f"Validation tiles and reconstructions ({os.path.basename(image_store)})")
        for v, rec in recons.items():
            plots.plot_reconstructions(os.path.join(workdir, "figures", f"ae_{v}_reconstructions.png"), images,
                                       {v: rec}, f"{v}: validation tiles (top) and reconstructions")
    study = {"variants": results, "image_store": image_store, "n_tiles": n, "n_val_tiles": int(n_val),
             "paper_note": "paper's final MSE on ICIAR tiles: pool 0.0048, relu 0.0034, relu_bn 0.002"}
    return {"mode": "ae_study", "dataset": inputs.dataset, "ae_study": study}, {}
