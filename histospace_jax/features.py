"""Frozen-feature cache: the encoder's output for every spot of a store, computed once.

The regression head only ever sees the frozen encoder's output, so recomputing the encoder for every tile in
every epoch of every fold (as the original protocol does) is wasted work. The cache is keyed by the store's
manifest and the encoder's weights: a different store or autoencoder gives a different key. Under mixed precision
(model.compute_dtype=bfloat16) the features are computed and kept in bfloat16, half the memory of float32;
train.feature_cache_dtype=bfloat16 keeps float32 computation and stores them in bfloat16 (half the disk and memory).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from histospace_jax import builders, console, controls, models, steps, xla_tuning
from histospace_jax import workdir as workdir_lib
from histospace_jax.data import pipeline
from histospace_jax.errors import WorkdirError
from histospace_jax.ingest import stain


def dihedral(tiles: np.ndarray, view: int) -> np.ndarray:
    """View `view` (0-7) of [N, T, T, C] tiles: rotation by 90 * (view % 4) degrees, mirrored for view >= 4.
    View 0 is the tile itself. Tissue has no preferred orientation, so all 8 are equally valid inputs."""
    out = np.rot90(tiles, k=view % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if view >= 4 else out)


def stain_jitter_draws(strength: float, seed: int, view: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) [len(ids), 3] of `stain.hed_jitter` for view `view` of the tiles `ids` (spot indices of a
    store, or tile indices of a slide): scale ~ U(1 - s, 1 + s), shift ~ U(-s, s) per stain. Each tile's draw
    depends on (seed, view, id) alone, so it does not depend on the batch the tile arrives in."""
    ids = np.asarray(ids, np.int64)
    draws = np.stack([np.random.default_rng([int(seed), int(view), int(i)]).uniform(-1.0, 1.0, 6) for i in ids]
                     ) if len(ids) else np.zeros((0, 6))
    return 1.0 + strength * draws[:, :3], strength * draws[:, 3:]


def augmented_view(tiles: np.ndarray, view: int, *, stain_jitter: float = 0.0, ids=None, seed: int = 0
                   ) -> np.ndarray:
    """View `view` of uint8 tiles: `dihedral`, and with stain_jitter > 0 a HED stain jitter of that strength for
    views 1-7 (view 0 stays the tile itself). `ids` (one per tile) fix each tile's jitter."""
    out = dihedral(tiles, view)
    if stain_jitter <= 0 or view == 0:
        return out
    if ids is None or len(ids) != len(tiles):
        raise ValueError(f"augmented_view with stain jitter needs one id per tile ({len(tiles)} tiles)")
    scale, shift = stain_jitter_draws(stain_jitter, seed, view, ids)
    return stain.hed_jitter(out, scale, shift)


