"""Autoencoder pretraining only, one variant (--config.model.variant). Set --config.ae.store=IMAGE_STORE for
real tiles, e.g. from `prepare --format=images` on ICIAR/BACH. The checkpoint lands in WORKDIR/checkpoints/ae.
The paper's three-variant study (curves, reconstruction grids, final MSE per variant): configs/ae_study.py,
or --config.mode=ae_study here."""

from histospace_jax import config as default


def get_config():
    c = default.get_config()
    c.mode = "pretrain_ae"
    c.ae.epochs = 10
    return c
