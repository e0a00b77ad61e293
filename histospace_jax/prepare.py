r"""Turns a public spatial-transcriptomics release (or a folder of H&E images) into a tile store.

    python -m histospace_jax.prepare --format=her2st --input=../shared/data/her2st --output=stores/her2st
    python -m histospace_jax.prepare --format=stnet --input=DIR --output=STORE --gene_map=hgnc.tsv --gene_ids=symbol
    python -m histospace_jax.prepare --format=visium --input=SAMPLE/outs --image=SAMPLE_fullres.tif --output=STORE
    python -m histospace_jax.prepare --format=images --input=BACH/ --source_mpp=0.42 --output=STORE
    python -m histospace_jax.prepare --format=hest --input=HEST_1K/ --samples=SPA154,SPA155 --output=STORE
    python -m histospace_jax.prepare --format=visium --input=HD_SAMPLE/outs --image=HD_fullres.tif --output=STORE
    python -m histospace_jax.prepare --format=her2st --input=../shared/data/her2st --output=gs://BUCKET/her2st

Defaults, and why:
* Tiles are 128 px at 300/128 = 2.34 um/px: each spans 300 um centred on its spot, the 100 um ST spot and the
  tissue most of the way to its neighbours' centres 200 um away (chosen on inner validation, README "Tile field of
  view"; --target_mpp sets another, e.g. 0.78125 for tiles that span the spot alone), whatever the slide's scale;
  slides at another scale are resampled (HER2ST patient A ~0.92, the others ~0.69 um/px; scales are derived from
  the spot grid or Visium's spot diameter, and recorded per section in the manifest).
* Colour-cast removal (per-channel 99th percentile, as in the paper) is on; --nocolour_cast disables it.
* --stain=macenko: deterministic, closed-form and about as good as Vahadane on H&E; --stain=vahadane matches the
  paper, --stain=none keeps the stains. Reference: --stain_reference=IMAGE, else a standard built-in H&E reference.
* Expression: log(1 + counts / library_size * 1e4), library size over all genes; genes expressed (count > 0) in
  >= 50% of the job's spots (the paper's filter), pooled over all sections and patients of the job (recorded in
  the manifest's gene_selection.pooled_over: a later leave-one-patient-out's held-out patient was among them).
* Spots: those with no counts are dropped, then those with fewer than --min_umi=100 UMIs (a 1-UMI spot would turn
  its single count into log1p(1e4) ~ 9.2; below 100 UMIs one count is worth >= log1p(100) ~ 4.6, the level of the
  most expressed genes, while real spots of even shallow ST sections hold >= ~150). Each spot's depth is kept in
  obs: library_size (total UMI over all genes) and n_genes_detected (genes with count > 0).
* HEST-1k (--format=hest): st/<id>.h5ad (raw counts in X, spot centres in obsm["spatial"]), wsis/<id>.tif,
  metadata/<id>.json; the scale and the patient come from the metadata (pixel_size_um_estimated, else _embedded;
  a patient name shared by two datasets is prefixed with the dataset title). tissue_seg/*.pkl is never unpickled
  (a downloaded pickle can run code); tissue is judged by our own check. An h5ad whose X is already normalised is
  refused unless --hest_normalised=raw (take layers['counts'] / raw.X) or =expm1 (undo log1p).
* Visium HD (--format=visium on an output with binned_outputs/): the 8 um bins are summed into square pseudo-spots
  of --pseudo_spot_um (default 100 um, an ST spot; the tiles span three times that unless --target_mpp says),
  kept when in-tissue bins cover at least half the square; see ingest/visium.py for the exact rule.
* --workers=1 keeps one slide in memory; --workers=N processes N sections at once (N slides in memory).
The store gets `report/report.json` and `report/thumbnails/<section>.png` (green boxes: tiles kept; yellow:
padded at the image edge; blue: rejected as background; red: dropped at the edge; black dots: spot centres).
"""

from __future__ import annotations

from absl import app, flags, logging

from histospace_jax.ingest import build, hest
from histospace_jax.ingest.common import IngestError

FLAGS = flags.FLAGS

flags.DEFINE_enum("format", None, list(build.FORMATS), "Input layout.")
flags.DEFINE_string("input", None, "Release folder (visium: Space Ranger outs/, several comma-separated).")
flags.DEFINE_string("output", None, "Tile store to create: a path, or a gs://BUCKET/..., s3://BUCKET/... or "
                    "file:///... URL (written in place; the manifest, written last, commits it).")
flags.DEFINE_list("sections", None, "Only these sections (default all). Images format: relative paths sans suffix.")
flags.DEFINE_list("samples", None, "hest: only these sample ids (the same as --sections; give one of the two).")
flags.DEFINE_bool("overwrite", False, "Replace an existing store at --output.")
flags.DEFINE_integer("tile_size", 128, "Tile side in pixels.")
flags.DEFINE_float("target_mpp", None, "Microns per pixel of the tiles (default 300 um / tile_size: a spot and its "
                   "surroundings).")
flags.DEFINE_float("source_mpp", None,
                  "Override the slides' microns per pixel (images: default from each image's own metadata).")
