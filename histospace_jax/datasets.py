"""Which stores a run reads: the user's (config.data.store, config.ae.store) or the built-in synthetic demo."""

from __future__ import annotations

import dataclasses
import os

from histospace_jax import console
from histospace_jax.data import demo
from histospace_jax.data import store as store_lib


@dataclasses.dataclass
class RunInputs:
    store: str                 # the regression store (spots with expression), or an image store
    ae_store: str | None       # the autoencoder's pretraining store; None = not chosen (the mode decides)
    dataset: dict              # {'name', 'synthetic'} for results.json
    writer: object             # metric_log.MetricWriter of the run


def demo_spec(config) -> demo.DemoSpec:
    d = config.data.demo
    return demo.DemoSpec(n_patients=d.n_patients, sections_per_patient=d.sections_per_patient, grid=tuple(d.grid),
                         n_genes=d.n_genes, n_pretrain_patients=d.n_pretrain_patients,
                         pretrain_grid=tuple(d.pretrain_grid), noise_sd=d.noise_sd, seed=d.seed)


def resolve_stores(config) -> tuple[str, str | None, dict]:
    """(regression store, autoencoder pretraining store or None, dataset description)."""
    d = config.data
    ae_store = _canonical(config.ae.store) or None
    if d.store:
        return _canonical(d.store), ae_store, {"name": store_lib.location_name(d.store), "synthetic": None}
    spec = demo_spec(config)
    root = d.demo_root or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                       "histospace_jax", "demo")
    console.log(f"Using the built-in SYNTHETIC demo data ({spec.key()}) under {root}")
    reg, pre = demo.build_demo(root, spec)
    return reg, (ae_store or pre), {"name": "demo (synthetic)", "synthetic": True}


def _canonical(location: str) -> str:
    """A store URL in its one spelling (no trailing slash), so names and messages derived from it agree; a path
    is kept as the user wrote it."""
    return store_lib.normalise_location(location) if location and store_lib.is_url(location) else location
