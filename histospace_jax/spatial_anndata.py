"""Spot-level results as AnnData `.h5ad` in scanpy's spatial convention, for scanpy.pl.spatial and squidpy.

What a file holds (one library per section; its library_id is the section name, found in obs[library_key]):
    X                            the main values, float32 [spots, genes] (e.g. predicted expression); var_names = genes
    layers[name]                 more values of the same shape (e.g. "truth", one per control)
    obs                          one row per spot (spot_id, section, patient, ...; strings become categoricals)
    obsm["spatial"]              (x, y) = (pixel_x, pixel_y): spot centres in FULL-RESOLUTION pixels of the section
    uns["spatial"][library_id]   images: "hires" (longest side <= HIRES_MAX_SIDE) and "lowres" (<= LOWRES_MAX_SIDE),
                                 uint8 RGB; scalefactors: tissue_hires_scalef / tissue_lowres_scalef (image pixels per
                                 full-resolution pixel) and spot_diameter_fullres; metadata: where the image came from
scanpy draws obsm["spatial"] times the scalefactor on the image, so the two must agree: the library builders here
make the image and its scalefactor together.

A section's image comes from its slide where that can be read (`slide_library`), else from a mosaic of the spot
tiles placed at their pixel positions (`mosaic_library`); `store_libraries` chooses per section of a tile store.
anndata is an optional dependency, imported only when writing: `AnnDataMissing` says how to install it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from histospace_jax import atomic
from histospace_jax.errors import BadInputError
from histospace_jax.ingest import slide_io, wsi

HIRES_MAX_SIDE = 2000  # Space Ranger's tissue_hires_image is 2000 px on its longest side
LOWRES_MAX_SIDE = 600  # and tissue_lowres_image 600 px
SCALEFACTOR_KEYS = ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres")
# Spot diameters of the two technologies our stores come from, for scanpy's circles.
SPOT_MICRONS = {"visium": 55.0}
ST_SPOT_MICRONS = 100.0  # legacy Spatial Transcriptomics (HER2ST, STNet)


class AnnDataMissing(ImportError):
    """anndata is not installed; the message says how to install it."""


def _anndata():
    try:
        import anndata
    except ImportError as e:
        raise AnnDataMissing("writing .h5ad needs anndata, a dependency of histospace_jax that this environment "
                             "lacks: reinstall the package (pip install -e .) or pip install anndata") from e
    return anndata


# ------------------------------------------------------------------------------------------------- the images

def _shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """`rgb` shrunk so its longest side is at most `max_side` (never enlarged); returns (image, scale), scale =
    output width / input width."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return np.ascontiguousarray(rgb), 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(out), size[0] / w


def library_entry(hires: np.ndarray, hires_scalef: float, spot_diameter_fullres: float, *,
                  source: str) -> dict:
    """One library of `write_spatial_h5ad`: the hires image, a lowres copy shrunk from it, and their
    scalefactors (hires_scalef: hires pixels per full-resolution pixel). `source` says where the image came
    from (kept in the metadata)."""
    lowres, shrink = _shrink(hires, LOWRES_MAX_SIDE)
    return {"hires": hires, "lowres": lowres,
            "scalefactors": {"tissue_hires_scalef": float(hires_scalef),
                             "tissue_lowres_scalef": float(hires_scalef * shrink),
                             "spot_diameter_fullres": float(spot_diameter_fullres)},
            "metadata": {"source_image": source}}


def slide_library(image, *, spot_diameter_fullres: float, expected_size: tuple[int, int] | None = None) -> dict:
    """A library from the section's full-resolution image: an RGB uint8 array [H, W, 3] in memory, a slide opened
    with `wsi.open_slide`, or an image / whole-slide file (read from a low pyramid level: memory stays bounded by
    the hires image). With `expected_size` (width, height), an image of another size is refused (BadInputError):
    the spot coordinates would not fall on it."""
    if isinstance(image, np.ndarray):
        _check_size("the slide image (in memory)", image.shape[1], image.shape[0], expected_size)
        hires, scale = _shrink(image, HIRES_MAX_SIDE)
        return library_entry(hires, scale, spot_diameter_fullres, source="the slide image (in memory)")
    if isinstance(image, (str, os.PathLike)):
        with wsi.open_slide(os.fspath(image)) as slide:
            return slide_library(slide, spot_diameter_fullres=spot_diameter_fullres, expected_size=expected_size)
    source = os.path.abspath(image.path)
    _check_size(source, image.width, image.height, expected_size)
    hires, (down_x, _) = slide_io.overview(image, max(image.width, image.height) / HIRES_MAX_SIDE,
                                           "hires image of the .h5ad")
    return library_entry(hires, 1.0 / down_x, spot_diameter_fullres, source=source)


def _check_size(source: str, width: int, height: int, expected: tuple[int, int] | None) -> None:
    if expected is not None and (int(width), int(height)) != tuple(int(v) for v in expected):
        raise BadInputError(f"{source}: {width}x{height} pixels, but the spots were placed on a {expected[0]}x"
                            f"{expected[1]} image; the file changed since the store was prepared.")


