"""Reading slide images, cutting tiles from them, and finding their tissue.

Plain images are decoded whole by `read_rgb`: RGBA images are composited over white (transparent = glass),
grayscale and palette images are expanded to RGB, 16-bit images are scaled to 8 bit; anything PIL cannot decode
raises an `IngestError` naming the file. Whole-slide images are opened with `wsi.open_slide` and read region by
region: the functions taking a `slide` here (crops in batches, a pixel sample, an overview from a low level, the
tissue map of a slide) keep memory bounded by a batch or by a low level, never by the slide.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from histospace_jax.ingest import colour
from histospace_jax.ingest.common import IngestError

# Whole-slide H&E images are legitimately far larger than PIL's decompression-bomb guard (~89 MP); HER2ST slides
# are ~92 MP. Raise the guard rather than disable it, so a truly absurd file still fails loudly.
Image.MAX_IMAGE_PIXELS = 2_000_000_000

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
# A pixel counts as tissue when its optical density summed over R, G, B (natural log, glass = 0) exceeds this, on
# colour-cast-corrected pixels: glass, including the tinted halo of HER2ST slides, stays below ~0.18, while pale
# stroma and the membranes of adipose tissue lie above. Near-black pixels (pen, scanner borders) are not tissue.
TISSUE_MIN_OD_SUM = 0.2
TISSUE_MIN_MAX_CHANNEL = 30
_OD_TABLE = (-np.log((np.arange(256) + 1.0) / 256.0)).astype(np.float32)

# Slide tissue maps are computed at about this many micrometres per pixel (finer for small tiles, so that a tile
# spans >= MASK_PX_PER_TILE map pixels): fine enough to see the texture of tissue, coarse enough to be cheap.
MASK_UM_PER_PX = 8.0
MASK_PX_PER_TILE = 4
# Stained glass is smooth and tissue is not: the tinted halo beside HER2ST sections and out-of-focus smudges have a
# local grey-level standard deviation of ~1 (3x3 pixels at ~8 um/px, 0-255 scale; 99th percentile of glass ~2.5)
# and tissue, adipose membranes included, tens. A map pixel is tissue when stained (tissue_mask) and textured.
MASK_MIN_TEXTURE = 4.0
# Connected tissue smaller than this fraction of the largest piece of tissue, or than one tile, is debris (dust,
# pen dots, the textured rim of a smudge); HER2ST: specks of <= 75 map pixels against a section of ~100,000.
MASK_MIN_COMPONENT_OF_LARGEST = 0.005
# Reading a whole level for an overview: at most this many pixels at once; larger levels (slides without a
# pyramid) are streamed in bands up to STREAM_MAX_PIXELS; past that the slide needs a pyramid.
OVERVIEW_READ_MAX_PIXELS = 64_000_000
STREAM_MAX_PIXELS = 1_200_000_000
BAND_PIXELS = 16_000_000  # pixels per band of a streamed level
CROP_BATCH_BYTES = 64 << 20  # crops cut from a slide at once
PROGRESS_EVERY_S = 10.0
PYRAMID_FIX = ("write it as a tiled pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid "
               "--compression=jpeg --tile-width=512 --tile-height=512`, or `bfconvert -pyramid-resolutions 6 "
               "-pyramid-scale 2 -tilex 512 -tiley 512 IN OUT.ome.tif`)")


def file_sha256(path: str) -> str:
    """Content hash of an image file; a later step compares stores by these to detect shared slides."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_rgb(path: str) -> tuple[np.ndarray, str]:
    """Decodes an image file to RGB uint8 [H, W, 3]; returns (array, original PIL mode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode = im.mode
                im.load()
                if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
                    alpha = rgba[..., 3:4] / 255.0
                    # Transparent areas are "no tissue": composite over white, the colour of glass.
                    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
                    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode
                if mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float64)
                    top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
                    gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
                    return np.repeat(gray[..., None], 3, axis=2), mode
                if mode != "RGB":
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except FileNotFoundError as e:
        raise IngestError(f"{path}: image not found; check the path in the release layout or --image.") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise IngestError(
            f"{path}: unreadable image ({type(e).__name__}: {e}); the file is truncated or not an image. "
            "Download or re-export it (TIFF/PNG/JPEG), or leave that section out with --sections."
        ) from e
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise IngestError(f"{path}: decoded to shape {arr.shape}, not an RGB image; re-export it as RGB.")
    return np.ascontiguousarray(arr), mode


def is_grayscale_mode(mode: str) -> bool:
    return mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F")


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels in colour-cast-corrected RGB [..., 3] (uint8 or float in [0, 255])."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        od_sum = _OD_TABLE[rgb].sum(axis=-1)
    else:
        od_sum = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).sum(axis=-1)
    return (od_sum > TISSUE_MIN_OD_SUM) & (rgb.max(axis=-1) > TISSUE_MIN_MAX_CHANNEL)


def tissue_fraction(tiles: np.ndarray) -> np.ndarray:
    """Fraction of tissue pixels per tile, tiles uint8 [n, T, T, 3] -> float [n]."""
    if len(tiles) == 0:
        return np.zeros(0)
    return tissue_mask(tiles).reshape(len(tiles), -1).mean(axis=1)


def sample_pixels(rgb: np.ndarray, max_pixels: int = 400_000) -> np.ndarray:
    """A regular-stride subsample of a slide's pixels [n, 3]: deterministic and cheap on 100 MP slides."""
    h, w = rgb.shape[:2]
    stride = max(1, int(np.ceil(np.sqrt(h * w / max_pixels))))
    return rgb[::stride, ::stride].reshape(-1, 3)


