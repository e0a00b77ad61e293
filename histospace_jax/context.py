"""Neighbourhoods of spots: what the tiles around a spot look like, as an extra input of the regression head
(model.context), and the smoothing of finished predictions over the same neighbours (model.smoothing).

A spot's expression follows its tissue neighbourhood as well as its own tile (the tumour edge, immune
infiltrates, stroma around a duct). With model.context=neighbours the head also sees the mean, over the spot's
adjacent ring of positions, of their globally average-pooled encoder features (one C-vector per view). Adjacent
means within `radius` times the section's spot spacing (the median distance to the nearest spot): the 8
surrounding spots of an ST array, the 6 of a Visium hexagon, the 8 tiles around a position of a prediction grid.
A position with no neighbour takes its own pooled features, so isolated spots still get a context of the right
scale. Mean pooling commutes with flips and rotations, so the context of a dihedral view is the mean of the
neighbours' pooled features under that same view.

Pure NumPy (plus scipy's k-d tree): the head's model code only concatenates the vector.
"""

from __future__ import annotations

import numpy as np
from scipy import spatial

from histospace_jax.errors import BadInputError

DEFAULT_RADIUS = 1.5  # in spot spacings: the adjacent ring on square and hexagonal grids, not the next ring
# A section's array coordinates are used for its positions only when its spots sit on the affine grid they imply
# to within this fraction of the spacing (RMS); otherwise they are not a grid of these spots and pixels are used.
MAX_GRID_RESIDUAL = 0.25


def grid_positions(pixel_x, pixel_y, array_x=None, array_y=None, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Where to look for each spot's neighbours, in pixels: its place on its group's (section's) array grid,
    mapped to pixels by the least-squares affine fit of the pixel centres on the array coordinates, where the
    spots have array coordinates that fit (residual RMS under MAX_GRID_RESIDUAL of the spacing); the pixel
    centres themselves otherwise (no array coordinates, a group of fewer than 3 spots, or a bad fit).

    Why: printed ST spots sit off their grid places by ~7% of a spacing (HER2ST: 15-22 px of ~291), and the
    nearest-spot spacing of jittered centres is itself short, so a 1.5-spacing radius around the measured
    centres catches a diagonal neighbour (1.41 spacings) only about half the time: a median of 5 of an ST
    spot's 8 adjacent spots, all 8 for 3% of spots. On the fitted grid every adjacent spot is found, on square
    (ST) and hexagonal (Visium, array_col stepping by 2) arrays alike."""
    x = np.asarray(pixel_x, np.float64).reshape(-1)
    y = np.asarray(pixel_y, np.float64).reshape(-1)
    if array_x is None or array_y is None:
        return x, y
    ax = np.asarray(array_x, np.float64).reshape(-1)
    ay = np.asarray(array_y, np.float64).reshape(-1)
    groups = np.zeros(len(x), np.int64) if groups is None else np.asarray(groups).reshape(-1)
    gx, gy = x.copy(), y.copy()
    for g in dict.fromkeys(groups.tolist()):
        rows = np.flatnonzero(groups == g)
        if len(rows) < 3 or not (np.isfinite(ax[rows]).all() and np.isfinite(ay[rows]).all()):
            continue
        design = np.stack([ax[rows], ay[rows], np.ones(len(rows))], 1)
        if np.linalg.matrix_rank(design) < 3:
            continue
        measured = np.stack([x[rows], y[rows]], 1)
        coef, *_ = np.linalg.lstsq(design, measured, rcond=None)
        fitted = design @ coef
        dist, _ = spatial.cKDTree(fitted).query(fitted, k=2)
        spacing = float(np.median(dist[:, 1]))
        rms = float(np.sqrt(np.mean(np.sum((fitted - measured) ** 2, 1))))
        if spacing > 0 and rms <= MAX_GRID_RESIDUAL * spacing:
            gx[rows], gy[rows] = fitted[:, 0], fitted[:, 1]
    return gx, gy


def obs_positions(obs: dict, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """grid_positions of store rows `rows` (default all), grouped by section, from obs pixel_x/pixel_y and, where
    present, array_x/array_y."""
    take = (lambda a: np.asarray(a)) if rows is None else (lambda a: np.asarray(a)[np.asarray(rows)])
    array = ("array_x" in obs and "array_y" in obs)
    return grid_positions(take(obs["pixel_x"]), take(obs["pixel_y"]), take(obs["array_x"]) if array else None,
                          take(obs["array_y"]) if array else None,
                          take(obs["section"]) if "section" in obs else None)


def neighbour_table(x, y, groups=None, radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """[N, K] row indices of each position's neighbours (positions of its group within `radius` x the group's
    spacing, itself excluded), padded with -1. Groups (sections) never neighbour each other."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        bad = int(np.flatnonzero(~(np.isfinite(x) & np.isfinite(y)))[0])
        raise BadInputError(f"position {bad} has a non-finite coordinate ({x[bad]}, {y[bad]}); neighbourhood "
                            "context needs every spot's pixel_x/pixel_y")
    lists: list[list[int]] = [[] for _ in range(n)]
    for g in dict.fromkeys(groups.tolist()):
        rows = np.flatnonzero(groups == g)
        if len(rows) < 2:
            continue
        xy = np.stack([x[rows], y[rows]], 1)
        tree = spatial.cKDTree(xy)
        dist, _ = tree.query(xy, k=2)
        spacing = float(np.median(dist[:, 1]))
        if spacing <= 0:
            raise BadInputError(f"section {g}: more than half of its spots share their position with another spot; "
                                "neighbourhood context needs distinct spot positions (check pixel_x/pixel_y)")
        for i, near in zip(rows, tree.query_ball_point(xy, radius * spacing * (1 + 1e-9))):
            lists[i] = sorted(int(rows[j]) for j in near if rows[j] != i)
    k = max([len(v) for v in lists] + [1])
    table = np.full((n, k), -1, np.int64)
    for i, v in enumerate(lists):
        table[i, :len(v)] = v
    return table


def pooled_features(features, chunk: int = 1024) -> np.ndarray:
    """[V, N, C] float32: the mean over the spatial grid of features [V, N, h, w, C] (an array, or a
    features.FeatureStream read `chunk` rows at a time)."""
    v, n = features.shape[:2]
    out = np.empty((v, n, features.shape[-1]), np.float32)
    for view in range(v):
        source = features[view] if isinstance(features, np.ndarray) else features.view(view)
        for a in range(0, n, chunk):
            out[view, a:a + chunk] = np.asarray(source[a:a + chunk], np.float32).mean(axis=(1, 2))
    return out


def neighbour_mean(values: np.ndarray, table: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """[..., len(rows), C] in `values`' dtype: for each of `rows` (default: every row) the mean of `values`
    ([..., N, C]) over its neighbours in `table` ([len(rows), K] row indices into `values`, -1 padded); a row with
    none takes its own value. One neighbour slot at a time, so memory is one [..., len(rows), C] block, not K."""
    values = np.asarray(values)
    rows = np.arange(values.shape[-2]) if rows is None else np.asarray(rows)
    own = np.take(values, rows, axis=-2)
    total, count = np.zeros_like(own), np.zeros(len(rows), np.int64)
    for k in range(table.shape[1]):
        valid = table[:, k] >= 0
        total[..., valid, :] += np.take(values, table[valid, k], axis=-2)
        count += valid
    return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], own).astype(values.dtype)


