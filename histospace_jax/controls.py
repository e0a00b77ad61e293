"""Controls and resampling statistics for a leave-one-patient-out expression-prediction result.

Pure functions of NumPy arrays (float64); no file I/O and no JAX. Each answers one question a sceptical
reviewer asks of "the model predicts gene expression from H&E with mean per-gene r = x":

* Trivial image control (`trivial_image_control`): ridge regression on 31 colour statistics of each tile (RGB and
  H/E/DAB optical-density percentiles, background fraction). Much of what an image model "predicts" can be tissue
  density and stain intensity; if colour statistics alone match the model, the model has learnt no morphology.
* Linear probe (`linear_probe`): ridge on PCA of pooled frozen-encoder feature maps. It separates what the
  encoder's features already contain from what the trained regression head adds.
* Depth oracle (`depth_oracle`): per-gene regression of expression on log library size, fitted on the training
  spots and applied to the test spots' true depths. Log-normalised expression still follows depth, and deep
  spots are tissue-rich tiles, so an image model can score by predicting depth; the oracle, which is *given* the
  depth, bounds that route. (`metrics.depth_adjusted_pearson_per_gene` removes it from a model's score.)
* Sampling depth oracle (`sampling_depth_oracle`, `sampling_expectation`): the same question answered by the
  measurement itself instead of a fitted line: each gene keeps its training share of the library, and a spot of
  depth L is expected to show E[log1p(scale * c / L)] for c ~ Poisson(L * share). Every gene then rises with depth
  as counting makes it rise (fewer zeros in deeper spots), whatever the training patients' lines say; lines fitted
  on one patient carry that patient's own mix of depth and tissue, and where the held-out patient's depth range
  differs (a shallow section) their slopes transfer badly.
* Spatial block permutation test (`grid_blocks`, `block_permutation_pvalues`, `n_significant_fdr`): the usual
  t-test of a per-gene r assumes independent spots, but expression and predictions are both spatially smooth, so
  neighbouring spots are near-copies and the t-test's effective n is far too large; smooth but unrelated maps
  then look "significant". Permuting whole spatial blocks keeps the within-block smoothness in the null.
* Bootstrap over units (`bootstrap_mean_gene_r`): a confidence interval of the mean per-gene r from resampling
  sections (or spatial blocks), the units that are independent, rather than spots, which are not;
  `bootstrap_gene_r_difference` gives the interval of the gap between two predictors on the same draws, which
  says whether "the model beats this control" holds beyond the variation between units.
* Noise ceiling (`noise_ceiling`, `counts_from_expression`): how well two independent measurements of the same
  tissue would agree given the counting (Poisson) noise of the section; a shallow section cannot be predicted
  better than it can be measured.
* Model pieces: standardised closed-form ridge (`ridge_fit`, `ridge_predict`, `choose_ridge_alpha` by
  leave-one-group-out), PCA by SVD (`fit_pca`, `pca_transform`) and the pooling of feature maps
  (`pooled_feature_maps`). Every statistic that is fitted (means, scales, components, coefficients, alpha) is
  fitted on training rows only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg
import scipy.stats as sps

from histospace_jax import metrics, stats
from histospace_jax.ingest import stain

# Half-decades from 1e-2 to 1e8. The linear probe ridges unstandardised principal-component scores, whose top
# eigenvalues (N x variance) reach 1e5-1e6 on real stores: its best penalty lay above 1e4, where an earlier grid
# ended, so the probe was under-regularised and scored below what it could.
DEFAULT_ALPHAS = np.logspace(-2, 8, 21)

# ------------------------------------------------------------------------------------------- colour features

_CHANNELS = ("R", "G", "B", "H", "E", "D")
_SUMMARIES = ("mean", "std", "p10", "p50", "p90")
COLOUR_FEATURE_NAMES = tuple(f"{c}_{s}" for c in _CHANNELS for s in _SUMMARIES) + ("background_fraction",)


def tile_colour_features(tiles_uint8: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[N, T, T, 3] uint8 tiles -> [N, 31] float64 colour statistics (names in COLOUR_FEATURE_NAMES).

    For each of R, G, B (scaled to [0, 1]) and the H, E, DAB concentrations from Ruifrok-Johnston colour
    deconvolution of the optical density (`stain.rgb_to_od`, natural log, so glass is 0): mean, std and the
    10th/50th/90th percentiles over the tile's pixels; then the fraction of background pixels, those whose OD is
    below `stain.OD_BETA` in every channel (near-white glass; the same threshold that defines tissue for the
    stain-matrix fit). Tiles are processed `chunk` at a time, one channel at a time, so memory stays bounded.
    """
    tiles = np.asarray(tiles_uint8)
    if tiles.dtype != np.uint8:
        raise ValueError(f"tile_colour_features expects uint8 tiles, got {tiles.dtype}")
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tile_colour_features expects [N, T, T, 3] tiles, got shape {tiles.shape}")
    n = tiles.shape[0]
    out = np.empty((n, len(COLOUR_FEATURE_NAMES)), np.float64)
    hed_from_od = stain.HED_FROM_OD.astype(np.float32)
    for start in range(0, n, max(1, int(chunk))):
        part = tiles[start:start + chunk]
        block = part.reshape(part.shape[0], tiles.shape[1] * tiles.shape[2], 3)
        od = stain.rgb_to_od(block)  # float32 by table look-up
        channels = [block[..., c].astype(np.float32) / np.float32(255.0) for c in range(3)]
        channels += [od @ hed_from_od[:, k] for k in range(3)]
        cols = []
        for values in channels:
            cols.append(values.mean(axis=1, dtype=np.float64))
            cols.append(values.std(axis=1, dtype=np.float64))
            cols.extend(np.percentile(values, [10.0, 50.0, 90.0], axis=1).astype(np.float64))
        cols.append((od < stain.OD_BETA).all(axis=2).mean(axis=1, dtype=np.float64))
        out[start:start + chunk] = np.stack(cols, axis=1)
    return out


