"""Frozen-feature cache: the encoder's output for every spot of a store, computed once.

The regression head only ever sees the frozen encoder's output, so recomputing the encoder for every tile in
every epoch of every fold (as the original protocol does) is wasted work. The cache is keyed by the store's
manifest and the encoder's weights: a different store or autoencoder gives a different key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid

import jax
import numpy as np
import tensorstore as ts

from histospace_jax import console, models, steps
from histospace_jax.data import pipeline


def dihedral(tiles: np.ndarray, view: int) -> np.ndarray:
    """View `view` (0-7) of [N, T, T, C] tiles: rotation by 90 * (view % 4) degrees, mirrored for view >= 4.
    View 0 is the tile itself. Tissue has no preferred orientation, so all 8 are equally valid inputs."""
    out = np.rot90(tiles, k=view % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if view >= 4 else out)


def cache_key(store, encoder_variables: dict, variant: str, views: int = 1) -> str:
    h = hashlib.sha256()
    if views != 1:
        h.update(f"views={views}".encode())
    h.update(json.dumps(store.manifest, sort_keys=True).encode())
    h.update(str(store.n_spots).encode())
    h.update(variant.encode())
    for leaf in jax.tree_util.tree_leaves(encoder_variables):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def compute_features(store, encoder_variables: dict, *, variant: str, encoder_features=(32, 64, 128),
                     batch_size: int = 128, views: int = 1, log=None) -> np.ndarray:
    """Encoder features of every spot, float32 [V, N, h, w, C] in store order: V = 1 (the tiles) or 8 (their
    dihedral views)."""
    n_dev = jax.local_device_count()
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    encode = jax.pmap(functools.partial(steps.encode_step, models.Encoder(variant, tuple(encoder_features))))
    variables = steps.replicate(encoder_variables)
    source = pipeline.ArraySource({"image": store.tiles})
    out = None
    done = 0
    progress = console.Progress("features", store.n_spots, views, counts="", unit="encodings")
    for batch in pipeline.ordered_batches(source, batch_size, pad_to_multiple=n_dev):
        n_real = int(batch["mask"].sum())
        for v in range(views):
            tiles = dihedral(batch["image"], v)
            feats = encode(variables, tiles.reshape((n_dev, -1) + tiles.shape[1:]))
            feats = np.asarray(feats).reshape((-1,) + feats.shape[2:])
            if out is None:
                out = np.empty((views, store.n_spots) + feats.shape[1:], np.float32)
            out[v, done:done + n_real] = feats[:n_real]
        done += n_real
        if log is not None and (done == store.n_spots or done % (batch_size * 20) < batch_size):
            log(progress.line(done))
    return out


def cached_features(cache_dir: str, store, encoder_variables: dict, *, variant: str,
                    encoder_features=(32, 64, 128), batch_size: int = 128, views: int = 1,
                    log=None) -> tuple[np.ndarray, str]:
    """Features [V, N, h, w, C] from the on-disk cache, computing and storing them on a miss. Returns
    (features, path)."""
    key = cache_key(store, encoder_variables, variant, views)
    path = os.path.join(os.path.abspath(cache_dir), f"features-{key}")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if os.path.exists(os.path.join(path, "zarr.json")):
        try:
            arr = ts.open(spec, read=True).result()
            if tuple(arr.shape[:2]) == (views, store.n_spots):
                if log:
                    log(f"[features] cache hit {path}")
                return arr.read().result(), path
        except Exception:  # unreadable cache entry: recompute and replace it
            pass
    feats = compute_features(store, encoder_variables, variant=variant, encoder_features=encoder_features,
                             batch_size=batch_size, views=views, log=log)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": tmp},
                   "metadata": {"shape": list(feats.shape), "data_type": "float32",
                                "chunk_grid": {"name": "regular",
                                               "configuration": {"chunk_shape": [1, 64] + list(feats.shape[2:])}}}},
                  create=True).result()
    arr.write(feats).result()
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.rename(tmp, path)
    except OSError:
        # Several processes of a multi-host job sharing this directory wrote the same features (same key);
        # another one renamed its copy first. Keep that one.
        if not os.path.exists(os.path.join(path, "zarr.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return feats, path


def for_config(config, workdir: str, store, encoder_variables: dict) -> np.ndarray:
    """The features [V, N, h, w, C] of every spot of `store` under `encoder_variables`, from WORKDIR/cache; V = 8
    dihedral views with train.augment=dihedral, else 1."""
    views = 8 if config.train.augment == "dihedral" else 1
    feats, _ = cached_features(os.path.join(workdir, "cache"), store, encoder_variables, variant=config.model.variant,
                               encoder_features=tuple(config.model.encoder_features),
                               batch_size=config.eval_batch_size, views=views, log=console.log)
    return feats
