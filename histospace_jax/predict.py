r"""Predicted expression for a new H&E slide from a deployable model (WORKDIR/model of a `train` or `external`
run).

    python -m histospace_jax.predict --checkpoint=WORKDIR/model --image=SLIDE.jpg --spots=SPOTS.csv --output=OUT
    python -m histospace_jax.predict --checkpoint=WORKDIR/model --image=SLIDE.svs --grid_step_um=100 \
        --output=OUT --genes=GNAS,HLA-B

--image: JPEG / PNG, or a whole-slide image (tiled pyramidal TIFF, OME-TIFF, SVS; other formats through the
optional `openslide` extra), read region by region (histospace_jax.ingest.wsi): memory is bounded by a batch of
tiles and a low pyramid level, not by the slide.
--source_mpp: the slide's microns per pixel. Default: from the slide's own metadata (OME PhysicalSizeX, Aperio
MPP, TIFF resolution tags); else, with --spots, fitted to array_x/array_y (ST: 200 um apart).
--spots: CSV with pixel_x, pixel_y (spot centres in level-0 slide pixels; optional spot_id, array_x, array_y).
Rows come out in the file's order; a spot centred outside the slide is an error.
--grid_step_um: tiles on a regular grid over the whole slide (step in micrometres). Which grid tiles are tissue is
decided before any full-resolution read, on a tissue map of a low pyramid level (stained and textured pixels; the
smooth tinted glass beside sections and blurred smudges are not textured; specks and small isolated pieces are
dropped): a tile is predicted when the map covers at least --min_tissue of it.

Tiles are cut at the model's microns per pixel and tile size, from the pyramid level nearest that scale, and
preprocessed as the training store was (colour-cast removal and stain normalisation, from the model's model.json,
via histospace_jax.ingest). Spots are processed --batch_size at a time; predictions stream to disk as they come,
with progress lines (rate, ETA). A model trained with neighbourhood context (model.context=neighbours) first
pools every position's encoder features in one pass over the slide, then gives each position the mean over its
adjacent spots or grid tiles. A model trained with neighbour smoothing of predictions (model.smoothing, the
standard recipe's default) writes each position's prediction blended with its neighbours' in a second pass that
reads the first pass's predictions back a window of rows at a time.
Output (written to OUT.tmp-*, renamed to OUT when complete):
  predictions.csv    spot_id, pixel_x, pixel_y, array_x, array_y, one column per gene
  predictions.zarr   float32 [n_spots, n_genes] (zarr v3), genes in model.json order
  overlay_<gene>.png predicted expression over the slide thumbnail, per --genes
  predictions.h5ad   AnnData in scanpy's spatial layout: X predictions, obs spots, var genes, obsm['spatial'],
                     uns['spatial'][<slide name>] a hires image of the slide and its scalefactors
  prediction.json    model, slide, scale and preprocessing used
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
import time
import uuid

import jax
import numpy as np
import tensorstore as ts
from absl import app, flags

from histospace_jax import atomic, console, context as context_lib, controls, counting_base, features, model_export
from histospace_jax import models, plots
from histospace_jax import spatial_anndata
from histospace_jax.errors import EXIT_BAD_INPUT, BadInputError
from histospace_jax.ingest import build, common, slide_io, stain, wsi

ST_SPOT_SPACING_UM = 200.0
PROGRESS_EVERY_S = 10.0


class PredictError(BadInputError):
    """Bad input to predict; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------ model


