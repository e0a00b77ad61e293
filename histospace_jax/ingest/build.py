"""The two-pass prepare job: public release on disk -> tile store (+ report).

Pass 1 reads every section's spot table and count matrix (no images) to choose the genes from statistics over
all spots of the job (every patient's, so a later leave-one-patient-out's held-out patient is among them; the
manifest says so under gene_selection.pooled_over), and to settle which spots are kept (missing counts, empty
libraries, libraries below --min_umi, tiles leaving the image) together with each slide's scale and image hash.
Spot stores keep each spot's depth in obs (library_size, n_genes_detected, both over all genes of the raw
matrix). Pass 2 opens each slide (`wsi.open_slide`: plain images are decoded whole, TIFF / OME-TIFF / SVS slides
are read region by region from the pyramid level nearest the tiles' scale), fits its colour cast and stains on a
pixel sample (from a low level of large slides), cuts the crops in batches, normalises them and appends the section
to a `StoreWriter`; its report thumbnail comes from a low level. Memory per worker is a batch of crops plus the
section's tiles (and a plain image's pixels); with --workers=N, N sections are processed at once in spawned
processes and appended in input order, so the store does not depend on the worker count. Sections that take long
print progress lines with rate and ETA on stderr.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import itertools
import multiprocessing
import os
import sys
from typing import Callable, Iterable, Iterator

import numpy as np

from histospace_jax import console
from histospace_jax.data import store as store_location
from histospace_jax.data.store import StoreWriter
from histospace_jax.ingest import (colour, expression, her2st, hest, plain_images, slide_io, stain, stnet,
                                   store_report, visium)
from histospace_jax.ingest.common import IngestError, SectionSource, SectionTable
from histospace_jax.ingest.wsi import open_slide

FORMATS = ("stnet", "her2st", "visium", "hest", "images")
EDGE_MODES = ("pad", "drop")
# Default tile side in micrometres: the spot and the tissue around it. An ST spot is 100 um across on a 200 um grid
# (a Visium spot 55 um on 100 um), and expression varies over several spots, so what lies around a spot tells about
# it. Chosen on the inner validation of the four shared HER2ST sections (training patients only; README "Tile field
# of view"): 100, 150, 200, 300 and 400 um tiles, all 128 px.
DEFAULT_TILE_UM = 300.0
# Visium HD: default side of the square pseudo-spots its bins are summed into, the size of an ST spot; the tile
# around a pseudo-spot keeps the ratio DEFAULT_TILE_UM : DEFAULT_PSEUDO_SPOT_UM unless --target_mpp sets it.
DEFAULT_PSEUDO_SPOT_UM = 100.0
DEFAULT_MIN_TISSUE_IMAGES = 0.5
MOSTLY_TISSUE = 0.5  # a tile is "tissue" in the report when at least half its pixels are tissue
# Spots with a library of fewer UMIs are dropped (prepare --min_umi). At the default normalisation (counts per
# 10k, log1p) a spot with L UMIs gives one count the value log1p(1e4 / L): ~9.2 at 1 UMI and ~4.6 at 100, against
# ~1-3 in spots of ordinary depth (HER2ST sections: medians ~650 to ~10,000 UMI; Visium: thousands). Below 100
# UMI a spot's profile is a handful of counts blown up to the scale of the most expressed genes, i.e. an empty or
# failed spot, not tissue signal. 100 is low enough to keep every real spot of shallow sections (HER2ST B4's
# shallowest non-empty spots hold ~150 UMI and its median is ~650; Visium 396A's shallowest spot 174) while a
# common QC floor of 500 would drop ~40% of B4.
DEFAULT_MIN_UMI = 100
# Obs columns of spot stores (not of image-only ones): the spot's sequencing depth.
DEPTH_OBS = ("library_size", "n_genes_detected")
GENE_POOL = "all spots of all sections in this store (held-out patients of leave-one-patient-out included)"
CHUNK = 64  # crops normalised at a time: bounds the float64 OD buffers to ~25 MB at 128 px


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    format: str
    input: str
    output: str
    sections: tuple[str, ...] | None = None
    overwrite: bool = False
    tile_size: int = 128
    target_mpp: float | None = None  # None: DEFAULT_TILE_UM / tile_size (Visium HD: scaled to --pseudo_spot_um)
    edge: str = "pad"
    min_tissue: float | None = None  # None: 0 for spot formats, 0.5 for images
    colour_cast: bool = True
    colour_percentile: float = colour.DEFAULT_PERCENTILE
    stain: str = "macenko"
    stain_reference: str | None = None
    gene_filter: str = "expressed"
    min_expressed_pct: float = 50.0
    n_genes: int = 1000
    gene_list: str | None = None
    genes_from: str | None = None
    gene_map: str | None = None
    gene_ids: str = "native"
    norm_scale: float = 1e4
    log_base: str = "e"
    workers: int = 1
    missing_counts: str = "drop"
    min_umi: int = DEFAULT_MIN_UMI
    image: tuple[str, ...] = ()
    section_name: tuple[str, ...] = ()
    patient: tuple[str, ...] = ()
    source_mpp: float | None = None
    skip_unreadable: bool = False
    thumbnail_px: int = 1024
    # Visium HD: side of the pseudo-spots bins are summed into; None: DEFAULT_PSEUDO_SPOT_UM. Without --target_mpp
    # the tile footprint follows it at the default ratio of tile to spot.
    pseudo_spot_um: float | None = None
    hest_normalised: str = "refuse"  # one of hest.NORMALISED_POLICIES: an h5ad whose X is not raw counts

    @property
    def resolved_target_mpp(self) -> float:
        if self.target_mpp:
            return float(self.target_mpp)
        if self.pseudo_spot_um:
            return float(self.pseudo_spot_um) * (DEFAULT_TILE_UM / DEFAULT_PSEUDO_SPOT_UM) / self.tile_size
        return DEFAULT_TILE_UM / self.tile_size

    @property
    def resolved_pseudo_spot_um(self) -> float:
        return float(self.pseudo_spot_um) if self.pseudo_spot_um else DEFAULT_PSEUDO_SPOT_UM

    @property
    def resolved_min_tissue(self) -> float:
        if self.min_tissue is not None:
            return float(self.min_tissue)
        return DEFAULT_MIN_TISSUE_IMAGES if self.format == "images" else 0.0


def validate(opts: PrepareOptions) -> None:
    checks = [
        (opts.format in FORMATS, f"--format={opts.format!r}: use one of {FORMATS}."),
        (opts.edge in EDGE_MODES, f"--edge={opts.edge!r}: use one of {EDGE_MODES}."),
        (opts.stain in stain.METHODS, f"--stain={opts.stain!r}: use one of {stain.METHODS}."),
        (opts.gene_filter in expression.GENE_FILTERS, f"--gene_filter={opts.gene_filter!r}: use one of "
                                                      f"{expression.GENE_FILTERS}."),
        (opts.gene_ids in ("native", "symbol", "ensembl"), f"--gene_ids={opts.gene_ids!r}: native|symbol|ensembl."),
        (opts.log_base in expression.LOG_BASES, f"--log_base={opts.log_base!r}: use one of "
                                                f"{list(expression.LOG_BASES)}."),
        (opts.missing_counts in ("drop", "error"), f"--missing_counts={opts.missing_counts!r}: drop|error."),
        (opts.tile_size >= 8, f"--tile_size={opts.tile_size}: use at least 8 px."),
        (opts.resolved_target_mpp > 0, f"--target_mpp={opts.target_mpp}: must be positive."),
        (opts.norm_scale > 0, f"--norm_scale={opts.norm_scale}: must be positive."),
        (0.0 <= opts.resolved_min_tissue <= 1.0, f"--min_tissue={opts.min_tissue}: a fraction in [0, 1]."),
        (opts.workers >= 1, f"--workers={opts.workers}: at least 1."),
        (int(opts.min_umi) == opts.min_umi and opts.min_umi >= 0,
         f"--min_umi={opts.min_umi}: a whole number of UMIs >= 0 (0 or 1 keeps every non-empty spot)."),
        (not (opts.gene_filter == "list" and not opts.gene_list), "--gene_filter=list needs --gene_list=FILE."),
        (opts.format != "visium" or bool(opts.image),
         "--format=visium needs --image=FULL_RES_HE (Space Ranger does not keep the full-resolution image)."),
        (opts.hest_normalised in hest.NORMALISED_POLICIES,
         f"--hest_normalised={opts.hest_normalised!r}: use one of {hest.NORMALISED_POLICIES}."),
        (opts.pseudo_spot_um is None or opts.pseudo_spot_um > 0, f"--pseudo_spot_um={opts.pseudo_spot_um}: must be "
                                                                 "positive."),
        (opts.pseudo_spot_um is None or opts.format == "visium",
         f"--pseudo_spot_um applies to --format=visium (Visium HD binned outputs), not --format={opts.format}."),
    ]
    for ok, message in checks:
        if not ok:
            raise IngestError(message)
    for path, flag in ((opts.stain_reference, "--stain_reference"), (opts.gene_list, "--gene_list"),
                       (opts.gene_map, "--gene_map")):
        if path and not os.path.isfile(path):
            raise IngestError(f"{flag}={path}: no such file.")


# ----------------------------------------------------------------------------------------------- section loading

def discover(opts: PrepareOptions) -> list[SectionSource]:
    sections = list(opts.sections) if opts.sections else None
    if opts.format == "her2st":
        return her2st.discover(opts.input, sections)
    if opts.format == "stnet":
        return stnet.discover(opts.input, sections)
    if opts.format == "images":
        return plain_images.discover(opts.input, sections)
    if opts.format == "hest":
        return hest.discover(opts.input, sections)
    inputs = [p for p in opts.input.split(",") if p]
    srcs = visium.discover(inputs, list(opts.image), list(opts.section_name) or None, list(opts.patient) or None,
                           pseudo_spot_um=opts.pseudo_spot_um)
    if sections:
        srcs = [s for s in srcs if s.section in sections]
    return srcs


@functools.lru_cache(maxsize=4)
def _gene_map(path: str | None):
    return expression.read_hgnc_map(path) if path else None


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of level 0, from the image's header or the slide's directory, without decoding pixels."""
    with open_slide(path) as slide:
        return slide.width, slide.height


