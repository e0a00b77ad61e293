"""Statistics for evaluation (float64): Pearson p-values, FDR, clustering and agreement, on top of SciPy.

* `pearson_pvalues(r, n)`: p-value of H0: rho = 0 from t = r sqrt((n-2)/(1-r^2)) (Student's t, n - 2 df),
  one-sided (rho > 0, default) or two-sided.
* `benjamini_hochberg(p)`: BH step-up adjusted p-values (q-values); `n_significant_positive(r, n)` counts genes
  with r > 0 whose one-sided p survives BH at the given FDR.
* `contingency_table`, `adjusted_rand_index` (Hubert & Arabie 1985), `kmeans` (k-means++ starts, fixed seed),
  `best_agreement` (matches clusters to classes to count agreeing spots, as the paper's "258 of 295").
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, special
from scipy import stats as sps
from scipy.cluster import vq
from scipy.stats import contingency

# ----------------------------------------------------------------------------------------------- significance


def pearson_pvalues(r, n: int, alternative: str = "greater") -> np.ndarray:
    """p-values of Pearson r over n pairs under H0: rho = 0 (t test with n - 2 df).

    alternative: "greater" (one-sided, rho > 0: 'the prediction ranks spots correctly'), or "two-sided".
    NaN r (undefined correlation) gives NaN p.
    """
    if n < 3:
        raise ValueError(f"a Pearson p-value needs at least 3 pairs, got n={n}")
    if alternative not in ("greater", "two-sided"):
        raise ValueError(f"alternative={alternative!r}: use 'greater' or 'two-sided'")
    r = np.clip(np.asarray(r, np.float64), -1.0, 1.0)
    df = n - 2
    # |r| = 1 divides by zero; the limit is an infinite t, whose tail probability is exactly 0 or 1.
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(np.abs(r) >= 1.0, np.sign(r) * np.inf, r * np.sqrt(df / (1.0 - r * r)))
    if alternative == "greater":
        return sps.t.sf(t, df)
    return np.minimum(1.0, 2.0 * sps.t.sf(np.abs(t), df))


def benjamini_hochberg(p) -> np.ndarray:
    """BH-adjusted p-values (q-values), same shape; NaN entries stay NaN and do not count as tests."""
    p = np.asarray(p, np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    # Undefined genes are not tests: counting them in m would make every other gene look less significant.
    if ok.any():
        q[ok] = sps.false_discovery_control(p[ok], method="bh")
    return q


def n_significant_positive(r, n: int, fdr: float = 0.05) -> int:
    """Genes with r > 0 whose one-sided p (rho > 0) is significant at `fdr` after BH over all defined genes."""
    r = np.asarray(r, np.float64)
    q = benjamini_hochberg(pearson_pvalues(r, n, "greater"))
    return int(np.sum((q <= fdr) & (r > 0)))


# ----------------------------------------------------------------------------------------------- clustering


def contingency_table(a, b) -> tuple[np.ndarray, list, list]:
    """Counts of (a == class_i, b == class_j): returns (table [len(A), len(B)], classes of a, classes of b),
    classes sorted."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"contingency_table: label arrays differ in shape {a.shape} vs {b.shape}")
    (ca, cb), table = contingency.crosstab(a.ravel(), b.ravel())
    return np.asarray(table, np.int64), ca.tolist(), cb.tolist()


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions, ~0 = chance)."""
    table, _, _ = contingency_table(a, b)
    n = table.sum()
    if n < 2:
        return float("nan")
    sum_ij = special.comb(table, 2).sum()
    sum_a = special.comb(table.sum(axis=1), 2).sum()
    sum_b = special.comb(table.sum(axis=0), 2).sum()
    expected = sum_a * sum_b / special.comb(n, 2)
    maximum = 0.5 * (sum_a + sum_b)
    if maximum == expected:  # both partitions trivial (one cluster each, or all singletons): ARI is 0/0
        return 1.0
    return float((sum_ij - expected) / (maximum - expected))


def best_agreement(truth, clusters) -> tuple[int, dict]:
    """Largest number of spots on which the clusters agree with the classes under a one-to-one matching of
    clusters to classes (k=2: the better of the two assignments). Returns (count, cluster -> class); a cluster
    left over when there are more clusters than classes is absent from the mapping."""
    table, classes, cl = contingency_table(truth, clusters)
    rows, cols = optimize.linear_sum_assignment(table, maximize=True)
    mapping = {cl[j]: classes[i] for i, j in zip(rows.tolist(), cols.tolist())}
    return int(table[rows, cols].sum()), mapping


def kmeans(x, k: int = 2, *, seed: int = 0, n_init: int = 10, max_iter: int = 100
           ) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means (SciPy's kmeans2, k-means++ starts); the lowest-inertia of `n_init` starts drawn from one
    seeded generator, so a seed always gives the same answer and one unlucky start cannot decide it.

    Returns (labels [N], centres [k, D], inertia). Labels are renumbered so cluster 0 is the one containing the
    first row, which makes results independent of the start that won.
    """
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} rows, got {n}")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        # Rows with too few distinct values (e.g. a constant prediction) leave a cluster empty or make the
        # k-means++ weights 0/0; that start then simply has no lower inertia than the others, so stay quiet.
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", UserWarning)
            # `seed=` (renamed `rng=` in SciPy 1.15, still accepted) keeps SciPy 1.11-1.14 working.
            centres, _ = vq.kmeans2(x, k, iter=max_iter, minit="++", missing="warn", seed=rng)
        # kmeans2's labels belong to the centres before its last update; assign against the final centres.
        labels, dist = vq.vq(x, centres)
        inertia = float(np.sum(dist * dist))
        if best is None or inertia < best[2] - 1e-12:
            best = (labels.astype(np.int64), centres, inertia)
    labels, centres, inertia = best
    order = list(dict.fromkeys(labels.tolist()))  # clusters in order of first appearance
    order += [j for j in range(k) if j not in order]
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return remap[labels], centres[order], inertia