def make_predict_fn(model, variables, info: dict, base: counting_base.CountingBase | None = None):
    """(uint8 tiles, their neighbourhood context [V, B, C] or None, their ids) -> expression: the mean over the
    ensemble's members and the model's views (`_view_fn`: dihedral, stain-jittered as in training) of the heads'
    standardised outputs, mapped back with the training store's per-gene mean and sd; with a counting `base`
    (model_export.load_counting_base), plus its value at the depth read from the untransformed tiles' pooled
    encoder feature maps, or blended with it at model.json's counting_weight (output_base "blend")."""
    weight = info.get("counting_weight") if info.get("output_base") == "blend" else None
    mean = np.asarray(info["target_mean"], np.float32)
    sd = np.asarray(info["target_sd"], np.float32)
    view_of = _view_fn(info)
    views = int(info["views"])
    shared = encoder_shared(variables)
    encoder = _member_subtree(variables, "encoder", member=0)
    encode = jax.jit(lambda e, x: model.apply(e, models.to_unit_range(x), method="encode"))
    if shared:
        # The members' heads share one frozen encoder: encode each view once, then run every head on the
        # features (the encoder is most of the work; with 5 members this is several times faster). The maps
        # stay on the device between the two programs; view 0's also serve the counting base.
        heads = _member_subtree(variables, "head")
        on_maps = jax.jit(lambda h, m, c: jax.vmap(
            lambda hv: model.apply(hv, m, False, None, c, method="from_features"))(h))

        def apply_view(x, c, keep_maps: bool):
            maps = encode(encoder, x)
            return on_maps(heads, maps, c), (maps if keep_maps else None)
    else:
        fn = jax.jit(jax.vmap(lambda v, x, c: model.apply(v, models.to_unit_range(x), False, None, c),
                              in_axes=(0, None, None)))

        def apply_view(x, c, keep_maps: bool):
            return fn(variables, x, c), (encode(encoder, x) if keep_maps else None)

    def predict(tiles, context=None, ids=None):
        total, maps0 = 0.0, None
        for v in range(views):
            # The base read the untransformed view in training (the cached features' view 0), never a jittered
            # one; view_of keeps view 0 the tile itself.
            z, maps = apply_view(view_of(tiles, v, ids), None if context is None else context[v],
                                 base is not None and v == 0)
            total = total + np.asarray(z)
            if maps is not None:
                maps0 = np.asarray(maps, np.float32)
        out = mean + sd * (total / views).mean(0)
        if base is not None:
            counting = counting_base.predict(base, controls.pooled_feature_maps(maps0))
            out = np.asarray(counting_base.combine(out, counting, weight), np.float32)
        return out

    predict.encoder_shared = shared
    return predict


def encoder_shared(variables) -> bool:
    """Whether every ensemble member (leading axis of each leaf) holds the same encoder, as the frozen encoder of
    a trained model does."""
    leaves = [x for k, v in variables.items() if "encoder" in v for x in jax.tree_util.tree_leaves(v["encoder"])]
    return all(np.array_equal(x[0], x[i]) for x in leaves for i in range(1, x.shape[0]))


def _member_subtree(variables, name: str, member: int | None = None) -> dict:
    """{collection: {name: subtree}} of `variables` (stacked over members), for one member or all of them."""
    pick = (lambda x: x) if member is None else (lambda x: x[member])
    return {k: {name: jax.tree_util.tree_map(pick, v[name])} for k, v in variables.items() if name in v}


def make_pooled_fn(model, variables, info: dict):
    """uint8 tiles -> [V, B, C]: the spatially average-pooled frozen-encoder features of each dihedral view (the
    encoder is the same in every ensemble member: member 0's is used)."""
    encoder = _member_subtree(variables, "encoder", member=0)
    fn = jax.jit(lambda v, x: model.apply(v, models.to_unit_range(x), method="encode").mean(axis=(1, 2)))
    view_of = _view_fn(info)
    views = int(info["views"])

    def pooled(tiles, ids=None):
        return np.stack([np.asarray(fn(encoder, view_of(tiles, v, ids)), np.float32) for v in range(views)])

    return pooled


def _view_fn(info: dict):
    """(tiles, view, ids) -> the view the model was trained on: dihedral, stain-jittered as in training
    (`features.augmented_view`; ids are the tiles' positions in the slide, None = their positions in the batch)."""
    jitter, seed = float(info.get("stain_jitter", 0.0)), int(info.get("jitter_seed", 0))

    def view_of(tiles, v, ids):
        return features.augmented_view(tiles, v, stain_jitter=jitter, seed=seed,
                                       ids=np.arange(len(tiles)) if ids is None else ids)

    return view_of


# ------------------------------------------------------------------------------------------------ preprocessing


