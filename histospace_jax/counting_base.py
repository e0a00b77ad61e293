"""The counting model as the heads' starting point (model.output_base="counting").

A spot's log-normalised expression is, before anything about its tissue, a function of how deeply it was
sequenced: counting a gene that makes up a share p of a library of size L gives E[log1p(scale c / L)], c ~
Poisson(L p) (controls.sampling_expectation). On real patients that gene-blind curve, evaluated at the depth a
ridge reads from the frozen features, beat the trained heads (README, "The counting model alone beats the
heads"). With this base the heads no longer spend themselves learning depth: they learn what the counting model
leaves (targets: expression minus the counting model at each training spot's measured depth, with its own
patient's shares), and a prediction is the counting model at the depth read from the image plus the heads'
output. Pure NumPy, no I/O: `fit` on training rows, `predict` on any rows, `residual_targets` for the heads,
`scale_for` whether a run on a store uses the base.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from histospace_jax import config as config_lib
from histospace_jax import controls, evaluation, metrics
from histospace_jax.errors import ConfigError

PCA_COMPONENTS = 256  # as the linear probe: the base at held-out spots is the image_depth_sampling control


@dataclasses.dataclass(frozen=True)
class CountingBase:
    """Each gene's library `shares` [G] on the training rows, the counts-per `scale`, and the depth reader:
    pooled feature maps standardised with `feature_mean` / `feature_scale` [P], projected on `components`
    [k, P] around `pca_mean` [P], then log depth = scores @ `depth_coef` [k] + `depth_intercept` (ridge, penalty
    `alpha` chosen by leave-one-group-out on the training rows)."""

    scale: float
    shares: np.ndarray
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    pca_mean: np.ndarray
    components: np.ndarray
    depth_coef: np.ndarray
    depth_intercept: float
    alpha: float

    def arrays(self) -> dict:
        """Every field as an array (model_export writes them to an .npz; `from_arrays` reads them back)."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays) -> "CountingBase":
        kw = {f.name: np.asarray(arrays[f.name]) for f in dataclasses.fields(cls)}
        for name in ("scale", "depth_intercept", "alpha"):
            kw[name] = float(kw[name])
        return cls(**kw)


