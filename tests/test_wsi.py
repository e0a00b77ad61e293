"""Whole-slide images read region by region (histospace_jax.ingest.wsi): small pyramidal TIFFs written here with
tifffile, read back against the arrays they were written from; their scale from the file's metadata; prepare and
predict on them, and their errors (no usable level, spots outside the slide) leaving nothing behind."""

from __future__ import annotations

import csv
import gzip
import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from histospace_jax import predict
from histospace_jax.data import open_store
from histospace_jax.ingest import build, slide_io, wsi
from histospace_jax.ingest.common import IngestError
from tests.test_ingest_fixtures import FIXTURE_MIN_UMI, synth_he, write_gz, write_stnet
from tests.test_predict import _model_dir


def _shrink(rgb: np.ndarray, factor: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).reduce(factor)) if factor > 1 else rgb


def write_pyramid(path, rgb, factors=(1, 2, 4), tile=256, compression="zlib", mpp=None, **kwargs):
    """A tiled pyramidal TIFF: level 0 and reduced copies (SubIFDs) by the given factors; returns the levels."""
    levels = [_shrink(rgb, f) for f in factors]
    extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(path, bigtiff=kwargs.pop("bigtiff", False)) as tw:
        tw.write(levels[0], tile=(tile, tile), subifds=len(levels) - 1, compression=compression, **extra, **kwargs)
        for lv in levels[1:]:
            tw.write(lv, tile=(tile, tile), subfiletype=1, compression=compression)
    return levels