class Preprocessor:
    """Colour-cast removal + stain normalisation of slide crops, as the training store's manifest records.

    Uses the ingest pipeline's SlideNormaliser (fitted on a pixel sample of the slide, applied per crop). The
    interface — construct with (opened slide, PIL mode, model info, path); call on uint8 crops;
    `tissue_fraction(crops)`; `detect_percentiles` (the colour cast tissue detection removes) — is all predict
    needs, so another normaliser can be dropped in here.
    """

    def __init__(self, slide, mode: str, info: dict, path: str):
        cc = info.get("colour_cast") or {}
        sn = info.get("stain_normalisation") or {}
        method = sn.get("method", "none") or "none"
        reference = None
        if method != "none":
            if "stain_matrix_HE_rgb" in sn:
                reference = stain.StainParams(np.asarray(sn["stain_matrix_HE_rgb"], np.float64),
                                              np.asarray(sn["max_concentrations"], np.float64))
            else:
                reference = stain.builtin_reference()
        self.description = {"colour_cast": cc, "stain_method": method}
        self._norm = build.SlideNormaliser(slide, mode, stain_method=method,
                                           colour_cast=bool(cc.get("enabled", False)),
                                           colour_percentile=float(cc.get("percentile", 99.0)), reference=reference,
                                           path=path, allow_fallback=True)
        self.detect_percentiles = self._norm.detect_percentiles

    def tissue_fraction(self, crops: np.ndarray) -> np.ndarray:
        return self._norm.tissue_fraction(crops)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        return self._norm(crops)


# ------------------------------------------------------------------------------------------------ positions