def store_context(features_per_encoder, obs: dict, radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """[E, V, N, C]: the neighbourhood context of every spot of a store under each encoder's features
    ([V, N, h, w, C] each), neighbours found within each section at obs_positions."""
    table = neighbour_table(*obs_positions(obs), obs["section"], radius)
    return np.stack([neighbour_mean(pooled_features(f), table) for f in features_per_encoder])


def smooth_predictions(pred: np.ndarray, table: np.ndarray, self_weight: float,
                       rows: np.ndarray | None = None) -> np.ndarray:
    """[len(rows), G]: each of `rows` (default: every row) of `pred` ([N, G]) weighted `self_weight`, plus
    (1 - self_weight) times neighbour_mean over its neighbours in `table` ([len(rows), K], indices into `pred`, -1
    padded; a row without neighbours keeps its own), in float64, returned in `pred`'s dtype. `rows` lets a caller
    smooth a slide a window at a time. A tile's prediction carries noise its neighbours' do not share, while
    expression varies smoothly over a few spots, so the blend tracks the measured maps better (README: chosen on
    inner validation). Uses the neighbours' images only, never their measurements."""
    pred = np.asarray(pred)
    own = pred if rows is None else pred[rows]
    if self_weight >= 1.0:
        return own
    mean = neighbour_mean(pred.astype(np.float64), table, rows)
    return (self_weight * own.astype(np.float64) + (1.0 - self_weight) * mean).astype(pred.dtype)


def section_table(obs: dict, rows: np.ndarray, radius: float) -> np.ndarray:
    """neighbour_table of store rows `rows` (indices into `rows`), neighbours among them within each section."""
    rows = np.asarray(rows)
    return neighbour_table(*obs_positions(obs, rows), np.asarray(obs["section"])[rows], radius)


def smooth_rows(pred: np.ndarray, obs: dict, rows: np.ndarray, radius: float, self_weight: float) -> np.ndarray:
    """smooth_predictions of the predictions of store rows `rows` ([len(rows), G]), neighbours found among those
    rows within each section (obs pixel_x, pixel_y, section)."""
    if not len(rows):
        return np.asarray(pred)
    return smooth_predictions(pred, section_table(obs, rows, radius), self_weight)


def neighbour_counts(table: np.ndarray) -> dict:
    """How many neighbours the positions of `table` have: median, most, and how many have none."""
    count = (table >= 0).sum(1)
    return {"neighbours_median": float(np.median(count)) if len(count) else 0.0,
            "neighbours_max": int(count.max()) if len(count) else 0, "n_without_neighbours": int((count == 0).sum())}


def describe(table: np.ndarray, radius: float) -> dict:
    """What results.json records about the neighbourhoods."""
    return {"input": "mean over the adjacent positions of their spatially average-pooled encoder features",
            "radius_spacings": float(radius), **neighbour_counts(table)}
