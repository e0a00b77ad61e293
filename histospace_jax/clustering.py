"""K-means (k=2) on predicted expression against the pathologist's cancer / non-cancer regions: contingency
table, agreement count (as the paper's "258 of 295") and adjusted Rand index, with a labels-beside-clusters
figure per section."""

from __future__ import annotations

import os

import numpy as np

from histospace_jax import plots, stats


def is_cancer_label(labels, cancer_labels: str) -> tuple[np.ndarray, np.ndarray]:
    """(labelled mask, cancer mask) from free-text labels; `cancer_labels` is comma-separated, case-insensitive."""
    wanted = {s.strip().lower() for s in cancer_labels.split(",") if s.strip()}
    lab = np.array([str(v).strip().lower() for v in labels])
    labelled = (lab != "") & (lab != "undetermined") & (lab != "nan")
    return labelled, np.isin(lab, list(wanted)) & labelled


def pathology_clustering(workdir: str, obs: dict, rows: np.ndarray, pred: np.ndarray, *, truth=None,
                         cancer_labels: str, seed: int = 0, prefix: str = "clustering") -> dict:
    """Per labelled section among `rows`: K-means (k=2) on the predicted expression of its labelled spots vs
    cancer / non-cancer. `pred` (and `truth`, the same on measured expression, as a reference) are
    [len(rows), G]. Returns {'sections': {...}} or {'skipped': reason}."""
    if "label" not in obs:
        return {"skipped": "the store has no label column"}
    labelled, cancer = is_cancer_label(obs["label"][rows], cancer_labels)
    if not labelled.any():
        return {"skipped": "no spot carries a pathologist label (none of the evaluated sections is annotated)"}
    out = {"cancer_labels": cancer_labels, "seed": seed, "sections": {}}
    sections = obs["section"][rows]
    for s in dict.fromkeys(sections[labelled].tolist()):
        sel = np.flatnonzero((sections == s) & labelled)
        if len(sel) < 4:
            continue
        y = cancer[sel].astype(int)
        entry = {"n_spots": int(len(sel)), "n_cancer": int(y.sum())}
        for name, mat in (("predicted", pred), ("measured", truth)):
            if mat is None:
                continue
            clusters, _, _ = stats.kmeans(np.asarray(mat)[sel], 2, seed=seed)
            table, classes, cl = stats.contingency_table(y, clusters)
            agree, mapping = stats.best_agreement(y, clusters)
            entry[name] = {"contingency": {"rows (truth)": ["non-cancer", "cancer"][:len(classes)]
                                           if classes == [0, 1] else classes,
                                           "columns (cluster)": cl, "table": table.tolist()},
                           "agreement": agree, "agreement_fraction": agree / len(sel),
                           "adjusted_rand_index": stats.adjusted_rand_index(y, clusters)}
            if name == "predicted":
                # Show clusters coloured by the class each is matched to, so agreeing spots share a colour.
                shown = np.array([int(mapping.get(c, c)) for c in clusters])
                x, yy = plots.grid_xy(obs, rows[sel])
                fname = f"{prefix}_{_safe(s)}.png"
                plots.plot_clusters(os.path.join(workdir, "figures", fname), x, yy, y, shown,
                              f"{s}: agreement {agree}/{len(sel)}, ARI {entry[name]['adjusted_rand_index']:.3f}")
                entry["figure"] = f"figures/{fname}"
        out["sections"][s] = entry
    return out


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(s))