@dataclasses.dataclass
class LoadedSection:
    table: SectionTable  # table.n_genes_detected is set (raw matrix, before gene merging)
    library_size: np.ndarray
    x0: np.ndarray  # top-left corners of the source boxes of kept spots (full-res pixels)
    y0: np.ndarray
    padded: np.ndarray  # bool per kept spot: its box leaves the image and is padded white
    box: int  # source box side in pixels
    dropped_boxes: tuple[np.ndarray, np.ndarray]
    dropped: dict
    width: int
    height: int
    gene_info: dict


def _subset(t: SectionTable, idx: np.ndarray) -> SectionTable:
    return dataclasses.replace(t, spot_ids=t.spot_ids[idx], array_x=t.array_x[idx], array_y=t.array_y[idx],
                               pixel_x=t.pixel_x[idx], pixel_y=t.pixel_y[idx], labels=t.labels[idx],
                               counts=t.counts.take_rows(idx),
                               n_genes_detected=None if t.n_genes_detected is None else t.n_genes_detected[idx])


def load_section(src: SectionSource, opts: PrepareOptions) -> LoadedSection:
    """Reads a section's spots and counts and settles which spots are kept (deterministic: both passes call it)."""
    kw = dict(missing_counts=opts.missing_counts, source_mpp=opts.source_mpp)
    if src.format == "her2st":
        table = her2st.read_section(src, **kw)
    elif src.format == "stnet":
        table = stnet.read_section(src, **kw)
    elif src.format == "hest":
        table = hest.read_section(src, normalised=opts.hest_normalised, **kw)
    else:
        table = visium.read_section(src, use_ids=opts.gene_ids == "ensembl",
                                    pseudo_spot_um=opts.resolved_pseudo_spot_um, **kw)
    where = f"section {src.section} ({src.files.get('counts', src.files.get('h5', src.files.get('mtx', '')))})"
    detected = table.genes_detected()  # of the raw matrix: before harmonise merges genes sharing an ID
    counts, gene_info = expression.harmonise(table.counts, table.notes["native_ids"], opts.gene_ids,
                                             _gene_map(opts.gene_map), where)
    table = dataclasses.replace(table, counts=counts, n_genes_detected=detected)
    dropped = dict(table.dropped)
    lib = counts.row_sums()  # merging genes keeps row sums: this is the total over all genes of the raw matrix
    nonzero = np.flatnonzero(lib > 0)
    dropped["zero_library"] = int(len(lib) - len(nonzero))
    if len(nonzero) < len(lib):
        table, lib = _subset(table, nonzero), lib[nonzero]
    deep = np.flatnonzero(lib >= opts.min_umi)  # after the zero-library drop: empty spots are counted there only
    dropped["below_min_umi"] = int(len(lib) - len(deep))
    if len(deep) < len(lib):
        table, lib = _subset(table, deep), lib[deep]

    width, height = image_size(src.image_path)
    i, _ = slide_io.first_outside(table.pixel_x, table.pixel_y, width, height)
    if i is not None:
        raise IngestError(
            f"{src.image_path}: spot {table.spot_ids[i]!r} of section {src.section} has its centre at pixel "
            f"({table.pixel_x[i]:.1f}, {table.pixel_y[i]:.1f}), outside the {width}x{height} image; the spot "
            "coordinates and the image do not match (wrong image, or a downscaled one: give the full-resolution "
            "image)."
        )
    box = slide_io.source_tile_size(opts.tile_size, opts.resolved_target_mpp, table.microns_per_pixel)
    x0, y0 = slide_io.crop_boxes(table.pixel_x, table.pixel_y, box)
    inside = slide_io.box_inside(x0, y0, box, width, height)
    dropped_boxes = (x0[:0], y0[:0])
    if opts.edge == "drop":
        dropped["tile_outside_image"] = int((~inside).sum())
        dropped_boxes = (x0[~inside], y0[~inside])
        keep = np.flatnonzero(inside)
        if len(keep) < len(inside):
            table, lib, x0, y0, inside = _subset(table, keep), lib[keep], x0[keep], y0[keep], inside[keep]
    else:
        dropped["tile_outside_image"] = 0
    return LoadedSection(table, lib, x0, y0, ~inside, box, dropped_boxes, dropped, width, height, gene_info)


