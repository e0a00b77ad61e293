"""Plain H&E image folders: grid tiling, background rejection, RGBA / grayscale / corrupt images."""

import os

import numpy as np
import pytest
from PIL import Image

from histospace_jax.data import open_store
from histospace_jax.ingest import build, plain_images, slide_io
from histospace_jax.ingest.common import IngestError
from tests.test_ingest_fixtures import synth_he


def _opts(inp, out, **kw):
    kw.setdefault("source_mpp", 0.5)
    kw.setdefault("target_mpp", 1.0)
    kw.setdefault("tile_size", 32)  # 64-px boxes at 0.5 -> 1.0 um/px
    return build.PrepareOptions(format="images", input=str(inp), output=str(out), **kw)


def test_grid_tiles_and_background_rejection(tmp_path):
    inp = tmp_path / "imgs" / "Benign"
    os.makedirs(inp)
    # 256 x 256: a 4 x 4 grid of 64-px boxes; tissue only in the left half.
    Image.fromarray(synth_he(256, 256, tissue=(0, 0, 128, 256))).save(inp / "a.png")
    rep = build.prepare(_opts(tmp_path / "imgs", tmp_path / "store"))
    store = open_store(tmp_path / "store")
    assert store.n_spots == 8 and rep["dropped"]["background"] == 8
    assert set(store.obs["array_x"]) == {0, 1} and set(store.obs["label"]) == {"Benign"}
    assert store.manifest["has_expression"] is False and store.manifest["synthetic"] is False
    np.testing.assert_allclose(sorted(set(store.obs["pixel_x"])), [32.0, 96.0])  # box centres, full-res frame
    assert store.tiles[0].shape == (32, 32, 3)
    # Image-only: no sequencing depth, no spot filters.
    assert "library_size" not in store.obs and "n_genes_detected" not in store.obs
    assert "spot_filters" not in store.manifest and "below_min_umi" not in rep["dropped"]


def test_rgba_grayscale_and_corrupt_images(tmp_path):
    d = tmp_path / "imgs"
    os.makedirs(d)
    rgb = synth_he(128, 128, seed=1)
    rgba = np.dstack([rgb, np.full((128, 128), 255, np.uint8)])
    rgba[:, 64:, 3] = 0  # transparent right half = glass
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    arr, mode = slide_io.read_rgb(str(d / "rgba.png"))
    assert mode == "RGBA" and (arr[:, 64:] == 255).all() and (arr[:, :64] == rgb[:, :64]).all()
    Image.fromarray(rgb.mean(axis=2).astype(np.uint8), "L").save(d / "gray.tif")
    arr, mode = slide_io.read_rgb(str(d / "gray.tif"))
    assert mode == "L" and arr.shape == (128, 128, 3)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(IngestError, match=r"broken\.jpg: unreadable image"):
        slide_io.read_rgb(str(d / "broken.jpg"))
    # Whole job: the grayscale image cannot be stain-normalised -> error naming it; with --stain=none and
    # --skip_unreadable the corrupt file is counted and left out.
    with pytest.raises(IngestError, match=r"gray\.tif: grayscale"):
        build.prepare(_opts(d, tmp_path / "s1", skip_unreadable=True))
    assert not os.path.exists(tmp_path / "s1")
    with pytest.raises(IngestError, match=r"broken\.jpg.*--skip_unreadable"):
        build.prepare(_opts(d, tmp_path / "s2", stain="none"))
    rep = build.prepare(_opts(d, tmp_path / "s3", stain="none", skip_unreadable=True))
    assert rep["n_sections_skipped"] == 1 and rep["n_sections"] == 2


def test_bach_patches(shared_data, tmp_path):
    inp = os.path.join(shared_data, "bach-a01")
    names = ["A01_0_10000_image_46", "A01_0_10000_image_47"]
    rep = build.prepare(build.PrepareOptions(format="images", input=inp, output=str(tmp_path / "bach"),
                                             sections=tuple(names), source_mpp=0.467, target_mpp=0.78125))
    store = open_store(tmp_path / "bach")
    # The patches' README: 0.467 um/px. 1000 px -> boxes of round(128 * 0.78125 / 0.467) = 214 px -> 4 x 4 grid.
    assert all(e["grid_tiles"] == 16 for e in rep["sections"])
    assert store.n_spots == 32 - rep["dropped"]["background"]
    assert (slide_io.tissue_fraction(store.tiles[:]) >= 0.5).mean() > 0.9
    srcs = plain_images.discover(inp, None)
    assert len(srcs) == 37 and srcs[0].extra["label"] == ""  # the README's thirty-seven patches


def test_scale_from_the_images_own_metadata(tmp_path):
    """Without --source_mpp, each image's own resolution tags give its scale; an image without them is refused,
    naming the file and the flag, and no store is left behind."""
    import tifffile

    inp = tmp_path / "imgs" / "Benign"
    os.makedirs(inp)
    pixels = synth_he(256, 256, tissue=(0, 0, 256, 256))
    # 0.5 um/px as TIFF resolution: 20,000 pixels per centimetre.
    tifffile.imwrite(inp / "a.tif", pixels, resolution=(20000.0, 20000.0), resolutionunit="CENTIMETER")
    rep = build.prepare(_opts(tmp_path / "imgs", tmp_path / "store", source_mpp=None))
    info = open_store(tmp_path / "store").manifest["sections"][0]
    assert info["source_microns_per_pixel"] == pytest.approx(0.5) and "metadata" in info["source_mpp_method"]
    assert info["source_tile_px"] == 64 and rep["n_spots"] == 16  # 64-px boxes, as with --source_mpp=0.5
    Image.fromarray(pixels).save(inp / "b.png")  # PNG without a physical scale
    with pytest.raises(IngestError, match=r"b\.png.*--source_mpp"):
        build.prepare(_opts(tmp_path / "imgs", tmp_path / "store2", source_mpp=None))
    assert not os.path.exists(tmp_path / "store2")
