"""Stain normalisation of H&E images: Macenko (2009) and Vahadane (2016), vectorised NumPy.

Both methods model a pixel's optical density (OD) as a non-negative mix of two stain colours,
``od = c_H * s_H + c_E * s_E`` (Beer-Lambert), estimate the slide's stain matrix ``S`` (rows s_H, s_E, unit norm,
haematoxylin first) and each pixel's concentrations ``c``, then rebuild the pixel with a reference stain matrix
and concentrations rescaled so their 99th percentiles match the reference's.

* Macenko: the stain vectors are the extreme angles (1st/99th percentile) of tissue OD projected on the plane of
  its two principal components; concentrations by least squares.
* Vahadane: sparse non-negative matrix factorisation of tissue OD (``min ||V - C S||^2 + lam |C|_1``, C, S >= 0,
  rows of S unit norm) by alternating projected-gradient (ISTA) steps for C and projected least squares for S,
  initialised at the Macenko estimate; concentrations by non-negative sparse coding.

Optical density uses ``od = -ln((I + 1) / 256)``, exactly invertible by ``I = 256 exp(-od) - 1``, so glass (255)
has zero density and maps back to 255, and normalising an image against itself changes only the small part of
each pixel's OD outside the stain plane.

Default method (`prepare --stain`) is Macenko: deterministic, closed-form, and about as good as Vahadane on
H&E in published comparisons; the paper's Vahadane is available with ``--stain=vahadane``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from histospace_jax.ingest.common import IngestError

METHODS = ("none", "macenko", "vahadane")
OD_BETA = 0.15  # pixels with OD below this in any channel are (near) transparent: background, not stain
ANGLE_PERCENTILE = 1.0  # Macenko's alpha: robust extremes of the stain angle distribution
MAX_CONC_PERCENTILE = 99.0
MIN_TISSUE_PIXELS = 200  # fewer OD>beta pixels than this cannot support a stain estimate
VAHADANE_LAMBDA = 0.1  # sparsity weight of the dictionary-learning step (Vahadane et al.)
VAHADANE_CODE_LAMBDA = 0.01  # smaller weight when coding pixels, so concentrations are not shrunk visibly
VAHADANE_FIT_PIXELS = 20_000

# Built-in reference: the H&E stain matrix and 99th-percentile concentrations widely used as the Macenko target
# (rows haematoxylin, eosin; OD columns R, G, B). Used when no --stain_reference image is given.
BUILTIN_STAIN_MATRIX = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
BUILTIN_MAX_CONC = np.array([1.9705, 1.0308])


class StainFitError(IngestError):
    """Too little tissue, or degenerate colours, to estimate stain vectors."""


@dataclasses.dataclass(frozen=True)
class StainParams:
    """A slide's (or the reference's) stain matrix [2, 3] (rows H, E; unit norm) and max concentrations [2]."""

    stain_matrix: np.ndarray
    max_conc: np.ndarray

    def to_json(self) -> dict:
        return {"stain_matrix_HE_rgb": np.round(self.stain_matrix, 6).tolist(),
                "max_concentrations": np.round(self.max_conc, 6).tolist()}


def builtin_reference() -> StainParams:
    return StainParams(BUILTIN_STAIN_MATRIX / np.linalg.norm(BUILTIN_STAIN_MATRIX, axis=1, keepdims=True),
                       BUILTIN_MAX_CONC.copy())


# OD of every uint8 intensity: uint8 images convert by table look-up instead of a logarithm per pixel.
_OD_TABLE = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density [..., 3], floored at 0 (nothing is brighter than glass). uint8 in -> float32 out (table
    look-up, the fast path for tiles); anything else -> float64."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return _OD_TABLE.astype(np.float32)[rgb]
    return np.maximum(-np.log((rgb.astype(np.float64) + 1.0) / 256.0), 0.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(256.0 * np.exp(-od) - 1.0, 0.0, 255.0)


# Ruifrok & Johnston (2001), "Quantification of histochemical staining by color deconvolution": optical-density
# colours (R, G, B) of haematoxylin, eosin and DAB, one stain per row.
RUIFROK_HED = np.array([[0.65, 0.70, 0.29],
                        [0.07, 0.99, 0.11],
                        [0.27, 0.57, 0.78]])
HED_STAIN_ROWS = RUIFROK_HED / np.linalg.norm(RUIFROK_HED, axis=1, keepdims=True)
# od = conc @ HED_STAIN_ROWS, so conc = od @ inv(HED_STAIN_ROWS): the three stains span OD space.
HED_FROM_OD = np.linalg.inv(HED_STAIN_ROWS)


def hed_jitter(tiles_uint8: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """HED stain jitter (Tellez et al. 2018): each tile's haematoxylin, eosin and DAB concentrations (Ruifrok-
    Johnston deconvolution of the optical density) become scale * c + shift, then back to RGB. [N, T, T, 3]
    uint8 tiles, `scale` and `shift` [N, 3] -> uint8 tiles. Concentrations are not floored, so scale 1 and
    shift 0 give the tiles back (to rounding)."""
    tiles = np.asarray(tiles_uint8)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"hed_jitter expects [N, T, T, 3] uint8 tiles, got {tiles.dtype} {tiles.shape}")
    scale = np.asarray(scale, np.float32).reshape(len(tiles), 1, 1, 3)
    shift = np.asarray(shift, np.float32).reshape(len(tiles), 1, 1, 3)
    conc = rgb_to_od(tiles) @ HED_FROM_OD.astype(np.float32)
    od = (conc * scale + shift) @ HED_STAIN_ROWS.astype(np.float32)
    return np.round(od_to_rgb(od)).astype(np.uint8)


def tissue_od(pixels: np.ndarray) -> np.ndarray:
    """OD [n, 3] of the pixels dense enough in every channel to carry stain (Macenko's beta threshold)."""
    od = rgb_to_od(np.asarray(pixels).reshape(-1, 3))
    return od[(od > OD_BETA).all(axis=1)]


def _order_he(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """Rows (H, E): haematoxylin absorbs red more strongly than eosin, so it has the larger red OD."""
    m = np.stack([v1, v2]) if v1[0] >= v2[0] else np.stack([v2, v1])
    m = m * np.where(m.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def macenko_stain_matrix(od: np.ndarray, alpha: float = ANGLE_PERCENTILE) -> np.ndarray:
    """Macenko et al. 2009 stain vectors from tissue OD [n, 3] -> [2, 3] (H, E)."""
    if len(od) < MIN_TISSUE_PIXELS:
        raise StainFitError(f"only {len(od)} stained pixels (need {MIN_TISSUE_PIXELS})")
    _, eigvecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = eigvecs[:, [2, 1]]  # first and second principal directions (eigh sorts ascending)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # orient both into the positive octant
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    return _order_he(v_lo, v_hi)


def _lstsq_conc(od: np.ndarray, stain: np.ndarray) -> np.ndarray:
    """Least-squares concentrations: od [n, 3] ~= C [n, 2] @ stain [2, 3]."""
    return od @ np.linalg.pinv(stain).astype(od.dtype)


def _sparse_code(od: np.ndarray, stain: np.ndarray, lam: float, n_iter: int = 30,
                 init: np.ndarray | None = None) -> np.ndarray:
    """Non-negative lasso per pixel, vectorised: min_C 0.5||od - C S||^2 + lam |C|_1, C >= 0 (projected ISTA)."""
    stain = stain.astype(od.dtype)
    gram = stain @ stain.T
    step = 1.0 / max(float(np.linalg.eigvalsh(gram.astype(np.float64))[-1]), 1e-12)
    target = od @ stain.T
    c = np.maximum(_lstsq_conc(od, stain), 0.0) if init is None else init
    for _ in range(n_iter):
        c = np.maximum(c - step * (c @ gram - target + lam), 0.0)
    return c


def vahadane_stain_matrix(od: np.ndarray, lam: float = VAHADANE_LAMBDA, n_iter: int = 60) -> np.ndarray:
    """Vahadane et al. 2016 stain vectors by sparse NMF of tissue OD [n, 3] -> [2, 3] (H, E)."""
    if len(od) < MIN_TISSUE_PIXELS:
        raise StainFitError(f"only {len(od)} stained pixels (need {MIN_TISSUE_PIXELS})")
    if len(od) > VAHADANE_FIT_PIXELS:  # deterministic thinning keeps the fit cheap on whole slides
        od = od[np.linspace(0, len(od) - 1, VAHADANE_FIT_PIXELS).astype(np.int64)]
    stain = macenko_stain_matrix(od)
    stain = np.maximum(stain, 1e-6)
    stain /= np.linalg.norm(stain, axis=1, keepdims=True)
    conc = _sparse_code(od, stain, lam, n_iter=10)
    for _ in range(n_iter):
        conc = _sparse_code(od, stain, lam, n_iter=5, init=conc)
        # Dictionary step: projected gradient on S (S >= 0), then rows back to unit norm with C rescaled so the
        # product C S is unchanged. Gradient steps, not a full least-squares solve, keep the alternation stable.
        gram = conc.T @ conc
        step = 1.0 / max(float(np.linalg.eigvalsh(gram)[-1]), 1e-12)
        for _ in range(5):
            stain = np.maximum(stain - step * (gram @ stain - conc.T @ od), 0.0)
        norms = np.linalg.norm(stain, axis=1)
        if (norms < 1e-8).any():
            raise StainFitError("a stain vector vanished during dictionary learning")
        stain = stain / norms[:, None]
        conc = conc * norms[None, :]
    return _order_he(stain[0], stain[1])


def estimate(method: str, pixels: np.ndarray) -> StainParams:
    """Stain matrix and 99th-percentile concentrations of RGB pixels [..., 3] (a slide sample or an image)."""
    od = tissue_od(pixels)
    if method == "macenko":
        stain = macenko_stain_matrix(od)
        conc = _lstsq_conc(od, stain)
    elif method == "vahadane":
        stain = vahadane_stain_matrix(od)
        conc = _sparse_code(od, stain, VAHADANE_CODE_LAMBDA)
    else:
        raise ValueError(f"unknown stain method {method!r}; use one of {METHODS}")
    max_conc = np.percentile(conc, MAX_CONC_PERCENTILE, axis=0)
    if not np.all(np.isfinite(stain)) or (max_conc <= 1e-6).any():
        raise StainFitError(f"degenerate stain estimate (max concentrations {max_conc})")
    return StainParams(stain, max_conc)


def normalise(rgb: np.ndarray, method: str, source: StainParams, target: StainParams) -> np.ndarray:
    """Re-stains RGB [..., 3] from the `source` stains to the `target` stains; returns float32 in [0, 255].

    uint8 input takes the fast float32 path (OD by table look-up)."""
    shape = np.shape(rgb)
    rgb = np.asarray(rgb)
    ratio = target.max_conc / source.max_conc
    if method == "macenko" and rgb.dtype == np.uint8:
        # Macenko is linear in OD: od_new = od @ M with M = pinv(S_src) diag(ratio) S_ref (3 x 3). For uint8 input
        # od @ M is a sum of three per-channel tables, avoiding large (n, 3) @ (3, k) products.
        m = np.linalg.pinv(source.stain_matrix) @ np.diag(ratio) @ target.stain_matrix
        tables = (_OD_TABLE[:, None, None] * m[None]).astype(np.float32)  # [256 intensities, 3 in, 3 out]
        flat = rgb.reshape(-1, 3)
        od_new = tables[flat[:, 0], 0] + tables[flat[:, 1], 1] + tables[flat[:, 2], 2]
        return od_to_rgb(od_new).reshape(shape).astype(np.float32)
    od = rgb_to_od(rgb.reshape(-1, 3))
    if method == "macenko":
        conc = _lstsq_conc(od, source.stain_matrix)
    elif method == "vahadane":
        conc = _sparse_code(od, source.stain_matrix, VAHADANE_CODE_LAMBDA)
    else:
        raise ValueError(f"unknown stain method {method!r}; use one of {METHODS}")
    conc = conc * ratio.astype(conc.dtype)[None, :]
    return od_to_rgb(conc @ target.stain_matrix.astype(conc.dtype)).reshape(shape).astype(np.float32)