def mosaic_library(pixel_xy: np.ndarray, tiles: np.ndarray, *, tile_fullres_px: float,
                   spot_diameter_fullres: float | None = None, full_size: tuple[int, int] | None = None) -> dict:
    """A library when the slide is not at hand: each spot's tile (covering tile_fullres_px full-resolution
    pixels) drawn at its centre on white, at the hires scale of a full-resolution image of `full_size` (width,
    height; default: just large enough for every tile). Full-resolution coordinates keep their origin, so
    obsm["spatial"] needs no shift."""
    xy = np.asarray(pixel_xy, np.float64).reshape(-1, 2)
    half = tile_fullres_px / 2.0
    if full_size is None:
        full_size = (math.ceil(xy[:, 0].max() + half), math.ceil(xy[:, 1].max() + half)) if len(xy) else (1, 1)
    width, height = int(full_size[0]), int(full_size[1])
    scale = min(1.0, HIRES_MAX_SIDE / max(width, height))
    canvas = np.full((max(1, round(height * scale)), max(1, round(width * scale)), 3), 255, np.uint8)
    side = max(1, round(tile_fullres_px * scale))
    for (x, y), tile in zip(xy, tiles):
        small = np.asarray(Image.fromarray(np.asarray(tile)).resize((side, side), Image.Resampling.BOX))
        r0, c0 = round((y - half) * scale), round((x - half) * scale)
        # Tiles padded past the slide's edge are clipped to the canvas, as the slide itself would be.
        rows = slice(max(r0, 0), min(r0 + side, canvas.shape[0]))
        cols = slice(max(c0, 0), min(c0 + side, canvas.shape[1]))
        if rows.start < rows.stop and cols.start < cols.stop:
            canvas[rows, cols] = small[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0]
    return library_entry(canvas, scale, spot_diameter_fullres or tile_fullres_px,
                         source="mosaic of the spot tiles (slide image not available)")


def _median_spacing(xy: np.ndarray) -> float | None:
    """Median distance from a spot to its nearest neighbour, in the units of `xy`; None for fewer than 2."""
    if len(xy) < 2:
        return None
    dist, _ = cKDTree(xy).query(xy, k=2)
    spacing = float(np.median(dist[:, 1]))
    return spacing if spacing > 0 else None


def store_libraries(store, rows: np.ndarray) -> dict[str, dict]:
    """One library per section among `rows` of a tile store: from the slide the manifest names
    (manifest["sections"][i]["image"]) where that file still reads at its recorded size, else a mosaic of the
    section's tiles. Tile footprint and spot diameter come from the manifest's scales, else the spot spacing."""
    manifest, obs = store.manifest, store.obs
    infos = {s.get("section"): s for s in manifest.get("sections", []) if isinstance(s, dict)}
    spot_um = SPOT_MICRONS.get(manifest.get("source_format"), ST_SPOT_MICRONS)
    rows = np.asarray(rows)
    out = {}
    for section in dict.fromkeys(obs["section"][rows].tolist()):
        sel = np.sort(rows[obs["section"][rows] == section])
        xy = np.stack([obs["pixel_x"][sel], obs["pixel_y"][sel]], axis=1)
        info = infos.get(section, {})
        mpp = info.get("source_microns_per_pixel")
        footprint = (info.get("source_tile_px")
                     or (manifest["tile_microns"] / mpp if mpp and manifest.get("tile_microns") else None)
                     or _median_spacing(xy) or float(store.tiles.shape[1]))
        spot_diameter = spot_um / mpp if mpp else footprint
        size = ((info["image_width"], info["image_height"])
                if info.get("image_width") and info.get("image_height") else None)
        image = info.get("image")
        library, fallback = None, "no slide image recorded in the store's manifest"
        if image and os.path.isfile(image):
            try:
                library = slide_library(image, spot_diameter_fullres=spot_diameter, expected_size=size)
            except BadInputError as e:
                fallback = str(e)
        elif image:
            fallback = f"{image}: not found on this machine"
        if library is None:
            library = mosaic_library(xy, np.asarray(store.tiles[sel]), tile_fullres_px=float(footprint),
                                     spot_diameter_fullres=spot_diameter, full_size=size)
            library["metadata"]["why_not_the_slide"] = fallback
        out[section] = library
    return out


# ------------------------------------------------------------------------------------------------- the file

def _check_library(path: str, library_id: str, lib: Mapping) -> None:
    where = f"{path}: library {library_id!r}"
    hires = lib.get("hires") if isinstance(lib, Mapping) else None
    if not isinstance(hires, np.ndarray) or hires.ndim != 3 or hires.shape[2] != 3:
        raise ValueError(f"{where}: needs a 'hires' image array [H, W, 3]; build it with slide_library or "
                         "mosaic_library.")
    factors = lib.get("scalefactors", {})
    bad = [k for k in SCALEFACTOR_KEYS if not (np.isfinite(factors.get(k, np.nan)) and factors.get(k, 0) > 0)]
    if bad:
        raise ValueError(f"{where}: scalefactors {bad} missing or not positive; give all of {SCALEFACTOR_KEYS}.")


