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
    ([V, N, h, w, C] each), neighbours found within each section from obs pixel_x/pixel_y."""
    table = neighbour_table(obs["pixel_x"], obs["pixel_y"], obs["section"], radius)
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
    return neighbour_table(np.asarray(obs["pixel_x"])[rows], np.asarray(obs["pixel_y"])[rows],
                           np.asarray(obs["section"])[rows], radius)


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
