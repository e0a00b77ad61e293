"""The tile store: the one format every dataset is converted into, on local disk or in an object store.

Layout of a store (a directory, or a prefix of `gs://`, `s3://`, `file://` or `memory://` URL)::

    manifest.json   genes, tile size, expression normalisation, microns per pixel, provenance
    tiles/          zarr v3 array, uint8 [N, T, T, 3]
    expression/     zarr v3 array, float32 [N, G]
    obs.csv         one row per spot: spot_id, section, patient, array_x, array_y, pixel_x, pixel_y, label
                    [, library_size, n_genes_detected: sequencing depth, in spot stores written since they exist]

Every file is read and written through a tensorstore kvstore built from the location (`kvstore_spec`), so a
URL works wherever a path does. Stores are written through `StoreWriter`, and a reader never sees a half-written
one: a plain path is built under a temporary sibling directory and renamed into place by `close()`; an object
store has no rename, so a URL store is written in place with the manifest LAST, as the commit, and `open_store`
refuses a store whose manifest is missing. `memory://` stores live as long as the process (tests).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorstore as ts

from histospace_jax.errors import BadInputError

FORMAT_NAME = "histospace-tile-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OBS_FILE = "obs.csv"

# Column name -> numpy dtype. `label` is the pathologist annotation ("" where none).
OBS_COLUMNS: dict[str, Any] = {
    "spot_id": str,
    "section": str,
    "patient": str,
    "array_x": np.int32,
    "array_y": np.int32,
    "pixel_x": np.float64,
    "pixel_y": np.float64,
    "label": str,
}
REQUIRED_OBS = ("section", "patient", "array_x", "array_y", "pixel_x", "pixel_y")
# Columns a store has only when its writer declares them (`StoreWriter(extra_obs=...)`), after OBS_COLUMNS.
# Sequencing depth of spot stores: `library_size` is the spot's total count (UMI) over ALL genes of its raw count
# matrix, before gene selection; `n_genes_detected` the number of those genes with a count > 0. Image-only stores
# and stores written before these columns existed lack them: test with `"library_size" in store.obs`.
OPTIONAL_OBS: dict[str, Any] = {
    "library_size": np.float64,
    "n_genes_detected": np.int64,
}
# Tiles are compressed one per inner chunk, so a random read decodes exactly one tile, and grouped into shard
# files of TILES_PER_SHARD so a large store is not hundreds of thousands of small files.
TILES_PER_SHARD = 256


class StoreError(BadInputError):
    """A tile store is missing, malformed or inconsistent; the message names the file and the fix."""


# URL scheme -> tensorstore kvstore driver. gs:// and s3:// use the machine's default credentials (gcloud
# application-default login / the VM's service account; the AWS credential chain).
URL_DRIVERS = {"gs": "gcs", "s3": "s3", "file": "file", "memory": "memory"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
# Keys only a tile store has: their presence tells a store (committed or not) from an empty or foreign prefix.
_STORE_KEYS = (MANIFEST, "tiles/zarr.json", "expression/zarr.json", OBS_FILE)
# One tensorstore context for the process: `memory://` data is held by the context, so every open must share it
# (and object-store connections are pooled).
_CONTEXT = ts.Context()


def is_url(location: str | os.PathLike) -> bool:
    """True for `scheme://...` locations (any scheme: unsupported ones are refused by `kvstore_spec`)."""
    return bool(_URL.match(os.fspath(location)))


def normalise_location(location: str | os.PathLike) -> str:
    """The canonical form of a store location: an absolute path, or a URL without trailing slashes (a relative
    `file://` path made absolute). Never mangles a URL the way os.path.abspath would."""
    location = os.fspath(location)
    m = _URL.match(location)
    if not m:
        return os.path.abspath(location)
    scheme, rest = m.group(1).lower(), m.group(2)
    # os.path.abspath also drops trailing slashes; a relative file:// path would otherwise depend on the cwd of
    # whichever process (a Grain worker) opens it.
    rest = os.path.abspath(rest or ".") if scheme == "file" else rest.rstrip("/")
    return f"{scheme}://{rest}"


def join_location(location: str, name: str) -> str:
    """`location`/`name`, for messages and for locating a store's members."""
    if not is_url(location):
        return os.path.join(location, name)
    return location + name if location.endswith("/") else f"{location}/{name}"