# ----------------------------------------------------------------------------------------------------- pass one

def image_scale(path: str, opts: PrepareOptions) -> tuple[float, str]:
    """(microns per pixel, where it came from) of a plain image or slide: --source_mpp, else its own metadata."""
    if opts.source_mpp:
        return float(opts.source_mpp), "given by --source_mpp"
    with open_slide(path) as slide:
        if slide.mpp:
            return float(slide.mpp), f"slide metadata ({slide.mpp_source})"
        raise IngestError(f"{path}: no microns per pixel in the image's metadata ({slide.mpp_source}); pass "
                          "--source_mpp (BACH/ICIAR-2018: 0.42 for its microscopy photographs, 0.467 for patches "
                          "of its whole-slide images).")


def pass1_section(src: SectionSource, opts: PrepareOptions) -> dict:
    if src.format == "images":
        try:
            width, height = image_size(src.image_path)
            mpp, how = image_scale(src.image_path, opts)
        except IngestError as e:
            if not opts.skip_unreadable:
                raise IngestError(f"{e} (or pass --skip_unreadable to leave such images out)") from e
            # Pass 2 meets the same failure and records the image as skipped.
            width, height = 0, 0
            mpp, how = opts.source_mpp or opts.resolved_target_mpp, f"not read ({e})"
        return {"info": _section_info(src, opts, mpp, how, width, height)}
    s = load_section(src, opts)
    stats = expression.section_gene_stats(s.table.counts, s.library_size, opts.norm_scale, opts.log_base)
    info = _section_info(src, opts, s.table.microns_per_pixel, s.table.mpp_method, s.width, s.height)
    info.update({
        "spots": int(s.table.n_spots),
        "dropped": s.dropped,
        "padded": int(s.padded.sum()),
        "gene_ids": s.gene_info,
        "genes_in_matrix": len(s.table.counts.genes),
        "labels_file": s.table.notes.get("labels_file", ""),
        "reader_notes": {k: v for k, v in s.table.notes.items() if k not in ("labels_file",)},
    })
    return {"info": info, "stats": stats}


