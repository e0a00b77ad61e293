"""A store's ingest report: `report/report.json` (counts) and `report/thumbnails/<section>.png` (spot boxes on the
tissue), written inside the store's temporary directory so they appear atomically with the store."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
from PIL import Image, ImageDraw

from histospace_jax import atomic

REPORT_DIR = "report"
REPORT_JSON = "report.json"
THUMB_DIR = "thumbnails"
# Box colours by fate of the spot/tile.
COLOURS = {"kept": (0, 200, 0), "padded": (255, 200, 0), "dropped_edge": (230, 0, 0),
           "background": (0, 120, 255)}
SPOT_DOT_RADIUS = 2.0  # thumbnail pixels: visible at 1024 px without hiding the tile boxes


def thumbnail_png(rgb: np.ndarray, boxes: dict[str, tuple[np.ndarray, np.ndarray]], box_size: int,
                  centres: tuple[np.ndarray, np.ndarray] | None, max_side: int = 1024) -> bytes:
    """A PNG of the slide shrunk to <= max_side px with tile boxes (full-res top-left corners per fate) and spot
    centres drawn on it."""
    h, w = rgb.shape[:2]
    factor = max(1, int(np.ceil(max(h, w) / max_side)))
    im = Image.fromarray(rgb).reduce(factor) if factor > 1 else Image.fromarray(rgb.copy())
    draw = ImageDraw.Draw(im)
    for fate, (x0, y0) in boxes.items():
        colour = COLOURS[fate]
        for x, y in zip(np.asarray(x0).tolist(), np.asarray(y0).tolist()):
            draw.rectangle([x / factor, y / factor, (x + box_size) / factor, (y + box_size) / factor],
                           outline=colour, width=1)
    if centres is not None:
        r = SPOT_DOT_RADIUS
        for x, y in zip(np.asarray(centres[0]).tolist(), np.asarray(centres[1]).tolist()):
            cx, cy = x / factor, y / factor
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # fast; thumbnails are inspected, not archived
    return buf.getvalue()


def safe_name(section: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", section)


def write_thumbnail(store_tmp: str, section: str, png: bytes) -> str:
    """Writes a section's thumbnail inside the store being built; returns its path relative to the store."""
    rel = os.path.join(REPORT_DIR, THUMB_DIR, f"{safe_name(section)}.png")
    atomic.write_bytes(os.path.join(store_tmp, rel), png)
    return rel


def write_report(store_tmp: str, report: dict) -> str:
    path = os.path.join(store_tmp, REPORT_DIR, REPORT_JSON)
    atomic.write_bytes(path, json.dumps(report, indent=1, default=_jsonable).encode())
    return path


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