def location_name(location: str | os.PathLike) -> str:
    """The last component of a path or URL (`gs://bucket/stores/her2st/` -> `her2st`)."""
    location = os.fspath(location)
    m = _URL.match(location)
    if m:
        return m.group(2).rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(os.path.normpath(location))


def kvstore_spec(location: str | os.PathLike, prefix: str = "") -> dict:
    """The tensorstore kvstore spec of `prefix` ("" = the store's root, "tiles/" = its tiles array) inside the
    store at `location` (a path or a gs://, s3://, file://, memory:// URL). Builds the spec only: no I/O."""
    location = normalise_location(location)
    m = _URL.match(location)
    if not m:
        return {"driver": "file", "path": _dir_path(location) + prefix}
    scheme, rest = m.group(1), m.group(2)
    driver = URL_DRIVERS.get(scheme)
    if driver is None:
        raise StoreError(f"{location}: unsupported URL scheme {scheme}://; a tile store lives at a local path or a "
                         f"{', '.join(s + '://' for s in URL_DRIVERS)} URL.")
    if driver in ("gcs", "s3"):
        bucket, _, path = rest.partition("/")
        if not bucket:
            raise StoreError(f"{location}: no bucket name; write {scheme}://BUCKET/PATH/TO/STORE.")
        return {"driver": driver, "bucket": bucket, "path": _dir_path(path) + prefix}
    return {"driver": driver, "path": _dir_path(rest) + prefix}


def _dir_path(path: str) -> str:
    """A kvstore path naming a directory: ends with one "/" (the root of a bucket or memory store is "")."""
    stripped = path.rstrip("/")
    return stripped + "/" if stripped else ("/" if path.startswith("/") else "")


def _array_spec(location: str, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": kvstore_spec(location, name + "/")}


def _open_kvstore(location: str) -> ts.KvStore:
    try:
        return ts.KvStore.open(kvstore_spec(location), context=_CONTEXT).result()
    except StoreError:
        raise
    except Exception as e:  # tensorstore reports bad specs and credentials as ValueError with its own text
        raise StoreError(f"{location}: cannot open ({e}); check the path or URL and, for gs:// or s3://, your "
                         "credentials.") from e


def _read_key(kv: ts.KvStore, location: str, key: str) -> bytes | None:
    """The bytes of `key` in the store, or None when it does not exist."""
    try:
        result = kv.read(key).result()
    except Exception as e:
        raise StoreError(f"{join_location(location, key)}: cannot read ({e}); check the location and, for gs:// "
                         "or s3://, your credentials and network.") from e
    return result.value if result.state == "value" else None


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """Every key starting with `prefix` (the empty prefix: every key)."""
    if not prefix:
        return ts.KvStore.KeyRange()
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def _key_range(key: str) -> ts.KvStore.KeyRange:
    """Exactly the one key."""
    return ts.KvStore.KeyRange(key, key + "\0")


def store_exists(location: str | os.PathLike) -> bool:
    """Whether something occupies `location`: for a path, anything; for a URL, a tile store, committed or not
    (an object-store prefix has no existence of its own)."""
    location = normalise_location(location)
    if not is_url(location):
        return os.path.exists(location)
    kv = _open_kvstore(location)
    return any(_read_key(kv, location, k) is not None for k in _STORE_KEYS)


class ArrayView:
    """Numpy-style read access to a zarr array: `view[i]`, `view[a:b]`, `view[[i, j]]` return numpy arrays."""

    def __init__(self, array: ts.TensorStore, path: str):
        self._array = array
        self._path = path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype.numpy_dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (list, np.ndarray)):
            index = np.asarray(index)
            if index.dtype == bool:
                index = np.flatnonzero(index)
            if index.size == 0:
                return np.zeros((0,) + self.shape[1:], self.dtype)
            # TensorStore reads sorted unique coordinates fastest; restore the caller's order afterwards.
            uniq, inverse = np.unique(index, return_inverse=True)
            return self._array.oindex[uniq].read().result()[inverse]
        return self._array[index].read().result()

    def __array__(self, dtype=None, copy=None):
        out = self._array.read().result()
        return out.astype(dtype) if dtype is not None else out

    def __repr__(self) -> str:
        return f"ArrayView({self._path}, shape={self.shape}, dtype={self.dtype})"


