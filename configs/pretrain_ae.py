"""Autoencoder pretraining only (set --config.ae.store=IMAGE_STORE for real tiles, e.g. from
`prepare --format=images` on ICIAR/BACH). The checkpoint lands in WORKDIR/checkpoints/ae."""

from configs import default


def get_config():
    c = default.get_config()
    c.mode = "pretrain_ae"
    c.ae.epochs = 10
    return c
