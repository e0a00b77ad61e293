"""Mode train: one head trained on every patient of a store, exported to WORKDIR/model/ for
`python -m histospace_jax.predict`. Nothing is held out, so nothing is evaluated (use mode loo for that)."""

from __future__ import annotations

import os

import jax
import numpy as np

from histospace_jax import atomic, autoencoder, counting_base, evaluation, features, folds, model_export, plots
from histospace_jax.data import open_store
from histospace_jax.data.store import require_same_tile_scale
from histospace_jax.errors import BadInputError


def run(config, workdir: str, inputs) -> tuple[dict, dict]:
    store = open_store(inputs.store)
    if not store.genes:
        raise BadInputError(f"{inputs.store}: has no expression (image-only store); training needs a spot store "
                            "from `python -m histospace_jax.prepare` with --format=stnet|her2st|visium")
    if inputs.ae_store:
        require_same_tile_scale(store, open_store(inputs.ae_store), "config.ae.store")
    ae = autoencoder.pretrain(config, workdir, inputs.ae_store or inputs.store, inputs.writer)
    feats = features.for_config(config, workdir, store, ae["variables"])
    expression = np.asarray(store.expression, np.float32)
    base_scale = counting_base.scale_for(config, store.manifest, store.obs, store.path)
    heads = folds.train_one_fold_on_all(
        config, workdir, store.obs, feats, expression, ae["variables"], inputs.writer, "train_all",
        base_scale=base_scale, blend_weights=counting_base.blend_weights(config, store.manifest, store.obs, store.path),
        blend_scale=evaluation.sampling_scale(store.manifest), source=store.fingerprint)
    # The exported heads' own training: the refit's pass when there was one (its rows say "(refit)").
    curve = [r for r in heads["curve"] if r["fold"].endswith("(refit)") == heads["refit"]]
    encoder_source = ae["summary"].get("loaded_from") or os.path.join(workdir, "checkpoints", "ae")
    info = {}
    if jax.process_index() == 0:
        info = model_export.export(os.path.join(workdir, "model"), config, heads["states"], store.genes, store,
                                   encoder_source, mean=heads["mean"], sd=heads["sd"], views=feats.shape[0],
                                   smoothing=folds.exported_smoothing(heads["smoothing"]),
                                   counting=heads["counting_base"], counting_weight=heads["counting_weight"])
        if curve:
            atomic.write_csv(os.path.join(workdir, "curves", "train.csv"), curve)
            plots.plot_curves(os.path.join(workdir, "curves", "train.png"),
                              plots.huber_series(curve, "train Huber {fold}"),
                              title="Head training loss (all spots)", xlabel="epoch", ylabel="Huber loss", logy=True)
    results = {"mode": "train",
               "dataset": {**inputs.dataset, "store": store.path, "synthetic": store.synthetic},
               "train": {"store": store.path, "patients": store.patients, "n_spots": store.n_spots,
                         "n_genes": len(store.genes), "epochs": config.train.epochs,
                         "best_epoch": heads["best_epoch"], "inner_validation": heads["inner_validation"],
                         "refit": heads["refit"], "live_units": heads["live_units"], "smoothing": heads["smoothing"],
                         "output_base": "mean" if base_scale is None else "counting",
                         "counting_blend": heads["counting_blend"],
                         "final_train_huber": curve[-1]["train_huber"] if curve else None},
               "model_export": info,
               "autoencoder": {k: v for k, v in ae["summary"].items() if k != "curve"}}
    return results, {}
