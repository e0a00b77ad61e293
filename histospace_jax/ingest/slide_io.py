"""Reading slide images and cutting tiles from them.

Slides are decoded once into an RGB uint8 array (one whole slide in memory at a time). RGBA images are
composited over white (transparent = glass), grayscale and palette images are expanded to RGB, 16-bit images are
scaled to 8 bit; anything PIL cannot decode raises an `IngestError` naming the file.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
from PIL import Image

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