@dataclasses.dataclass(frozen=True)
class TileStore:
    """An opened tile store. `tiles` and `expression` read lazily; `obs` and `manifest` are in memory."""

    path: str
    manifest: dict
    tiles: ArrayView
    expression: ArrayView
    obs: dict[str, np.ndarray]

    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    @property
    def n_spots(self) -> int:
        return len(self.tiles)

    @property
    def patients(self) -> list[str]:
        """Patients in order of first appearance."""
        return list(dict.fromkeys(self.obs["patient"].tolist()))

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("synthetic", False))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the manifest, which records how and when the store was prepared (source, provenance,
        filters, stain normalisation, genes, spot count), of every spot's obs and of its first, middle and last
        tiles and expression rows: a store prepared again, or another store at the same path, gets another.
        Checkpoints record it, so a workdir never resumes on data it was not trained on. (Not every tile: at
        STNet scale that would be gigabytes.)"""
        h = hashlib.sha1(json.dumps(self.manifest, sort_keys=True, default=str).encode())
        for name in sorted(self.obs):
            h.update(name.encode())
            h.update(np.asarray(self.obs[name]).astype(str).tobytes())
        n = self.n_spots
        for row in sorted({0, n // 2, n - 1} if n else ()):
            h.update(np.ascontiguousarray(self.tiles[row]).tobytes())
            if len(self.expression.shape) == 2 and self.expression.shape[1]:
                h.update(np.ascontiguousarray(self.expression[row]).tobytes())
        return h.hexdigest()[:16]

    def gene_index(self, genes: Sequence[str]) -> np.ndarray:
        """Column indices of `genes`; raises naming every gene the store lacks."""
        lookup = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in lookup]
        if missing:
            raise StoreError(
                f"{self.path}: {len(missing)} requested gene(s) not in this store, e.g. {missing[:10]}. "
                "Prepare the store with the same gene list (prepare --genes_from=OTHER_STORE) or drop them."
            )
        return np.array([lookup[g] for g in genes], dtype=np.int64)


def _read_obs(kv: ts.KvStore, location: str, n: int) -> dict[str, np.ndarray]:
    obs_path = join_location(location, OBS_FILE)
    data = _read_key(kv, location, OBS_FILE)
    if data is None:
        raise StoreError(f"{obs_path}: missing spot table; the store is incomplete, prepare it again.")
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as e:
        raise StoreError(f"{obs_path}: cannot read spot table ({e}); the store is damaged, prepare it again.") from e
    if not rows:
        raise StoreError(f"{obs_path}: empty spot table; prepare the store again.")
    header, body = rows[0], rows[1:]
    missing = [c for c in REQUIRED_OBS if c not in header]
    if missing:
        raise StoreError(f"{obs_path}: missing column(s) {missing}; prepare the store again.")
    if len(body) != n:
        raise StoreError(f"{obs_path}: {len(body)} rows but tiles/ holds {n} tiles; the store is corrupt, prepare it again.")
    cols = list(zip(*body)) if body else [()] * len(header)
    obs = {}
    for name, values in zip(header, cols):
        dtype = OBS_COLUMNS.get(name, OPTIONAL_OBS.get(name, str))
        if dtype is str:
            obs[name] = np.array(values, dtype=object).astype(str)
            continue
        try:
            obs[name] = np.array(values, dtype=dtype)
        except ValueError:
            bad = next((i, v) for i, v in enumerate(values) if not _parses(v, dtype))
            raise StoreError(
                f"{obs_path}: column {name!r}, data row {bad[0] + 1}: {bad[1]!r} is not a {np.dtype(dtype).name} "
                "value; the spot table is damaged, prepare the store again."
            ) from None
    return obs


def _parses(value: str, dtype) -> bool:
    try:
        np.array([value], dtype=dtype)
        return True
    except ValueError:
        return False


def open_store(path: str | os.PathLike) -> TileStore:
    """Opens the tile store at `path` (a directory, or a gs://, s3://, file://, memory:// URL) for reading."""
    path = os.fspath(path)
    if is_url(path):
        path = normalise_location(path)
    elif not os.path.isdir(path):
        raise StoreError(f"{path}: no such tile store. Create one with `python -m histospace_jax.prepare` or use the demo.")
    manifest_path = join_location(path, MANIFEST)
    kv = _open_kvstore(path)
    raw = _read_key(kv, path, MANIFEST)
    if raw is None:
        _refuse_without_manifest(kv, path)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{manifest_path}: not valid JSON ({e}); prepare the store again.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{manifest_path}: format {found!r} is not {FORMAT_NAME!r}.")
    try:
        tiles = ts.open(_array_spec(path, "tiles"), read=True, context=_CONTEXT).result()
        expression = ts.open(_array_spec(path, "expression"), read=True, context=_CONTEXT).result()
    except Exception as e:  # tensorstore raises ValueError subclasses with its own text
        raise StoreError(f"{path}: cannot open tiles/ or expression/ ({e}); prepare the store again.") from e
    n = int(tiles.shape[0])
    if int(expression.shape[0]) != n:
        raise StoreError(f"{path}: tiles/ has {n} rows but expression/ has {expression.shape[0]}; prepare it again.")
    if int(expression.shape[1]) != len(manifest["genes"]):
        raise StoreError(
            f"{path}: expression/ has {expression.shape[1]} columns but manifest lists {len(manifest['genes'])} genes."
        )
    obs = _read_obs(kv, path, n)
    return TileStore(path, manifest, ArrayView(tiles, join_location(path, "tiles")),
                     ArrayView(expression, join_location(path, "expression")), obs)


SCALE_TOLERANCE = 0.01  # relative difference of um/px under which two stores' tiles count as one magnification


def require_same_tile_scale(reference: TileStore, other: TileStore, role: str) -> None:
    """Refuses a store whose tiles show another magnification than `reference`'s: an encoder trained on one scale
    reads the other's cells and tissue at the wrong size, with no error anywhere else. `role` names `other`'s use
    (e.g. "config.ae.store"). Stores that do not record their scale (the synthetic demo's) pass."""
    ref_mpp, other_mpp = reference.manifest.get("microns_per_pixel"), other.manifest.get("microns_per_pixel")
    if not ref_mpp or not other_mpp or abs(other_mpp - ref_mpp) <= SCALE_TOLERANCE * ref_mpp:
        return
    other_um, ref_um = other_mpp * other.tiles.shape[1], ref_mpp * reference.tiles.shape[1]
    raise StoreError(f"{other.path} ({role}): tiles at {other_mpp:g} um/px ({other_um:g} um wide), but "
                     f"{reference.path} has {ref_mpp:g} um/px ({ref_um:g} um): the encoder would see another "
                     f"magnification. Prepare {other.path} again with --target_mpp={ref_mpp:g}.")


def _refuse_without_manifest(kv: ts.KvStore, location: str) -> None:
    """Raises the right StoreError for a location without a manifest: nothing there, or an unfinished store."""
    manifest_path = join_location(location, MANIFEST)
    if any(_read_key(kv, location, k) is not None for k in _STORE_KEYS[1:]):
        # The manifest is the commit of a store: written last, so its absence means the writer never finished.
        raise StoreError(f"{manifest_path}: missing, but {location} holds tile data: a prepare writing it was "
                         "interrupted and never committed it (the manifest is written last). Re-run prepare with "
                         "--overwrite to replace it.")
    if is_url(location):
        raise StoreError(f"{location}: no such tile store (no manifest.json or tiles/ under it). Check the URL, or "
                         "create one with `python -m histospace_jax.prepare --output=URL`.")
    raise StoreError(f"{manifest_path}: missing; {location} is not a tile store (or was never finished). "
                     "Prepare it again.")


def _format_obs_value(v) -> str:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


class StoreWriter:
    """Builds a tile store section by section in bounded memory.

        with StoreWriter(path_or_url, genes=genes, manifest={...}) as w:
            w.append(tiles, expression, obs)   # any number of times
        # the store is visible at `path_or_url` only after a clean exit from the block

    `tmp_path` is a local directory whose files become files of the store on `close()` (ingest puts its report
    there). A plain path is built in a temporary sibling directory (tmp_path itself) that `close()` renames into
    place; an exception removes it and leaves `path` untouched. A URL store is written in place, its small files
    staged in tmp_path and uploaded by `close()`, which writes the manifest last: until then `open_store` refuses
    it. An exception removes what was written. Overwriting a URL store removes the old one when the writer starts
    (an object store cannot swap two prefixes), so a failed overwrite leaves no store, never a half-written one.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        genes: Sequence[str],
        tile_size: int = 128,
        manifest: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        extra_obs: Sequence[str] = (),
    ):
        self.path = normalise_location(path)
        self.is_url = is_url(self.path)
        if not overwrite and store_exists(self.path):
            raise StoreError(f"{self.path}: already exists. Pass overwrite (prepare --overwrite) to replace it.")
        unknown = [c for c in extra_obs if c not in OPTIONAL_OBS]
        if unknown or len(set(extra_obs)) != len(extra_obs):
            raise StoreError(f"{self.path}: extra obs columns {list(extra_obs)}: each must be one of "
                             f"{list(OPTIONAL_OBS)}, at most once.")
        self.obs_columns = list(OBS_COLUMNS) + list(extra_obs)
        self.extra_obs = tuple(extra_obs)
        genes = [str(g) for g in genes]
        # An empty gene list is allowed: image-only stores (autoencoder pretraining) carry no expression.
        dup = sorted({g for g in genes if genes.count(g) > 1}) if len(set(genes)) != len(genes) else []
        if dup:
            raise StoreError(f"{self.path}: duplicated gene names {dup[:10]}; make gene names unique before writing.")
        self.genes = genes
        self.tile_size = int(tile_size)
        self.overwrite = overwrite
        self._manifest = dict(manifest or {})
        if self.is_url:
            self._kv = _open_kvstore(self.path)
            if overwrite:
                _remove_url_store(self._kv, self.path)
            self._build_at = self.path
            self.tmp_path = tempfile.mkdtemp(prefix=f"histospace-store-{location_name(self.path)}-")
        else:
            parent = os.path.dirname(self.path)
            os.makedirs(parent, exist_ok=True)
            self.tmp_path = os.path.join(parent, f".{os.path.basename(self.path)}.tmp-{uuid.uuid4().hex[:8]}")
            os.makedirs(self.tmp_path)
            self._build_at = self.tmp_path
            self._kv = _open_kvstore(self.tmp_path)
        t = self.tile_size
        self._tiles = ts.open(
            {
                **_array_spec(self._build_at, "tiles"),
                "metadata": {
                    "shape": [0, t, t, 3],
                    "data_type": "uint8",
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [TILES_PER_SHARD, t, t, 3]}},
                    "codecs": [{
                        "name": "sharding_indexed",
                        "configuration": {
                            "chunk_shape": [1, t, t, 3],
                            "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
                            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                             {"name": "crc32c"}],
                        },
                    }],
                },
            },
            create=True,
            context=_CONTEXT,
        ).result()
        g = len(genes)
        self._expr = ts.open(
            {
                **_array_spec(self._build_at, "expression"),
                "metadata": {
                    "shape": [0, g],
                    "data_type": "float32",
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1024, max(1, min(g, 1024))]}},
                    "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
                },
            },
            create=True,
            context=_CONTEXT,
        ).result()
        self._obs_file = open(os.path.join(self.tmp_path, OBS_FILE), "w", newline="")
        self._obs_writer = csv.writer(self._obs_file)
        self._obs_writer.writerow(self.obs_columns)
        self.n = 0
        self._closed = False

    def append(self, tiles: np.ndarray, expression: np.ndarray, obs: Mapping[str, Iterable]) -> None:
        """Appends n spots: tiles uint8 [n,T,T,3], expression float32 [n,G], obs columns of length n."""
        tiles = np.asarray(tiles)
        expression = np.asarray(expression, dtype=np.float32)
        n = tiles.shape[0]
        t = self.tile_size
        where = obs.get("section", ["?"])
        where = f"section {np.asarray(where)[0] if n else '?'}"
        if tiles.dtype != np.uint8 or tiles.shape[1:] != (t, t, 3):
            raise StoreError(f"{self.path}: {where}: tiles must be uint8 [n,{t},{t},3], got {tiles.dtype} {tiles.shape}.")
        if expression.shape != (n, len(self.genes)):
            raise StoreError(
                f"{self.path}: {where}: expression shape {expression.shape} != ({n}, {len(self.genes)} genes)."
            )
        bad = ~np.isfinite(expression)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise StoreError(
                f"{self.path}: {where}: non-finite expression ({expression[i, j]}) at spot row {i}, gene "
                f"{self.genes[j]!r}; fix or drop that spot in the input before preparing."
            )
        columns = {}
        for name in REQUIRED_OBS:
            if name not in obs:
                raise StoreError(f"{self.path}: {where}: obs column {name!r} missing.")
        for name in OBS_COLUMNS:
            col = np.asarray(obs[name]) if name in obs else np.array([""] * n if OBS_COLUMNS[name] is str else [0] * n)
            if name == "spot_id" and name not in obs:
                col = np.array([f"{x}x{y}" for x, y in zip(obs["array_x"], obs["array_y"])])
            if len(col) != n:
                raise StoreError(f"{self.path}: {where}: obs column {name!r} has {len(col)} values for {n} spots.")
            columns[name] = col
        for name in self.extra_obs:
            if name not in obs:
                raise StoreError(f"{self.path}: {where}: obs column {name!r} missing (this store declares it in "
                                 "extra_obs); pass it for every spot.")
            columns[name] = self._numeric_obs(name, obs[name], n, where)
        if n == 0:
            return
        new_n = self.n + n
        self._tiles = self._tiles.resize(exclusive_max=[new_n, t, t, 3]).result()
        self._expr = self._expr.resize(exclusive_max=[new_n, len(self.genes)]).result()
        self._tiles[self.n:new_n].write(tiles).result()
        self._expr[self.n:new_n].write(expression).result()
        for row in zip(*(columns[c] for c in self.obs_columns)):
            self._obs_writer.writerow([_format_obs_value(v) for v in row])
        self.n = new_n

    def _numeric_obs(self, name: str, values, n: int, where: str) -> np.ndarray:
        """An optional numeric obs column, checked: finite, non-negative, and whole numbers for integer columns."""
        dtype = np.dtype(OPTIONAL_OBS[name])
        try:
            col = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise StoreError(f"{self.path}: {where}: obs column {name!r} must be numeric ({e}).") from e
        if col.shape != (n,):
            raise StoreError(f"{self.path}: {where}: obs column {name!r} has shape {col.shape} for {n} spots.")
        bad = ~np.isfinite(col) | (col < 0)
        if dtype.kind == "i":
            bad |= col != np.rint(col)
        if bad.any():
            i = int(np.argmax(bad))
            raise StoreError(f"{self.path}: {where}: obs column {name!r} has {float(col[i])!r} at spot row {i}; it "
                             f"must be a finite non-negative {dtype.name} value.")
        return col.astype(dtype)

    def update_manifest(self, **entries) -> None:
        """Adds manifest entries known only while writing (e.g. final counts); written by close()."""
        self._manifest.update(entries)

    def close(self) -> str:
        """Writes the manifest (the commit) and makes the finished store visible; returns its location."""
        if self._closed:
            return self.path
        self._obs_file.close()
        if self.n == 0:
            self.abort()
            raise StoreError(f"{self.path}: no spots were written; check the input selection.")
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "n_spots": self.n,
            "tile_size": self.tile_size,
            "genes": self.genes,
            **self._manifest,
        }
        manifest.setdefault("synthetic", False)
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        if self.is_url:
            try:
                for future in [self._kv.write(key, _file_bytes(full)) for key, full in _staged_files(self.tmp_path)]:
                    future.result()
                self._kv.write(MANIFEST, manifest_bytes).result()
            except Exception as e:
                self.abort()
                raise StoreError(f"{self.path}: writing the store failed ({e}); nothing was committed. Check "
                                 "the URL, credentials and network, then prepare again.") from e
            shutil.rmtree(self.tmp_path, ignore_errors=True)
        else:
            self._kv.write(MANIFEST, manifest_bytes).result()
            _replace_dir(self.tmp_path, self.path, self.overwrite)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Removes everything this writer wrote; a store that existed before is untouched (plain paths)."""
        if not self._obs_file.closed:
            self._obs_file.close()
        if self.is_url:
            # Best effort: the manifest was never written, so anything left behind is refused by open_store.
            try:
                futures = [self._kv.delete_range(_key_range(key)) for key, _ in _staged_files(self.tmp_path)]
                futures += [self._kv.delete_range(_prefix_range(p)) for p in ("tiles/", "expression/")]
                for future in futures:
                    future.result()
            except Exception:
                pass
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _staged_files(directory: str) -> list[tuple[str, str]]:
    """(store key, local file) of every file under a writer's local directory, the manifest excepted (it is the
    commit, written by close() alone)."""
    out = []
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            full = os.path.join(root, name)
            key = os.path.relpath(full, directory).replace(os.sep, "/")
            if key != MANIFEST:
                out.append((key, full))
    return out


def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _remove_url_store(kv: ts.KvStore, location: str) -> None:
    """Deletes the tile store at a URL: its manifest first, so no reader sees it half deleted. A prefix holding
    no tile store is left alone (it may hold other data)."""
    if not any(_read_key(kv, location, k) is not None for k in _STORE_KEYS):
        return
    try:
        kv.delete_range(_key_range(MANIFEST)).result()
        kv.delete_range(_prefix_range("")).result()
    except Exception as e:
        raise StoreError(f"{location}: cannot remove the existing store to overwrite it ({e}); check your "
                         "permissions on it, or write to another URL.") from e


def _replace_dir(src: str, dst: str, overwrite: bool) -> None:
    """Moves directory `src` to `dst`; an existing `dst` is swapped out first so there is no moment without one."""
    if os.path.exists(dst):
        if not overwrite:
            shutil.rmtree(src, ignore_errors=True)
            raise StoreError(f"{dst}: already exists. Pass overwrite to replace it.")
        trash = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, trash)
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)


def write_store(path, tiles, expression, genes, obs, *, manifest=None, overwrite=False, tile_size=None) -> str:
    """Writes a whole store in one call (small stores, tests). Optional obs columns (OPTIONAL_OBS) present in `obs`
    are written too."""
    tiles = np.asarray(tiles)
    extra = tuple(c for c in OPTIONAL_OBS if c in obs)
    with StoreWriter(path, genes=genes, tile_size=tile_size or tiles.shape[1], manifest=manifest,
                     overwrite=overwrite, extra_obs=extra) as w:
        w.append(tiles, expression, obs)
    return w.path