def _section_info(src, opts, mpp, how, width, height) -> dict:
    return {
        "section": src.section,
        "patient": src.patient,
        "image": os.path.abspath(src.image_path),
        "image_sha256": slide_io.file_sha256(src.image_path) if os.path.isfile(src.image_path) else "",
        "image_width": int(width),
        "image_height": int(height),
        "source_microns_per_pixel": float(mpp),
        "source_mpp_method": how,
        "resample_factor": float(mpp) / opts.resolved_target_mpp,
        "source_tile_px": slide_io.source_tile_size(opts.tile_size, opts.resolved_target_mpp, float(mpp)),
    }


# ----------------------------------------------------------------------------------------------------- pass two

class SlideNormaliser:
    """Colour-cast removal and stain normalisation fitted once per slide and applied to crops of it."""

    def __init__(self, pixels, mode: str, *, stain_method: str, colour_cast: bool, colour_percentile: float,
                 reference: stain.StainParams | None, path: str, allow_fallback: bool = False):
        """`pixels`: an opened slide (fitted on `slide_io.sample_slide_pixels`: a strided sample of a small slide,
        of a low pyramid level of a large one) or an RGB array (fitted on a strided sample of it)."""
        self.method = stain_method
        self.reference = reference
        if slide_io.is_grayscale_mode(mode) and stain_method != "none":
            raise IngestError(f"{path}: grayscale image (mode {mode}); stain normalisation needs colour. Re-export it "
                              "in colour, pass --stain=none, or leave it out with --sections.")
        sample = slide_io.sample_pixels(pixels) if isinstance(pixels, np.ndarray) else \
            slide_io.sample_slide_pixels(pixels)
        # Percentiles are always computed: tissue detection runs on cast-corrected pixels even with --nocolour_cast.
        self.detect_percentiles = colour.channel_percentiles(sample, colour_percentile)
        self.percentiles = self.detect_percentiles if colour_cast else None
        if self.percentiles is not None:
            sample = colour.remove_colour_cast(sample, self.percentiles)
        self.params = None
        self.fallback = ""
        if stain_method != "none":
            try:
                self.params = stain.estimate(stain_method, sample)
            except stain.StainFitError as e:
                if not allow_fallback:
                    raise IngestError(f"{path}: cannot estimate {stain_method} stain vectors ({e}); check that the image "
                                      "shows H&E-stained tissue, or pass --stain=none.") from e
                self.fallback = str(e)

    def tissue_fraction(self, crops: np.ndarray) -> np.ndarray:
        """Fraction of tissue pixels per crop, judged on cast-corrected pixels at source resolution."""
        out = np.zeros(len(crops))
        for a in range(0, len(crops), CHUNK):
            x = colour.remove_colour_cast(crops[a:a + CHUNK], self.detect_percentiles)
            out[a:a + CHUNK] = slide_io.tissue_mask(_to_uint8(x)).reshape(len(x), -1).mean(axis=1)
        return out

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """Cast-corrected, stain-normalised copies of uint8 crops [n, s, s, 3]."""
        out = np.empty_like(crops)
        for a in range(0, len(crops), CHUNK):
            x = crops[a:a + CHUNK]
            if self.percentiles is not None:
                # Rounded back to uint8 between the steps: the stain step then takes the table-look-up fast path.
                x = _to_uint8(colour.remove_colour_cast(x, self.percentiles))
            if self.params is not None:
                x = _to_uint8(stain.normalise(x, self.method, self.params, self.reference))
            out[a:a + CHUNK] = x
        return out

    def describe(self) -> dict:
        d = {"colour_percentiles": None if self.percentiles is None else np.round(self.percentiles, 2).tolist()}
        if self.params is not None:
            d["stain"] = self.params.to_json()
        if self.fallback:
            d["stain_fit_failed"] = self.fallback
        return d


