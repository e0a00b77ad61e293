"""Evaluation metrics (NumPy, float64). Pure functions of arrays.

Two Pearson correlations matter and they answer different questions:

* per-gene Pearson (the field's standard): for each gene, r across the evaluated spots between predicted and
  measured expression. It asks "does the model rank spots correctly for this gene?". A gene whose measured or
  predicted values are constant over the spots has no defined r; it is returned as NaN and left out of means,
  and the number of such genes is reported beside the mean.
* per-spot Pearson (the HistoSPACE paper's headline): for each spot, r across genes. Because genes differ
  hugely in mean level, predicting the same mean profile for every spot already scores 0.35-0.55 on real data,
  so it is always reported beside the mean-profile baseline.
"""

from __future__ import annotations

import numpy as np

from histospace_jax import stats


def _pearson_along(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    # r is undefined where either side is exactly constant along the axis.
    constant = (np.ptp(a, axis=axis) == 0) | (np.ptp(b, axis=axis) == 0)
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    num = (a * b).sum(axis=axis)
    den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
    r = num / np.where(constant, 1.0, den)
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """r across spots for each gene: [N, G] x [N, G] -> [G] (NaN for constant genes)."""
    return _pearson_along(y_true, y_pred, axis=0)


def pearson_per_spot(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """r across genes for each spot: [N, G] x [N, G] -> [N] (NaN for constant spots)."""
    return _pearson_along(y_true, y_pred, axis=1)


def nanmean_or_nan(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def nanmedian_or_nan(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.square(np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64))))


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """The metric block reported for every model and control."""
    r_gene = pearson_per_gene(y_true, y_pred)
    r_spot = pearson_per_spot(y_true, y_pred)
    return {
        "per_gene_pearson": nanmean_or_nan(r_gene),
        "per_gene_pearson_median": nanmedian_or_nan(r_gene),
        "n_genes_undefined_r": int(np.sum(~np.isfinite(r_gene))),
        "per_spot_pearson": nanmean_or_nan(r_spot),
        "mse": mse(y_true, y_pred),
    }


def mean_profile_prediction(train_expression: np.ndarray, n: int) -> np.ndarray:
    """The image-blind baseline: the training spots' mean expression profile, repeated for n spots."""
    mean = np.asarray(train_expression, np.float64).mean(axis=0)
    return np.broadcast_to(mean, (n, mean.shape[0])).copy()


# ------------------------------------------------------------------------------------------------ significance


def gene_significance(y_true: np.ndarray, y_pred: np.ndarray, fdr: float = 0.05) -> dict:
    """Genes whose per-gene r is > 0 and significant at `fdr` (one-sided t-test p-values, Benjamini-Hochberg
    over the genes with a defined r)."""
    r = pearson_per_gene(y_true, y_pred)
    n = int(np.asarray(y_true).shape[0])
    tested = int(np.sum(np.isfinite(r)))
    sig = stats.n_significant_positive(r, n, fdr) if n >= 3 and tested else 0
    return {"n_genes_significant": int(sig), "n_genes_tested": tested, "fdr": float(fdr)}


def full_regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, fdr: float = 0.05) -> dict:
    """regression_metrics plus the FDR significance count (the block every result table reports)."""
    return {**regression_metrics(y_true, y_pred), **gene_significance(y_true, y_pred, fdr)}