def cache_key(store, encoder_variables: dict, variant: str, views: int = 1, dtype: str = "float32",
              stain_jitter: float = 0.0, jitter_seed: int = 0, compute_dtype: str | None = None) -> str:
    h = hashlib.sha256()
    if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.dtype(dtype):
        h.update(f"compute={jnp.dtype(compute_dtype)}".encode())
    if stain_jitter > 0:
        h.update(f"stain_jitter={float(stain_jitter)!r},seed={int(jitter_seed)}".encode())
    if views != 1:
        h.update(f"views={views}".encode())
    if dtype != "float32":
        h.update(f"dtype={dtype}".encode())
    h.update(json.dumps(store.manifest, sort_keys=True).encode())
    h.update(str(store.n_spots).encode())
    h.update(variant.encode())
    for leaf in jax.tree_util.tree_leaves(encoder_variables):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def _cache_metadata(shape, dtype: str) -> dict:
    """zarr v3 layout of a cache: one row of one view per inner chunk (a random row is one small read when the
    heads stream their batches from disk), SHARD_ROWS rows per file (few files, sequential bulk reads)."""
    inner = [1, 1] + list(shape[2:])
    return {"shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, SHARD_ROWS] + list(shape[2:])}},
            "codecs": [{"name": "sharding_indexed",
                        "configuration": {"chunk_shape": inner, "codecs": [{"name": "bytes",
                                                                             "configuration": {"endian": "little"}}],
                                          "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                                           {"name": "crc32c"}]}}]}


SHARD_ROWS = 256


def write_features(path: str, store, encoder_variables: dict, *, variant: str, encoder_features=(32, 64, 128),
                   batch_size: int = 128, views: int = 1, dtype: str = "float32", stain_jitter: float = 0.0,
                   jitter_seed: int = 0, log=None, compute_dtype: str | None = None) -> None:
    """Writes the encoder features of every spot, [V, N, h, w, C] in store order, stored in `dtype` and computed
    in `compute_dtype` (default `dtype`; V = 1 (the tiles) or 8 (their `augmented_view`s)), to a new zarr array
    at `path`, one batch at a time: memory holds one batch, whatever the store's size."""
    n_dev = jax.local_device_count()
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    np_dtype = jnp.dtype(dtype)
    encoder = models.Encoder(variant, tuple(encoder_features), dtype=jnp.dtype(compute_dtype or dtype))
    encode = steps.with_compiler_options(jax.pmap(functools.partial(steps.encode_step, encoder)),
                                         xla_tuning.conv_step_options())
    variables = steps.replicate(encoder_variables)
    source = pipeline.ArraySource({"image": store.tiles})
    out = None
    done = 0
    pending = []
    progress = console.Progress("features", store.n_spots, views, counts="", unit="encodings")
    for batch in pipeline.ordered_batches(source, batch_size, pad_to_multiple=n_dev):
        n_real = int(batch["mask"].sum())
        for v in range(views):
            tiles = augmented_view(batch["image"], v, stain_jitter=stain_jitter, seed=jitter_seed,
                                   ids=np.arange(done, done + len(batch["image"])))
            feats = encode(variables, tiles.reshape((n_dev, -1) + tiles.shape[1:]))
            feats = np.asarray(feats.astype(np_dtype)).reshape((-1,) + feats.shape[2:])
            if out is None:
                shape = (views, store.n_spots) + feats.shape[1:]
                out = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path},
                               "metadata": _cache_metadata(shape, str(np_dtype))}, create=True).result()
            pending.append(out[v, done:done + n_real].write(feats[:n_real]))
        done += n_real
        if len(pending) > 4 * views:  # bounded write-behind: encoding and writing overlap
            for w in pending[:-views]:
                w.result()
            pending = pending[-views:]
        if log is not None and (done == store.n_spots or done % (batch_size * 20) < batch_size):
            log(progress.line(done))
    for w in pending:
        w.result()


class FeatureStream:
    """A feature cache [V, N, h, w, C] left on disk: rows are read when asked for (heads whose features do not fit
    in memory stream their batches from it)."""

    def __init__(self, array: ts.TensorStore, path: str):
        self._array, self.path = array, path
        self.shape = tuple(int(d) for d in array.shape)
        self.dtype = np.dtype(array.dtype.numpy_dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def rows(self, views: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Features of (view, row) pairs, [len(rows), h, w, C]."""
        views, rows = np.asarray(views, np.int64), np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0,) + self.shape[2:], self.dtype)
        return self._array.vindex[views, rows].read().result()

    def view(self, v: int) -> "FeatureView":
        return FeatureView(self, v)


class FeatureView:
    """One dihedral view of a FeatureStream, indexable by rows like an [N, h, w, C] array."""

    def __init__(self, stream: FeatureStream, v: int):
        self.stream, self.v = stream, v
        self.shape = stream.shape[1:]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows]
        return self.stream.rows(np.full(len(rows), self.v), rows)


def machine_memory_bytes() -> int:
    """This machine's physical memory (16 GiB assumed where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 16 << 30


def resident_bytes_budget() -> int:
    """Bytes of features kept in memory before LOO streams them from disk instead: a quarter of the machine's
    memory (on a CPU backend the device copy is host memory too, and the run needs room beside them)."""
    return machine_memory_bytes() // 4


def cached_features(cache_dir: str, store, encoder_variables: dict, *, variant: str,
                    encoder_features=(32, 64, 128), batch_size: int = 128, views: int = 1, dtype: str = "float32",
                    stain_jitter: float = 0.0, jitter_seed: int = 0, resident: bool = True, log=None,
                    compute_dtype: str | None = None) -> tuple["np.ndarray | FeatureStream", str]:
    """Features [V, N, h, w, C] in `dtype` (computed in `compute_dtype`, default `dtype`) from the on-disk cache,
    computing and storing them on a miss. Returns (features in memory, or a FeatureStream on the cache when not
    `resident`; path)."""
    key = cache_key(store, encoder_variables, variant, views, dtype, stain_jitter, jitter_seed, compute_dtype)
    path = os.path.join(os.path.abspath(cache_dir), f"features-{key}")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    arr = None
    if os.path.exists(os.path.join(path, "zarr.json")):
        try:
            arr = ts.open(spec, read=True).result()
            if tuple(arr.shape[:2]) != (views, store.n_spots):
                arr = None
            elif log:
                log(f"[features] cache hit {path}")
        except Exception:  # unreadable cache entry: recompute and replace it
            arr = None
    if arr is None:
        side = int(store.tiles.shape[1]) // 2 ** len(tuple(encoder_features))
        workdir_lib.ensure_free_space(cache_dir, views * store.n_spots * side * side
                                      * int(tuple(encoder_features)[-1]) * jnp.dtype(dtype).itemsize,
                                      "the feature cache")
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        write_features(tmp, store, encoder_variables, variant=variant, encoder_features=encoder_features,
                       batch_size=batch_size, views=views, dtype=dtype, stain_jitter=stain_jitter,
                       jitter_seed=jitter_seed, log=log, compute_dtype=compute_dtype)
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
        arr = ts.open(spec, read=True).result()
    if resident:
        return arr.read().result(), path
    return FeatureStream(arr, path), path


def for_config(config, workdir: str, store, encoder_variables: dict, *, resident: bool = True
               ) -> "np.ndarray | FeatureStream":
    """The features [V, N, h, w, C] of every spot of `store` under `encoder_variables`, from WORKDIR/cache; V = 8
    dihedral views with train.augment=dihedral (stain-jittered with train.stain_jitter), else 1. In memory, or a
    FeatureStream when not `resident`."""
    feats, _ = cached_features(os.path.join(workdir, "cache"), store, encoder_variables, variant=config.model.variant,
                               encoder_features=tuple(config.model.encoder_features),
                               batch_size=config.eval_batch_size, views=n_views(config),
                               dtype=cache_dtype(config), compute_dtype=config.model.get("compute_dtype", "float32"),
                               stain_jitter=stain_jitter(config), jitter_seed=int(config.seed), resident=resident,
                               log=console.log)
    return feats


def cache_dtype(config) -> str:
    """train.feature_cache_dtype, "auto" being model.compute_dtype."""
    return str(builders.feature_dtype(config))


def n_views(config) -> int:
    return 8 if config.train.augment == "dihedral" else 1


def colour_statistics(store, rows: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """The trivial-image control's colour statistics (controls.tile_colour_features) of the tiles of `rows` (all
    when None), in that order, reading the store a chunk at a time in ascending row order."""
    rows = np.arange(store.n_spots) if rows is None else np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), len(controls.COLOUR_FEATURE_NAMES)), np.float64)
    for a in range(0, len(rows), chunk):
        part = order[a:a + chunk]
        out[part] = controls.tile_colour_features(np.asarray(store.tiles[rows[part]]))
    return out


def shown_tiles(store, rows: np.ndarray, max_sections: int = 4) -> np.ndarray:
    """Tiles of `rows` for the H&E under the spatial maps (plots.plot_spatial_maps): those of the first
    `max_sections` sections, the ones the figure shows, read from the store; white for the rest."""
    sections = store.obs["section"][rows]
    shown = np.isin(sections, list(dict.fromkeys(sections.tolist()))[:max_sections])
    tiles = np.full((len(rows),) + tuple(store.tiles.shape[1:]), 255, np.uint8)
    if shown.any():
        tiles[shown] = np.asarray(store.tiles[np.sort(rows[shown])])[np.argsort(np.argsort(rows[shown]))]
    return tiles


def stain_jitter(config) -> float:
    return float(config.train.get("stain_jitter", 0.0))


def feature_bytes(config, store) -> int:
    """Bytes of one encoder's feature cache for `store` (every view)."""
    t = int(store.tiles.shape[1]) // 2 ** len(tuple(config.model.encoder_features))  # each block halves the tile
    itemsize = jnp.dtype(cache_dtype(config)).itemsize
    return n_views(config) * store.n_spots * t * t * int(config.model.encoder_features[-1]) * itemsize


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.1f} GiB" if n_bytes >= 2 ** 30 else f"{n_bytes / 2 ** 20:.1f} MiB"


