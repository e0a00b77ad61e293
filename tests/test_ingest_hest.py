"""HEST-1k reader: the shared HER2ST sections converted into the HEST layout give the same store as the HER2ST
reader (acceptance), and small synthetic samples for patients, normalised input and bad input."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from scipy import sparse

from histospace_jax.data import open_store
from histospace_jax.ingest import build, her2st, hest, slide_io
from histospace_jax.ingest.common import IngestError
from tests.conftest import SHARED_DATA
from tests.test_ingest_fixtures import FIXTURE_MIN_UMI, synth_he, st_grid

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")
tifffile = pytest.importorskip("tifffile")

ROUND_TRIP_SECTIONS = ("B4", "C3")  # two patients: the patient ids must survive the round trip
# Tiles may differ by this much (uint8 levels) between the two stores. The TIFF here is lossless (deflate), so they
# are identical in practice; a lossy slide (JPEG tiles, as many HEST slides are) would need a few levels.
TILE_TOLERANCE = 2


def write_pyramid(path: str, rgb: np.ndarray, levels: int = 2) -> None:
    """A tiled, deflate-compressed pyramidal TIFF (full resolution first, halved levels as SubIFDs), as HEST ships
    (lossless here, so tiles can be compared exactly)."""
    options = dict(tile=(256, 256), compression="zlib", compressionargs={"level": 1}, photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2 ** 31) as tif:
        tif.write(rgb, subifds=levels, **options)
        level = rgb
        for _ in range(levels):
            level = level[::2, ::2]
            tif.write(level, subfiletype=1, **options)


def write_hest_sample(root: str, sample: str, rgb: np.ndarray, *, spot_ids, array_col, array_row, pixel_x, pixel_y,
                      counts, genes, meta: dict, in_tissue=None, layers=None, x=None) -> None:
    """One sample in the HEST-1k layout: st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json."""
    for sub in ("st", "wsis", "metadata"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    obs = pd.DataFrame({"array_row": np.asarray(array_row, np.int64), "array_col": np.asarray(array_col, np.int64),
                        "pxl_row_in_fullres": np.asarray(pixel_y, float),
                        "pxl_col_in_fullres": np.asarray(pixel_x, float)},
                       index=pd.Index([str(s) for s in spot_ids]))
    obs["in_tissue"] = np.ones(len(obs), np.int64) if in_tissue is None else np.asarray(in_tissue, np.int64)
    adata = anndata.AnnData(X=sparse.csr_matrix(counts if x is None else x, dtype=np.float32), obs=obs,
                            var=pd.DataFrame(index=pd.Index(list(genes))), layers=layers or {})
    adata.obsm["spatial"] = np.stack([np.asarray(pixel_x, float), np.asarray(pixel_y, float)], axis=1)
    adata.write_h5ad(os.path.join(root, "st", f"{sample}.h5ad"))
    write_pyramid(os.path.join(root, "wsis", f"{sample}.tif"), rgb)
    with open(os.path.join(root, "metadata", f"{sample}.json"), "w") as f:
        json.dump({"id": sample, "fullres_px_width": rgb.shape[1], "fullres_px_height": rgb.shape[0], **meta}, f)


# ------------------------------------------------------------------------------------------ HER2ST round trip

@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    release = os.path.join(SHARED_DATA, "her2st")
    if not os.path.isdir(release):
        pytest.skip(f"real data not found at {release} (../shared/data beside the repository root)")
    tmp = tmp_path_factory.mktemp("hest_round_trip")
    root = str(tmp / "hest")
    for src in her2st.discover(release, list(ROUND_TRIP_SECTIONS)):
        t = her2st.read_section(src)  # every selected spot with counts: prepare's filters then run on both sides
        rgb, _ = slide_io.read_rgb(src.image_path)
        write_hest_sample(root, src.section, rgb, spot_ids=t.spot_ids, array_col=t.array_x, array_row=t.array_y,
                          pixel_x=t.pixel_x, pixel_y=t.pixel_y, counts=t.counts.matrix, genes=t.counts.genes,
                          meta={"patient": src.patient, "dataset_title": "HER2ST", "organ": "Breast",
                                "st_technology": "Spatial Transcriptomics",
                                "pixel_size_um_estimated": t.microns_per_pixel, "pixel_size_um_embedded": None,
                                "spot_diameter": 100.0, "inter_spot_dist": 200.0})
    # Tiles at 0.78125 um/px read the pyramid's full-resolution level as the JPEG reader does; at the default
    # 2.34 um/px the pyramid's 2x level is read instead (the point of a pyramid), a different filtering whose tiles
    # differ from the JPEG's by ~4 grey levels on average, so the tile comparison below would test the filters.
    reference = build.prepare(build.PrepareOptions(format="her2st", input=release, output=str(tmp / "her2st_store"),
                                                   sections=ROUND_TRIP_SECTIONS, target_mpp=0.78125))
    converted = build.prepare(build.PrepareOptions(format="hest", input=root, output=str(tmp / "hest_store"),
                                                   sections=ROUND_TRIP_SECTIONS, target_mpp=0.78125))
    return open_store(tmp / "her2st_store"), open_store(tmp / "hest_store"), reference, converted


@pytest.mark.shared_data
def test_round_trip_gives_the_same_spots_and_expression(round_trip):
    ref, got, ref_rep, got_rep = round_trip
    assert got.genes == ref.genes and got.n_spots == ref.n_spots > 400
    for key in ("spot_id", "section", "patient", "array_x", "array_y", "pixel_x", "pixel_y", "label",
                "library_size", "n_genes_detected"):
        np.testing.assert_array_equal(got.obs[key], ref.obs[key], err_msg=key)
    np.testing.assert_array_equal(got.expression[:], ref.expression[:])
    # The converted samples hold only spots with counts, so HER2ST's no_counts has no counterpart; every later
    # filter (empty and shallow libraries, background tiles) drops the same spots.
    def filters(rep):
        return {k: v for k, v in rep["dropped"].items() if k not in ("no_counts", "not_in_tissue")}
    assert filters(got_rep) == filters(ref_rep) and got_rep["dropped"]["not_in_tissue"] == 0
    for a, b in zip(got.manifest["sections"], ref.manifest["sections"]):
        assert a["source_microns_per_pixel"] == b["source_microns_per_pixel"]
        assert a["source_tile_px"] == b["source_tile_px"]
        assert "pixel_size_um_estimated" in a["source_mpp_method"]


@pytest.mark.shared_data
def test_round_trip_tiles_equal_within_compression_tolerance(round_trip):
    ref, got, _, _ = round_trip
    diff = np.abs(got.tiles[:].astype(np.int16) - ref.tiles[:].astype(np.int16))
    assert int(diff.max()) <= TILE_TOLERANCE, f"max tile difference {int(diff.max())}"


# ------------------------------------------------------------------------------------------ synthetic samples

GENES = [f"GENE{j}" for j in range(8)]
IMAGE_PX = 700


def _sample_arrays(seed: int):
    rng = np.random.default_rng(seed)
    ax, ay, px, py = st_grid(5, 5, 100.0, origin=150.0)  # 100 px apart: 200 um at 2 um/px
    counts = rng.poisson(3.0, (len(ax), len(GENES))).astype(np.int64)
    counts[:, 0] = 0  # a gene no spot expresses
    return dict(spot_ids=[f"{x}x{y}" for x, y in zip(ax, ay)], array_col=ax, array_row=ay, pixel_x=px, pixel_y=py,
                counts=counts, genes=GENES)


def _write_samples(root: str, specs: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for k, (sample, meta) in enumerate(specs.items()):
        arrays = _sample_arrays(k)
        write_hest_sample(root, sample, synth_he(IMAGE_PX, IMAGE_PX, seed=k), meta=meta, **arrays)
        out[sample] = arrays
    return out


BASE_META = {"pixel_size_um_estimated": 2.0, "pixel_size_um_embedded": 1.0, "spot_diameter": 100.0,
             "inter_spot_dist": 200.0, "st_technology": "Spatial Transcriptomics", "organ": "Breast"}


def test_hest_store_takes_scale_and_patients_from_metadata_and_never_unpickles(tmp_path):
    root = str(tmp_path / "hest")
    specs = {"S1": {**BASE_META, "patient": "Patient 1", "dataset_title": "Study A"},
             "S2": {**BASE_META, "patient": "Patient 1", "dataset_title": "Study B"},
             "S3": {**BASE_META, "patient": None, "dataset_title": "Study B"},
             "S4": {**BASE_META, "patient": "Patient 9", "dataset_title": "Study B"}}
    truth = _write_samples(root, specs)
    # HEST's tissue segmentations are pickles; one that writes a file when unpickled must stay unopened.
    marker = tmp_path / "unpickled"
    os.makedirs(os.path.join(root, "tissue_seg"))
    with open(os.path.join(root, "tissue_seg", "S1_tissue_seg.pkl"), "wb") as f:
        f.write(pickle.dumps(_OpensFile(str(marker))))
    os.makedirs(os.path.join(root, "patches"))
    with open(os.path.join(root, "patches", "S1.h5"), "wb") as f:
        f.write(b"not read")
    out = tmp_path / "store"
    build.prepare(build.PrepareOptions(format="hest", input=root, output=str(out), sections=("S1", "S2", "S3"),
                                       min_umi=FIXTURE_MIN_UMI))
    assert not marker.exists()
    store = open_store(out)
    assert store.patients == ["Study A/Patient 1", "Study B/Patient 1", "S3"]
    for sec in ("S1", "S2", "S3"):
        rows = np.flatnonzero(store.obs["section"] == sec)
        c = truth[sec]["counts"]
        np.testing.assert_array_equal(store.obs["spot_id"][rows], truth[sec]["spot_ids"])
        np.testing.assert_array_equal(store.obs["library_size"][rows], c.sum(axis=1))
        expected = np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4)[:, [GENES.index(g) for g in store.genes]]
        np.testing.assert_allclose(store.expression[:][rows], expected, rtol=1e-5)
    assert "GENE0" not in store.genes
    for entry in store.manifest["sections"]:  # estimated (2.0) wins over embedded (1.0): a 300 um tile = 150 px
        assert entry["source_microns_per_pixel"] == 2.0 and entry["source_tile_px"] == 150
        assert entry["reader_notes"]["st_technology"] == "Spatial Transcriptomics"


class _OpensFile:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_in_tissue_and_embedded_pixel_size_and_derived_array_coordinates(tmp_path):
    root = str(tmp_path / "hest")
    meta = {k: v for k, v in BASE_META.items() if k != "pixel_size_um_estimated"}
    arrays = _sample_arrays(0)
    in_tissue = np.ones(len(arrays["spot_ids"]), int)
    in_tissue[:3] = 0
    write_hest_sample(root, "S1", synth_he(IMAGE_PX, IMAGE_PX), meta=meta, in_tissue=in_tissue, **arrays)
    src = hest.discover(root, None)[0]
    assert src.patient == "S1"  # no patient in the metadata: the sample is its own patient
    t = hest.read_section(src)
    assert t.microns_per_pixel == 1.0 and "pixel_size_um_embedded" in t.mpp_method
    assert list(t.spot_ids) == arrays["spot_ids"][3:] and t.dropped["not_in_tissue"] == 3
    np.testing.assert_array_equal(t.array_x, arrays["array_col"][3:])
    # Without obs array_row / array_col, grid positions come from the pixels and the spot spacing of the metadata
    # (200 um at 1 um/px = 200 px, so the 100 px grid steps by halves: rint gives 0, 0, 1, 2, 2, ...).
    adata = anndata.read_h5ad(src.files["counts"])
    adata.obs = adata.obs.drop(columns=["array_row", "array_col"])
    adata.write_h5ad(src.files["counts"])
    t = hest.read_section(src)
    np.testing.assert_array_equal(t.array_x, np.rint((t.pixel_x - t.pixel_x.min()) / 200.0))
    assert t.notes["array_coordinates"].startswith("pixels / inter_spot_dist")


def test_normalised_values_are_refused_or_converted_on_request(tmp_path):
    arrays = _sample_arrays(0)
    c = arrays["counts"]
    logged = np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4)
    stores = {}
    for policy in ("raw", "expm1", "counts"):
        root = str(tmp_path / policy)
        if policy == "counts":
            write_hest_sample(root, "S1", synth_he(IMAGE_PX, IMAGE_PX), meta=BASE_META, **arrays)
        else:
            write_hest_sample(root, "S1", synth_he(IMAGE_PX, IMAGE_PX), meta=BASE_META, x=logged,
                              layers={"counts": sparse.csr_matrix(c.astype(np.float32))}, **arrays)
        if policy == "raw":
            with pytest.raises(IngestError) as e:
                build.prepare(build.PrepareOptions(format="hest", input=root, output=str(tmp_path / "refused")))
            msg = str(e.value)
            assert "S1.h5ad" in msg and "non-integer" in msg and "--hest_normalised=raw" in msg
            assert not (tmp_path / "refused").exists()
        out = str(tmp_path / f"store_{policy}")
        build.prepare(build.PrepareOptions(format="hest", input=root, output=out, min_umi=FIXTURE_MIN_UMI,
                                           hest_normalised="refuse" if policy == "counts" else policy))
        stores[policy] = open_store(out)
    reference = stores["counts"]
    for policy in ("raw", "expm1"):
        assert stores[policy].genes == reference.genes
        np.testing.assert_allclose(stores[policy].expression[:], reference.expression[:], rtol=1e-5, atol=1e-5)
        notes = stores[policy].manifest["sections"][0]["reader_notes"]["counts_from"]
        assert notes.startswith("layers['counts']" if policy == "raw" else "expm1 of X")


def _drop_metadata(root):
    os.remove(os.path.join(root, "metadata", "S1.json"))


def _drop_spatial(root):
    path = os.path.join(root, "st", "S1.h5ad")
    adata = anndata.read_h5ad(path)
    del adata.obsm["spatial"]
    adata.write_h5ad(path)


def _scale_spatial(root):  # coordinates of a 10x downscaled image claimed as full resolution: off the slide
    path = os.path.join(root, "st", "S1.h5ad")
    adata = anndata.read_h5ad(path)
    adata.obsm["spatial"] = adata.obsm["spatial"] * 10.0
    adata.write_h5ad(path)


def _drop_pixel_size(root):
    path = os.path.join(root, "metadata", "S1.json")
    with open(path) as f:
        meta = json.load(f)
    meta["pixel_size_um_estimated"] = meta["pixel_size_um_embedded"] = None
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("spoil, names, fix", [
    (_drop_metadata, [os.path.join("metadata", "S1.json")], "Restore metadata/<id>.json"),
    (_drop_spatial, [os.path.join("st", "S1.h5ad"), "obsm['spatial']"], "adata.obsm['spatial'] ="),
    (_scale_spatial, [os.path.join("st", "S1.h5ad"), os.path.join("wsis", "S1.tif"), "outside the 700x700 slide"],
     "must be full-resolution pixels"),
    (_drop_pixel_size, [os.path.join("metadata", "S1.json"), "pixel_size_um_estimated"], "--source_mpp"),
])
def test_bad_input_names_the_file_and_the_fix_and_writes_nothing(tmp_path, spoil, names, fix):
    root = str(tmp_path / "hest")
    _write_samples(root, {"S1": {**BASE_META, "patient": "P1"}})
    spoil(root)
    out = tmp_path / "store"
    with pytest.raises(IngestError) as e:
        build.prepare(build.PrepareOptions(format="hest", input=root, output=str(out), min_umi=FIXTURE_MIN_UMI))
    for name in names:
        assert name in str(e.value)
    assert fix in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["hest"]  # no store, no temporary folder left behind


def test_unknown_sample_and_missing_slide(tmp_path):
    root = str(tmp_path / "hest")
    _write_samples(root, {"S1": {**BASE_META, "patient": "P1"}})
    with pytest.raises(IngestError, match=r"--samples: \['S9'\].*available: S1"):
        hest.discover(root, ["S9"])
    os.remove(os.path.join(root, "wsis", "S1.tif"))
    with pytest.raises(IngestError, match=r"wsis/S1\.tif: slide of sample S1 missing"):
        hest.discover(root, None)
    with pytest.raises(IngestError, match="no st/ folder"):
        hest.discover(str(tmp_path), None)
