"""Colour-cast removal: per-channel 99th-percentile scaling, as in the HistoSPACE paper.

Scanners and stain batches tint the glass (background) slightly; dividing each channel by its 99th percentile
over the slide and multiplying by 255 maps the brightest 1% (glass) to white in every channel, removing the cast.
The percentiles are computed once per slide (on a regular subsample) and applied to every tile cut from it, so
tiles of one slide share one correction.
"""

from __future__ import annotations

import numpy as np

DEFAULT_PERCENTILE = 99.0


def channel_percentiles(pixels: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> np.ndarray:
    """Per-channel percentile of RGB pixels [..., 3] -> float [3], floored at 1 to avoid division by zero."""
    flat = np.asarray(pixels).reshape(-1, 3)
    return np.maximum(np.percentile(flat, percentile, axis=0), 1.0)


def remove_colour_cast(rgb: np.ndarray, percentiles: np.ndarray) -> np.ndarray:
    """Scales each channel so its `percentiles` value becomes 255; returns float32 in [0, 255]."""
    scale = 255.0 / np.asarray(percentiles, dtype=np.float32)
    return np.minimum(np.asarray(rgb, dtype=np.float32) * scale, 255.0)