def read_spots(path: str) -> dict:
    """Spot table: pixel_x, pixel_y (required), spot_id, array_x, array_y (optional), in file order."""
    with open(path, newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        delim = "\t" if sample.count("\t") > sample.count(",") else ","
        rows = list(csv.DictReader(f, delimiter=delim))
    if not rows:
        raise PredictError(f"{path}: no spots; give a CSV with columns pixel_x, pixel_y (spot centres in pixels).")
    missing = [c for c in ("pixel_x", "pixel_y") if c not in rows[0]]
    if missing:
        raise PredictError(f"{path}: missing column(s) {missing}; columns found: {list(rows[0])}.")
    out = {"pixel_x": np.array([float(r["pixel_x"]) for r in rows]),
           "pixel_y": np.array([float(r["pixel_y"]) for r in rows])}
    # Array (grid) coordinates: array_x/array_y, or x/y as in ST spot files (`*_selection.tsv`).
    ax, ay = ("array_x", "array_y") if "array_x" in rows[0] else ("x", "y")
    if ax in rows[0] and ay in rows[0]:
        out["array_x"] = np.array([float(r[ax]) for r in rows])
        out["array_y"] = np.array([float(r[ay]) for r in rows])
    default_ids = [f"{r[ax]}x{r[ay]}" if ax in r else f"spot{i}" for i, r in enumerate(rows)]
    out["spot_id"] = np.array([r.get("spot_id") or d for r, d in zip(rows, default_ids)])
    if "selected" in rows[0]:  # ST spot files: only spots under tissue
        keep = np.array([r["selected"].strip() in ("1", "1.0", "True", "true") for r in rows])
        out = {k: v[keep] for k, v in out.items()}
    return out


def check_spots_inside(pos: dict, width: int, height: int, spots_csv: str, image: str) -> None:
    i, n_outside = slide_io.first_outside(pos["pixel_x"], pos["pixel_y"], width, height)
    if i is not None:
        raise PredictError(
            f"{spots_csv}: {n_outside} spot(s) centred outside the {width}x{height} slide {image}, e.g. "
            f"{pos['spot_id'][i]!r} at pixel ({pos['pixel_x'][i]:.1f}, {pos['pixel_y'][i]:.1f}); the spots and the "
            "slide do not match. Give the spots' slide, or pixel coordinates in its full-resolution (level-0) frame "
            "(scale coordinates taken on a downscaled image)."
        )


def grid_positions(width: int, height: int, step_px: float) -> dict:
    nx, ny = max(1, int(width // step_px)), max(1, int(height // step_px))
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    gx, gy = gx.ravel(), gy.ravel()
    return {"pixel_x": (gx + 0.5) * step_px, "pixel_y": (gy + 0.5) * step_px, "array_x": gx.astype(float),
            "array_y": gy.astype(float), "spot_id": np.array([f"{x}x{y}" for x, y in zip(gx, gy)])}


def grid_on_tissue(slide, pos: dict, box: int, source_mpp: float, tile_um: float, percentiles: np.ndarray,
                   min_tissue: float) -> tuple[np.ndarray, dict]:
    """Which grid tiles are tissue, from a tissue map of a low level (no full-resolution read); and a note on the
    map for prediction.json."""
    map_um = max(source_mpp, min(slide_io.MASK_UM_PER_PX, tile_um / slide_io.MASK_PX_PER_TILE))
    try:
        small, scale = slide_io.overview(slide, map_um / source_mpp, "tissue map of --grid_step_um")
    except common.IngestError as e:
        raise PredictError(str(e)) from e
    tissue = slide_io.tissue_map(small, percentiles, scale[0] * source_mpp, min_component_um2=tile_um ** 2)
    x0, y0 = slide_io.crop_boxes(pos["pixel_x"], pos["pixel_y"], box)
    keep = slide_io.box_coverage(tissue, x0, y0, box, scale) >= min_tissue
    note = {"map_microns_per_pixel": float(scale[0] * source_mpp), "map_size": [int(small.shape[1]),
                                                                              int(small.shape[0])],
            "tissue_fraction_of_slide": float(tissue.mean()), "min_tissue": float(min_tissue)}
    return keep, note


def fit_mpp_from_grid(spots: dict, path: str) -> float:
    try:
        return common.fit_st_mpp(spots["array_x"], spots["array_y"], spots["pixel_x"], spots["pixel_y"], path)
    except common.IngestError as e:
        raise PredictError(str(e)) from e


def slide_scale(slide, image: str, source_mpp: float | None, pos: dict | None, spots_csv: str | None
                ) -> tuple[float, str]:
    """(microns per pixel, where it came from): --source_mpp, else the slide's metadata, else the spot grid."""
    if source_mpp:
        return float(source_mpp), "--source_mpp"
    if slide.mpp:
        return float(slide.mpp), f"slide metadata ({slide.mpp_source})"
    if pos is not None and "array_x" in pos:
        return fit_mpp_from_grid(pos, spots_csv), "fitted to the spot grid (200 um spacing)"
    where = f"; or give array_x/array_y in {spots_csv} to fit it to the ST spot grid" if spots_csv else ""
    raise PredictError(f"{image}: no microns per pixel in the slide's metadata ({slide.mpp_source}); pass "
                       f"--source_mpp=UM_PER_PX (the scanner's value, e.g. 0.25 at 40x, 0.5 at 20x){where}.")


# ------------------------------------------------------------------------------------------------ run


def predict_slide(model_dir: str, image: str, output: str, *, spots_csv: str | None = None,
                  grid_step_um: float | None = None, source_mpp: float | None = None, genes: str = "",
                  batch_size: int = 64, min_tissue: float = 0.5, thumbnail_px: int = 1024, overwrite: bool = False,
                  log=print) -> dict:
    """Runs the whole prediction; returns a summary dict (also written as OUT/prediction.json)."""
    if bool(spots_csv) == bool(grid_step_um):
        raise PredictError("give exactly one of --spots=CSV or --grid_step_um=UM")
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise PredictError(f"{output}: already exists; pass --overwrite or choose another --output.")
    try:
        slide = wsi.open_slide(image)
    except common.IngestError as e:
        raise PredictError(str(e)) from e
    with slide:
        return _predict(slide, model_dir, image, output, spots_csv=spots_csv, grid_step_um=grid_step_um,
                        source_mpp=source_mpp, genes=genes, batch_size=batch_size, min_tissue=min_tissue,
                        thumbnail_px=thumbnail_px, log=log)


def _predict(slide, model_dir, image, output, *, spots_csv, grid_step_um, source_mpp, genes, batch_size, min_tissue,
             thumbnail_px, log) -> dict:
    width, height = slide.width, slide.height
    pos = read_spots(spots_csv) if spots_csv else None
    source_mpp, scale_how = slide_scale(slide, image, source_mpp, pos, spots_csv)
    if pos is not None:
        check_spots_inside(pos, width, height, spots_csv, image)
    info, model, variables = model_export.load(model_dir)
    predict = make_predict_fn(model, variables, info, model_export.load_counting_base(model_dir, info))
    if info.get("output_base") == "blend":
        log(f"[predict] the model blends its heads' predictions with the counting model at the depth read from each "
            f"tile: weight {info['counting_weight']:g} (chosen on inner validation in training)")
    gene_names = list(info["genes"])
    mpp = float(info["microns_per_pixel"] or 100.0 / info["tile_size"])
    t = int(info["tile_size"])
    box = slide_io.source_tile_size(t, mpp, float(source_mpp))
    try:
        pre = Preprocessor(slide, slide.mode, info, image)
    except common.IngestError as e:
        raise PredictError(str(e)) from e
    tissue_note = None
    if pos is None:
        pos = grid_positions(width, height, grid_step_um / source_mpp)
        n_grid = len(pos["pixel_x"])
        keep, tissue_note = grid_on_tissue(slide, pos, box, source_mpp, t * mpp, pre.detect_percentiles, min_tissue)
        pos = {k: v[keep] for k, v in pos.items()}
        log(f"[predict] tissue map at {tissue_note['map_microns_per_pixel']:.1f} um/px: {len(pos['pixel_x'])} of "
            f"{n_grid} grid tiles on tissue")
        if not len(pos["pixel_x"]):
            raise PredictError(f"{image}: no grid tile is at least {min_tissue:.0%} tissue on the slide's tissue map; "
                               "check that it is an H&E slide at the given scale, or lower --min_tissue.")
    else:
        n_grid = len(pos["pixel_x"])
    n = len(pos["pixel_x"])
    x0, y0 = slide_io.crop_boxes(pos["pixel_x"], pos["pixel_y"], box)
    level = slide.best_level(mpp / float(source_mpp))
    crop_px = slide_io.level_box(box, slide.levels[level][2])
    log(f"[predict] {image}: {width}x{height} px at {source_mpp:.4f} um/px ({scale_how}); {n} "
        f"{'spots' if spots_csv else 'grid tiles'}; {box}px crops read as {crop_px}px from level {level} -> {t}px "
        f"tiles; {len(gene_names)} genes")

    def tiles_of(idx):
        try:
            crops = slide_io.cut_crops_from(slide, x0[idx], y0[idx], box, level)
        except common.IngestError as e:
            raise PredictError(str(e)) from e
        tiles = slide_io.resize_tiles(pre(crops), t)
        pad = (-len(tiles)) % batch_size  # one compiled shape for every batch
        return (np.concatenate([tiles, np.repeat(tiles[:1], pad, 0)]) if pad else tiles), len(tiles)

    ctx = None
    uses_context = info["model"].get("context", "none") == "neighbours"
    smoothing = info["model"].get("smoothing")
    if uses_context or smoothing:
        # One set of positions for both passes: the array grid where the spots give one (context.grid_positions).
        grid_xy = context_lib.grid_positions(pos["pixel_x"], pos["pixel_y"], pos.get("array_x"), pos.get("array_y"))
        if spots_csv and "array_x" not in pos:
            log(f"[predict] {spots_csv} has no array coordinates: neighbours are found around the measured spot "
                "centres, which on ST arrays miss some diagonal neighbours; add array_x/array_y (or x/y) columns "
                "to find them on the array grid, as training did")
    if uses_context:
        radius = float(info["model"].get("context_radius", context_lib.DEFAULT_RADIUS))
        table = context_lib.neighbour_table(*grid_xy, None, radius)
        log(f"[predict] the model takes neighbourhood context: a first pass pools every position's encoder features "
            f"(neighbours within {radius:g} x the {'spot' if spots_csv else 'grid'} spacing, median "
            f"{np.median((table >= 0).sum(1)):g})")
        pooled_fn = make_pooled_fn(model, variables, info)
        parts, n_batches, last_report = [], -(-n // batch_size), time.time()
        progress = console.Progress("context", n_batches, batch_size, counts="batch ", unit="tiles")
        for b, a in enumerate(range(0, n, batch_size)):
            batch, n_real = tiles_of(np.arange(a, min(n, a + batch_size)))
            parts.append(pooled_fn(batch, ids=a + np.arange(len(batch)))[:, :n_real])
            if time.time() - last_report >= PROGRESS_EVERY_S or b + 1 == n_batches:
                last_report = time.time()
                log(progress.line(b + 1, pooled=a + n_real))
        ctx = context_lib.neighbour_mean(np.concatenate(parts, 1), table)

    smooth_table = None
    if smoothing:
        smooth_table = context_lib.neighbour_table(*grid_xy, None, smoothing["radius"])
        smoothing = {**smoothing, "neighbours_median": context_lib.neighbour_counts(smooth_table)["neighbours_median"]}
        log(f"[predict] the model smooths its predictions: each position x {smoothing['self_weight']:g} + the mean of "
            f"its neighbours (within {smoothing['radius']:g} x the {'spot' if spots_csv else 'grid'} spacing, median "
            f"{smoothing['neighbours_median']:g}) x {1 - smoothing['self_weight']:g}, in a second pass")

    tmp = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        g = len(gene_names)

        def open_zarr(name):
            return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(tmp, name)},
                            "metadata": {"shape": [0, g], "data_type": "float32",
                                         "chunk_grid": {"name": "regular",
                                                        "configuration": {"chunk_shape": [1024, min(g, 1024)]}},
                                         "attributes": {"genes": gene_names}}}, create=True).result()

        arr = open_zarr("predictions.zarr")
        # With smoothing, the first pass keeps the tiles' own predictions here and the second writes the output.
        raw = open_zarr("unsmoothed.zarr") if smoothing else None
        shown = [x for x in genes.split(",") if x in gene_names] if genes else []
        if genes and len(shown) < len([x for x in genes.split(",") if x]):
            log(f"[predict] genes not in the model, no overlay: "
                f"{[x for x in genes.split(',') if x and x not in gene_names]}")
        if not shown:
            shown = gene_names[:2]
        shown_idx = [gene_names.index(x) for x in shown]
        shown_vals = []
        n_batches = -(-n // batch_size)
        progress = console.Progress("predict", n_batches, batch_size, counts="batch ", unit="tiles")
        last_report = time.time()
        with open(os.path.join(tmp, "predictions.csv"), "w", newline="") as fcsv:
            w = csv.writer(fcsv)
            w.writerow(["spot_id", "pixel_x", "pixel_y", "array_x", "array_y"] + gene_names)

            def write_rows(a, idx, pred):
                nonlocal arr
                arr = arr.resize(exclusive_max=[a + len(idx), g]).result()
                arr[a:a + len(idx)].write(pred).result()
                ax = pos.get("array_x")
                for j, i in enumerate(idx):
                    w.writerow([pos["spot_id"][i], f"{pos['pixel_x'][i]:.2f}", f"{pos['pixel_y'][i]:.2f}",
                                "" if ax is None else f"{ax[i]:g}",
                                "" if ax is None else f"{pos['array_y'][i]:g}"]
                               + [f"{v:.6g}" for v in pred[j]])
                shown_vals.append(pred[:, shown_idx])

            for b, a in enumerate(range(0, n, batch_size)):
                idx = np.arange(a, min(n, a + batch_size))
                batch, n_real = tiles_of(idx)
                batch_ctx = None
                if ctx is not None:
                    batch_ctx = np.zeros((ctx.shape[0], len(batch), ctx.shape[2]), np.float32)
                    batch_ctx[:, :n_real] = ctx[:, idx]
                pred = predict(batch, batch_ctx, ids=a + np.arange(len(batch)))[:n_real].astype(np.float32)
                if raw is None:
                    write_rows(a, idx, pred)
                else:
                    raw = raw.resize(exclusive_max=[a + len(idx), g]).result()
                    raw[a:a + len(idx)].write(pred).result()
                if time.time() - last_report >= PROGRESS_EVERY_S or b + 1 == n_batches:
                    last_report = time.time()
                    log(progress.line(b + 1, predicted=a + len(idx)))
            if raw is not None:
                # Grid positions run row by row, so a batch's neighbours lie within about one grid row of it:
                # each batch reads that window of the first pass, never the whole slide.
                for a in range(0, n, batch_size):
                    idx = np.arange(a, min(n, a + batch_size))
                    near = smooth_table[idx]
                    lo = int(min(idx[0], near[near >= 0].min(initial=n)))
                    hi = int(max(idx[-1], near.max(initial=-1))) + 1
                    window = raw[lo:hi].read().result()
                    write_rows(a, idx, context_lib.smooth_predictions(
                        window, np.where(near >= 0, near - lo, -1), smoothing["self_weight"], rows=idx - lo))
                del raw
                shutil.rmtree(os.path.join(tmp, "unsmoothed.zarr"))
        rows = np.arange(n)
        vals = np.concatenate(shown_vals) if shown_vals else np.zeros((0, len(shown)))
        thumb, (sx, sy) = slide_io.overview(slide, max(width, height) / thumbnail_px, "overlay thumbnail")
        overlays = []
        for k, gname in enumerate(shown):
            fname = f"overlay_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in gname)}.png"
            plots.plot_overlay(os.path.join(tmp, fname), thumb, pos["pixel_x"] / sx, pos["pixel_y"] / sy, vals[:, k],
                               gname, box / sx, thumbnail_px)
            overlays.append(fname)
        del thumb
        h5ad = write_h5ad(os.path.join(tmp, "predictions.h5ad"), slide, image, arr, gene_names, pos, rows, box,
                          source_mpp, log)
        summary = {"model": os.path.abspath(model_dir), "image": os.path.abspath(image), "image_size": [width, height],
                   "image_levels": [list(lv) for lv in slide.levels], "read_level": int(level),
                   "source_microns_per_pixel": float(source_mpp), "scale_from": scale_how,
                   "positions": "spots" if spots_csv else f"grid every {grid_step_um} um",
                   "n_positions": int(n_grid), "n_predicted": int(n), "tile_size": t, "crop_px": int(box),
                   "model_microns_per_pixel": mpp, "preprocessing": pre.description, "genes": len(gene_names),
                   "tissue_map": tissue_note, "overlays": overlays, "h5ad": h5ad, "trained_on": info.get("trained_on"),
                   "smoothing": smoothing}
        atomic.write_json(os.path.join(tmp, "prediction.json"), summary)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[predict] wrote {output}: {n} rows")
    return summary


def write_h5ad(path: str, slide, image: str, arr, genes, pos, rows, box: int, mpp: float, log) -> str | None:
    """predictions.h5ad in scanpy's spatial layout: X the predictions, obsm['spatial'] the tile centres in slide
    pixels, uns['spatial'][<slide name>] a hires image of the slide (from a low pyramid level) and its scalefactors,
    so `scanpy.pl.spatial` draws the predictions over the slide."""
    section = os.path.splitext(os.path.basename(image))[0]
    obs = {"spot_id": np.asarray(pos["spot_id"])[rows].astype(str), "section": np.full(len(rows), section)}
    if "array_x" in pos:
        obs.update(array_x=np.asarray(pos["array_x"])[rows], array_y=np.asarray(pos["array_y"])[rows])
    try:
        spatial_anndata.write_spatial_h5ad(
            path, X=arr.read().result()[rows], genes=genes, obs=obs,
            spatial_xy=np.column_stack([pos["pixel_x"][rows], pos["pixel_y"][rows]]),
            library_images={section: spatial_anndata.slide_library(slide, spot_diameter_fullres=float(box))},
            uns_extra={"histospace": {"mode": "predict", "image": os.path.abspath(image),
                                      "source_microns_per_pixel": float(mpp)}})
    except spatial_anndata.AnnDataMissing as e:
        log(f"[predict] no .h5ad: {e}; CSV and zarr written")
        return None
    return os.path.basename(path)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for name in ("orbax", "absl"):  # Orbax logs every restore at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    F = flags.FLAGS
    try:
        predict_slide(F.checkpoint, F.image, F.output, spots_csv=F.spots, grid_step_um=F.grid_step_um,
                      source_mpp=F.source_mpp, genes=F.genes, batch_size=F.batch_size, min_tissue=F.min_tissue,
                      thumbnail_px=F.thumbnail_px, overwrite=F.overwrite)
    except BadInputError as e:
        print(f"predict: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def _define_flags():
    flags.DEFINE_string("checkpoint", None, "Model directory (WORKDIR/model of a `train` or `external` run).")
    flags.DEFINE_string("image", None, "H&E slide: JPEG/PNG, or a whole-slide image (pyramidal TIFF, OME-TIFF, SVS).")
    flags.DEFINE_string("spots", None, "CSV of spot centres: pixel_x, pixel_y [, spot_id, array_x, array_y].")
    flags.DEFINE_float("grid_step_um", None, "Predict on a regular grid over the slide's tissue, this step (um).")
    flags.DEFINE_float("source_mpp", None, "Slide microns per pixel (default: the slide's metadata, else fitted to "
                                           "the spots' array grid).")
    flags.DEFINE_string("output", None, "Output directory.")
    flags.DEFINE_string("genes", "GNAS,HLA-B", "Genes to draw as overlays (comma-separated).")
    flags.DEFINE_integer("batch_size", 64, "Tiles per batch (memory: one batch of crops and a low pyramid level).")
    flags.DEFINE_float("min_tissue", 0.5, "Grid mode: minimum fraction of a tile covered by the slide's tissue map.")
    flags.DEFINE_integer("thumbnail_px", 1024, "Longest side of the overlay thumbnails.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
    flags.mark_flags_as_required(["checkpoint", "image", "output"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
