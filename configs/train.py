"""Train on every patient of a store and export the model that `python -m histospace_jax.predict` reads.

    python -m histospace_jax.main --config=configs/train.py --workdir=DIR --config.data.store=STORE
    python -m histospace_jax.predict --checkpoint=DIR/model --image=SLIDE.jpg --spots=SPOTS.csv --output=OUT

Pretrains the autoencoder (ae.store / ae.checkpoint as in the other modes), trains one head on all spots of
data.store for train.epochs (fixed; nothing is held out, so nothing is evaluated here: use configs/loo.py for
accuracy) and writes WORKDIR/model/ (Orbax checkpoint + model.json with genes, architecture and preprocessing).
"""

from histospace_jax import config as default


def get_config():
    c = default.get_config()
    c.mode = "train"
    return c
