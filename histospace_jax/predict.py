r"""Predicted expression for a new H&E slide from a deployable model (WORKDIR/model of a `train` or `external`
run).

    python -m histospace_jax.predict --checkpoint=WORKDIR/model --image=SLIDE.jpg --spots=SPOTS.csv --output=OUT
    python -m histospace_jax.predict --checkpoint=WORKDIR/model --image=SLIDE.tif --grid_step_um=100 \
        --source_mpp=0.5 --output=OUT --genes=GNAS,HLA-B

--spots: CSV with pixel_x, pixel_y (spot centres in slide pixels; optional spot_id, array_x, array_y). Rows come
out in the file's order. Without --source_mpp the slide's scale is fitted to array_x/array_y (ST: 200 um apart).
--grid_step_um: tiles on a regular grid (step in micrometres), background tiles (tissue fraction below
--min_tissue) left out; needs --source_mpp.

Tiles are cut at the model's microns per pixel and tile size and preprocessed as the training store was
(colour-cast removal and stain normalisation, from the model's model.json, via histospace_jax.ingest).
Spots are processed --batch_size at a time: memory is the decoded slide plus one batch (predictions stream to
disk). Output (written to OUT.tmp-*, renamed to OUT when complete):
  predictions.csv    spot_id, pixel_x, pixel_y, array_x, array_y, one column per gene
  predictions.zarr   float32 [n_spots, n_genes] (zarr v3), genes in model.json order
  overlay_<gene>.png predicted expression over the slide thumbnail, per --genes
  predictions.h5ad   AnnData (obs: spots, var: genes, obsm['spatial']) when `anndata` is installed
  prediction.json    model, slide, scale and preprocessing used
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
import uuid

import jax
import numpy as np
import tensorstore as ts
from absl import app, flags

from histospace_jax import atomic, features, model_export, models, plots
from histospace_jax.errors import EXIT_BAD_INPUT, BadInputError
from histospace_jax.ingest import build, common, slide_io, stain

ST_SPOT_SPACING_UM = 200.0


class PredictError(BadInputError):
    """Bad input to predict; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------ model


def make_predict_fn(model, variables, info: dict):
    """uint8 tiles -> expression: the mean over the ensemble's members and the model's dihedral views of the
    heads' standardised outputs, mapped back with the training store's per-gene mean and sd."""
    mean = np.asarray(info["target_mean"], np.float32)
    sd = np.asarray(info["target_sd"], np.float32)
    views = int(info["views"])
    fn = jax.jit(jax.vmap(lambda v, x: model.apply(v, models.to_unit_range(x), False), in_axes=(0, None)))

    def predict(tiles):
        z = sum(np.asarray(fn(variables, features.dihedral(tiles, v))) for v in range(views)) / views
        return mean + sd * z.mean(0)

    return predict


# ------------------------------------------------------------------------------------------------ preprocessing


class Preprocessor:
    """Colour-cast removal + stain normalisation of slide crops, as the training store's manifest records.

    Uses the ingest pipeline's SlideNormaliser (fitted on the whole slide, applied per crop). The interface —
    construct with (rgb, PIL mode, model info, path); call on uint8 crops; `tissue_fraction(crops)` — is all
    predict needs, so another normaliser can be dropped in here.
    """

    def __init__(self, rgb: np.ndarray, mode: str, info: dict, path: str):
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
        self._norm = build.SlideNormaliser(rgb, mode, stain_method=method, colour_cast=bool(cc.get("enabled", False)),
                                           colour_percentile=float(cc.get("percentile", 99.0)), reference=reference,
                                           path=path, allow_fallback=True)

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


