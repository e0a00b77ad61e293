"""Whole-slide images read region by region: a read decodes only the tiles (or strips) it overlaps.

    with open_slide("slide.svs") as slide:
        slide.width, slide.height, slide.mpp, slide.levels   # levels: [(width, height, downsample), ...]
        slide.read_region(x0, y0, w, h, level=2)             # x0, y0 in level-0 pixels; w, h in level pixels
        slide.read_level(slide.best_level(32.0))              # a whole low level (overviews, tissue masks)

Backends, chosen by the file's content rather than its name:
* tifffile: TIFF, BigTIFF, OME-TIFF, SVS, NDPI and other TIFF-based slides. Pyramid levels come from tifffile's
  series (SubIFDs, reduced pages, OME and SVS levels). Tiles or strips are read and decoded on demand and kept in
  a small cache, so the neighbouring crops of a batch do not decode the same tile again. JPEG / JPEG 2000 tiles
  need the `imagecodecs` package; zlib, LZMA and uncompressed tiles do not.
* OpenSlide (the optional extra `openslide`: openslide-python and openslide-bin): slide formats tifffile cannot
  read (MIRAX, Hamamatsu VMS, Ventana BIF, ...), and TIFFs whose compression tifffile cannot decode here.
* PIL: JPEG, PNG and other plain images, decoded whole on first use by `slide_io.read_rgb` (they are small).

Pixels come out as RGB uint8, converted the way `slide_io.read_rgb` converts plain images: transparency over white,
grayscale and palette expanded, 16-bit scaled to 8. Parts of a region outside the slide, and tiles missing from the
file, are 255 (glass). `mpp` is the slide's microns per pixel from its own metadata (OME PhysicalSizeX, the Aperio
description's `MPP =`, TIFF X/YResolution in centimetres or inches, OpenSlide's mpp-x), or None; `mpp_source` says
which. Values outside a plausible microscope range (e.g. the 72 dpi most image writers put in by default) are
ignored, and `mpp_source` says so.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ElementTree

import numpy as np
from PIL import Image

from histospace_jax.ingest import slide_io
from histospace_jax.ingest.common import IngestError

# Microscope scans run from ~0.1 um/px (80x) to a few um/px (low-power overviews); flatbed scans of slides reach
# ~10. Image writers' default densities (72-300 dpi = 85-350 um/px) are not a measurement: ignored.
PLAUSIBLE_MPP = (0.05, 20.0)
# Decoded segments kept per open slide. A batch of crops touches a band of tiles; 256 MB holds a band of 512-px
# tiles across a 100,000-px-wide slide, so a row-major pass decodes each tile about once.
SEGMENT_CACHE_BYTES = 256 << 20
DECODE_THREADS = min(8, os.cpu_count() or 1)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_UNITS_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_FIX_UNREADABLE = ("download or re-export it (pyramidal tiled TIFF, OME-TIFF, SVS, PNG or JPEG), or leave it out "
                   "(--sections, or --skip_unreadable for image folders)")


def open_slide(path: str) -> "Slide":
    """Opens a slide for region reads; raises IngestError naming the file and the fix when it cannot."""
    if not os.path.isfile(path):
        raise IngestError(f"{path}: image not found; check the path in the release layout or --image.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic in TIFF_MAGIC:
        try:
            return TiffSlide(path)
        except _Unsupported as e:
            reason = str(e)
        if _openslide() is not None:
            try:
                return OpenSlideSlide(path)
            except _Unsupported as e:
                reason += f"; OpenSlide: {e}"
        try:
            slide = ImageSlide(path)
            if slide.width * slide.height <= slide_io.STREAM_MAX_PIXELS:  # PIL decodes whole: small ones only
                return slide
        except IngestError:
            pass
        raise IngestError(f"{path}: cannot read this TIFF ({reason}). Install the decoders (pip install imagecodecs; "
                          f"for other slide formats the `openslide` extra), or {_FIX_UNREADABLE}.")
    try:
        return ImageSlide(path)
    except IngestError as e:
        if _openslide() is None:
            raise IngestError(f"{e} If it is a whole-slide format (MIRAX, VMS, BIF, ...), install the `openslide` "
                              "extra (pip install openslide-python openslide-bin).") from e
        try:
            return OpenSlideSlide(path)
        except _Unsupported:
            raise e from None


class _Unsupported(Exception):
    """This backend cannot read the file; open_slide tries the next one."""


class Slide:
    """A slide opened for region reads. Subclasses implement `read` (level coordinates, inside the level)."""

    path: str
    width: int
    height: int
    mpp: float | None
    mpp_source: str
    mode: str  # PIL-style mode of the stored pixels ("RGB", "RGBA", "L", "I;16", ...)
    levels: list[tuple[int, int, float]]  # (width, height, downsample from level 0), finest first
    in_memory: bool = False  # the whole level 0 is decoded already: reading all of it costs nothing

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3] of the given level, in that level's pixels; the box lies inside the level."""
        raise NotImplementedError

    def read_region(self, x0: int, y0: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 [h, w, 3]: (x0, y0) is the top-left corner in level-0 pixels, w and h are pixels of `level`.
        Parts outside the slide are 255 (glass)."""
        lw, lh, _ = self.levels[level]
        sx, sy = self.width / lw, self.height / lh
        return self.read_level_region(level, int(math.floor(x0 / sx + 0.5)), int(math.floor(y0 / sy + 0.5)), w, h)

    def read_level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """As read_region, with (x, y) in the level's own pixels."""
        lw, lh, _ = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if xb > xa and yb > ya:
            out[ya - y:yb - y, xa - x:xb - x] = self.read(level, xa, ya, xb - xa, yb - ya)
        return out

    def read_level(self, level: int) -> np.ndarray:
        """The whole level as RGB uint8; meant for low levels (overviews, masks)."""
        lw, lh, _ = self.levels[level]
        return self.read(level, 0, 0, lw, lh)

    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample not above `downsample` (level 0 when every level is coarser).
        Levels within 1% of the request count as matching it: pyramids round odd sizes."""
        best = 0
        for i, (_, _, d) in enumerate(self.levels):
            if d <= downsample * 1.01 and d > self.levels[best][2]:
                best = i
        return best

    def close(self) -> None:
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {self.width}x{self.height}, mpp={self.mpp}, "
                f"{len(self.levels)} level(s))")


def _plausible_mpp(mpp: float | None, source: str) -> tuple[float | None, str]:
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return None, "none in the file's metadata"
    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None, f"ignored {source} = {mpp:.4g} um/px (outside {PLAUSIBLE_MPP} um/px: not a microscope scale)"
    return float(mpp), source


# --------------------------------------------------------------------------------------------------- tifffile


class TiffSlide(Slide):
    """TIFF-based slides through tifffile, decoding only the segments (tiles or strips) a read overlaps."""

    def __init__(self, path: str):
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as e:  # tifffile raises many types on damaged files
            raise _Unsupported(f"tifffile: {type(e).__name__}: {e}") from e
        try:
            self._pages = self._level_pages()
            # Everything tifffile would read lazily from the file, read now: decoding threads share the handle
            # (building a page's decoder reads its first segment, to tell JFIF from plain JPEG).
            self._segment_index = [(np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64),
                                    page.jpegtables, getattr(key, "jpegheader", None), key.decode)
                                   for page, key in self._pages]
            key = self._pages[0][1]
            self.width, self.height = int(key.imagewidth), int(key.imagelength)
            self.levels = [(int(k.imagewidth), int(k.imagelength), self.width / int(k.imagewidth))
                           for _, k in self._pages]
            self.mode, self._convert = _pixel_format(key)
            self.mpp, self.mpp_source = self._metadata_mpp()
            self._cache: collections.OrderedDict = collections.OrderedDict()
            self._cache_bytes = 0
            self._lock, self._file_lock = threading.Lock(), threading.Lock()
            self._pool = None
            self.read(len(self.levels) - 1, 0, 0, 1, 1)  # a decodable file, or the next backend now
        except _Unsupported:
            self._tif.close()
            raise
        except Exception as e:  # IngestError from the probe read, or tifffile refusing the page's layout
            self._tif.close()
            raise _Unsupported(str(e) if isinstance(e, IngestError) else f"tifffile: {type(e).__name__}: {e}") from e

    def _level_pages(self):
        """[(page, keyframe)] per level, finest first: the largest single-plane image of the file and every smaller
        image of the same aspect ratio (tifffile may list reduced pages as levels of its series or as series of
        their own); label and macro photographs of other shapes are left out."""
        images = []
        for series in self._tif.series:
            for lvl in series.levels:
                if lvl.keyframe is not None and len(lvl.pages) == 1:  # several planes: channels, z, time
                    images.append((lvl.pages[0], lvl.keyframe))
        if not images:
            raise _Unsupported("no single-plane image (a multi-channel or z-stack file)")

        def size(image):
            return int(image[1].imagewidth), int(image[1].imagelength)

        w0, h0 = max((size(im) for im in images), key=lambda wh: wh[0] * wh[1])
        levels, widths = [], set()
        for image in sorted(images, key=lambda im: -size(im)[0] * size(im)[1]):
            w, h = size(image)
            # Same aspect ratio, allowing the rounding of odd sizes at each halving.
            if w not in widths and abs(w / w0 - h / h0) <= 2.0 / min(w, h) + 0.01:
                levels.append(image)
                widths.add(w)
        return levels

    def _metadata_mpp(self) -> tuple[float | None, str]:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            mpp = _ome_mpp(tif.ome_metadata)
            if mpp is not None:
                return _plausible_mpp(mpp, "OME-XML PhysicalSizeX")
        description = str(self._pages[0][1].description or "")
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
        if match:
            return _plausible_mpp(float(match.group(1)), "Aperio ImageDescription MPP")
        key = self._pages[0][1]
        res, unit = key.tags.get(282), key.tags.get(296)  # XResolution, ResolutionUnit
        if res is not None and unit is not None and int(unit.value) in (2, 3):
            num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
            if num and den:
                per_um = (num / den) / (25400.0 if int(unit.value) == 2 else 10000.0)
                return _plausible_mpp(1.0 / per_um, f"TIFF XResolution ({'inch' if int(unit.value) == 2 else 'cm'})")
        return None, "none in the file's metadata"

    # Segments: tiles (tiled pages) or strips (others), numbered as in the page's offsets, plane by plane.

    def _segment_grid(self, key):
        if key.is_tiled:
            return int(key.tilewidth), int(key.tilelength)
        return int(key.imagewidth), int(key.rowsperstrip or key.imagelength)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        _, key = self._pages[level]
        sw, sh = self._segment_grid(key)
        across = -(-int(key.imagewidth) // sw)
        rows, cols = range(y // sh, (y + h - 1) // sh + 1), range(x // sw, (x + w - 1) // sw + 1)
        wanted = [r * across + c for r in rows for c in cols]
        segments = self._segments(level, wanted)
        out = np.empty((h, w, 3), np.uint8)
        for r in rows:
            for c in cols:
                seg = segments[r * across + c]
                ya, yb = max(y, r * sh), min(y + h, (r + 1) * sh)
                xa, xb = max(x, c * sw), min(x + w, (c + 1) * sw)
                if seg is None:  # a tile the writer left out: nothing was scanned there
                    out[ya - y:yb - y, xa - x:xb - x] = 255
                else:
                    out[ya - y:yb - y, xa - x:xb - x] = seg[ya - r * sh:yb - r * sh, xa - c * sw:xb - c * sw]
        return out

    def prefetch(self, level: int, boxes) -> None:
        """Decodes, in parallel, the segments that reads of these (x, y, w, h) level boxes will need."""
        _, key = self._pages[level]
        sw, sh = self._segment_grid(key)
        across = -(-int(key.imagewidth) // sw)
        lw, lh, _ = self.levels[level]
        wanted = set()
        for x, y, w, h in boxes:
            xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
            if xb > xa and yb > ya:
                wanted.update(r * across + c for r in range(ya // sh, (yb - 1) // sh + 1)
                              for c in range(xa // sw, (xb - 1) // sw + 1))
        self._segments(level, sorted(wanted))

    def _segments(self, level: int, indices: list[int]) -> dict:
        """Decoded RGB uint8 segments by index (None for segments missing from the file), through the cache."""
        found, missing = {}, []
        with self._lock:
            for i in indices:
                if (level, i) in self._cache:
                    self._cache.move_to_end((level, i))
                    found[i] = self._cache[(level, i)]
                else:
                    missing.append(i)
        if missing:
            if len(missing) > 1 and DECODE_THREADS > 1:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS)
                decoded = list(self._pool.map(lambda i: self._decode(level, i), missing))
            else:
                decoded = [self._decode(level, i) for i in missing]
            with self._lock:
                for i, seg in zip(missing, decoded):
                    found[i] = seg
                    self._cache[(level, i)] = seg
                    self._cache_bytes += 0 if seg is None else seg.nbytes
                while self._cache_bytes > SEGMENT_CACHE_BYTES and len(self._cache) > len(indices):
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= 0 if old is None else old.nbytes
        return found

    def _decode(self, level: int, index: int) -> np.ndarray | None:
        _, key = self._pages[level]
        offsets, counts, jpegtables, jpegheader, decode = self._segment_index[level]
        planes = int(key.samplesperpixel) if key.planarconfig == 2 else 1
        per_plane = len(offsets) // planes
        parts = []
        for p in range(planes):
            k = p * per_plane + index
            offset, count = int(offsets[k]), int(counts[k])
            if count == 0:
                return None
            fh = self._tif.filehandle
            with self._file_lock:  # tifffile's own file lock is a no-op unless it runs threads itself
                fh.seek(offset)
                data = fh.read(count)
            try:
                arr, _, shape = decode(data, k, jpegtables=jpegtables, jpegheader=jpegheader, _fullsize=key.is_tiled)
            except Exception as e:  # codec errors come in many types; at opening, TiffSlide passes on the file
                raise IngestError(f"{self.path}: {'tile' if key.is_tiled else 'strip'} {index} of level {level} "
                                  f"cannot be decoded ({type(e).__name__}: {e}); the file is damaged or uses a "
                                  f"compression this installation cannot decode (pip install imagecodecs); "
                                  f"{_FIX_UNREADABLE}.") from e
            parts.append(np.asarray(arr).reshape(shape[1], shape[2], -1))
        return self._convert(parts[0] if planes == 1 else np.concatenate(parts, axis=2))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._cache.clear()
        self._tif.close()


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            size = element.get("PhysicalSizeX")
            if size is None:
                return None
            unit = element.get("PhysicalSizeXUnit", "µm")
            return float(size) * _UNITS_TO_UM.get(unit, float("nan"))
    return None


def _pixel_format(key):
    """(PIL-style mode, converter of a decoded segment [h, w, samples] to RGB uint8) for a TIFF page."""
    photometric = int(key.photometric)
    samples = int(key.samplesperpixel)
    dtype = np.dtype(key.dtype) if key.dtype is not None else None
    if dtype is None:
        raise _Unsupported(f"sample format not supported ({key.bitspersample}-bit)")
    extrasamples = tuple(int(v) for v in np.atleast_1d(key.extrasamples)) if key.extrasamples else ()
    has_alpha = bool(extrasamples) and extrasamples[0] in (1, 2)
    if photometric == 3:  # palette
        colormap = np.asarray(key.colormap)
        table = (colormap >> 8 if colormap.max() > 255 else colormap).astype(np.uint8).T  # [entries, 3]
        return "P", lambda a: table[a[..., 0]]
    if photometric in (0, 1):  # grayscale (0: white is zero)
        invert = photometric == 0
        if dtype == np.bool_ or int(key.bitspersample) == 1:
            mode = "1"
        elif dtype == np.uint8:
            mode = "LA" if samples >= 2 and has_alpha else "L"
        elif dtype == np.uint16:
            mode = "I;16"
        elif dtype.kind == "f":
            mode = "F"
        else:
            mode = "I"

        def gray(a):
            g = _to_uint8(a[..., :1], dtype, int(key.bitspersample))
            if invert:
                g = 255 - g
            rgb = np.repeat(g, 3, axis=2)
            return _over_white(rgb, a[..., 1:2], dtype) if mode == "LA" else rgb

        return mode, gray
    if photometric in (2, 6):  # RGB; YCbCr arrives as RGB from the JPEG decoder
        if samples < 3:
            raise _Unsupported(f"photometric {photometric} with {samples} sample(s)")
        if photometric == 6 and int(key.compression) not in (6, 7, 33003, 33005, 34892, 33007):
            raise _Unsupported("YCbCr pixels outside JPEG")
        rgba = samples >= 4 and has_alpha
        return ("RGBA" if rgba else "RGB"), (
            lambda a: _over_white(_to_uint8(a[..., :3], dtype, int(key.bitspersample)), a[..., 3:4], dtype)
            if rgba else _to_uint8(a[..., :3], dtype, int(key.bitspersample)))
    raise _Unsupported(f"photometric interpretation {photometric} (e.g. CMYK or CIELab) is not brightfield RGB")


def _to_uint8(a: np.ndarray, dtype: np.dtype, bits: int) -> np.ndarray:
    if a.dtype == np.uint8 and bits == 8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_ or bits == 1:
        return (a.astype(np.uint8) > 0).astype(np.uint8) * 255
    if dtype.kind == "f":
        return np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    top = float(2 ** bits - 1) if dtype.kind == "u" else float(np.iinfo(dtype).max)
    # As slide_io.read_rgb scales 16-bit images: rint(value / 65535 * 255).
    return np.clip(np.rint(a.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)


def _over_white(rgb: np.ndarray, alpha: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # As slide_io.read_rgb composites transparency: transparent = glass (white).
    a = _to_uint8(alpha, dtype, 8 * dtype.itemsize).astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- OpenSlide


def _openslide():
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the Python package without the OpenSlide library
        return None
    return openslide


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads (the optional extra `openslide`)."""

    def __init__(self, path: str):
        openslide = _openslide()
        self.path = path
        try:
            self._osr = openslide.OpenSlide(path)
        except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError
            raise _Unsupported(f"{type(e).__name__}: {e}") from e
        self.width, self.height = (int(v) for v in self._osr.dimensions)
        self.levels = [(int(w), int(h), self.width / int(w)) for w, h in self._osr.level_dimensions]
        self.mode = "RGBA"
        try:
            mpp = float(self._osr.properties.get("openslide.mpp-x") or "nan")
        except ValueError:
            mpp = None
        self.mpp, self.mpp_source = _plausible_mpp(mpp, "OpenSlide openslide.mpp-x")

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        _, _, d = self.levels[level]
        # OpenSlide takes the corner in level-0 pixels; it returns RGBA, transparent where nothing was scanned.
        rgba = np.asarray(self._osr.read_region((int(round(x * d)), int(round(y * d))), level, (w, h)))
        return _over_white(rgba[..., :3], rgba[..., 3:4], np.dtype(np.uint8))

    def close(self) -> None:
        self._osr.close()


# --------------------------------------------------------------------------------------------------- PIL


class ImageSlide(Slide):
    """Plain images (JPEG, PNG, small TIFFs PIL reads): one level, decoded whole by slide_io.read_rgb on first
    use; the size and mode come from the header, so opening costs no decoding."""

    in_memory = True

    def __init__(self, path: str):
        self.path = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    self.width, self.height = im.size
                    self.mode = im.mode
                    dpi = im.info.get("dpi")
        except FileNotFoundError as e:
            raise IngestError(f"{path}: image not found; check the path in the release layout or --image.") from e
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise IngestError(f"{path}: unreadable image ({type(e).__name__}: {e}); the file is truncated or not "
                              f"an image: {_FIX_UNREADABLE}.") from e
        self.levels = [(self.width, self.height, 1.0)]
        mpp = 25400.0 / float(dpi[0]) if dpi and float(dpi[0]) > 0 else None
        self.mpp, self.mpp_source = _plausible_mpp(mpp, "image header dpi")
        self._rgb = None

    @property
    def pixels(self) -> np.ndarray:
        if self._rgb is None:
            self._rgb, _ = slide_io.read_rgb(self.path)
            if self._rgb.shape[:2] != (self.height, self.width):
                raise IngestError(f"{self.path}: decoded size {self._rgb.shape[1]}x{self._rgb.shape[0]} differs "
                                  f"from its header {self.width}x{self.height}; the file is corrupt, download it "
                                  "again.")
        return self._rgb

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.pixels[y:y + h, x:x + w]

    def read_level(self, level: int) -> np.ndarray:
        return self.pixels

    def close(self) -> None:
        self._rgb = None
