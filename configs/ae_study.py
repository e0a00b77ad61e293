"""The paper's autoencoder study: the three variants (pool; +ReLU; +ReLU+BN) trained on the same image tiles.

    python -m histospace_jax.main --config=configs/ae_study.py --workdir=DIR --config.ae.store=IMAGE_STORE

Per variant: WORKDIR/ae_<variant>/checkpoints/ae (usable as --config.ae.checkpoint), train/validation MSE
curves (curves/ae_study.csv, figures/ae_study_curves.png), reconstruction grids (figures/ae_*_reconstructions.png)
and the final MSE in results.json (paper, ICIAR tiles: 0.0048, 0.0034, 0.002). Without ae.store it uses the
demo pretraining store (SYNTHETIC) or data.store.
"""

from histospace_jax import config as default


def get_config():
    c = default.get_config()
    c.mode = "ae_study"
    c.ae.epochs = 10
    return c