def _cache_bytes_present(cache_dir: str) -> int:
    """Bytes of the feature caches already under `cache_dir` (a rerun hits or replaces them)."""
    total = 0
    for root, _, files in os.walk(cache_dir):
        if os.sep + "features-" in root:  # a cache directory or one inside it
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def require_cache_space(config, workdir: str, stores: list, encoders: dict[str, int], log=None) -> None:
    """Before any autoencoder trains: the feature caches a run will write under WORKDIR/cache, one per encoder
    (`encoders`: what they are -> how many) and store (`stores`: leave-one-patient-out caches its one store, the
    external test its training and its test store), every view of every spot, must fit on the workdir's disk. A run that cannot fit
    them is refused now, naming the sizes and the settings that shrink them (WorkdirError, exit 73), rather than
    at the first cache that does not fit, after hours of pretraining and encoding."""
    cache_dir = os.path.join(workdir, "cache")
    n = sum(encoders.values())
    each = sum(feature_bytes(config, s) for s in stores)
    n_spots = sum(s.n_spots for s in stores)
    need, present = n * each, _cache_bytes_present(cache_dir)
    free = workdir_lib.free_bytes(cache_dir)
    what = f"{n} encoder{'s' if n != 1 else ''} (" + ", ".join(f"{k} {v}" for k, v in encoders.items() if v) + ")"
    if log:
        log(f"[features] caches of {what} x {_size(each)} = {_size(need)} under {cache_dir} ({_size(free)} free)")
    if need > free + present:
        raise WorkdirError(
            errno.ENOSPC,
            f"{cache_dir}: this run caches the frozen features of {what}, {n_views(config)} views of "
            f"{n_spots} spots{' of ' + str(len(stores)) + ' stores' if len(stores) > 1 else ''} at "
            f"{_size(each)} each: {_size(need)} ({need:,} bytes) in all, but the disk has "
            f"{_size(free)} free" + (f" and {_size(present)} of earlier caches" if present else "") + ". Shrink it: "
            + ("--config.ae.store=IMAGE_STORE (one autoencoder for every fold, pretrained on a separate image set "
               "such as ICIAR/BACH, as the paper did, instead of one per fold), "
               if any("per fold" in k and v for k, v in encoders.items()) else "")
            + "--config.train.feature_cache_dtype=bfloat16 "
            "(half the bytes; the heads still compute in float32), --config.loo.random_encoder_control=off (or "
            "fewer loo.random_encoder_draws), --config.train.augment=none (1 view instead of 8); or use a --workdir "
            "on a larger disk")


def resident_choice(config, store, n_encoders: int, log=None) -> bool:
    """train.features_in_memory: "on", "off", or "auto" (in memory when every encoder's features fit in
    `resident_bytes_budget()`)."""
    setting = str(config.train.get("features_in_memory", "auto")).lower()
    if setting != "auto":
        return setting == "on"
    need, budget = n_encoders * feature_bytes(config, store), resident_bytes_budget()
    if need > budget and log:
        log(f"[features] {n_encoders} x {feature_bytes(config, store) / 2**30:.1f} GiB of features exceed the "
            f"in-memory budget ({budget / 2**30:.1f} GiB, a quarter of this machine's memory): the heads stream their "
            "batches from the on-disk cache (train.features_in_memory=on forces memory)")
    return need <= budget
