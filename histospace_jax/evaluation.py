"""Held-out metrics of every fold with its controls, and the summary over folds. Pure functions of arrays."""

from __future__ import annotations

import numpy as np

from histospace_jax import metrics

SUMMARY_KEYS = ("per_gene_pearson", "per_gene_pearson_median", "n_genes_significant", "per_spot_pearson", "mse")


def fold_results(plan, preds: dict, untrained: dict, expression: np.ndarray, extra_controls: dict | None = None,
                 fdr: float = 0.05) -> list[dict]:
    """Per fold of `plan`: the model's metrics and every control's (mean-profile predictor, untrained head, and
    each of `extra_controls` {name: {fold: predictions}}), each with the FDR significance count."""
    out = []
    for f in range(len(plan.folds)):
        rows, train_rows = plan.held_out_rows(f), plan.training_rows(f)
        truth = expression[rows]
        model = metrics.full_regression_metrics(truth, preds[f], fdr)
        baseline = metrics.full_regression_metrics(
            truth, metrics.mean_profile_prediction(expression[train_rows], len(rows)), fdr)
        controls = {"mean_predictor": baseline,
                    "untrained_head": metrics.full_regression_metrics(truth, untrained[f], fdr)}
        control_r = {}
        for name, ctrl in (extra_controls or {}).items():
            controls[name] = metrics.full_regression_metrics(truth, ctrl[f], fdr)
            control_r[name] = metrics.pearson_per_gene(truth, ctrl[f])
        out.append({"held_out": plan.name(f), "n_spots": int(len(rows)), **model,
                    "baseline": {"per_spot_pearson": baseline["per_spot_pearson"], "mse": baseline["mse"]},
                    "controls": controls,
                    "per_gene_r": metrics.pearson_per_gene(truth, preds[f]),
                    "per_gene_r_controls": control_r})
    return out


def summarise(folds: list[dict]) -> dict:
    """Means over folds (each held-out patient weighs the same)."""
    def mean(get):
        return metrics.nanmean_or_nan([get(f) for f in folds])

    summary = {k: mean(lambda f, k=k: f[k]) for k in SUMMARY_KEYS}
    summary["baseline_per_spot_pearson"] = mean(lambda f: f["baseline"]["per_spot_pearson"])
    summary["baseline_mse"] = mean(lambda f: f["baseline"]["mse"])
    summary["controls"] = {name: {k: mean(lambda f, k=k, name=name: f["controls"][name].get(k, float("nan")))
                                  for k in SUMMARY_KEYS}
                           for name in folds[0]["controls"]}
    return summary


def top_genes(genes, r, best: bool, k: int = 10) -> list:
    """The k genes with the highest (or lowest) defined r, as [gene, r] pairs."""
    r = np.asarray(r, np.float64)
    ok = np.flatnonzero(np.isfinite(r))
    order = ok[np.argsort(-r[ok] if best else r[ok], kind="stable")][:k]
    return [[genes[i], float(r[i])] for i in order]