def normaliser_for(rgb, mode, opts: PrepareOptions, reference, path: str, allow_fallback: bool = False):
    return SlideNormaliser(rgb, mode, stain_method=opts.stain, colour_cast=opts.colour_cast,
                           colour_percentile=opts.colour_percentile, reference=reference, path=path,
                           allow_fallback=allow_fallback)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pass2_spots(src: SectionSource, opts: PrepareOptions, genes: list[str],
                reference: stain.StainParams | None) -> dict:
    s = load_section(src, opts)
    t = s.table
    with open_slide(src.image_path) as slide:
        norm = normaliser_for(slide, slide.mode, opts, reference, src.image_path)
        # Crops come from the pyramid level nearest (not coarser than) the tiles' scale, in batches.
        level = slide.best_level(opts.resolved_target_mpp / t.microns_per_pixel)
        tiles, tissue = slide_io.cut_tiles(slide, s.x0, s.y0, s.box, opts.tile_size, level=level, prepare=norm,
                                           tissue=norm.tissue_fraction, name=f"prepare {src.section}",
                                           report=functools.partial(print, file=sys.stderr, flush=True))
        keep = tissue >= opts.resolved_min_tissue
        small, (sx, sy) = slide_io.overview(slide, max(s.width, s.height) / opts.thumbnail_px, "report thumbnail")
        thumb = store_report.thumbnail_png(
            small,
            {fate: (np.asarray(x) / sx, np.asarray(y) / sy) for fate, (x, y) in
             {"kept": (s.x0[keep & ~s.padded], s.y0[keep & ~s.padded]),
              "padded": (s.x0[keep & s.padded], s.y0[keep & s.padded]),
              "background": (s.x0[~keep], s.y0[~keep]), "dropped_edge": s.dropped_boxes}.items()},
            s.box / sx, (t.pixel_x / sx, t.pixel_y / sy), opts.thumbnail_px)
        del small
    dense, missing = t.counts.dense_columns(genes)
    expr = expression.normalise(dense, s.library_size, opts.norm_scale, opts.log_base)
    idx = np.flatnonzero(keep)
    obs = {
        "spot_id": t.spot_ids[idx], "section": np.array([src.section] * len(idx)),
        "patient": np.array([src.patient] * len(idx)), "array_x": t.array_x[idx], "array_y": t.array_y[idx],
        "pixel_x": t.pixel_x[idx], "pixel_y": t.pixel_y[idx], "label": t.labels[idx],
        "library_size": s.library_size[idx], "n_genes_detected": t.genes_detected()[idx],
    }
    dropped = dict(s.dropped, background=int((~keep).sum()))
    entry = {
        "section": src.section, "patient": src.patient, "spots_written": int(len(idx)),
        "dropped": dropped, "padded": int((s.padded & keep).sum()),
        "tissue_fraction_mean": float(tissue[idx].mean()) if len(idx) else 0.0,
        "tissue_fraction_min": float(tissue[idx].min()) if len(idx) else 0.0,
        "tiles_mostly_tissue_fraction": float((tissue[idx] >= MOSTLY_TISSUE).mean()) if len(idx) else 0.0,
        "labelled_spots": int((t.labels[idx] != "").sum()),
        "library_size_min": float(s.library_size[idx].min()) if len(idx) else 0.0,
        "library_size_median": float(np.median(s.library_size[idx])) if len(idx) else 0.0,
        "genes_absent_in_section": len(missing), "genes_absent_examples": missing[:20],
        **norm.describe(),
    }
    return {"tiles": tiles[idx], "expression": expr[idx], "obs": obs, "entry": entry, "thumbnail": thumb}