flags.DEFINE_enum("edge", "pad", list(build.EDGE_MODES), "Tiles leaving the image: pad with white, or drop the spot.")
flags.DEFINE_float("min_tissue", None, "Drop tiles with a smaller tissue-pixel fraction (default 0; images: 0.5).")
flags.DEFINE_bool("colour_cast", True, "Remove the colour cast by per-channel percentile scaling.")
flags.DEFINE_float("colour_percentile", 99.0, "Percentile mapped to white by colour-cast removal.")
flags.DEFINE_enum("stain", "macenko", ["none", "macenko", "vahadane"], "Stain normalisation method.")
flags.DEFINE_string("stain_reference", None, "Reference H&E image for stain normalisation (default built-in).")
flags.DEFINE_enum("gene_filter", "expressed", ["expressed", "hvg", "mean", "list"], "Gene selection rule.")
flags.DEFINE_float("min_expressed_pct", 50.0, "gene_filter=expressed: min %% of spots with count > 0.")
flags.DEFINE_integer("n_genes", 1000, "gene_filter=hvg|mean: number of genes.")
flags.DEFINE_string("gene_list", None, "gene_filter=list: text file, one gene per line.")
flags.DEFINE_string("genes_from", None, "Use the gene list of this existing store (missing genes stored as 0).")
flags.DEFINE_string("gene_map", None, "HGNC TSV ('Approved symbol', 'Ensembl ID(supplied by Ensembl)').")
flags.DEFINE_enum("gene_ids", "native", ["native", "symbol", "ensembl"], "Gene ID type of the store.")
flags.DEFINE_float("norm_scale", 1e4, "Library-size normalisation target (counts per norm_scale).")
flags.DEFINE_enum("log_base", "e", ["e", "2", "10", "none"], "Base of log(1 + x); none = no log.")
flags.DEFINE_integer("workers", 1, "Sections processed at once (each holds one slide in memory).")
flags.DEFINE_enum("missing_counts", "drop", ["drop", "error"], "Spots under tissue without a count row.")
flags.DEFINE_integer(
    "min_umi", build.DEFAULT_MIN_UMI,
    "Drop spots whose library size (total UMI over all genes) is below this, after dropping empty spots; counted "
    "per section in the report as dropped.below_min_umi. Default 100: with counts per 10k and log1p, one count in a "
    "spot of L UMIs becomes log1p(1e4/L) (9.2 at L=1, 4.6 at L=100, ~1-3 at ordinary depths), so spots under 100 "
    "UMIs are empty or failed spots whose few counts mimic the most expressed genes; real spots of shallow ST "
    "sections (HER2ST B4, median ~650) start near 150, so 100 keeps them (500, a common Visium floor, would drop "
    "~40% of B4). 0 or 1 keeps every non-empty spot.")
flags.DEFINE_list("image", [], "visium: full-resolution H&E image per --input, comma-separated.")
flags.DEFINE_list("section_name", [], "visium: section names per --input (default: folder above outs/).")
flags.DEFINE_list("patient", [], "visium: patient per --input (default: the section name).")
flags.DEFINE_bool("skip_unreadable", False, "images: leave unreadable images out (counted) instead of failing.")
flags.DEFINE_integer("thumbnail_px", 1024, "Longest side of the report thumbnails.")
flags.DEFINE_float("pseudo_spot_um", None, "Visium HD: side in um of the square pseudo-spots bins are summed into "
                   "(default 100 um); without --target_mpp the tiles span three times that.")
flags.DEFINE_enum("hest_normalised", "refuse", list(hest.NORMALISED_POLICIES),
                  "hest: when an h5ad's X is not raw counts: refuse; raw = use its layers['counts'] or raw.X; "
                  "expm1 = undo log1p (exact for log1p(counts / library * scale)).")


def options_from_flags() -> build.PrepareOptions:
    if FLAGS.samples and FLAGS.sections:
        raise app.UsageError("give --samples or --sections, not both (they select the same thing)")
    sections = FLAGS.samples or FLAGS.sections
    return build.PrepareOptions(
        format=FLAGS.format, input=FLAGS.input, output=FLAGS.output,
        sections=tuple(sections) if sections else None, overwrite=FLAGS.overwrite,
        tile_size=FLAGS.tile_size, target_mpp=FLAGS.target_mpp, source_mpp=FLAGS.source_mpp, edge=FLAGS.edge,
        min_tissue=FLAGS.min_tissue, colour_cast=FLAGS.colour_cast, colour_percentile=FLAGS.colour_percentile,
        stain=FLAGS.stain, stain_reference=FLAGS.stain_reference, gene_filter=FLAGS.gene_filter,
        min_expressed_pct=FLAGS.min_expressed_pct, n_genes=FLAGS.n_genes, gene_list=FLAGS.gene_list,
        genes_from=FLAGS.genes_from, gene_map=FLAGS.gene_map, gene_ids=FLAGS.gene_ids, norm_scale=FLAGS.norm_scale,
        log_base=FLAGS.log_base, workers=FLAGS.workers, missing_counts=FLAGS.missing_counts, min_umi=FLAGS.min_umi,
        image=tuple(FLAGS.image), section_name=tuple(FLAGS.section_name), patient=tuple(FLAGS.patient),
        skip_unreadable=FLAGS.skip_unreadable, thumbnail_px=FLAGS.thumbnail_px,
        pseudo_spot_um=FLAGS.pseudo_spot_um, hest_normalised=FLAGS.hest_normalised,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        rep = build.prepare(options_from_flags(), log=logging.info)
    except IngestError as e:
        # Bad input: the message already names the file, the item and the fix; no traceback needed.
        logging.error("%s", e)
        raise SystemExit(f"prepare failed: {e}") from None
    logging.info("wrote %s: %d sections, %d spots, %d genes, %.1f%% tiles mostly tissue; report in %s/report/",
                 rep["store"], rep["n_sections"], rep["n_spots"], rep["genes"]["n"],
                 100 * rep["tiles_mostly_tissue_fraction"], rep["store"])


if __name__ == "__main__":
    flags.mark_flags_as_required(["format", "input", "output"])
    app.run(main)