def _unique_names(obs: Mapping[str, np.ndarray], library: np.ndarray, n: int) -> list[str]:
    """obs_names: the spot ids when they are unique, else "<library>_<spot id>" (spot ids repeat across
    sections), else row numbers."""
    if "spot_id" in obs:
        ids = [str(v) for v in obs["spot_id"]]
        if len(set(ids)) == n:
            return ids
        ids = [f"{lib}_{i}" for lib, i in zip(library, ids)]
        if len(set(ids)) == n:
            return ids
    return [str(i) for i in range(n)]


def write_spatial_h5ad(path: str, *, X: np.ndarray, genes: Sequence[str], obs: Mapping[str, Sequence],
                       spatial_xy: np.ndarray, library_images: Mapping[str, Mapping],
                       library_key: str = "section", layers: Mapping[str, np.ndarray] | None = None,
                       uns_extra: Mapping[str, Any] | None = None) -> str:
    """Writes `path` (.h5ad) atomically: X [n, genes], obs columns of length n (obs[library_key] names each spot's
    library), spatial_xy [n, 2] full-resolution (x, y), library_images {library_id: {"hires", "lowres" (optional),
    "scalefactors", "metadata" (optional)}} as built by slide_library / mosaic_library / store_libraries, layers
    {name: [n, genes]}, uns_extra merged into uns. Raises AnnDataMissing without anndata, ValueError (naming the
    file and the item) on inconsistent input. Returns `path`."""
    X = np.asarray(X, np.float32)
    genes = [str(g) for g in genes]
    if X.ndim != 2 or X.shape[1] != len(genes):
        raise ValueError(f"{path}: X has shape {X.shape}, expected [spots, {len(genes)} genes].")
    n = X.shape[0]
    xy = np.asarray(spatial_xy, np.float64)
    if xy.shape != (n, 2) or not np.isfinite(xy).all():
        raise ValueError(f"{path}: spatial_xy must be finite [{n}, 2] full-resolution (x, y), got {xy.shape}.")
    columns = {name: np.asarray(values) for name, values in obs.items()}
    for name, col in columns.items():
        if col.shape != (n,):
            raise ValueError(f"{path}: obs column {name!r} has shape {col.shape}, expected ({n},).")
    if library_key not in columns:
        raise ValueError(f"{path}: obs has no {library_key!r} column naming each spot's library.")
    library = columns[library_key].astype(str)
    missing = sorted(set(library.tolist()) - set(library_images))
    if missing:
        raise ValueError(f"{path}: no image for library(ies) {missing[:5]}; pass one per {library_key}.")
    layers = {name: np.asarray(v, np.float32) for name, v in (layers or {}).items()}
    for name, v in layers.items():
        if v.shape != X.shape:
            raise ValueError(f"{path}: layer {name!r} has shape {v.shape}, expected {X.shape} like X.")
    spatial = {}
    for library_id in dict.fromkeys(library.tolist()):
        lib = library_images[library_id]
        _check_library(path, library_id, lib)
        hires = np.asarray(lib["hires"])
        lowres = np.asarray(lib["lowres"]) if lib.get("lowres") is not None else _shrink(hires, LOWRES_MAX_SIDE)[0]
        factors = {k: float(lib["scalefactors"][k]) for k in SCALEFACTOR_KEYS}
        # scanpy draws obsm["spatial"] * tissue_hires_scalef on the hires image: a spot off the image means the
        # coordinates and the scalefactor disagree.
        on_image = xy[library == library_id] * factors["tissue_hires_scalef"]
        tolerance = factors["spot_diameter_fullres"] * factors["tissue_hires_scalef"]
        if (on_image < -tolerance).any() or (on_image[:, 0] > hires.shape[1] + tolerance).any() or \
                (on_image[:, 1] > hires.shape[0] + tolerance).any():
            raise ValueError(f"{path}: library {library_id!r}: spots fall outside its {hires.shape[1]}x"
                             f"{hires.shape[0]} hires image at tissue_hires_scalef={factors['tissue_hires_scalef']}; "
                             "spatial_xy must be full-resolution pixels of the image the library was built from.")
        spatial[library_id] = {"images": {"hires": hires, "lowres": lowres}, "scalefactors": factors,
                               "metadata": {str(k): str(v) for k, v in lib.get("metadata", {}).items()}}

    anndata = _anndata()
    import pandas as pd

    frame = pd.DataFrame({name: (pd.Categorical(col.astype(str)) if col.dtype.kind in "OUS" else col)
                          for name, col in columns.items()}, index=_unique_names(columns, library, n))
    adata = anndata.AnnData(X=X, obs=frame, var=pd.DataFrame(index=genes), layers=layers,
                            obsm={"spatial": xy}, uns={"spatial": spatial, **dict(uns_extra or {})})
    # gzip: a section's images are ~13 MB raw, and H&E compresses well.
    atomic.write_file(path, lambda tmp: adata.write_h5ad(tmp, compression="gzip"))
    return path