def pass2_image(src: SectionSource, opts: PrepareOptions, genes: list[str],
                reference: stain.StainParams | None) -> dict:
    try:
        slide = open_slide(src.image_path)
        slide.read_region(0, 0, 1, 1)  # decodes a plain image (or a slide's first tile): unreadable files fail here
    except IngestError as e:
        if not opts.skip_unreadable:
            raise IngestError(f"{e} (or pass --skip_unreadable to leave such images out)") from e
        return {"skipped": str(e), "entry": {"section": src.section, "skipped": str(e), "spots_written": 0}}
    with slide:
        mode, w, h = slide.mode, slide.width, slide.height
        source_mpp, _ = image_scale(src.image_path, opts)
        norm = normaliser_for(slide, mode, opts, reference, src.image_path, allow_fallback=True)
        box = slide_io.source_tile_size(opts.tile_size, opts.resolved_target_mpp, source_mpp)
        x0, y0, cols, rows = plain_images.grid_boxes(w, h, box)
        level = slide.best_level(opts.resolved_target_mpp / source_mpp)
        tiles, tissue = slide_io.cut_tiles(slide, x0, y0, box, opts.tile_size, level=level, prepare=norm,
                                           tissue=norm.tissue_fraction, name=f"prepare {src.section}",
                                           report=functools.partial(print, file=sys.stderr, flush=True))
        keep = tissue >= opts.resolved_min_tissue
        small, (sx, sy) = slide_io.overview(slide, max(w, h) / opts.thumbnail_px, "report thumbnail")
        thumb = store_report.thumbnail_png(small, {"kept": (x0[keep] / sx, y0[keep] / sy),
                                                   "background": (x0[~keep] / sx, y0[~keep] / sy)},
                                           box / sx, None, opts.thumbnail_px)
        del small
    idx = np.flatnonzero(keep)
    label = src.extra.get("label", "")
    n = len(idx)
    obs = {
        "spot_id": np.array([f"{src.section}:{c}x{r}" for c, r in zip(cols[idx], rows[idx])]),
        "section": np.array([src.section] * n), "patient": np.array([src.patient] * n),
        "array_x": cols[idx].astype(np.int32), "array_y": rows[idx].astype(np.int32),
        "pixel_x": (x0[idx] + box / 2.0).astype(np.float64), "pixel_y": (y0[idx] + box / 2.0).astype(np.float64),
        "label": np.array([label] * n),
    }
    entry = {
        "section": src.section, "label": label, "image_mode": mode, "grid_tiles": int(len(x0)),
        "spots_written": n, "dropped": {"background": int((~keep).sum())},
        "tissue_fraction_mean": float(tissue[idx].mean()) if n else 0.0,
        "tiles_mostly_tissue_fraction": float((tissue[idx] >= MOSTLY_TISSUE).mean()) if n else 0.0,
        **norm.describe(),
    }
    return {"tiles": tiles[idx], "expression": np.zeros((n, len(genes)), np.float32), "obs": obs, "entry": entry,
            "thumbnail": thumb}


def _pass2(src: SectionSource, opts: PrepareOptions, genes, reference) -> dict:
    if src.format == "images":
        return pass2_image(src, opts, genes, reference)
    return pass2_spots(src, opts, genes, reference)


# ------------------------------------------------------------------------------------------------- orchestration

