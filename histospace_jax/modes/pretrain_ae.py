"""Mode pretrain_ae: the autoencoder alone (one variant), checkpointed under WORKDIR/checkpoints/ae."""

from __future__ import annotations

from histospace_jax import autoencoder


def run(config, workdir: str, inputs) -> tuple[dict, dict]:
    ae = autoencoder.pretrain(config, workdir, inputs.ae_store or inputs.store, inputs.writer)
    return {"mode": "pretrain_ae", "dataset": inputs.dataset, "autoencoder": ae["summary"]}, {}