# ----------------------------------------------------------------------------------------------------- ridge


@dataclasses.dataclass(frozen=True)
class RidgeModel:
    """Ridge fit. `coef` [P, G] and `intercept` [G] act on raw x (prediction = x @ coef + intercept); the
    penalty was applied to the coefficients of x standardised with `x_mean` / `x_scale` (training rows)."""

    coef: np.ndarray
    intercept: np.ndarray
    x_mean: np.ndarray
    x_scale: np.ndarray
    alpha: float


def _as_2d(a, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {a.shape}")
    return a


def _paired_with_labels(y_true, y_pred, labels, name: str):
    """Truth and prediction as [N, G] of one shape, and one label per spot; ValueError naming what differs."""
    y_true = _as_2d(y_true, "y_true")
    y_pred = _as_2d(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != y_true.shape[0]:
        raise ValueError(f"{name} has {labels.shape[0]} labels for {y_true.shape[0]} spots")
    return y_true, y_pred, labels


def _standardiser(x: np.ndarray, standardise: bool) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    if not standardise:
        return mean, np.ones(x.shape[1])
    scale = x.std(axis=0)
    # A constant training column carries nothing; scale 1 leaves it at zero after centring instead of 0/0.
    return mean, np.where(scale > 1e-12 * np.maximum(1.0, np.abs(mean)), scale, 1.0)


def _solve_pos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.solve(a, b, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        # alpha = 0 on rank-deficient x: the minimum-norm least-squares solution is the alpha -> 0 limit.
        return scipy.linalg.lstsq(a, b)[0]


def ridge_fit(x, y, alpha: float, standardise: bool = True) -> RidgeModel:
    """Closed-form ridge: min ||y - b0 - xs B||^2 + alpha ||B||^2 with xs = (x - mean) / std (training rows),
    intercept unpenalised. Solves the P x P primal system when P <= N, else the N x N dual
    (B = xs^T (xs xs^T + alpha I)^-1 y_c), whichever is smaller. `standardise=False` only centres x (for
    inputs already on a common scale, such as PCA scores, where the penalty should shrink small-variance
    directions more)."""
    x = _as_2d(x, "x")
    y = _as_2d(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows, y has {y.shape[0]}")
    if x.shape[0] < 1:
        raise ValueError("ridge_fit needs at least one row")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    mean, scale = _standardiser(x, standardise)
    xs = (x - mean) / scale
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    n, p = xs.shape
    if p <= n:
        beta = _solve_pos(xs.T @ xs + alpha * np.eye(p), xs.T @ yc)
    else:
        beta = xs.T @ _solve_pos(xs @ xs.T + alpha * np.eye(n), yc)
    coef = beta / scale[:, None]
    return RidgeModel(coef=coef, intercept=y_mean - mean @ coef, x_mean=mean, x_scale=scale, alpha=float(alpha))


def ridge_predict(model: RidgeModel, x) -> np.ndarray:
    return _as_2d(x, "x") @ model.coef + model.intercept


def _fallback_halves(n: int) -> np.ndarray:
    return (np.arange(n) >= n // 2).astype(np.int64)


def choose_ridge_alpha(x, y, groups, alphas=DEFAULT_ALPHAS, fallback_groups=None, standardise: bool = True
                       ) -> tuple[float, dict]:
    """Ridge penalty by leave-one-group-out over the TRAINING rows.

    For each group held out, ridge is fitted on the other groups (standardisation statistics included) for every
    alpha, and the held-out group is scored by its mean per-gene r (and MSE), mirroring how the outer LOO scores
    a held-out patient. Scores are averaged over held-out groups; the best alpha has the highest mean r, ties
    (within 1e-9) and all-undefined r broken by lowest MSE, then by the larger alpha (the simpler model).

    Groups should be units the test data is independent of (sections, patients). With a single group,
    `fallback_groups` is used instead (callers pass spatial blocks); if that is None too, rows are split into
    the first and second half in their given order - contiguous halves rather than an interleaved split, so that
    neighbouring rows (usually neighbouring spots) do not sit on both sides of the split.

    Returns (alpha, {"alphas": [A], "mean_r": [A], "mse": [A], "n_groups": int}).
    All alphas of a fold come from one SVD of its training rows: B(alpha) = V diag(s / (s^2 + alpha)) U^T y_c.
    """
    x = _as_2d(x, "x")
    y = _as_2d(y, "y")
    alphas = np.asarray(alphas, np.float64).reshape(-1)
    if alphas.size == 0 or np.any(alphas < 0):
        raise ValueError("alphas must be a non-empty list of non-negative penalties")
    groups = np.asarray(groups).reshape(-1)
    if groups.shape[0] != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"x, y and groups disagree in rows: {x.shape[0]}, {y.shape[0]}, {groups.shape[0]}")
    if np.unique(groups).size < 2:
        groups = _fallback_halves(x.shape[0]) if fallback_groups is None else np.asarray(fallback_groups)
        if groups.shape[0] != x.shape[0] or np.unique(groups).size < 2:
            raise ValueError("choose_ridge_alpha needs at least two groups (or two rows for the fallback split)")
    labels = np.unique(groups)
    r_scores = np.full((alphas.size, labels.size), np.nan)
    mse_scores = np.full((alphas.size, labels.size), np.nan)
    for k, g in enumerate(labels):
        val = groups == g
        xt, yt, xv, yv = x[~val], y[~val], x[val], y[val]
        mean, scale = _standardiser(xt, standardise)
        xts = (xt - mean) / scale
        xvs = (xv - mean) / scale
        y_mean = yt.mean(axis=0)
        u, s, vt = scipy.linalg.svd(xts, full_matrices=False)
        keep = s > 1e-10 * max(1.0, s[0] if s.size else 0.0)
        u, s, vt = u[:, keep], s[keep], vt[keep]
        uty = u.T @ (yt - y_mean)
        xv_v = xvs @ vt.T
        for a, alpha in enumerate(alphas):
            pred = y_mean + xv_v @ (uty * (s / (s * s + alpha))[:, None])
            mse_scores[a, k] = metrics.mse(yv, pred)
            if val.sum() >= 2:
                r_scores[a, k] = metrics.nanmean_or_nan(metrics.pearson_per_gene(yv, pred))
    with np.errstate(invalid="ignore"):
        mean_r = np.array([metrics.nanmean_or_nan(row) for row in r_scores])
    mean_mse = mse_scores.mean(axis=1)
    if np.any(np.isfinite(mean_r)):
        best_r = np.nanmax(mean_r)
        candidates = np.flatnonzero(np.isfinite(mean_r) & (mean_r >= best_r - 1e-9))
    else:
        candidates = np.arange(alphas.size)
    best_mse = mean_mse[candidates].min()
    candidates = candidates[mean_mse[candidates] <= best_mse * (1 + 1e-12)]
    best = candidates[np.argmax(alphas[candidates])]
    return float(alphas[best]), {"alphas": alphas, "mean_r": mean_r, "mse": mean_mse, "n_groups": int(labels.size)}


# ------------------------------------------------------------------------------------------------ PCA, pooling


def pooled_feature_maps(feats) -> np.ndarray:
    """[N, h, w, C] encoder feature maps -> [N, 16 C + 2 C] float64: the 4 x 4 grid of average-pooled cells
    (flattened row-major as (cell_row, cell_col, channel)), then each channel's global mean, then its global std.
    The grid keeps coarse layout (where in the tile the nuclei are); mean and std summarise the whole tile. Maps
    too small for a 4 x 4 grid (tiny test models) use the largest grid, 2 x 2 or 1 x 1, that divides them."""
    f = np.asarray(feats)
    if f.ndim != 4:
        raise ValueError(f"pooled_feature_maps expects [N, h, w, C], got shape {f.shape}")
    n, h, w, c = f.shape
    g = next(d for d in (4, 2, 1) if h % d == 0 and w % d == 0)
    grid = f.reshape(n, g, h // g, g, w // g, c).mean(axis=(2, 4), dtype=np.float64).reshape(n, g * g * c)
    flat = f.reshape(n, h * w, c)
    return np.concatenate([grid, flat.mean(axis=1, dtype=np.float64), flat.std(axis=1, dtype=np.float64)], axis=1)


@dataclasses.dataclass(frozen=True)
class PCAModel:
    """Principal axes `components` [k, P] (unit rows; sign fixed so each row's largest-magnitude entry is
    positive), the training `mean` [P], and the training variance along each axis `explained_variance` [k]."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray


def fit_pca(x, n_components: int) -> PCAModel:
    """PCA of the (training) rows by SVD of the centred matrix; n_components is capped at
    min(n_rows - 1, n_features), the number of non-trivial axes centred rows can have."""
    x = _as_2d(x, "x")
    n, p = x.shape
    k = int(min(n_components, n - 1, p))
    if k < 1:
        raise ValueError(f"fit_pca: no components possible from {n} rows x {p} features")
    mean = x.mean(axis=0)
    _, s, vt = scipy.linalg.svd(x - mean, full_matrices=False)
    vt = vt[:k]
    flip = np.sign(vt[np.arange(k), np.argmax(np.abs(vt), axis=1)])
    return PCAModel(mean=mean, components=vt * flip[:, None], explained_variance=s[:k] ** 2 / (n - 1))


def pca_transform(model: PCAModel, x) -> np.ndarray:
    return (_as_2d(x, "x") - model.mean) @ model.components.T


# ------------------------------------------------------------------------------------------------- controls


def linear_probe(feats_train, y_train, groups_train, feats_test, n_components: int = 256,
                 alphas=DEFAULT_ALPHAS, fallback_groups=None) -> tuple[np.ndarray, float]:
    """Ridge on the top principal components of pooled frozen-encoder feature maps -> (test predictions, alpha):
    probe_scores, then ridge_on_scores."""
    return ridge_on_scores(*probe_scores(feats_train, feats_test, n_components), y_train, groups_train,
                           alphas, fallback_groups)


@dataclasses.dataclass(frozen=True)
class ProbeProjection:
    """The linear probe's input map, fitted on training rows: pooled feature maps standardised with `mean` /
    `scale` [P], then projected on `pca`'s axes."""

    mean: np.ndarray
    scale: np.ndarray
    pca: PCAModel

    def scores(self, pooled) -> np.ndarray:
        return pca_transform(self.pca, (_as_2d(pooled, "pooled") - self.mean) / self.scale)


def fit_probe_projection(pooled_train, n_components: int = 256) -> ProbeProjection:
    """Standardiser and top principal components of the training rows' pooled feature maps ([N, P])."""
    pooled_train = _as_2d(pooled_train, "pooled_train")
    mean, scale = _standardiser(pooled_train, True)
    return ProbeProjection(mean, scale, fit_pca((pooled_train - mean) / scale, n_components))


def probe_scores(feats_train, feats_test, n_components: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The linear probe's inputs: pooled feature maps, standardised on the training rows, projected on the
    training rows' top principal components (fit_probe_projection) -> (train scores, test scores). The PCA has
    seen the inner-validation rows' features (never their expression), which is unsupervised only."""
    p_train = pooled_feature_maps(feats_train)
    projection = fit_probe_projection(p_train, n_components)
    return projection.scores(p_train), projection.scores(pooled_feature_maps(feats_test))


def ridge_on_scores(z_train, z_test, y_train, groups_train, alphas=DEFAULT_ALPHAS, fallback_groups=None
                    ) -> tuple[np.ndarray, float]:
    """Ridge on probe_scores -> (test predictions, alpha). The scores stay unstandardised, so the penalty shrinks
    low-variance components most (ridge on the standardised features restricted to the top components). Alpha
    is chosen by leave-one-group-out on `groups_train`."""
    alpha, _ = choose_ridge_alpha(z_train, y_train, groups_train, alphas, fallback_groups, standardise=False)
    return ridge_predict(ridge_fit(z_train, y_train, alpha, standardise=False), z_test), alpha


def image_log_depth(z_train, z_test, log_depth_train, groups_train, alphas=DEFAULT_ALPHAS, fallback_groups=None
                    ) -> tuple[np.ndarray, float]:
    """Each test spot's log library size as the image says it: the linear probe's ridge (ridge_on_scores, on
    probe_scores) fitted to the training spots' log library sizes -> ([N_test], alpha)."""
    d_train = np.asarray(log_depth_train, np.float64).reshape(-1, 1)
    depth_test, alpha = ridge_on_scores(z_train, z_test, d_train, groups_train, alphas, fallback_groups)
    return depth_test[:, 0], alpha


def image_depth(z_train, z_test, log_depth_train, y_train, groups_train, alphas=DEFAULT_ALPHAS,
                fallback_groups=None) -> tuple[np.ndarray, float]:
    """Depth read from the image -> (test predictions, alpha): the depth oracle's per-gene lines evaluated at
    `image_log_depth`. A rank-one predictor that knows nothing about any gene beyond how deep the image says
    the spot is; a model that cannot beat it has learnt depth, not genes."""
    depth_test, alpha = image_log_depth(z_train, z_test, log_depth_train, groups_train, alphas, fallback_groups)
    return depth_oracle(log_depth_train, y_train, depth_test), alpha


def trivial_image_control(tiles_train, y_train, groups_train, tiles_test, alphas=DEFAULT_ALPHAS,
                          fallback_groups=None) -> tuple[np.ndarray, float]:
    """Ridge on tile colour statistics (`tile_colour_features`, standardised on the training tiles), alpha by
    leave-one-group-out on `groups_train` -> (test predictions, alpha)."""
    f_train = tile_colour_features(tiles_train)
    f_test = tile_colour_features(tiles_test)
    alpha, _ = choose_ridge_alpha(f_train, y_train, groups_train, alphas, fallback_groups)
    return ridge_predict(ridge_fit(f_train, y_train, alpha), f_test), alpha


def depth_oracle(log_depth_train, y_train, log_depth_test) -> np.ndarray:
    """Per-gene least-squares line of expression on log depth, [1, log_depth], fitted on the training spots and
    evaluated at the test spots' depths -> [N_test, G]."""
    y = _as_2d(y_train, "y_train")
    d_train = np.asarray(log_depth_train, np.float64).reshape(-1)
    d_test = np.asarray(log_depth_test, np.float64).reshape(-1)
    if d_train.shape[0] != y.shape[0]:
        raise ValueError(f"log_depth_train has {d_train.shape[0]} values for {y.shape[0]} rows")
    if not (np.all(np.isfinite(d_train)) and np.all(np.isfinite(d_test))):
        raise ValueError("log depths must be finite")
    coef, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(d_train), d_train]), y, rcond=None)
    return np.column_stack([np.ones_like(d_test), d_test]) @ coef


# Poisson means up to this are summed exactly (float64 pmf recurrence from exp(-lambda), far from underflow);
# above it a fourth-order expansion around the mean is used, off by < 2e-5 there.
_EXACT_POISSON_MEAN = 100.0


def sampling_expectation(log_depth, shares, scale: float = 1e4) -> np.ndarray:
    """E[log(1 + scale * c / L)] for c ~ Poisson(L * p): the log-normalised value a spot of library size L =
    exp(log_depth) is expected to show for a gene that makes up a share p of its library, from counting noise
    alone. [N] log depths x [G] shares -> [N, G] float64. Increasing in L for every p > 0 (deeper spots have
    fewer zero counts), and tends to log(1 + scale * p)."""
    depth = np.exp(np.asarray(log_depth, np.float64).reshape(-1))[:, None]
    share = np.asarray(shares, np.float64).reshape(-1)[None, :]
    if not (np.all(np.isfinite(depth)) and np.all(np.isfinite(share))):
        raise ValueError("sampling_expectation: log depths and shares must be finite")
    if np.any(share < 0) or np.any(depth <= 0):
        raise ValueError("sampling_expectation: shares must be >= 0 and depths > 0")
    lam = depth * share
    a = np.broadcast_to(scale / depth, lam.shape)
    out = np.empty(lam.shape)
    small = lam <= _EXACT_POISSON_MEAN
    if small.any():
        ls, as_ = lam[small], a[small]
        pmf = np.exp(-ls)
        total = np.zeros_like(ls)
        top = int(np.ceil(_EXACT_POISSON_MEAN + 12.0 * np.sqrt(_EXACT_POISSON_MEAN) + 10.0))
        for c in range(1, top + 1):
            pmf = pmf * ls / c
            total += pmf * np.log1p(as_ * c)
        out[small] = total
    large = ~small
    if large.any():
        # g(c) = log(1 + a c) around c = lambda, u = 1 + a lambda; Poisson central moments lambda, lambda,
        # 3 lambda^2 + lambda.
        ll, al = lam[large], a[large]
        u = 1.0 + al * ll
        out[large] = (np.log(u) - al ** 2 * ll / (2 * u ** 2) + al ** 3 * ll / (3 * u ** 3)
                      - al ** 4 * (3 * ll ** 2 + ll) / (4 * u ** 4))
    return out


def library_shares(expression, library_size, scale: float = 1e4) -> np.ndarray:
    """Each gene's share of the library over the given spots: its total count over their total library size
    (counts from `counts_from_expression`). [N, G], [N] -> [G]."""
    counts = counts_from_expression(expression, library_size, scale)
    lib = np.asarray(library_size, np.float64).reshape(-1)
    if not lib.sum() > 0:
        raise ValueError("library_shares: the spots' library sizes sum to 0")
    return counts.sum(axis=0, dtype=np.float64) / lib.sum()


def sampling_depth_oracle(expression_train, library_train, log_depth_test, scale: float = 1e4) -> np.ndarray:
    """Sequencing depth through the measurement: each gene's library share on the training spots, and each
    test spot's expected log-normalised value at its depth (`sampling_expectation`) -> [N_test, G]. Given the
    true depths, the strongest predictor that knows nothing about any gene but its training share."""
    return sampling_expectation(log_depth_test, library_shares(expression_train, library_train, scale), scale)


# ------------------------------------------------------------------------------------------ block permutation


def grid_blocks(array_x, array_y, sections, block: int = 4) -> np.ndarray:
    """Block id (0..B-1) per spot: squares of `block` x `block` array-grid cells, separately in each section.

    Coordinates are the integer array grid (Visium array_col/array_row; on the Visium hexagonal grid array_col
    steps by 2 within a row, so a block of 4 spans 4 rows x 2 spots). Ids are ordered by (section, x, y)."""
    ax = np.asarray(array_x).reshape(-1)
    ay = np.asarray(array_y).reshape(-1)
    sec = np.asarray(sections).reshape(-1)
    if not (ax.shape == ay.shape == sec.shape):
        raise ValueError(f"array_x, array_y, sections disagree in length: {ax.shape}, {ay.shape}, {sec.shape}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    _, sec_id = np.unique(sec, return_inverse=True)
    bx = np.floor_divide(np.round(ax).astype(np.int64), block)
    by = np.floor_divide(np.round(ay).astype(np.int64), block)
    _, ids = np.unique(np.stack([sec_id.reshape(-1), bx, by], axis=1), axis=0, return_inverse=True)
    return ids.reshape(-1).astype(np.int64)


def _standardised_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns centred and scaled to unit norm, so r = column-wise dot product; flags constant columns."""
    a = a - a.mean(axis=0)
    norm = np.linalg.norm(a, axis=0)
    constant = norm <= 1e-12 * np.maximum(1.0, np.abs(a).max(axis=0, initial=0.0))
    return a / np.where(constant, 1.0, norm), constant


def _size_classes(sizes: np.ndarray, min_blocks: int) -> list[np.ndarray]:
    """Blocks (indices) grouped by size: runs of equal size in ascending order, a run shorter than
    `min_blocks` merged with the next (the last with the previous), so every class has blocks to swap with."""
    order = np.argsort(sizes, kind="stable")
    classes: list[list[int]] = []
    current: list[int] = []
    for i, b in enumerate(order):
        current.append(int(b))
        last = i == len(order) - 1
        if last or (sizes[order[i + 1]] != sizes[b] and len(current) >= min_blocks):
            classes.append(current)
            current = []
    if len(classes) > 1 and len(classes[-1]) < min_blocks:
        classes[-2].extend(classes.pop())
    return [np.asarray(c, np.int64) for c in classes]


PERMUTATION_NULLS = ("monte_carlo", "normal")


def block_permutation_pvalues(y_true, y_pred, blocks, n_perm: int = 200, seed: int = 0,
                              min_class_blocks: int = 5, null: str = "monte_carlo", strata=None) -> np.ndarray:
    """One-sided p-values (H0: r <= 0) of each gene's per-gene r under a spatial block permutation null.

    Method. Spots are grouped in spatial blocks (`grid_blocks`). Each permutation moves the prediction block by
    block: blocks are sorted by size into classes of (nearly) equal size (`_size_classes`: equal sizes, small
    classes merged with the next size up, so that edge blocks are not left unmovable), the blocks of each class
    are put in a random order, and the concatenated spots of the shuffled blocks are laid, in order, onto the
    concatenated spots of the blocks in their original order. This is a permutation of spots that carries each
    block's predictions (in the order the spots are given) onto another block of the same size, so the
    prediction's smoothness within blocks is kept while its relation to the truth is broken; where sizes in a
    class differ, a block's predictions straddle two neighbouring target blocks. The same spot permutation is
    used for every gene, so between-gene correlation is preserved as well.

    Strata (`strata`, one label per spot, e.g. the section; every block must lie in one stratum): blocks move
    only within their own stratum, size classes being formed in each. Sections differ in their per-gene mean
    (batch effects in the counts, stain in the prediction), and a block moved onto another section carries its
    section's offset with it: with truth and prediction independent but both offset per section, a null that
    mixes sections makes the offsets' chance agreement look like signal (three 16 x 16 sections: a third of
    unrelated genes at p < 0.05). Within sections the offsets stay where they are under every permutation, so
    they add nothing to the null's spread that the observed r does not also carry. A stratum of one block keeps
    it in place.

    Validity. Under H0 the prediction's block layout is exchangeable with any other layout of blocks of equal
    size (within a stratum), so with equal-sized blocks p = (1 + #{r_perm >= r_obs}) / (n_perm + 1) is a valid
    Monte-Carlo permutation p-value (never below 1/(n_perm+1)); with mixed sizes it is approximate. It corrects for
    autocorrelation at scales up to the block size; blocks must be larger than the range over which expression
    is correlated, otherwise the remaining between-block correlation makes p-values too small again.

    Resolution (`null`). The Monte-Carlo p-value is never below 1/(n_perm+1), and Benjamini-Hochberg over G genes
    passes a gene at p only when about p * G / fdr genes reach p or less: with 200 permutations and 1,443 genes a
    gene passes only if ~145 others also sit at the floor. That is why the depth-adjusted test, where a handful of
    genes carry signal, needs more than the floor: null="normal" scores each gene's observed r against a normal
    with its own permutation null's mean and SD (p = 1 - Phi(z)), resolving small p-values from the same
    permutations. It is approximate in the far tail (the null of r over a few dozen blocks is close to normal,
    but not exactly), and reads the same smoothness-preserving null.

    Computation: with columns standardised to unit norm, r = sum_i zt_i zp_i, and a spot permutation leaves the
    norms unchanged, so each permutation costs one gather and one column-wise dot product over [N, G].
    NaN for genes whose truth or prediction is constant.
    """
    y_true, y_pred, blocks = _paired_with_labels(y_true, y_pred, blocks, "blocks")
    if n_perm < 1 or (null == "normal" and n_perm < 2):
        raise ValueError(f"n_perm must be >= 1 (>= 2 for the normal null), got {n_perm}")
    if null not in PERMUTATION_NULLS:
        raise ValueError(f"null must be one of {PERMUTATION_NULLS}, got {null!r}")
    zt, ct = _standardised_columns(y_true)
    zp, cp = _standardised_columns(y_pred)
    undefined = ct | cp
    r_obs = np.einsum("ng,ng->g", zt, zp)
    _, block_id = np.unique(blocks, return_inverse=True)
    block_id = block_id.reshape(-1)
    spots_of = np.split(np.argsort(block_id, kind="stable"), np.cumsum(np.bincount(block_id))[:-1])
    sizes = np.array([len(s) for s in spots_of])
    if strata is None:
        classes = _size_classes(sizes, max(2, int(min_class_blocks)))
    else:
        stratum_of_spot = np.unique(np.asarray(strata).reshape(-1), return_inverse=True)[1].reshape(-1)
        if stratum_of_spot.shape[0] != y_true.shape[0]:
            raise ValueError(f"strata has {stratum_of_spot.shape[0]} labels for {y_true.shape[0]} spots")
        stratum_of_block = np.array([stratum_of_spot[s[0]] for s in spots_of])
        if any(np.any(stratum_of_spot[s] != k) for s, k in zip(spots_of, stratum_of_block)):
            raise ValueError("a block spans two strata: blocks must lie within one stratum (grid_blocks per section)")
        classes = []
        for k in np.unique(stratum_of_block):
            members = np.flatnonzero(stratum_of_block == k)
            classes += [members[c] for c in _size_classes(sizes[members], max(2, int(min_class_blocks)))]
    targets = [np.concatenate([spots_of[b] for b in cls]) for cls in classes]
    rng = np.random.default_rng(seed)
    exceed = np.zeros(y_true.shape[1], np.int64)
    total, total_sq = np.zeros(y_true.shape[1]), np.zeros(y_true.shape[1])
    perm = np.arange(y_true.shape[0])
    # Ties (e.g. a permutation reproducing the observed r exactly) count against the gene, as they must.
    threshold = r_obs - 1e-12
    for _ in range(n_perm):
        for cls, target in zip(classes, targets):
            perm[target] = np.concatenate([spots_of[b] for b in cls[rng.permutation(len(cls))]])
        r_perm = np.einsum("ng,ng->g", zt, zp[perm])
        exceed += r_perm >= threshold
        total += r_perm
        total_sq += r_perm * r_perm
    p = (1.0 + exceed) / (n_perm + 1.0)
    if null == "normal":
        mean = total / n_perm
        sd = np.sqrt(np.maximum(total_sq - n_perm * mean * mean, 0.0) / (n_perm - 1))
        # A null without spread (every permutation gave the same r) has no normal to read: keep its Monte-Carlo p.
        spread = sd > 1e-12
        z = np.where(spread, (r_obs - mean) / np.where(spread, sd, 1.0), 0.0)
        p = np.where(spread, sps.norm.sf(z), p)
    return np.where(undefined, np.nan, p)


def n_significant_fdr(pvalues, fdr: float = 0.05) -> int:
    """Genes whose p-value survives Benjamini-Hochberg at `fdr` over the genes with a defined p-value."""
    q = stats.benjamini_hochberg(pvalues)
    return int(np.sum(np.isfinite(q) & (q <= fdr)))


# ------------------------------------------------------------------------------------------------- bootstrap


def _unit_sums(y_true: np.ndarray, y_pred: np.ndarray, unit_id: np.ndarray, n_units: int) -> np.ndarray:
    """Per-unit sufficient statistics of per-gene r: [n_units, 6, G] (n, St, Sp, Stt, Spp, Stp). Columns are
    centred on their overall means first, which keeps the pooled variance formula free of cancellation."""
    order = np.argsort(unit_id, kind="stable")
    t = (y_true - y_true.mean(axis=0))[order]
    p = (y_pred - y_pred.mean(axis=0))[order]
    counts = np.bincount(unit_id, minlength=n_units)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # every unit has >= 1 spot (ids come from unique)
    out = np.empty((n_units, 6, t.shape[1]))
    out[:, 0] = counts[:, None]
    for k, values in enumerate((t, p, t * t, p * p, t * p), start=1):
        out[:, k] = np.add.reduceat(values, starts, axis=0)
    return out


def _pooled_r(weights: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Per-gene r of the spots of the units repeated `weights` times: weights [B, U] -> r [B, G]."""
    u, _, g = sums.shape
    pooled = (weights @ sums.reshape(u, 6 * g)).reshape(-1, 6, g)
    n, st, sp, stt, spp, stp = np.moveaxis(pooled, 1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        vt = stt - st * st / n
        vp = spp - sp * sp / n
        cov = stp - st * sp / n
        # Constant within the resample (up to round-off relative to the values' magnitude): r undefined.
        bad = (vt <= 1e-12 * stt) | (vp <= 1e-12 * spp) | (n < 2)
        r = cov / np.sqrt(np.where(bad, 1.0, vt * vp))
    return np.where(bad, np.nan, np.clip(r, -1.0, 1.0))


def _resampled_mean_r(y_true: np.ndarray, preds: list[np.ndarray], unit_id: np.ndarray, n_units: int, n_boot: int,
                      seed: int) -> np.ndarray:
    """Mean over genes of per-gene r of each of `preds` on n_boot resamples of the units, every predictor on the
    same draws: [n_boot, len(preds)], NaN where a resample leaves no gene with a defined r."""
    sums = [_unit_sums(y_true, p, unit_id, n_units) for p in preds]
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, len(preds)))
    batch = 64
    for start in range(0, n_boot, batch):
        b = min(batch, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        weights = np.zeros((b, n_units))
        np.add.at(weights, (np.repeat(np.arange(b), n_units), draws.reshape(-1)), 1.0)
        for k, s in enumerate(sums):
            r = _pooled_r(weights, s)
            ok = np.isfinite(r)
            with np.errstate(invalid="ignore"):
                means[start:start + b, k] = np.where(ok.any(axis=1),
                                                     np.where(ok, r, 0.0).sum(axis=1) / ok.sum(axis=1), np.nan)
    return means


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _resampling_inputs(y_true, preds, units, level: float):
    """(y_true, preds) as [N, G] float64 of one shape, unit ids 0..U-1 per spot, and U; ValueError naming what
    does not fit."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    checked = [_paired_with_labels(y_true, p, units, "units") for p in preds]
    _, unit_id = np.unique(checked[0][2], return_inverse=True)
    unit_id = unit_id.reshape(-1)
    return checked[0][0], [c[1] for c in checked], unit_id, (int(unit_id.max()) + 1 if unit_id.size else 0)


def bootstrap_mean_gene_r(y_true, y_pred, units, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile-bootstrap confidence interval of the mean over genes of per-gene r, resampling units.

    Units (the caller's: sections when there are many, else spatial blocks; evaluation.bootstrap_units) are drawn
    with replacement, the drawn units'
    spots are pooled (a unit drawn twice counts twice), per-gene r is recomputed on the pooled spots and averaged
    over the genes with a defined r. Spots within a unit are correlated, units roughly independent, so the
    interval reflects the real sampling variability; with few units (< ~10) it is itself unreliable and too
    narrow. Each resample costs one [n_boot, U] x [U, 6 G] product of per-unit sums, not a pass over spots.

    Returns {"mean_r": point estimate on all spots, "low", "high", "level", "n_units", "n_boot"}; low/high are
    NaN with fewer than two units.
    """
    y_true, (y_pred,), unit_id, n_units = _resampling_inputs(y_true, [y_pred], units, level)
    point = metrics.nanmean_or_nan(metrics.pearson_per_gene(y_true, y_pred))
    out = {"mean_r": point, "low": float("nan"), "high": float("nan"), "level": float(level),
           "n_units": n_units, "n_boot": int(n_boot)}
    if n_units < 2 or n_boot < 1:
        return out
    means = _resampled_mean_r(y_true, [y_pred], unit_id, n_units, n_boot, seed)[:, 0]
    out["low"], out["high"] = _percentile_interval(means, level)
    return out


def bootstrap_gene_r_differences(y_true, pred, others: dict, units, n_boot: int = 200, seed: int = 0,
                                 level: float = 0.95) -> dict:
    """Paired percentile-bootstrap intervals of (mean per-gene r of pred) - (mean per-gene r of each of `others`
    {name: predictions}): all scored on the same resampled units in every draw, so what they share (which
    sections were drawn, how predictable those are) cancels and each interval is that of its gap alone. An
    interval that excludes 0 says the gap holds beyond the variation between units; with few units it is too
    narrow, as in bootstrap_mean_gene_r. One pass over the draws serves every comparison.

    Returns {name: {"difference", "low", "high", "level", "n_units", "n_boot"}}; low/high are NaN with fewer
    than two units.
    """
    names = list(others)
    y_true, preds, unit_id, n_units = _resampling_inputs(y_true, [pred] + [others[k] for k in names], units, level)
    point = [metrics.nanmean_or_nan(metrics.pearson_per_gene(y_true, p)) for p in preds]
    resampled = (_resampled_mean_r(y_true, preds, unit_id, n_units, n_boot, seed)
                 if n_units >= 2 and n_boot >= 1 and names else None)
    out = {}
    for k, name in enumerate(names, start=1):
        low, high = (float("nan"), float("nan")) if resampled is None else _percentile_interval(
            resampled[:, 0] - resampled[:, k], level)
        out[name] = {"difference": float(point[0] - point[k]), "low": low, "high": high, "level": float(level),
                     "n_units": n_units, "n_boot": int(n_boot)}
    return out


def bootstrap_gene_r_difference(y_true, pred_a, pred_b, units, n_boot: int = 200, seed: int = 0,
                                level: float = 0.95) -> dict:
    """bootstrap_gene_r_differences for one pair: the interval of (mean per-gene r of pred_a) - (that of
    pred_b)."""
    return bootstrap_gene_r_differences(y_true, pred_a, {"b": pred_b}, units, n_boot, seed, level)["b"]


# ---------------------------------------------------------------------------------------------- noise ceiling


def counts_from_expression(expression, library_size, scale: float = 1e4) -> np.ndarray:
    """Integer counts from log-normalised expression: round(expm1(e) * library / scale), the inverse of
    e = log1p(counts / library * scale). [N, G] x [N] -> int64 [N, G]."""
    e = _as_2d(expression, "expression")
    lib = np.asarray(library_size, np.float64).reshape(-1)
    if lib.shape[0] != e.shape[0]:
        raise ValueError(f"library_size has {lib.shape[0]} values for {e.shape[0]} spots")
    return np.maximum(np.rint(np.expm1(e) * (lib[:, None] / scale)), 0.0).astype(np.int64)


def noise_ceiling(counts, library_size, seed: int = 0, scale: float = 1e4) -> dict:
    """How well the section agrees with itself: split-half reliability of each gene under counting noise.

    Method. Each spot's molecules are split at random into two halves (binomial thinning, p = 1/2): each gene's
    count c into c1 ~ Binomial(c, 1/2) and c - c1; the rest of the spot's library (library_size minus the
    selected genes' counts, not stored per gene) is split the same way, so each half's library is the sum of its
    own molecules, lib1 = sum_g c1 + Binomial(rest, 1/2), lib2 = library - lib1, exactly as if the whole count
    vector had been thinned. Each half is normalised with its own library, log1p(c_half / lib_half * scale),
    and per-gene r is taken between the halves across spots (spots with an empty half-library are left out).

    For Poisson counts the two halves are independent measurements of the same tissue at half depth; their r
    is the half-depth reliability. Spearman-Brown, 2r / (1 + r) per gene, projects it to full depth: the
    expected r between two independent full-depth measurements of this tissue. A perfect predictor of the true
    expression could reach at most about sqrt(reliability) against the one noisy measurement we have
    ("ceiling_r_mean"). On a shallow section where a gene is mostly 0s and 1s, the ceiling is low, and a model's
    r should be read against it, not against 1. (Log normalisation makes these classical-test-theory
    projections approximate; in particular, when depth varies across spots, log1p of sparse counts follows depth
    in both halves alike, so even a gene of constant true rate gets a small positive split-half r. The sqrt of a
    noisy near-zero reliability is biased upward, so the ceiling is generous for barely detected genes.)

    The depth-adjusted reliability ("depth_adjusted_*") reads the same split the way the depth-adjusted metric
    reads a prediction: both halves residualised per gene on a cubic in the spot's log library size, then r. It
    is the ceiling for depth-adjusted per-gene r. On the shallow HER2ST section B4 the split-half r is 0.20 but
    its depth-adjusted part only 0.06: most of what the section agrees with itself on is depth.

    Returns {"split_half_r_per_gene" [G], "split_half_r_mean", "spearman_brown_r_per_gene" [G],
    "spearman_brown_r_mean", "ceiling_r_per_gene" [G], "ceiling_r_mean", "depth_adjusted_split_half_r_per_gene"
    [G], "depth_adjusted_split_half_r_mean", "depth_adjusted_ceiling_r_per_gene" [G],
    "depth_adjusted_ceiling_r_mean", "n_spots_used"}.
    """
    c = np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"counts must be [N, G], got shape {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(np.rint(c) != c):
        raise ValueError("counts must be non-negative integers")
    c = c.astype(np.int64)
    lib = np.asarray(library_size).reshape(-1)
    if lib.shape[0] != c.shape[0]:
        raise ValueError(f"library_size has {lib.shape[0]} values for {c.shape[0]} spots")
    lib = np.rint(lib).astype(np.int64)
    rest = lib - c.sum(axis=1)
    if np.any(rest < 0):
        raise ValueError("library_size is smaller than the sum of the given counts for some spots")
    rng = np.random.default_rng(seed)
    c1 = rng.binomial(c, 0.5)
    c2 = c - c1
    lib1 = c1.sum(axis=1) + rng.binomial(rest, 0.5)
    lib2 = lib - lib1
    used = (lib1 > 0) & (lib2 > 0)
    e1 = np.log1p(c1[used] / lib1[used, None] * scale)
    e2 = np.log1p(c2[used] / lib2[used, None] * scale)
    r = metrics.pearson_per_gene(e1, e2) if used.sum() >= 2 else np.full(c.shape[1], np.nan)
    sb, ceiling = _spearman_brown_ceiling(r)
    # The same split read by the depth-adjusted metric: each half residualised per gene on a cubic in log library
    # (the spot's full library, as metrics.depth_adjusted_pearson_per_gene does), so the depth both halves share
    # no longer counts as agreement.
    r_depth = metrics.depth_adjusted_pearson_per_gene(e1, e2, np.log(lib[used]))  # NaN with too few spots
    sb_depth, ceiling_depth = _spearman_brown_ceiling(r_depth)
    return {
        "split_half_r_per_gene": r,
        "split_half_r_mean": metrics.nanmean_or_nan(r),
        "spearman_brown_r_per_gene": sb,
        "spearman_brown_r_mean": metrics.nanmean_or_nan(sb),
        "ceiling_r_per_gene": ceiling,
        "ceiling_r_mean": metrics.nanmean_or_nan(ceiling),
        "depth_adjusted_split_half_r_per_gene": r_depth,
        "depth_adjusted_split_half_r_mean": metrics.nanmean_or_nan(r_depth),
        "depth_adjusted_ceiling_r_per_gene": ceiling_depth,
        "depth_adjusted_ceiling_r_mean": metrics.nanmean_or_nan(ceiling_depth),
        "n_spots_used": int(used.sum()),
    }


def _spearman_brown_ceiling(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per gene: split-half r projected to full depth (2r / (1 + r)) and its ceiling sqrt(clip(., 0, 1))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sb = np.where(r > -1.0, 2.0 * r / (1.0 + r), np.nan)
    return sb, np.where(np.isfinite(sb), np.sqrt(np.clip(sb, 0.0, 1.0)), np.nan)