def ordered_map(fn: Callable, items: Iterable, workers: int, *args) -> Iterator:
    """fn(item, *args) for each item, results in input order; with workers > 1, at most `workers` items are in
    flight in spawned processes (spawn, not fork: the parent may hold TensorStore threads)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item, *args)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx) as pool:
        it = iter(items)
        pending = collections.deque(pool.submit(fn, item, *args) for item in itertools.islice(it, workers))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt, *args))
            yield result


def stain_reference(opts: PrepareOptions) -> tuple[stain.StainParams | None, str]:
    if opts.stain == "none":
        return None, ""
    if not opts.stain_reference:
        return stain.builtin_reference(), "builtin (standard H&E reference stain matrix and max concentrations)"
    with open_slide(opts.stain_reference) as slide:
        sample = slide_io.sample_slide_pixels(slide)  # a strided sample; from a low level of a large slide
    if opts.colour_cast:
        sample = colour.remove_colour_cast(sample, colour.channel_percentiles(sample, opts.colour_percentile))
    try:
        return stain.estimate(opts.stain, sample), os.path.abspath(opts.stain_reference)
    except stain.StainFitError as e:
        raise IngestError(f"--stain_reference={opts.stain_reference}: cannot estimate stain vectors ({e}); choose a "
                          "reference image with plenty of H&E tissue.") from e


def choose_genes(opts: PrepareOptions, stats: expression.GeneStats) -> tuple[list[str], dict, dict | None]:
    """(genes, selection info, expression settings of --genes_from store or None)."""
    other_expr = None
    if opts.genes_from:
        genes, other_expr = expression.gene_list_from_store(opts.genes_from)
        info = {"mode": "genes_from", "store": store_location.normalise_location(opts.genes_from), "n_genes_selected": len(genes),
                "n_spots_considered": stats.n_spots, "n_genes_in_input": len(stats.genes)}
        present = set(stats.genes)
        info["missing_from_input"] = [g for g in genes if g not in present]
        return genes, info, other_expr
    gene_list = expression.read_gene_list(opts.gene_list) if opts.gene_filter == "list" else None
    genes, info = expression.select_genes(stats, opts.gene_filter, min_expressed_pct=opts.min_expressed_pct,
                                          n_genes=opts.n_genes, gene_list=gene_list, where=opts.input)
    return genes, info, None


def gene_pool(opts: PrepareOptions, section_infos: list[dict]) -> dict:
    """Which spots the gene selection pooled, for the manifest: results must be able to say that genes were chosen
    with the held-out patients' spots included (the selection is unsupervised, but it did see them)."""
    if opts.genes_from:
        return {"pooled_over": "not this store: genes taken from the --genes_from store; see its manifest's "
                               "gene_selection"}
    if opts.gene_filter == "list":
        return {"pooled_over": "none: genes given by --gene_list (no statistics over spots used)"}
    spot_infos = [i for i in section_infos if "spots" in i]
    return {"pooled_over": GENE_POOL,
            "sections_pooled": [i["section"] for i in spot_infos],
            "patients_pooled": list(dict.fromkeys(i["patient"] for i in spot_infos))}