@pytest.fixture(scope="module")
def noise_slide(tmp_path_factory):
    rgb = np.random.default_rng(0).integers(0, 256, (1100, 1500, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("wsi") / "noise.tif")
    return path, write_pyramid(path, rgb, mpp=0.5)


def test_regions_and_levels_equal_the_arrays_written(noise_slide):
    path, levels = noise_slide
    with wsi.open_slide(path) as s:
        assert isinstance(s, wsi.TiffSlide) and (s.width, s.height) == (1500, 1100) and s.mode == "RGB"
        assert [(w, h) for w, h, _ in s.levels] == [(lv.shape[1], lv.shape[0]) for lv in levels]
        for x, y, w, h in ((0, 0, 10, 10), (250, 240, 300, 40), (1200, 900, 300, 200), (511, 767, 2, 2)):
            np.testing.assert_array_equal(s.read_region(x, y, w, h), levels[0][y:y + h, x:x + w])
        # Level 2 (4x): corner in level-0 pixels, size in level pixels.
        np.testing.assert_array_equal(s.read_region(400, 200, 120, 90, level=2), levels[2][50:140, 100:220])
        np.testing.assert_array_equal(s.read_level(1), levels[1])
        # Outside the slide: glass.
        r = s.read_region(-20, 1090, 50, 30)
        assert (r[:10, 20:] == levels[0][1090:, :30]).all() and (r[:, :20] == 255).all() and (r[10:] == 255).all()
        assert [s.best_level(d) for d in (1.0, 3.9, 3.99, 4.0, 64)] == [0, 1, 2, 2, 2]  # within 1% counts as equal
        crops = slide_io.cut_crops_from(s, np.array([100, -10]), np.array([60, 5]), 40, level=1)
        np.testing.assert_array_equal(crops[0], levels[1][30:50, 50:70])
        assert (crops[1][:, :5] == 255).all()


def test_jpeg_tiles_decoded_in_threads_equal_tifffiles_own_reading(tmp_path):
    """JPEG pyramids (what scanners write) through the parallel decoder: the same pixels tifffile itself gives."""
    pytest.importorskip("imagecodecs", reason="JPEG tiles need imagecodecs")
    rgb = synth_he(1200, 1000, seed=2)
    write_pyramid(tmp_path / "jpeg.tif", rgb, factors=(1, 2, 8), tile=128, compression="jpeg")
    with tifffile.TiffFile(tmp_path / "jpeg.tif") as tif:
        # (tifffile lists the 8x level as a series of its own: not a halving of the level before it)
        expected = sorted((lv.asarray() for series in tif.series for lv in series.levels), key=lambda a: -a.size)
    with wsi.open_slide(str(tmp_path / "jpeg.tif")) as s:
        for level in (1, 0, 2):  # a level read after another: decoders must not share the file position
            np.testing.assert_array_equal(s.read_level(level), expected[level])


def test_scale_from_metadata(tmp_path):
    rgb = np.full((300, 400, 3), 200, np.uint8)
    cases = {
        "cm.tif": (dict(resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER"), 0.25, "XResolution"),
        "inch.tif": (dict(resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH"), 0.5, "XResolution"),
        "svs.tif": (dict(description="Aperio Image Library v12.0.15\n46000x32914 [0,100 46000x32814] (256x256) "
                                     "JPEG/RGB Q=70|AppMag = 40|MPP = 0.2527|Filename = x"), 0.2527, "Aperio"),
        "dpi72.tif": (dict(resolution=(72, 72), resolutionunit="INCH"), None, "ignored"),
        "none.tif": ({}, None, "none"),
    }
    for name, (kw, mpp, source) in cases.items():
        tifffile.imwrite(tmp_path / name, rgb, tile=(128, 128), **kw)
    tifffile.imwrite(tmp_path / "ome.ome.tif", rgb, tile=(128, 128), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 460.0, "PhysicalSizeXUnit": "nm"})
    cases["ome.ome.tif"] = ({}, 0.46, "OME")
    for name, (_, mpp, source) in cases.items():
        with wsi.open_slide(str(tmp_path / name)) as s:
            assert (s.mpp is None) if mpp is None else s.mpp == pytest.approx(mpp), name
            assert source in s.mpp_source, (name, s.mpp_source)


def test_pixel_formats_match_the_plain_image_reader(tmp_path):
    """Stripped, RGBA, 16-bit grayscale and planar TIFFs give the pixels and mode slide_io.read_rgb gives."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, (200, 300), dtype=np.uint8)])
    gray16 = rng.integers(0, 65536, (200, 300), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "strips.tif", rgb, rowsperstrip=16, compression="zlib")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, tile=(64, 64), extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "gray16.tif", gray16, tile=(64, 64))
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, 2, 0), planarconfig="separate", photometric="rgb")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    for tif, ref, mode in (("strips.tif", rgb, "RGB"), ("planar.tif", rgb, "RGB"), ("rgba.tif", "rgba.png", "RGBA"),
                           ("gray16.tif", "gray16.png", "I;16")):
        expected = ref if isinstance(ref, np.ndarray) else slide_io.read_rgb(str(tmp_path / ref))[0]
        with wsi.open_slide(str(tmp_path / tif)) as s:
            assert isinstance(s, wsi.TiffSlide) and s.mode == mode, (tif, s.mode)
            np.testing.assert_array_equal(s.read_region(30, 20, 250, 170), expected[20:190, 30:280], err_msg=tif)
    with wsi.open_slide(str(tmp_path / "rgba.png")) as s:  # plain images: PIL, decoded whole
        assert isinstance(s, wsi.ImageSlide) and s.mode == "RGBA"
        np.testing.assert_array_equal(s.read_region(-5, 0, 20, 20)[:, 5:], slide_io.read_rgb(
            str(tmp_path / "rgba.png"))[0][:20, :15])


def test_openslide_backend_reads_the_same_pixels(noise_slide):
    if wsi._openslide() is None:
        pytest.skip("openslide-python / openslide-bin not installed (the optional `openslide` extra)")
    path, levels = noise_slide
    try:
        s = wsi.OpenSlideSlide(path)
    except wsi._Unsupported as e:
        pytest.skip(f"this OpenSlide build does not read tifffile's SubIFD pyramids: {e}")
    with s:
        np.testing.assert_array_equal(s.read_region(250, 240, 300, 40), levels[0][240:280, 250:550])


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(IngestError, match=r"broken\.tif: "):
        wsi.open_slide(str(tmp_path / "broken.tif"))
    with pytest.raises(IngestError, match=r"nothere\.svs: image not found"):
        wsi.open_slide(str(tmp_path / "nothere.svs"))


# ------------------------------------------------------------------------------------------------ predict


def _tissue_with_halo_and_smudge(size: int) -> np.ndarray:
    """Glass with a textured H&E section (from size/8 to size/2 on both axes), a smooth pink tint beside it (as
    beside HER2ST sections) and a blurred grey smudge far from it; both of those are stained enough to pass a
    per-pixel optical-density test."""
    rgb = synth_he(size, size, seed=3, tissue=(size // 8, size // 8, size // 2, size // 2), cast=(0.02, 0.05, 0.02))
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    tint = np.exp(-(((xx - 0.68) / 0.1) ** 2 + ((yy - 0.3) / 0.15) ** 2))
    smudge = np.exp(-((xx - 0.8) ** 2 + (yy - 0.85) ** 2) / 0.04 ** 2)
    od = tint[..., None] * np.array([0.02, 0.35, 0.12], np.float32) + smudge[..., None] * 0.6
    return np.clip(np.rint(rgb.astype(np.float32) * np.exp(-od)), 0, 255).astype(np.uint8)


def _model_100um(path) -> None:
    """The tiny test model, its 16-px tiles made 100 um wide (6.25 um/px)."""
    path.mkdir()
    _model_dir(str(path))
    info = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps(dict(info, microns_per_pixel=6.25)))


def test_predict_grid_on_a_pyramid_keeps_tissue_and_rejects_tint_and_smudge(tmp_path):
    _model_100um(tmp_path / "model")
    rgb = _tissue_with_halo_and_smudge(2048)
    write_pyramid(tmp_path / "slide.tif", rgb, factors=(1, 2, 4, 8), mpp=2.0)
    logs = []
    s = predict.predict_slide(str(tmp_path / "model"), str(tmp_path / "slide.tif"), str(tmp_path / "out"),
                              grid_step_um=100, batch_size=64, log=logs.append)
    assert s["source_microns_per_pixel"] == 2.0 and "XResolution" in s["scale_from"]
    assert s["read_level"] == 1  # 6.25 um/px tiles from the 2x level (4 um/px) of a 2 um/px slide
    assert s["n_positions"] == 40 * 40 and any("ETA" in m for m in logs)
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    x = np.array([float(r["pixel_x"]) for r in rows])
    y = np.array([float(r["pixel_y"]) for r in rows])
    lo, hi = 2048 // 8, 2048 // 2
    inside = (x > lo - 25) & (x < hi + 25) & (y > lo - 25) & (y < hi + 25)
    assert inside.all(), list(zip(x[~inside], y[~inside]))[:5]  # nothing on the tint or the smudge
    assert len(rows) >= ((hi - lo) // 50) ** 2 and s["n_predicted"] == len(rows)
    # The tint and the smudge pass the per-pixel stain test: only the map's texture and size tests reject them.
    for px, py in ((0.68, 0.3), (0.8, 0.85)):
        assert slide_io.tissue_mask(rgb[int(py * 2048), int(px * 2048)])


def test_predict_without_a_usable_level_fails_naming_file_and_fix(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    _model_dir(str(tmp_path / "model"))
    write_pyramid(tmp_path / "flat.tif", synth_he(640, 640), factors=(1,), mpp=0.5)
    monkeypatch.setattr(slide_io, "STREAM_MAX_PIXELS", 100_000)  # stands in for a 50,000-px slide with no pyramid
    with pytest.raises(predict.PredictError, match=r"flat\.tif: no pyramid level small enough.*tiled pyramidal TIFF"):
        predict.predict_slide(str(tmp_path / "model"), str(tmp_path / "flat.tif"), str(tmp_path / "out"),
                              grid_step_um=16, log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["flat.tif", "model"]  # no output, no temporary directory
    # prepare likewise, and leaves no store behind.
    (tmp_path / "imgs").mkdir()
    os.replace(tmp_path / "flat.tif", tmp_path / "imgs" / "flat.tif")
    with pytest.raises(IngestError, match=r"flat\.tif: no pyramid level small enough for the report thumbnail"):
        build.prepare(build.PrepareOptions(format="images", input=str(tmp_path / "imgs"),
                                           output=str(tmp_path / "store"), source_mpp=0.5))
    assert sorted(os.listdir(tmp_path)) == ["imgs", "model"]


def test_predict_spots_outside_the_slide_fail_naming_the_files(tmp_path):
    (tmp_path / "model").mkdir()
    _model_dir(str(tmp_path / "model"))
    write_pyramid(tmp_path / "slide.tif", synth_he(512, 512), factors=(1, 4), mpp=1.0)
    with open(tmp_path / "spots.csv", "w") as f:
        f.write("spot_id,pixel_x,pixel_y\na,100,100\nb,2000,100\n")
    with pytest.raises(predict.PredictError, match=r"spots\.csv: 1 spot\(s\) centred outside the 512x512 slide "
                                                   r".*slide\.tif.*'b'.*level-0"):
        predict.predict_slide(str(tmp_path / "model"), str(tmp_path / "slide.tif"), str(tmp_path / "out"),
                              spots_csv=str(tmp_path / "spots.csv"), log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["model", "slide.tif", "spots.csv"]


# ------------------------------------------------------------------------------------------------ prepare


def _stnet_with_tiffs(root: str) -> None:
    """The STNet fixture with every JPEG replaced by a tiled pyramidal TIFF of its decoded pixels."""
    with open(os.path.join(root, "metadata.csv")) as f:
        meta = f.read()
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".jpg"):
                rgb, _ = slide_io.read_rgb(os.path.join(dirpath, name))
                write_pyramid(os.path.join(dirpath, name[:-4] + ".tif"), rgb, factors=(1, 4), tile=128)
                os.remove(os.path.join(dirpath, name))
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write(meta.replace(".jpg", ".tif"))


def test_prepare_on_tiled_tiffs_equals_prepare_on_the_same_pixels(tmp_path):
    write_stnet(str(tmp_path / "jpg"))
    write_stnet(str(tmp_path / "tif"))
    _stnet_with_tiffs(str(tmp_path / "tif"))
    stores = {}
    for kind in ("jpg", "tif"):
        build.prepare(build.PrepareOptions(format="stnet", input=str(tmp_path / kind),
                                           output=str(tmp_path / f"s_{kind}"), min_umi=FIXTURE_MIN_UMI))
        stores[kind] = open_store(tmp_path / f"s_{kind}")
    a, b = stores["jpg"], stores["tif"]
    assert a.n_spots == b.n_spots > 0
    np.testing.assert_array_equal(a.tiles[:], b.tiles[:])
    np.testing.assert_array_equal(a.expression[:], b.expression[:])
    assert os.path.exists(tmp_path / "s_tif" / "report" / "thumbnails")


def test_prepare_spot_outside_a_tiff_slide_names_the_slide(tmp_path):
    root = str(tmp_path / "rel")
    write_stnet(root)
    _stnet_with_tiffs(root)
    path = os.path.join(root, "BC2", "spots_BC2_D1.csv.gz")
    lines = gzip.open(path).read().decode().splitlines()
    k, _, y = lines[-1].split(",")
    lines[-1] = f"{k},5000.0,{y}"
    write_gz(path, "\n".join(lines) + "\n")
    with pytest.raises(IngestError, match=r"HE_BC2_D1\.tif: spot .* outside the 900x900 image"):
        build.prepare(build.PrepareOptions(format="stnet", input=root, output=str(tmp_path / "store"),
                                           min_umi=FIXTURE_MIN_UMI))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("store")]


@pytest.mark.shared_data
def test_her2st_grid_tissue_map_rejects_the_tint_and_the_smudge(shared_data):
    """HER2ST C3: the pink tint right of the section and the grey smudge at ~(2150, 5650) px are not tissue."""
    image = os.path.join(shared_data, "her2st", "data", "ST-imgs", "C", "C3", "5714_HE_BT_D1.jpg")
    if not os.path.isfile(image):
        pytest.skip(f"HER2ST C3 image not found at {image}")
    with wsi.open_slide(image) as slide:
        sample = slide_io.sample_slide_pixels(slide)
        from histospace_jax.ingest import colour

        pct = colour.channel_percentiles(sample, 99.0)
        small, scale = slide_io.overview(slide, 8.0 / 0.687)
    tissue = slide_io.tissue_map(small, pct, scale[0] * 0.687, min_component_um2=100.0 ** 2)

    def covered(x, y, r=150):  # fraction of tissue in a (2r)-px box around a level-0 point
        return slide_io.box_coverage(tissue, np.array([x - r]), np.array([y - r]), 2 * r, scale)[0]

    assert covered(4000, 3500) > 0.9  # the section
    assert covered(2150, 5650) == 0.0  # the smudge
    assert covered(7000, 4800) == 0.0 and covered(6300, 5600) == 0.0  # the pink tint beside the section
    assert 0.1 < tissue.mean() < 0.25