def crop_boxes(centre_x: np.ndarray, centre_y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of `size` x `size` boxes centred on the given (fractional) pixel coordinates."""
    x0 = np.floor(np.asarray(centre_x, float) - size / 2.0 + 0.5).astype(np.int64)
    y0 = np.floor(np.asarray(centre_y, float) - size / 2.0 + 0.5).astype(np.int64)
    return x0, y0


def first_outside(x: np.ndarray, y: np.ndarray, width: int, height: int) -> tuple[int | None, int]:
    """(index of the first centre outside a width x height image, or None; how many are outside)."""
    outside = ~((x >= 0) & (x < width) & (y >= 0) & (y < height))
    return (int(np.argmax(outside)) if outside.any() else None), int(outside.sum())


def box_inside(x0: np.ndarray, y0: np.ndarray, size: int, width: int, height: int) -> np.ndarray:
    return (x0 >= 0) & (y0 >= 0) & (x0 + size <= width) & (y0 + size <= height)


def cut_crops(rgb: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: int, fill: int = 255) -> np.ndarray:
    """Crops [n, size, size, 3]; parts outside the image are filled with `fill` (white = glass)."""
    h, w = rgb.shape[:2]
    out = np.full((len(x0), size, size, 3), fill, dtype=np.uint8)
    for i, (x, y) in enumerate(zip(x0.tolist(), y0.tolist())):
        xa, ya = max(x, 0), max(y, 0)
        xb, yb = min(x + size, w), min(y + size, h)
        if xb > xa and yb > ya:
            out[i, ya - y:yb - y, xa - x:xb - x] = rgb[ya:yb, xa:xb]
    return out


def resize_tiles(crops: np.ndarray, size: int) -> np.ndarray:
    """Resamples square crops to `size` px. Area averaging (PIL BOX) when shrinking avoids aliasing; bicubic
    when enlarging."""
    if crops.shape[1] == size:
        return crops
    method = Image.Resampling.BOX if crops.shape[1] > size else Image.Resampling.BICUBIC
    out = np.empty((len(crops), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(crops):
        out[i] = np.asarray(Image.fromarray(c).resize((size, size), method))
    return out


def source_tile_size(tile_size: int, target_mpp: float, source_mpp: float) -> int:
    """Side, in source pixels, of the region that becomes one `tile_size` tile at `target_mpp`."""
    return max(1, int(round(tile_size * target_mpp / source_mpp)))


# ------------------------------------------------------------------------------------------------ slides


def level_box(size: int, downsample: float) -> int:
    """Side, in pixels of a level with this downsample, of a `size`-pixel level-0 box."""
    return max(1, int(round(size / downsample)))


def cut_crops_from(slide, x0: np.ndarray, y0: np.ndarray, size: int, level: int = 0) -> np.ndarray:
    """Crops [n, s, s, 3] of `size`-pixel level-0 boxes (top-left corners in level-0 pixels), read from `level`
    (s = size / its downsample); parts outside the slide are white."""
    s = level_box(size, slide.levels[level][2])
    out = np.empty((len(x0), s, s, 3), np.uint8)
    lw, lh, _ = slide.levels[level]
    sx, sy = slide.width / lw, slide.height / lh
    lx = np.floor(np.asarray(x0, float) / sx + 0.5).astype(np.int64)
    ly = np.floor(np.asarray(y0, float) / sy + 0.5).astype(np.int64)
    if hasattr(slide, "prefetch"):  # decode the batch's tiles together, in parallel
        slide.prefetch(level, [(x, y, s, s) for x, y in zip(lx.tolist(), ly.tolist())])
    for i, (x, y) in enumerate(zip(lx.tolist(), ly.tolist())):
        out[i] = slide.read_level_region(level, x, y, s, s)
    return out


def crop_batch_size(side: int) -> int:
    return max(1, min(1024, CROP_BATCH_BYTES // (side * side * 3)))


def cut_tiles(slide, x0: np.ndarray, y0: np.ndarray, size: int, tile_size: int, *, level: int = 0,
              prepare: Callable[[np.ndarray], np.ndarray], tissue: Callable[[np.ndarray], np.ndarray],
              report: Callable[[str], None] | None = None, name: str = "tiles") -> tuple[np.ndarray, np.ndarray]:
    """(tiles [n, tile_size, tile_size, 3], tissue fraction [n]) of `size`-pixel level-0 boxes: crops read from
    `level` in batches, `tissue(crops)` judged on the crops, `prepare(crops)` resized to tile_size. Memory holds
    one batch of crops besides the tiles. Long jobs send a progress line with rate and ETA to `report`."""
    n = len(x0)
    tiles = np.empty((n, tile_size, tile_size, 3), np.uint8)
    fraction = np.zeros(n)
    batch = crop_batch_size(level_box(size, slide.levels[level][2]))
    progress = _Progress(name, n, report)
    for a in range(0, n, batch):
        crops = cut_crops_from(slide, x0[a:a + batch], y0[a:a + batch], size, level)
        fraction[a:a + batch] = tissue(crops)
        tiles[a:a + batch] = resize_tiles(prepare(crops), tile_size)
        progress.update(min(n, a + batch))
    return tiles, fraction


class _Progress:
    """A progress line (done/total, rate, ETA) at most every PROGRESS_EVERY_S, for jobs that last that long."""

    def __init__(self, name: str, total: int, report: Callable[[str], None] | None):
        self.name, self.total, self.report = name, total, report
        self.t0 = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if self.report is None or now - self.last < PROGRESS_EVERY_S or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = int((self.total - done) / max(rate, 1e-9))
        self.report(f"[{self.name}] {done}/{self.total} tiles {rate:.1f} tiles/s ETA {eta // 60}m{eta % 60:02d}s")


def _level_for_overview(slide, downsample: float, purpose: str) -> int:
    level = slide.best_level(downsample)
    lw, lh, _ = slide.levels[level]
    if getattr(slide, "in_memory", False) or lw * lh <= STREAM_MAX_PIXELS:
        return level
    sizes = ", ".join(f"{w}x{h}" for w, h, _ in slide.levels)
    raise IngestError(
        f"{slide.path}: no pyramid level small enough for the {purpose} (levels: {sizes}; the best match, "
        f"{lw}x{lh}, would have to be decoded whole). The slide needs a low-resolution level of at most "
        f"{STREAM_MAX_PIXELS // 1_000_000} megapixels, downsampled about {downsample:.0f}x: {PYRAMID_FIX}."
    )


def _level_bands(slide, level: int, band_rows: int):
    """(y, rows [h, w, 3]) of a whole level, `band_rows` at a time (a multiple of the caller's stride)."""
    lw, lh, _ = slide.levels[level]
    if getattr(slide, "in_memory", False) or lw * lh <= OVERVIEW_READ_MAX_PIXELS:
        yield 0, slide.read_level(level)
        return
    for y in range(0, lh, band_rows):
        yield y, slide.read_level_region(level, 0, y, lw, min(band_rows, lh - y))


def overview(slide, downsample: float, purpose: str = "overview") -> tuple[np.ndarray, tuple[float, float]]:
    """The slide shrunk at least `downsample` times (area averaging) from its best pyramid level, and the
    actual (x, y) downsample of the result. Memory: the result plus one band of the level read."""
    level = _level_for_overview(slide, downsample, purpose)
    lw, lh, d = slide.levels[level]
    factor = max(1, math.ceil(downsample / d - 1e-6))
    band = max(factor, (BAND_PIXELS // max(lw, 1)) // factor * factor)
    parts = []
    for _, rows in _level_bands(slide, level, band):
        im = Image.fromarray(np.ascontiguousarray(rows))
        parts.append(np.asarray(im.reduce(factor)) if factor > 1 else np.asarray(im))
    small = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return small, (slide.width / small.shape[1], slide.height / small.shape[0])


def sample_slide_pixels(slide, max_pixels: int = 400_000) -> np.ndarray:
    """A regular-stride sample of a slide's pixels [n, 3] for fitting colour and stain normalisation: from level 0
    when it is small or decoded already (then exactly `sample_pixels` of the whole image), else from the finest
    level of at most OVERVIEW_READ_MAX_PIXELS pixels."""
    level = 0
    if not getattr(slide, "in_memory", False):
        small = [i for i, (w, h, _) in enumerate(slide.levels) if w * h <= OVERVIEW_READ_MAX_PIXELS]
        level = small[0] if small else _level_for_overview(slide, 1.0, "colour and stain fit")
    lw, lh, _ = slide.levels[level]
    stride = max(1, int(np.ceil(np.sqrt(lh * lw / max_pixels))))
    band = max(stride, (BAND_PIXELS // max(lw, 1)) // stride * stride)
    return np.concatenate([rows[::stride, ::stride].reshape(-1, 3)
                           for _, rows in _level_bands(slide, level, band)], axis=0)


def tissue_map(rgb: np.ndarray, percentiles: np.ndarray, um_per_px: float, min_component_um2: float) -> np.ndarray:
    """Boolean tissue map of a slide overview (uint8 RGB at `um_per_px`): stained (tissue_mask, after removing
    the colour cast with `percentiles`) and textured pixels, small gaps closed, connected pieces smaller than
    `min_component_um2` or MASK_MIN_COMPONENT_OF_LARGEST of the largest piece removed."""
    corrected = np.clip(np.rint(colour.remove_colour_cast(rgb, percentiles)), 0, 255).astype(np.uint8)
    grey = corrected.astype(np.float32).mean(axis=2)
    mean = ndimage.uniform_filter(grey, 3, mode="nearest")
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(grey * grey, 3, mode="nearest") - mean * mean, 0.0))
    mask = tissue_mask(corrected) & (spread > MASK_MIN_TEXTURE)
    # Closing joins the textured pixels of one tissue across nuclei-free gaps; padding keeps the border open.
    mask = ndimage.binary_closing(np.pad(mask, 2), np.ones((3, 3), bool), iterations=2)[2:-2, 2:-2]
    labels, n = ndimage.label(mask, np.ones((3, 3), bool))
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel())[1:]
    floor = max(min_component_um2 / um_per_px ** 2, MASK_MIN_COMPONENT_OF_LARGEST * areas.max())
    keep = np.concatenate([[False], areas >= floor])
    return keep[labels]


def box_coverage(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: float,
                 scale: tuple[float, float]) -> np.ndarray:
    """Fraction of each `size`-pixel level-0 box (top-left corners x0, y0) covered by `mask`, a map of the slide
    shrunk `scale` = (x, y) times. Map pixels count by their centres."""
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    # Map pixel j covers level-0 x in [j * sx, (j + 1) * sx): its centre lies in [x0, x0 + size) when j is in
    # [ceil(x0 / sx - 0.5), ceil((x0 + size) / sx - 0.5)).
    xa = np.clip(np.ceil(np.asarray(x0, float) / scale[0] - 0.5), 0, w).astype(np.int64)
    xb = np.clip(np.ceil((np.asarray(x0, float) + size) / scale[0] - 0.5), 0, w).astype(np.int64)
    ya = np.clip(np.ceil(np.asarray(y0, float) / scale[1] - 0.5), 0, h).astype(np.int64)
    yb = np.clip(np.ceil((np.asarray(y0, float) + size) / scale[1] - 0.5), 0, h).astype(np.int64)
    inside = table[yb, xb] - table[ya, xb] - table[yb, xa] + table[ya, xa]
    # Divided by the box's whole area: its parts outside the slide are glass.
    return np.minimum(inside / max(size / scale[0] * size / scale[1], 1.0), 1.0)
