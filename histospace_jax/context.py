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


def neighbour_mean(pooled: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[..., N, C]: for each row, the mean of `pooled` over its neighbours in `table` ([N, K], -1 padded); rows
    with none take their own value."""
    valid = table >= 0
    count = valid.sum(1)
    gathered = np.take(pooled, np.where(valid, table, 0), axis=-2)  # [..., N, K, C]
    total = (gathered * valid[..., None]).sum(-2)
    own = count == 0
    out = total / np.maximum(count, 1)[:, None]
    out[..., own, :] = pooled[..., own, :]
    return out.astype(np.float32)


def store_context(features_per_encoder, obs: dict, radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """[E, V, N, C]: the neighbourhood context of every spot of a store under each encoder's features
    ([V, N, h, w, C] each), neighbours found within each section from obs pixel_x/pixel_y."""
    table = neighbour_table(obs["pixel_x"], obs["pixel_y"], obs["section"], radius)
    return np.stack([neighbour_mean(pooled_features(f), table) for f in features_per_encoder])


def smooth_predictions(pred: np.ndarray, table: np.ndarray, self_weight: float) -> np.ndarray:
    """[N, G]: each row's prediction weighted `self_weight`, plus (1 - self_weight) times the mean prediction of
    its neighbours in `table` ([N, K], -1 padded; a row without neighbours keeps its own). A tile's prediction
    carries noise its neighbours' do not share, while expression varies smoothly over a few spots, so the blend
    tracks the measured maps better (README: chosen on inner validation). Uses the neighbours' images only,
    never their measurements."""
    pred = np.asarray(pred)
    return blend_with_neighbours(pred, np.arange(len(pred)), table, self_weight)


def blend_with_neighbours(source: np.ndarray, rows: np.ndarray, table: np.ndarray, self_weight: float) -> np.ndarray:
    """smooth_predictions of the rows `rows` of `source` ([N, G]), whose neighbours `table` ([len(rows), K], -1
    padded) indexes into `source`: lets a caller smooth a slide a window of rows at a time."""
    own = np.asarray(source[rows], np.float64)
    if self_weight >= 1.0:
        return np.asarray(source[rows])
    total, count = np.zeros_like(own), np.zeros(len(rows), np.int64)
    for k in range(table.shape[1]):  # one neighbour slot at a time: memory of one [len(rows), G] block
        valid = table[:, k] >= 0
        total[valid] += source[table[valid, k]]
        count += valid
    mean = np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], own)
    return (self_weight * own + (1.0 - self_weight) * mean).astype(source.dtype)


def smooth_rows(pred: np.ndarray, obs: dict, rows: np.ndarray, radius: float, self_weight: float) -> np.ndarray:
    """smooth_predictions of the predictions of store rows `rows` ([len(rows), G]), neighbours found among those
    rows within each section (obs pixel_x, pixel_y, section)."""
    rows = np.asarray(rows)
    if not len(rows):
        return np.asarray(pred)
    table = neighbour_table(np.asarray(obs["pixel_x"])[rows], np.asarray(obs["pixel_y"])[rows],
                            np.asarray(obs["section"])[rows], radius)
    return smooth_predictions(pred, table, self_weight)


def describe(table: np.ndarray, radius: float) -> dict:
    """What results.json records about the neighbourhoods."""
    count = (table >= 0).sum(1)
    return {"input": "mean over the adjacent positions of their spatially average-pooled encoder features",
            "radius_spacings": float(radius), "neighbours_median": float(np.median(count)) if len(count) else 0.0,
            "neighbours_max": int(count.max()) if len(count) else 0, "n_without_neighbours": int((count == 0).sum())}
