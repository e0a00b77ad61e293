"""AnnData out in scanpy's spatial convention: the file read back with anndata, images and scalefactors that put
every spot on its tissue, the slide-or-mosaic choice per section, and LOO's predictions.h5ad."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from histospace_jax import folds, spatial_anndata
from histospace_jax.data import open_store, write_store
from histospace_jax.modes import loo

anndata = pytest.importorskip("anndata")

# Four solid colours, one per quadrant of a 3000 x 1500 slide (larger than hires, so it is shrunk).
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], np.uint8)


def quadrant_slide(width=3000, height=1500) -> np.ndarray:
    slide = np.empty((height, width, 3), np.uint8)
    for q, colour in enumerate(COLOURS):
        r, c = divmod(q, 2)
        slide[r * height // 2:(r + 1) * height // 2, c * width // 2:(c + 1) * width // 2] = colour
    return slide


def quadrant_of(x, y, width=3000, height=1500):
    return (np.asarray(y) >= height // 2).astype(int) * 2 + (np.asarray(x) >= width // 2).astype(int)


def colour_at(library: dict, x: float, y: float, image: str = "hires") -> np.ndarray:
    """The image pixel scanpy puts a full-resolution (x, y) on."""
    f = library["scalefactors"][f"tissue_{image}_scalef"]
    return library[image][int(y * f), int(x * f)]


def test_write_and_read_back_in_scanpy_layout(tmp_path):
    rng = np.random.default_rng(0)
    n, genes = 12, ["G1", "G2", "G3"]
    xy = np.column_stack([rng.uniform(100, 2900, n), rng.uniform(100, 1400, n)])
    sections = np.array(["A"] * 6 + ["B"] * 6)
    tiles = np.repeat(COLOURS[quadrant_of(xy[:, 0], xy[:, 1])][:, None, None, :], 16, 1).repeat(16, 2)
    libraries = {"A": spatial_anndata.slide_library(quadrant_slide(), spot_diameter_fullres=120.0),
                 "B": spatial_anndata.mosaic_library(xy[6:], tiles[6:], tile_fullres_px=80.0,
                                                     full_size=(3000, 1500))}
    X, truth = rng.random((n, 3), dtype=np.float32), rng.random((n, 3), dtype=np.float32)
    path = tmp_path / "out" / "p.h5ad"
    spatial_anndata.write_spatial_h5ad(
        str(path), X=X, genes=genes, obs={"spot_id": [f"{i % 6}x0" for i in range(n)], "section": sections,
                                          "patient": np.where(sections == "A", "P1", "P2"), "fold": ["P1"] * n},
        spatial_xy=xy, library_images=libraries, layers={"truth": truth}, uns_extra={"histospace": {"mode": "t"}})
    assert os.listdir(path.parent) == ["p.h5ad"]  # no temporary left behind

    a = anndata.read_h5ad(path)
    np.testing.assert_allclose(a.X, X)
    np.testing.assert_allclose(a.layers["truth"], truth)
    np.testing.assert_allclose(a.obsm["spatial"], xy)
    assert list(a.var_names) == genes and a.obs_names.is_unique and a.obs_names[0] == "A_0x0"
    assert list(a.obs["section"].cat.categories) == ["A", "B"] and set(a.obs["patient"]) == {"P1", "P2"}
    assert a.uns["histospace"]["mode"] == "t"
    for lib in ("A", "B"):
        entry = a.uns["spatial"][lib]
        assert set(entry["images"]) == {"hires", "lowres"} and set(entry["scalefactors"]) == set(
            spatial_anndata.SCALEFACTOR_KEYS)
        hires, lowres = entry["images"]["hires"], entry["images"]["lowres"]
        assert hires.dtype == np.uint8 and max(hires.shape[:2]) == 2000 and max(lowres.shape[:2]) == 600
        sf = entry["scalefactors"]
        assert sf["tissue_hires_scalef"] == pytest.approx(2000 / 3000)
        assert sf["tissue_lowres_scalef"] == pytest.approx(600 / 3000)
        # Every spot of the library lands on its own quadrant's colour, on both images.
        sel = (a.obs["section"] == lib).to_numpy()
        for (x, y), q in zip(xy[sel], quadrant_of(xy[sel, 0], xy[sel, 1])):
            for image in ("hires", "lowres"):
                view = {image: entry["images"][image], "scalefactors": sf}
                np.testing.assert_allclose(colour_at(view, x, y, image), COLOURS[q], atol=2)
    assert a.uns["spatial"]["A"]["scalefactors"]["spot_diameter_fullres"] == 120.0
    assert a.uns["spatial"]["B"]["scalefactors"]["spot_diameter_fullres"] == 80.0
    assert "mosaic" in a.uns["spatial"]["B"]["metadata"]["source_image"]


def test_inconsistent_input_is_refused_naming_the_item(tmp_path):
    xy = np.array([[10.0, 10.0], [20.0, 20.0]])
    lib = spatial_anndata.slide_library(np.zeros((40, 40, 3), np.uint8), spot_diameter_fullres=5.0)
    ok = dict(X=np.zeros((2, 1)), genes=["G"], obs={"section": ["S", "S"]}, spatial_xy=xy, library_images={"S": lib})
    path = str(tmp_path / "x.h5ad")
    with pytest.raises(ValueError, match="no image for library"):
        spatial_anndata.write_spatial_h5ad(path, **{**ok, "library_images": {}})
    with pytest.raises(ValueError, match="spots fall outside"):
        spatial_anndata.write_spatial_h5ad(path, **{**ok, "spatial_xy": xy * 10})
    with pytest.raises(ValueError, match="layer 'truth'"):
        spatial_anndata.write_spatial_h5ad(path, **ok, layers={"truth": np.zeros((3, 1))})
    with pytest.raises(ValueError, match="X has shape"):
        spatial_anndata.write_spatial_h5ad(path, **{**ok, "genes": ["G", "H"]})
    assert not os.listdir(tmp_path)


def _store_with_sections(tmp_path, slide_path: str):
    """A 2-patient store whose manifest records a readable slide for P1_S1 and a missing one for P2_S1."""
    rng = np.random.default_rng(1)
    xs, ys = np.meshgrid(np.arange(375, 3000, 750.0), np.arange(375, 1500, 750.0))  # off the quadrant edges
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    m = len(xy)
    tiles = np.repeat(COLOURS[quadrant_of(xy[:, 0], xy[:, 1])][:, None, None, :], 16, 1).repeat(16, 2)
    obs = {"section": ["P1_S1"] * m + ["P2_S1"] * m, "patient": ["P1"] * m + ["P2"] * m,
           "array_x": np.tile(np.arange(m) % 4, 2), "array_y": np.tile(np.arange(m) // 4, 2),
           "pixel_x": np.tile(xy[:, 0], 2), "pixel_y": np.tile(xy[:, 1], 2)}
    section = {"image_width": 3000, "image_height": 1500, "source_microns_per_pixel": 0.5, "source_tile_px": 200}
    manifest = {"source_format": "her2st", "tile_microns": 100.0,
                "sections": [{"section": "P1_S1", "image": slide_path, **section},
                             {"section": "P2_S1", "image": str(tmp_path / "moved.png"), **section}]}
    path = write_store(str(tmp_path / "store"), np.concatenate([tiles, tiles]),
                       rng.random((2 * m, 2), dtype=np.float32), ["G1", "G2"], obs, manifest=manifest)
    return open_store(path)


def test_store_libraries_use_the_slide_when_it_reads_else_a_tile_mosaic(tmp_path):
    slide = tmp_path / "slide.png"
    Image.fromarray(quadrant_slide()).save(slide)
    store = _store_with_sections(tmp_path, str(slide))
    libs = spatial_anndata.store_libraries(store, np.arange(store.n_spots))
    assert libs["P1_S1"]["metadata"]["source_image"] == str(slide)
    assert "mosaic" in libs["P2_S1"]["metadata"]["source_image"]
    assert "moved.png: not found" in libs["P2_S1"]["metadata"]["why_not_the_slide"]
    for lib in libs.values():
        h, w, _ = lib["hires"].shape
        assert 1000 <= w <= 2000 and h * 2 == w  # a slide shrinks by a whole factor (2 here), a mosaic to 2000
        assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(w / 3000)
        assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100.0 / 0.5)  # ST spot, 0.5 um/px
    for x, y, q in zip(store.obs["pixel_x"], store.obs["pixel_y"], quadrant_of(store.obs["pixel_x"],
                                                                               store.obs["pixel_y"])):
        for lib in libs.values():
            np.testing.assert_allclose(colour_at(lib, x, y), COLOURS[q], atol=2)
    # A slide replaced by an image of another size is not used: the spots would not fall on it.
    Image.fromarray(quadrant_slide(1000, 500)).save(slide)
    lib = spatial_anndata.store_libraries(store, np.arange(store.n_spots))["P1_S1"]
    assert "mosaic" in lib["metadata"]["source_image"] and "1000x500" in lib["metadata"]["why_not_the_slide"]


def _fake_loo(store):
    plan = folds.plan_leave_one_patient_out(store)
    rng = np.random.default_rng(2)
    preds = {k: rng.random((len(plan.held_out_rows(k)), len(store.genes)), dtype=np.float32)
             for k in range(len(plan.folds))}
    controls = {"mean_predictor": {k: np.full_like(p, 0.5) for k, p in preds.items()}}
    return {"plan": plan, "preds": preds}, controls


def test_loo_writes_predictions_h5ad_beside_the_truth(tmp_path):
    store = _store_with_sections(tmp_path, str(tmp_path / "absent.png"))
    loo_out, controls = _fake_loo(store)
    expression = np.asarray(store.expression)
    loo._write_h5ad(str(tmp_path), store, loo_out, expression, controls)
    a = anndata.read_h5ad(tmp_path / "predictions.h5ad")
    plan = loo_out["plan"]
    rows = np.concatenate([plan.held_out_rows(k) for k in range(2)])
    np.testing.assert_array_equal(a.obs["store_row"], rows)
    np.testing.assert_allclose(a.X, np.concatenate([loo_out["preds"][0], loo_out["preds"][1]]))
    np.testing.assert_allclose(a.layers["truth"], expression[rows])
    np.testing.assert_allclose(a.layers["mean_predictor"], 0.5)
    assert list(a.obs["fold"]) == list(a.obs["patient"]) == ["P1"] * 8 + ["P2"] * 8
    assert set(a.obs.columns) >= {"spot_id", "section", "patient", "fold"}
    assert set(a.uns["spatial"]) == {"P1_S1", "P2_S1"} and a.uns["histospace"]["mode"] == "loo"
    np.testing.assert_allclose(a.obsm["spatial"], np.column_stack([store.obs["pixel_x"], store.obs["pixel_y"]])[rows])


def test_without_anndata_loo_skips_the_file_with_a_note(tmp_path, monkeypatch, capsys):
    store = _store_with_sections(tmp_path, "")
    loo_out, controls = _fake_loo(store)
    monkeypatch.setitem(sys.modules, "anndata", None)  # makes `import anndata` fail
    with pytest.raises(spatial_anndata.AnnDataMissing, match="pip install"):
        spatial_anndata.write_spatial_h5ad(str(tmp_path / "x.h5ad"), X=np.zeros((1, 1)), genes=["G"],
                                           obs={"section": ["S"]}, spatial_xy=[[1.0, 1.0]],
                                           library_images={"S": spatial_anndata.slide_library(
                                               np.zeros((4, 4, 3), np.uint8), spot_diameter_fullres=1.0)})
    loo._write_h5ad(str(tmp_path), store, loo_out, np.asarray(store.expression), controls)
    assert not (tmp_path / "predictions.h5ad").exists()
    assert "predictions.h5ad not written" in capsys.readouterr().out
