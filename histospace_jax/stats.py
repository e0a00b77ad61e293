"""Statistics in plain NumPy (float64): p-values, FDR, clustering and agreement. Pure functions of arrays.

* `betainc(a, b, x)`: regularized incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes
  6.4), with the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly.
* `t_sf(t, df)`: upper tail of Student's t, P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0.
* `pearson_pvalues(r, n)`: p-value of H0: rho = 0 from t = r sqrt((n-2)/(1-r^2)), one-sided (rho > 0, default)
  or two-sided.
* `benjamini_hochberg(p)`: BH step-up adjusted p-values (q-values); `n_significant_positive(r, n)` counts genes
  with r > 0 whose one-sided p survives BH at the given FDR.
* `contingency_table`, `adjusted_rand_index` (Hubert & Arabie 1985), `kmeans` (k-means++ seeding, fixed seed),
  `best_agreement` (matches clusters to classes to count agreeing spots, as the paper's "258 of 295").
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-15
_TINY = 1e-300


# ----------------------------------------------------------------------------------------------- distributions


def _betacf(a: float, b: float, x: float, max_iter: int = 500) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = _TINY if abs(d) < _TINY else d
    d = 1.0 / d
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = _TINY if abs(d) < _TINY else d
        c = 1.0 + aa / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = _TINY if abs(d) < _TINY else d
        c = 1.0 + aa / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return h


def _betainc_scalar(a: float, b: float, x: float) -> float:
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if math.isnan(x):
        return float("nan")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def betainc(a, b, x) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b), elementwise (broadcasting)."""
    a, b, x = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(x, np.float64))
    out = np.empty(x.shape, np.float64)
    for i in np.ndindex(x.shape):
        out[i] = _betainc_scalar(float(a[i]), float(b[i]), float(x[i]))
    return out


def t_sf(t, df) -> np.ndarray:
    """P(T > t) for Student's t with `df` degrees of freedom, elementwise."""
    t, df = np.broadcast_arrays(np.asarray(t, np.float64), np.asarray(df, np.float64))
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2.0, 0.5, np.where(np.isinf(t), 0.0, x))  # P(|T| > |t|) / 2
    out = np.where(t >= 0, tail, 1.0 - tail)
    return np.where(np.isnan(t), np.nan, out)


def pearson_pvalues(r, n: int, alternative: str = "greater") -> np.ndarray:
    """p-values of Pearson r over n pairs under H0: rho = 0 (t test with n - 2 df).

    alternative: "greater" (one-sided, rho > 0: 'the prediction ranks spots correctly'), or "two-sided".
    NaN r (undefined correlation) gives NaN p.
    """
    if n < 3:
        raise ValueError(f"a Pearson p-value needs at least 3 pairs, got n={n}")
    r = np.clip(np.asarray(r, np.float64), -1.0, 1.0)
    df = n - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / np.maximum(1.0 - r * r, 0.0))
    t = np.where(np.abs(r) >= 1.0, np.sign(r) * np.inf, t)
    if alternative == "greater":
        p = t_sf(t, df)
    elif alternative == "two-sided":
        p = np.minimum(1.0, 2.0 * t_sf(np.abs(t), df))
    else:
        raise ValueError(f"alternative={alternative!r}: use 'greater' or 'two-sided'")
    return np.where(np.isnan(r), np.nan, p)


def benjamini_hochberg(p) -> np.ndarray:
    """BH-adjusted p-values (q-values), same shape; NaN entries stay NaN and do not count as tests."""
    p = np.asarray(p, np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]  # step-up: q_i = min_{j >= i} p_j m / j
    q[order] = np.minimum(ranked, 1.0)
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
    ca, ia = np.unique(a, return_inverse=True)
    cb, ib = np.unique(b, return_inverse=True)
    table = np.zeros((len(ca), len(cb)), np.int64)
    np.add.at(table, (ia.ravel(), ib.ravel()), 1)
    return table, ca.tolist(), cb.tolist()


def _comb2(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x * (x - 1.0) / 2.0


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions, ~0 = chance)."""
    table, _, _ = contingency_table(a, b)
    n = table.sum()
    if n < 2:
        return float("nan")
    sum_ij = _comb2(table).sum()
    sum_a = _comb2(table.sum(axis=1)).sum()
    sum_b = _comb2(table.sum(axis=0)).sum()
    total = _comb2(n)
    expected = sum_a * sum_b / total
    maximum = 0.5 * (sum_a + sum_b)
    if maximum == expected:  # both partitions trivial (one cluster each, or all singletons)
        return 1.0
    return float((sum_ij - expected) / (maximum - expected))


def best_agreement(truth, clusters) -> tuple[int, dict]:
    """Largest number of spots on which the clusters agree with the classes under a one-to-one matching of
    clusters to classes (k=2: the better of the two assignments). Returns (count, cluster -> class)."""
    import itertools

    table, classes, cl = contingency_table(truth, clusters)
    best, best_map = -1, {}
    k = len(cl)
    for perm in itertools.permutations(range(max(len(classes), k)), k):
        score = sum(table[perm[j], j] for j in range(k) if perm[j] < len(classes))
        if score > best:
            best = int(score)
            best_map = {cl[j]: classes[perm[j]] for j in range(k) if perm[j] < len(classes)}
    return best, best_map


def kmeans(x, k: int = 2, *, seed: int = 0, n_init: int = 10, max_iter: int = 300, tol: float = 1e-8
           ) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding; the best of `n_init` seeded starts (deterministic for a seed).

    Returns (labels [N], centres [k, D], inertia). Labels are renumbered so cluster 0 is the one containing the
    first row, which makes results independent of the start that won.
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} rows, got {n}")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        centres = _kmeanspp(x, k, rng)
        labels = np.zeros(n, np.int64)
        for _it in range(max_iter):
            d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
            labels = d.argmin(1)
            new = np.array([x[labels == j].mean(0) if np.any(labels == j) else centres[j] for j in range(k)])
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= tol:
                break
        d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        labels = d.argmin(1)
        inertia = float(d[np.arange(n), labels].sum())
        if best is None or inertia < best[2] - 1e-12:
            best = (labels, centres, inertia)
    labels, centres, inertia = best
    order = list(dict.fromkeys(labels.tolist()))  # clusters in order of first appearance
    order += [j for j in range(k) if j not in order]
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return remap[labels], centres[order], inertia


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=d2 / total))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.array(centres)
