"""Plain H&E image folders (ICIAR-2018 / BACH style) for autoencoder pretraining.

Every TIFF/PNG/JPEG under --input (recursively) is one "section". A file inside a sub-folder takes the first
sub-folder's name as its label (BACH's class folders: Normal, Benign, InSitu, Invasive); files at the top level
get no label. Each image is cut into a non-overlapping grid of tiles (the grid is centred, so the unused margin is
split evenly); tiles with less than --min_tissue tissue pixels are rejected as background.
"""

from __future__ import annotations

import os

import numpy as np

from histospace_jax.ingest.common import IngestError, SectionSource
from histospace_jax.ingest.slide_io import IMAGE_EXTENSIONS

FORMAT = "images"


def discover(input_dir: str, sections: list[str] | None) -> list[SectionSource]:
    if not os.path.isdir(input_dir):
        raise IngestError(f"{input_dir}: no such folder; --input must be a folder of H&E images.")
    found = []
    for d, subdirs, files in os.walk(input_dir):
        subdirs.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                found.append(os.path.join(d, f))
    if not found:
        raise IngestError(f"{input_dir}: no {IMAGE_EXTENSIONS} images found; point --input at the image folder.")
    out = []
    for path in found:
        rel = os.path.relpath(path, input_dir)
        name = os.path.splitext(rel)[0].replace(os.sep, "/")
        parts = rel.split(os.sep)
        label = parts[0] if len(parts) > 1 else ""
        out.append(SectionSource(FORMAT, name, name, path, {}, {"label": label}))
    if sections:
        names = [s.section for s in out]
        unknown = [s for s in sections if s not in names]
        if unknown:
            raise IngestError(f"--sections: {unknown} not among the images of {input_dir} (e.g. {names[:5]}).")
        out = [s for s in out if s.section in set(sections)]
    return out


def grid_boxes(width: int, height: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-left corners (x0, y0) and grid indices (col, row) of non-overlapping `size` boxes covering the image."""
    nx, ny = width // size, height // size
    if nx == 0 or ny == 0:
        return (np.zeros(0, np.int64),) * 4
    off_x, off_y = (width - nx * size) // 2, (height - ny * size) // 2
    rows, cols = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    cols, rows = cols.ravel(), rows.ravel()
    return off_x + cols * size, off_y + rows * size, cols, rows
