"""External test: train one head on all (or external.train_patients) spots of data.store, evaluate on
external.store (or on data.store's external.test_patients) on the genes both stores share.

    python -m histospace_jax.main --config=configs/external.py --workdir=DIR \
        --config.data.store=STORE_A --config.external.store=STORE_B
    # one store, disjoint patients:
    python -m histospace_jax.main --config=configs/external.py --workdir=DIR \
        --config.data.store=STORE --config.external.train_patients=B --config.external.test_patients=C

Reports per-gene and per-spot metrics with the mean-profile, untrained-head and random-encoder controls,
spatial maps of external.map_genes, an overlap check of the two stores (shared patients, including HER2ST
E-H == STNet BC23567/BC23810/BC23903/BC24044, source-image and tile hashes; overlapping test spots are left
out unless external.exclude_overlap=False), and exports WORKDIR/model/ for `python -m histospace_jax.predict`.
"""

from histospace_jax import config as default


def get_config():
    c = default.get_config()
    c.mode = "external"
    c.loo.random_encoder_control = "on"
    return c
