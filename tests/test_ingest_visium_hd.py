"""Visium HD: a fixture in Space Ranger's binned layout (Parquet positions, h5 counts) summed into pseudo-spots;
each pseudo-spot's counts equal the sum of its bins, and its tile spans the pseudo-spot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from histospace_jax.data import open_store
from histospace_jax.ingest import build, visium
from histospace_jax.ingest.common import IngestError
from tests.test_ingest_fixtures import FIXTURE_MIN_UMI, synth_he, write_10x_h5
from tests.test_ingest_visium import _write_outs

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

BIN_UM, MPP = 8.0, 0.5  # a bin is 16 px
N_ROWS, N_COLS = 30, 28
ORIGIN_PX = 40.0
# Feature 5 repeats the symbol GENE0 (summed with it), feature 6 is an antibody tag (not a gene).
NAMES = ["GENE0", "GENE1", "GENE2", "GENE3", "GENE4", "GENE0", "ADT6"]
TYPES = ["Gene Expression"] * 6 + ["Antibody Capture"]
COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")


def _write_hd(root: str, *, seed: int = 0, drop_column: str | None = None, stray_barcode: bool = False) -> dict:
    """A Visium HD sample: SAMPLE/outs/binned_outputs/square_008um in Space Ranger's layout (a square_016um folder
    beside it must be passed over for the 8 um bins), plus a full-resolution PNG."""
    rng = np.random.default_rng(seed)
    binned = os.path.join(root, "SAMPLE", "outs", "binned_outputs")
    bins = os.path.join(binned, "square_008um")
    os.makedirs(os.path.join(bins, "spatial"))
    os.makedirs(os.path.join(binned, "square_016um", "spatial"))
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(N_ROWS), np.arange(N_COLS), indexing="ij"))
    barcodes = np.array([f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)])
    in_tissue = ((rows < 22) & (cols >= 3) & (rng.random(len(rows)) > 0.1)).astype(np.int64)
    px = ORIGIN_PX + (cols + 0.5) * BIN_UM / MPP
    py = ORIGIN_PX + (rows + 0.5) * BIN_UM / MPP
    # Positions list every bin, in a shuffled order (Space Ranger's order is not the grid's).
    order = rng.permutation(len(rows))
    table = {"barcode": barcodes[order], "in_tissue": in_tissue[order], "array_row": rows[order],
             "array_col": cols[order], "pxl_row_in_fullres": py[order], "pxl_col_in_fullres": px[order]}
    if drop_column:
        del table[drop_column]
    pq.write_table(pa.table(table), os.path.join(bins, "spatial", "tissue_positions.parquet"))
    with open(os.path.join(bins, "spatial", "scalefactors_json.json"), "w") as f:
        json.dump({"microns_per_pixel": MPP, "bin_size_um": BIN_UM, "spot_diameter_fullres": BIN_UM / MPP,
                   "tissue_hires_scalef": 0.2}, f)
    # The filtered matrix: in-tissue bins only, genes x barcodes CSC as Space Ranger writes it.
    in_matrix = np.flatnonzero(in_tissue)
    counts = rng.poisson(0.4, (len(NAMES), len(rows))).astype(np.int64)
    sub = counts[:, in_matrix]
    matrix_barcodes = barcodes[in_matrix].astype("S")
    if stray_barcode:
        matrix_barcodes[0] = b"s_008um_09999_09999-1"
    write_10x_h5(os.path.join(bins, "filtered_feature_bc_matrix.h5"), sub, matrix_barcodes,
                 [f"ENSG{j:011d}" for j in range(len(NAMES))], NAMES, TYPES)
    height, width = int(2 * ORIGIN_PX + N_ROWS * BIN_UM / MPP), int(2 * ORIGIN_PX + N_COLS * BIN_UM / MPP)
    Image.fromarray(synth_he(height, width, seed=seed)).save(os.path.join(root, "fullres.png"))
    return dict(rows=rows, cols=cols, in_tissue=in_tissue, px=px, py=py, counts=counts, outs=os.path.dirname(binned),
                image=os.path.join(root, "fullres.png"))


def _expected_pseudo_spots(truth: dict, pseudo_um: float) -> dict:
    """{(pseudo row, pseudo col): (summed gene-expression counts by feature, centre x, centre y)} of the kept
    pseudo-spots, by walking the P-squares: a bin belongs to the square that holds its centre."""
    out = {}
    centre_r = (truth["rows"] + 0.5) * BIN_UM  # bin centres in um from the array origin
    centre_c = (truth["cols"] + 0.5) * BIN_UM
    gex = truth["counts"][:6] * truth["in_tissue"][None, :]  # filtered matrix: in-tissue bins only
    for i in range(int(np.ceil(N_ROWS * BIN_UM / pseudo_um))):
        for j in range(int(np.ceil(N_COLS * BIN_UM / pseudo_um))):
            inside = ((centre_r >= i * pseudo_um) & (centre_r < (i + 1) * pseudo_um)
                      & (centre_c >= j * pseudo_um) & (centre_c < (j + 1) * pseudo_um))
            if truth["in_tissue"][inside].sum() * BIN_UM ** 2 >= 0.5 * pseudo_um ** 2:
                out[(i, j)] = (gex[:, inside].sum(axis=1), truth["px"][inside].mean(), truth["py"][inside].mean())
    return out


def test_pseudo_spot_counts_are_the_sums_of_their_bins(tmp_path):
    truth = _write_hd(str(tmp_path))
    src = visium.discover([truth["outs"]], [truth["image"]], None, None)[0]
    assert src.section == "SAMPLE" and src.extra["bins"] == "square_008um"
    t = visium.read_section(src, pseudo_spot_um=100.0)
    expected = _expected_pseudo_spots(truth, 100.0)
    assert len(expected) >= 3 and t.n_spots == len(expected)
    assert t.microns_per_pixel == MPP and "microns_per_pixel" in t.mpp_method
    dense, _ = t.counts.dense_columns(["GENE0", "GENE1", "GENE2", "GENE3", "GENE4"])
    assert "ADT6" not in t.counts.genes
    for k, (r, c) in enumerate(zip(t.array_y, t.array_x)):
        by_feature, cx, cy = expected[(int(r), int(c))]
        np.testing.assert_array_equal(dense[k], [by_feature[0] + by_feature[5], *by_feature[1:5]])
        assert t.pixel_x[k] == pytest.approx(cx) and t.pixel_y[k] == pytest.approx(cy)
        assert t.genes_detected()[k] == (by_feature > 0).sum()  # the two GENE0 features count as two genes
        assert t.spot_ids[k] == f"{c}x{r}"
    # 100 um of 8 um bins: squares of 12 and 13 bins a side (the bin centred on 100 um starts the second square).
    per_square = np.bincount(visium.pseudo_spot_of_bins(np.arange(N_ROWS), np.arange(N_COLS), BIN_UM, 100.0)[0])
    assert per_square.tolist() == [12, 13, 5]
    assert t.notes["visium_hd"]["bin_um"] == BIN_UM and t.dropped["little_tissue"] == 2


def test_prepare_centres_tiles_three_pseudo_spots_wide_unless_target_mpp_says(tmp_path):
    """Default pseudo-spots are 100 um (an ST spot) and their tiles 300 um, the ratio of an ST store's defaults; a
    given --pseudo_spot_um scales the tiles with it, and a given --target_mpp sets them alone."""
    truth = _write_hd(str(tmp_path))
    for pseudo_um, target_mpp, side, tile_um in ((None, None, 100.0, 300.0), (48.0, None, 48.0, 144.0),
                                                (48.0, 0.5, 48.0, 64.0)):
        out = tmp_path / f"store_{pseudo_um}_{target_mpp}"
        build.prepare(build.PrepareOptions(format="visium", input=truth["outs"], image=(truth["image"],),
                                           output=str(out), pseudo_spot_um=pseudo_um, target_mpp=target_mpp,
                                           min_umi=FIXTURE_MIN_UMI, stain="none"))
        store = open_store(out)
        expected = _expected_pseudo_spots(truth, side)
        assert store.n_spots == len(expected)
        assert store.manifest["tile_microns"] == pytest.approx(tile_um)
        assert store.manifest["sections"][0]["source_tile_px"] == round(tile_um / MPP)
        sums = {key: v[0][:6].sum() for key, v in expected.items()}
        np.testing.assert_array_equal(store.obs["library_size"],
                                      [sums[(int(r), int(c))] for r, c in zip(store.obs["array_y"],
                                                                              store.obs["array_x"])])


def _prepare(tmp_path, inputs, **kw):
    out = tmp_path / "store"
    with pytest.raises(IngestError) as e:
        build.prepare(build.PrepareOptions(format=kw.pop("format", "visium"), input=inputs, output=str(out), **kw))
    assert not out.exists()
    return str(e.value)


def test_bad_input_names_the_file_and_the_fix(tmp_path):
    truth = _write_hd(str(tmp_path / "a"), drop_column="pxl_col_in_fullres")
    msg = _prepare(tmp_path, truth["outs"], image=(truth["image"],))
    assert "tissue_positions.parquet" in msg and "pxl_col_in_fullres" in msg and "Copy" in msg
    truth = _write_hd(str(tmp_path / "b"), stray_barcode=True)
    msg = _prepare(tmp_path, truth["outs"], image=(truth["image"],))
    assert "filtered_feature_bc_matrix.h5" in msg and "s_008um_09999_09999-1" in msg
    truth = _write_hd(str(tmp_path / "c"))
    msg = _prepare(tmp_path, truth["outs"], image=(truth["image"],), pseudo_spot_um=4.0)
    assert "--pseudo_spot_um=4 is smaller than the 8 um bins" in msg and "square_002um" in msg
    msg = _prepare(tmp_path, truth["outs"], format="her2st", pseudo_spot_um=50.0)
    assert "--pseudo_spot_um applies to --format=visium" in msg
    _write_outs(str(tmp_path / "standard"))  # a standard Visium output: real spots, nothing to aggregate
    msg = _prepare(tmp_path, str(tmp_path / "standard" / "outs"), image=(str(tmp_path / "standard" / "image.png"),),
                   pseudo_spot_um=50.0)
    assert "standard Visium output" in msg and "drop --pseudo_spot_um" in msg