def prepare(opts: PrepareOptions, log: Callable[[str], None] = lambda m: None) -> dict:
    """Runs the whole job; returns the report dict. The store appears at opts.output only on success."""
    validate(opts)
    out = store_location.normalise_location(opts.output)  # a path, or a gs:// / s3:// / file:// URL
    if not opts.overwrite and store_location.store_exists(out):
        raise IngestError(f"{out}: already exists; pass --overwrite to replace it, or choose another --output.")
    sources = discover(opts)
    if not sources:
        raise IngestError(f"{opts.input}: no sections selected; check --sections.")
    log(f"{len(sources)} section(s) of {opts.format} from {opts.input}")

    # Pass 1: spot tables and counts (no images).
    stats = expression.GeneStats()
    section_infos = []
    pass1_progress = console.Progress("prepare pass 1", len(sources), 1, counts="section ", unit="sections")
    for i, res in enumerate(ordered_map(pass1_section, sources, opts.workers, opts)):
        section_infos.append(res["info"])
        if "stats" in res:
            st = res["stats"]
            stats.add_partial(st["genes"], st["n_spots"], st["expressed"], st["total"], st["total_sq"])
        log(f"pass 1: {sources[i].section}: {res['info'].get('spots', '-')} spots "
            f"({pass1_progress.line(i + 1)})")

    expr_settings = {"normalisation": "library_size", "scale": opts.norm_scale,
                     "log": "none" if opts.log_base == "none" else "log1p", "log_base": opts.log_base,
                     "library_size": "total counts of the spot over all genes of its count matrix, before gene "
                                     "selection",
                     "formula": "log_b(1 + counts / library_size * scale)"}
    if opts.format != "images" and stats.n_spots == 0:
        dropped = _sum_dicts(i.get("dropped", {}) for i in section_infos)
        raise IngestError(
            f"{opts.input}: no spot of the {len(sources)} section(s) is left to prepare (dropped: {dropped}); "
            + (f"their libraries are all below --min_umi={opts.min_umi} UMIs: lower --min_umi (0 keeps every "
               "non-empty spot) if these really are spot counts." if dropped.get("below_min_umi") else
               "check the spot tables and count matrices.")
        )
    if opts.format == "images":
        genes, selection = [], {"mode": "none (image-only store: no expression columns)"}
        expr_settings = {"has_expression": False}
    else:
        genes, selection, other = choose_genes(opts, stats)
        if other and (other.get("scale") != opts.norm_scale or other.get("log_base", "e") != opts.log_base):
            log(f"note: --genes_from store was normalised with {other}; this store uses scale={opts.norm_scale}, "
                f"log_base={opts.log_base}")
            selection["genes_from_expression"] = other
        selection.update(gene_pool(opts, section_infos))
        if selection.get("missing_from_input"):
            log(f"{len(selection['missing_from_input'])} selected gene(s) absent from every input section (stored "
                f"as 0): {selection['missing_from_input'][:10]}")
    log(f"{len(genes)} gene(s) selected ({selection['mode']})")

    reference, reference_name = stain_reference(opts)
    manifest = {
        "source_format": opts.format,
        "microns_per_pixel": opts.resolved_target_mpp,
        "tile_microns": opts.resolved_target_mpp * opts.tile_size,
        "pixel_coordinates": "obs pixel_x (column) / pixel_y (row): spot or tile centre in the ORIGINAL "
                             "full-resolution image of its section, before any resampling",
        "expression": expr_settings,
        "gene_ids": opts.gene_ids,
        "gene_map": os.path.abspath(opts.gene_map) if opts.gene_map else None,
        "gene_selection": selection,
        "genes_missing_from_input": selection.get("missing_from_input", []),
        "colour_cast": {"enabled": opts.colour_cast, "method": "per-channel percentile scaling",
                        "percentile": opts.colour_percentile},
        "stain_normalisation": {"method": opts.stain, "reference": reference_name,
                                **(reference.to_json() if reference is not None else {})},
        "tiles": {"edge": opts.edge, "pad_value": 255, "min_tissue": opts.resolved_min_tissue,
                  "resampling": "PIL BOX when shrinking, BICUBIC when enlarging"},
        "sections": section_infos,
        "provenance": {"input": os.path.abspath(opts.input), "command": " ".join(sys.argv),
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "options": {k: v for k, v in dataclasses.asdict(opts).items()}},
        "synthetic": False,
    }
    if opts.format == "images":
        manifest["has_expression"] = False
    else:
        manifest["spot_filters"] = {
            "zero_library": "spots with no count over all genes are dropped (report: dropped.zero_library)",
            "min_umi": int(opts.min_umi),
            "min_umi_rule": "then spots whose library size (total UMI over all genes of the raw matrix) is below "
                            "min_umi are dropped (report: dropped.below_min_umi); gene selection sees only the "
                            "spots kept",
        }
        manifest["obs_depth"] = {
            "library_size": "obs column: the spot's total count (UMI) over all genes of its raw count matrix, before "
                            "gene selection (the normalisation's library size)",
            "n_genes_detected": "obs column: number of genes of the raw count matrix with a count > 0 in the spot",
        }

    entries = []
    with StoreWriter(out, genes=genes, tile_size=opts.tile_size, manifest=manifest, overwrite=opts.overwrite,
                     extra_obs=() if opts.format == "images" else DEPTH_OBS) as w:
        # Sections differ in size: the ETA counts spots (or images) still to cut, not sections.
        weights = [i.get("spots", 1) for i in section_infos]
        pass2_progress = console.Progress("prepare pass 2", sum(weights), 1, counts="",
                                          unit="images" if opts.format == "images" else "spots")
        done = 0
        for src, res, weight in zip(sources, ordered_map(_pass2, sources, opts.workers, opts, genes, reference),
                                    weights):
            entry = res["entry"]
            if "skipped" not in res:
                w.append(res["tiles"], res["expression"], res["obs"])
                entry["thumbnail"] = store_report.write_thumbnail(w.tmp_path, src.section, res["thumbnail"])
            entries.append(entry)
            done += weight
            log(f"pass 2: {src.section}: {entry['spots_written']} tiles ({pass2_progress.line(done)})")
        written = [e for e in entries if "skipped" not in e]
        rep = {
            "store": out, "format": opts.format, "n_sections": len(written),
            "n_sections_skipped": len(entries) - len(written),
            "n_spots": int(sum(e["spots_written"] for e in entries)),
            "dropped": _sum_dicts(e.get("dropped", {}) for e in entries),
            "padded": int(sum(e.get("padded", 0) for e in entries)),
            "tiles_mostly_tissue_fraction": _weighted(entries, "tiles_mostly_tissue_fraction"),
            "tissue_fraction_mean": _weighted(entries, "tissue_fraction_mean"),
            "genes": {"n": len(genes), "selection": selection},
            "microns_per_pixel": opts.resolved_target_mpp, "tile_size": opts.tile_size,
            "sections": entries,
        }
        store_report.write_report(w.tmp_path, rep)
        w.update_manifest(report={k: rep[k] for k in ("n_sections", "n_sections_skipped", "n_spots", "dropped",
                                                       "padded", "tiles_mostly_tissue_fraction",
                                                       "tissue_fraction_mean")})
    return rep


def _sum_dicts(ds: Iterable[dict]) -> dict:
    out: dict = collections.Counter()
    for d in ds:
        out.update(d)
    return dict(out)


def _weighted(entries: list[dict], key: str) -> float:
    n = sum(e["spots_written"] for e in entries if key in e)
    if not n:
        return 0.0
    return float(sum(e[key] * e["spots_written"] for e in entries if key in e) / n)