def grid_positions(width: int, height: int, step_px: float) -> dict:
    nx, ny = max(1, int(width // step_px)), max(1, int(height // step_px))
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    gx, gy = gx.ravel(), gy.ravel()
    return {"pixel_x": (gx + 0.5) * step_px, "pixel_y": (gy + 0.5) * step_px, "array_x": gx.astype(float),
            "array_y": gy.astype(float), "spot_id": np.array([f"{x}x{y}" for x, y in zip(gx, gy)])}


def fit_mpp_from_grid(spots: dict, path: str) -> float:
    try:
        return common.fit_st_mpp(spots["array_x"], spots["array_y"], spots["pixel_x"], spots["pixel_y"], path)
    except common.IngestError as e:
        raise PredictError(str(e)) from e


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
    info, model, variables = model_export.load(model_dir)
    predict = make_predict_fn(model, variables, info)
    gene_names = list(info["genes"])
    rgb, mode = slide_io.read_rgb(image)
    height, width = rgb.shape[:2]
    if spots_csv:
        pos = read_spots(spots_csv)
        if source_mpp is None:
            if "array_x" not in pos:
                raise PredictError(f"{spots_csv}: no array_x/array_y to fit the slide's scale; pass --source_mpp.")
            source_mpp = fit_mpp_from_grid(pos, spots_csv)
            scale_how = "fitted to the spot grid (200 um spacing)"
        else:
            scale_how = "--source_mpp"
    else:
        if not source_mpp:
            raise PredictError("--grid_step_um needs --source_mpp (the slide's microns per pixel)")
        pos = grid_positions(width, height, grid_step_um / source_mpp)
        scale_how = "--source_mpp"
    n = len(pos["pixel_x"])
    mpp = float(info["microns_per_pixel"] or 100.0 / info["tile_size"])
    t = int(info["tile_size"])
    box = slide_io.source_tile_size(t, mpp, float(source_mpp))
    x0, y0 = slide_io.crop_boxes(pos["pixel_x"], pos["pixel_y"], box)
    pre = Preprocessor(rgb, mode, info, image)
    log(f"[predict] {image}: {width}x{height} px at {source_mpp:.4f} um/px ({scale_how}); {n} "
        f"{'spots' if spots_csv else 'grid tiles'}; {box}px crops -> {t}px tiles; {len(gene_names)} genes")

    tmp = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        g = len(gene_names)
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(tmp, "predictions.zarr")},
                       "metadata": {"shape": [0, g], "data_type": "float32",
                                    "chunk_grid": {"name": "regular",
                                                   "configuration": {"chunk_shape": [1024, min(g, 1024)]}},
                                    "attributes": {"genes": gene_names}}}, create=True).result()
        shown = [x for x in genes.split(",") if x in gene_names] if genes else []
        if genes and len(shown) < len([x for x in genes.split(",") if x]):
            log(f"[predict] genes not in the model, no overlay: "
                f"{[x for x in genes.split(',') if x and x not in gene_names]}")
        if not shown:
            shown = gene_names[:2]
        shown_idx = [gene_names.index(x) for x in shown]
        kept_rows, shown_vals = [], []
        written = 0
        with open(os.path.join(tmp, "predictions.csv"), "w", newline="") as fcsv:
            w = csv.writer(fcsv)
            w.writerow(["spot_id", "pixel_x", "pixel_y", "array_x", "array_y"] + gene_names)
            for a in range(0, n, batch_size):
                idx = np.arange(a, min(n, a + batch_size))
                crops = slide_io.cut_crops(rgb, x0[idx], y0[idx], box)
                if grid_step_um:
                    keep = pre.tissue_fraction(crops) >= min_tissue
                    idx, crops = idx[keep], crops[keep]
                    if not len(idx):
                        continue
                tiles = slide_io.resize_tiles(pre(crops), t)
                pad = (-len(tiles)) % batch_size  # one compiled shape for every batch
                batch = np.concatenate([tiles, np.repeat(tiles[:1], pad, 0)]) if pad else tiles
                pred = predict(batch)[:len(tiles)].astype(np.float32)
                arr = arr.resize(exclusive_max=[written + len(idx), g]).result()
                arr[written:written + len(idx)].write(pred).result()
                written += len(idx)
                for j, i in enumerate(idx):
                    ax = pos.get("array_x")
                    w.writerow([pos["spot_id"][i], f"{pos['pixel_x'][i]:.2f}", f"{pos['pixel_y'][i]:.2f}",
                                "" if ax is None else f"{ax[i]:g}",
                                "" if ax is None else f"{pos['array_y'][i]:g}"]
                               + [f"{v:.6g}" for v in pred[j]])
                kept_rows.append(idx)
                shown_vals.append(pred[:, shown_idx])
                if (a // batch_size) % 20 == 0:
                    log(f"[predict] {min(n, a + batch_size)}/{n} positions, {written} predicted")
        rows = np.concatenate(kept_rows) if kept_rows else np.zeros(0, np.int64)
        vals = np.concatenate(shown_vals) if shown_vals else np.zeros((0, len(shown)))
        overlays = []
        for k, gname in enumerate(shown):
            fname = f"overlay_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in gname)}.png"
            plots.plot_overlay(os.path.join(tmp, fname), rgb, pos["pixel_x"][rows], pos["pixel_y"][rows], vals[:, k],
                         gname, box, thumbnail_px)
            overlays.append(fname)
        h5ad = write_h5ad(os.path.join(tmp, "predictions.h5ad"), arr, gene_names, pos, rows, source_mpp, log)
        summary = {"model": os.path.abspath(model_dir), "image": os.path.abspath(image), "image_size": [width, height],
                   "source_microns_per_pixel": float(source_mpp), "scale_from": scale_how,
                   "positions": "spots" if spots_csv else f"grid every {grid_step_um} um",
                   "n_positions": int(n), "n_predicted": int(written), "tile_size": t, "crop_px": int(box),
                   "model_microns_per_pixel": mpp, "preprocessing": pre.description, "genes": len(gene_names),
                   "overlays": overlays, "h5ad": h5ad, "trained_on": info.get("trained_on")}
        atomic.write_json(os.path.join(tmp, "prediction.json"), summary)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[predict] wrote {output}: {written} rows")
    return summary


def write_h5ad(path: str, arr, genes, pos, rows, mpp, log) -> str | None:
    try:
        import anndata
        import pandas as pd
    except ImportError:
        log("[predict] anndata not installed: no .h5ad (pip install anndata); CSV and zarr written")
        return None
    x = arr.read().result()
    obs = pd.DataFrame({"pixel_x": pos["pixel_x"][rows], "pixel_y": pos["pixel_y"][rows]},
                       index=[str(s) for s in pos["spot_id"][rows]])
    ad = anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(genes)))
    ad.obsm["spatial"] = np.stack([pos["pixel_x"][rows], pos["pixel_y"][rows]], 1)
    ad.uns["histospace"] = {"source_microns_per_pixel": float(mpp)}
    ad.write_h5ad(path)
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
    flags.DEFINE_string("image", None, "H&E slide image (JPEG/PNG/TIFF).")
    flags.DEFINE_string("spots", None, "CSV of spot centres: pixel_x, pixel_y [, spot_id, array_x, array_y].")
    flags.DEFINE_float("grid_step_um", None, "Predict on a regular grid with this step (micrometres).")
    flags.DEFINE_float("source_mpp", None, "Slide microns per pixel (default: fitted to the spots' array grid).")
    flags.DEFINE_string("output", None, "Output directory.")
    flags.DEFINE_string("genes", "GNAS,HLA-B", "Genes to draw as overlays (comma-separated).")
    flags.DEFINE_integer("batch_size", 64, "Tiles per batch (memory: slide + one batch).")
    flags.DEFINE_float("min_tissue", 0.5, "Grid mode: minimum tissue fraction of a tile.")
    flags.DEFINE_integer("thumbnail_px", 1024, "Longest side of the overlay thumbnails.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
    flags.mark_flags_as_required(["checkpoint", "image", "output"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