def pooled_rows(feature_maps, rows: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """controls.pooled_feature_maps of `feature_maps[rows]` ([N, h, w, C] in memory or a cache view that indexes
    like one), `chunk` rows at a time so the maps of every spot are never in memory together."""
    rows = np.asarray(rows)
    parts = [controls.pooled_feature_maps(np.asarray(feature_maps[rows[i:i + chunk]]))
             for i in range(0, len(rows), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def fit(pooled_train: np.ndarray, expression_train: np.ndarray, library_train: np.ndarray, groups: np.ndarray,
        scale: float) -> CountingBase:
    """The counting base of training rows: their genes' library shares (controls.library_shares) and a ridge
    from their pooled feature maps ([N, P], `pooled_rows`) to their log library size, on the linear probe's
    inputs (controls.fit_probe_projection: standardised, top PCA_COMPONENTS principal components)."""
    pooled_train = np.asarray(pooled_train, np.float64)
    library_train = np.asarray(library_train, np.float64).reshape(-1)
    if len(pooled_train) != len(library_train) or len(library_train) != len(expression_train):
        raise ValueError(f"counting_base.fit: {len(pooled_train)} feature rows, {len(expression_train)} expression "
                         f"rows and {len(library_train)} library sizes; they must be the same spots")
    projection = controls.fit_probe_projection(pooled_train, PCA_COMPONENTS)
    z = projection.scores(pooled_train)
    log_depth = np.log(np.maximum(library_train, 1.0)).reshape(-1, 1)
    alpha, _ = controls.choose_ridge_alpha(z, log_depth, groups, standardise=False)
    ridge = controls.ridge_fit(z, log_depth, alpha, standardise=False)
    return CountingBase(scale=float(scale), shares=controls.library_shares(expression_train, library_train, scale),
                        feature_mean=projection.mean, feature_scale=projection.scale,
                        pca_mean=projection.pca.mean, components=projection.pca.components,
                        depth_coef=np.asarray(ridge.coef, np.float64)[:, 0],
                        depth_intercept=float(np.asarray(ridge.intercept).reshape(-1)[0]), alpha=float(alpha))


def image_log_depth(base: CountingBase, pooled: np.ndarray) -> np.ndarray:
    """[N] log library sizes the base reads from pooled feature maps [N, P]."""
    z = ((np.asarray(pooled, np.float64) - base.feature_mean) / base.feature_scale - base.pca_mean) @ base.components.T
    return z @ base.depth_coef + base.depth_intercept


def predict(base: CountingBase, pooled: np.ndarray) -> np.ndarray:
    """[N, G] float64: the counting model at the depth the image shows, the value the heads' output is added to."""
    return controls.sampling_expectation(image_log_depth(base, pooled), base.shares, base.scale)


def residual_targets(expression: np.ndarray, library_size: np.ndarray, patients: np.ndarray, scale: float
                     ) -> np.ndarray:
    """What the heads learn under the base: each spot's expression minus the counting model at its measured
    depth with its own patient's library shares ([N, G] float32). Own-patient shares leave the heads the
    tissue's deviation from its patient's average make-up, which is what transfers between patients; the
    base at prediction brings the training patients' shares. A spot's residual never reads another patient's
    counts, so one matrix serves every fold (a held-out patient's rows are not trained on)."""
    expression = np.asarray(expression, np.float32)
    library = np.asarray(library_size, np.float64).reshape(-1)
    patients = np.asarray(patients)
    log_depth = np.log(np.maximum(library, 1.0))
    out = np.empty_like(expression)
    for p in np.unique(patients):
        rows = np.flatnonzero(patients == p)
        shares = controls.library_shares(expression[rows], library[rows], scale)
        out[rows] = expression[rows] - controls.sampling_expectation(log_depth[rows], shares, scale)
    return out


def scale_for(config, manifest: dict, obs: dict, where: str) -> float | None:
    """The counts-per scale the base works in for a run on store `where`, or None for no base
    (model.output_base "mean", or "auto" where the recipe or the store rules it out). Asked for explicitly on a
    store whose expression is not log1p counts per scale with library sizes, it is an error that says so."""
    choice = config.model.output_base
    if choice == "auto":
        choice = config_lib.RECIPES[config.recipe].output_base
        explicit = False
    else:
        explicit = True
    if choice != "counting":
        return None
    scale = evaluation.sampling_scale(manifest)
    if scale is not None and "library_size" in obs:
        return scale
    if explicit:
        raise ConfigError(f"model.output_base=counting needs a store of log1p counts per scale with each spot's "
                          f"library size (prepare's default for real data); {where} holds "
                          f"{manifest.get('expression', {}) or 'no counts (synthetic)'} "
                          f"{'with' if 'library_size' in obs else 'without'} library sizes. Use "
                          "--config.model.output_base=mean.")
    return None


def blend_weights(config, manifest: dict, obs: dict, where: str) -> tuple[float, ...] | None:
    """The candidate weights of the counting model in the final prediction (model.counting_blend), or None for
    no blend: "none", a counting base (which adds the counting model in full), or "auto" on a store without
    counts or under a recipe without the blend. Asked for explicitly where it cannot apply, it is an error that
    says why."""
    choice = config.model.get("counting_blend", "none")
    explicit = choice != "auto"
    if not explicit:
        choice = config_lib.RECIPES[config.recipe].counting_blend
    if choice == "none":
        return None
    if scale_for(config, manifest, obs, where) is not None:
        if explicit:
            raise ConfigError("model.counting_blend=validated blends the heads with the counting model, but "
                              "model.output_base=counting already adds it in full; use one: "
                              "--config.model.counting_blend=none or --config.model.output_base=mean.")
        return None
    if evaluation.sampling_scale(manifest) is None or "library_size" not in obs:
        if explicit:
            raise ConfigError(f"model.counting_blend=validated needs a store of log1p counts per scale with each "
                              f"spot's library size (prepare's default for real data); {where} holds "
                              f"{manifest.get('expression', {}) or 'no counts (synthetic)'} "
                              f"{'with' if 'library_size' in obs else 'without'} library sizes. Use "
                              "--config.model.counting_blend=none.")
        return None
    return tuple(float(w) for w in config.model.counting_blend_weights)


def blend(heads: np.ndarray, counting: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) x the heads' predictions + weight x the counting model's, both [N, G] in expression units."""
    return (1.0 - weight) * np.asarray(heads, np.float64) + weight * np.asarray(counting, np.float64)


def combine(heads: np.ndarray, counting: np.ndarray | None, weight: float | None) -> np.ndarray:
    """A final prediction from the heads' `heads` and the counting model's `counting` (same rows): the counting
    model added in full (`weight` None: output_base=counting, the heads learnt what it leaves) or blended at
    `weight` (model.counting_blend); `heads` itself without a counting model."""
    if counting is None:
        return heads
    if weight is None:
        return np.asarray(heads, np.float64) + np.asarray(counting, np.float64)
    return blend(heads, counting, weight)


def unvalidated_blend() -> dict:
    """choose_blend's record where there is no inner validation to choose on: the heads alone."""
    return {"weight": 0.0, "chosen_by": "no inner validation: the heads alone"}


def choose_blend(truth: np.ndarray, heads: np.ndarray, counting: np.ndarray, train_sd: np.ndarray,
                 weights) -> dict:
    """The blend weight of `weights` whose predictions of inner-validation spots (`heads`, `counting`, [N, G])
    have the lowest MSE against `truth` in the training rows' per-gene SDs² (ties go to the smaller weight):
    {"weight", "inner_validation_mse": {weight: MSE}, "inner_validation_per_gene_r": {weight: mean per-gene r, a
    record; nothing is chosen on it}, "n_spots"}."""
    truth = np.asarray(truth, np.float64)
    sd = np.asarray(train_sd, np.float64)
    scores, gene_r = {}, {}
    for w in sorted(set(float(w) for w in weights)):
        pred = blend(heads, counting, w)
        scores[w] = float(np.mean(((truth - pred) / sd) ** 2))
        gene_r[f"{w:g}"] = metrics.nanmean_or_nan(metrics.pearson_per_gene(truth, pred))
    best = min(scores, key=lambda w: (scores[w], w))
    return {"weight": best, "inner_validation_mse": {f"{w:g}": v for w, v in scores.items()},
            "inner_validation_per_gene_r": gene_r, "n_spots": len(truth)}
