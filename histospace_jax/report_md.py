"""report.md: what a run did, on which data, how well, against which controls, with its figures.

`write_report(workdir, results)` is called at the end of every mode.
"""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np

from histospace_jax import atomic, console

CONTROL_NOTES = {
    "mean_predictor": "training spots' mean profile for every spot (ignores the image; per-gene r undefined)",
    "untrained_head": "the regression head at initialisation (no training)",
    "random_encoder": "the same head trained on a randomly initialised, untrained encoder (what pretraining buys)",
    "trivial_image": "ridge regression on colour and H/E/D statistics of each tile (does the model use more than "
                     "colour?)",
    "linear_probe": "ridge on the top 256 principal components of the frozen features the heads see, pooled 4x4 "
                    "plus global mean and std (is the trained head better than a linear model on its own inputs?)",
    "depth_oracle": "per gene, a line in the spot's log library size fitted on the training patients (how much of "
                    "per-gene r is sequencing depth?)",
    "image_depth": "the depth oracle's lines at the log library size a ridge reads from the frozen features (has "
                   "the model learnt more than how deep the image says the spot is?)",
    "depth_oracle_sampling": "the spot's library size through the counting model: each gene at its training "
                             "share of the library, the log-normalised value Poisson counting gives at that depth "
                             "(depth without lines fitted to the training patients' tissue)",
    "image_depth_sampling": "the counting model at the log library size a ridge reads from the frozen features "
                            "(a rank-one predictor: how deep the image says the spot is, and nothing about genes)",
    "model_unsmoothed": "the model's own predictions before the neighbour smoothing (model.smoothing; what the "
                        "smoothing adds). Not a control: the model and every image-based control are smoothed alike",
}


def smoothing_lines(smooth: dict | None) -> list[str]:
    """report.md's account of the neighbour smoothing of predictions (results.json training.smoothing)."""
    if not smooth:
        return []
    lines = [f"- neighbour smoothing of predictions: {smooth['what']}; applied to {', '.join(smooth['applied_to'])} "
             "(`model_unsmoothed`: the model without it)"]
    for name, c in smooth.get("sets", {}).items():
        scores = c.get("inner_validation_mse")
        tried = (" (inner-validation MSE " + ", ".join(f"w {w}: {v:.4f}" for w, v in scores.items()) + ")"
                 if scores else "")
        lines.append(f"  - {name}: self_weight {c['self_weight']:g}, by {c['chosen_by']}{tried}; radius "
                     f"{c['radius']:g} spacings, median {c['neighbours_median']:g} neighbours")
    if smooth.get("random_encoder_self_weight"):
        lines.append("  - the random-encoder control, on its own inner validation: self_weight " + ", ".join(
            f"{k} {v:g}" for k, v in smooth["random_encoder_self_weight"].items()))
    return lines


def counting_blend_lines(blend: dict | None) -> list[str]:
    """report.md's account of the blend with the counting model (results.json training.counting_blend, or the
    external test's and train's {"weight", ...} of one fold)."""
    if not blend:
        return []
    lines = [f"- blend with the counting model: {blend['what']}"]
    for name, c in blend.get("per_fold", {}).items():
        scores = c.get("inner_validation_mse")
        tried = (" (inner-validation MSE " + ", ".join(f"w {w}: {v:.4f}" for w, v in scores.items()) + ")"
                 if scores else f" ({c['chosen_by']})")
        gene_r = c.get("inner_validation_per_gene_r")
        if gene_r:
            tried += "; their per-gene r, not chosen on: " + ", ".join(f"w {w}: {_f(v)}" for w, v in gene_r.items())
        lines.append(f"  - {name}: weight {c['weight']:g}{tried}")
    if blend.get("random_encoder_weight"):
        lines.append("  - the random-encoder control, on its own inner validation: weight " + ", ".join(
            f"{k} {v:g}" for k, v in blend["random_encoder_weight"].items()))
    return lines


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0%}"


def _md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _metric_rows(label: str, block: dict, n_spots=None) -> list[list]:
    rows = console.metric_rows(label, block, n_spots)
    for r in rows:
        r[1] = "**model**" if r[1] == "model" else r[1]
    return rows


METRIC_HEADER = console.METRIC_HEADER


def _provenance(results: dict) -> list[str]:
    d = results.get("dataset", {})
    lines = ["## Data", ""]
    synthetic = d.get("synthetic")
    if synthetic:
        lines.append("> **SYNTHETIC DATA** (the built-in demo): these numbers say nothing about real tissue.")
        lines.append("")
    if results.get("evaluated_on") == "inner_validation":
        lines.append("> **Scored on inner validation** (loo.evaluate_on=inner_validation): each fold is scored on "
                     "spots of its training patients held out from its heads, not on its held-out patient.")
        lines.append("")
    if results.get("held_out_unit", {}).get("unit") == "section":
        lines.append("> **Leave-one-section-out** (loo.hold_out=section): each held-out section's patient has other "
                     "sections in training. These are within-patient figures; a new patient's slide gets "
                     "leave-one-patient-out's.")
        lines.append("")
    store = d.get("store")
    lines.append(f"- dataset: {d.get('name', '?')} ({'synthetic' if synthetic else 'real'})")
    if store:
        lines.append(f"- store: `{store}`")
        try:
            with open(os.path.join(store, "manifest.json")) as f:
                m = json.load(f)
            prov = m.get("provenance", {})
            if m.get("synthetic"):
                lines.append(f"- source: {m.get('note', 'synthetic generator')} ({prov.get('generator', '')})")
                lines.append(f"- tiles: {m.get('tile_size')} px, rendered directly (no colour-cast removal or "
                             "stain normalisation applied)")
            else:
                lines.append(f"- source: {m.get('source_format', '?')} from `{prov.get('input', '?')}` "
                             f"(prepared {prov.get('created', '?')})")
                stain = m.get("stain_normalisation", {})
                lines.append(f"- tiles: {m.get('tile_size')} px at {m.get('microns_per_pixel')} um/px; colour "
                             f"cast removal {m.get('colour_cast', {}).get('enabled', '?')}; stain "
                             f"normalisation {stain.get('method', '?')}")
            lines.append(f"- expression: {m.get('expression', {}).get('formula', m.get('expression'))}")
        except (OSError, json.JSONDecodeError):
            pass
    for k in ("n_spots", "n_genes", "patients"):
        if k in d:
            lines.append(f"- {k}: {d[k]}")
    return lines + [""]


def _config_section(results: dict) -> list[str]:
    c = results.get("config", {})
    keys = [("mode", c.get("mode")), ("model", c.get("model")), ("ae", c.get("ae")), ("train", c.get("train")),
            ("loo", c.get("loo"))]
    if c.get("mode") == "external":
        keys.append(("external", c.get("external")))
    lines = ["## Configuration", ""]
    for k, v in keys:
        lines.append(f"- `{k}`: `{json.dumps(v, default=str)}`")
    lines += ["", "<details><summary>full configuration</summary>", "", "```json",
              json.dumps(c, indent=1, default=str), "```", "", "</details>", ""]
    return lines


def _figures(workdir: str) -> list[str]:
    pngs = sorted(glob.glob(os.path.join(workdir, "**", "*.png"), recursive=True))
    pngs = [p for p in pngs if "/cache/" not in p and "/checkpoints/" not in p]
    if not pngs:
        return []
    lines = ["## Figures", ""]
    for p in pngs:
        rel = os.path.relpath(p, workdir)
        lines += [f"### {rel}", "", f"![{rel}]({rel})", ""]
    return lines


def _genes_section(genes, per_gene, k: int = 10) -> list[str]:
    """Top and bottom genes by r (mean over folds)."""
    stacked = np.stack([np.asarray(x, np.float64) for _, x in per_gene])
    # A gene constant in every fold has no r anywhere: it stays NaN (and is left out of the ranking).
    defined = np.isfinite(stacked).sum(0)
    r = np.where(defined > 0, np.nansum(stacked, axis=0) / np.maximum(defined, 1), np.nan)
    ok = np.flatnonzero(np.isfinite(r))
    order = ok[np.argsort(-r[ok], kind="stable")]
    folds = [name for name, _ in per_gene]
    header = ["gene", "mean r"] + ([f"r ({f})" for f in folds] if len(folds) > 1 else [])

    def rows(idx):
        return [[genes[i], float(r[i])] + ([float(x[i]) for _, x in per_gene] if len(folds) > 1 else [])
                for i in idx]

    return ["## Genes by per-gene r (mean over folds)", "", f"Top {k}:", "", _md_table(header, rows(order[:k])), "",
            f"Bottom {k}:", "", _md_table(header, rows(order[::-1][:k])), "", "All genes: `per_gene.csv`.", ""]


BEYOND_DEPTH_CONTROLS = ("trivial_image", "linear_probe", "random_encoder")


def _beyond_depth_section(beyond: dict | None) -> list[str]:
    """The genes whose depth-adjusted r passes the spatial test, per held-out patient, beside the controls and
    the references; a patient with none says so."""
    if not beyond:
        return []
    lines = ["## Genes predicted beyond sequencing depth", "",
             "Depth-adjusted r per gene, kept only where the block permutation of the depth residuals (4x4-spot "
             "blocks, Benjamini-Hochberg) passes; ranked by r. Beside it: the controls' depth-adjusted r for the "
             "same gene, the mean measured expression of its neighbouring spots (a reference that reads the "
             "held-out counts) and the noise ceiling. A gene whose r is above its noise ceiling (marked) agrees "
             "with the measurement more than the section's own counts agree with themselves: read it as chance, "
             "not signal. All genes: `per_gene.csv`.", ""]
    for name, b in beyond.items():
        by_control = ", ".join(f"{c} {n}" for c, n in b.get("controls_n_significant", {}).items())
        controls_line = ([f"The same test on each control's predictions passes: {by_control}.", ""] if by_control
                         else [])
        if not b["genes"]:
            lines += [f"Held out {name}: **no gene** passes at {b['fdr']:g} FDR: nothing this model predicts "
                      "about single genes beyond sequencing depth can be told from chance on this patient.", "",
                      *controls_line]
            continue
        shown = [c for c in BEYOND_DEPTH_CONTROLS if c in b["genes"][0]["controls_depth_adjusted_r"]]
        header = (["gene", "depth-adjusted r", "q"] + [f"{c} (depth-adjusted r)" for c in shown] +
                  ["neighbours' measurements", "noise ceiling"])
        rows = [[g["gene"], _f(g["depth_adjusted_r"], 3), _f(g["q"], 3)] +
                [_f(g["controls_depth_adjusted_r"][c], 3) for c in shown] +
                [_f(g["neighbour_reference_depth_adjusted_r"], 3),
                 _f(g["noise_ceiling_depth_adjusted_r"], 3)
                 + (" (**r above it**)" if g.get("above_noise_ceiling") else "")]
                for g in b["genes"]]
        n_above = b.get("n_above_noise_ceiling")
        above_line = ([f"{n_above} of the {b['n_significant']} score above their noise ceiling, beyond what the "
                       "section's counts support: at most "
                       f"{b['n_significant'] - n_above} gene(s) here can be signal.", ""] if n_above else [])
        lines += [f"Held out {name}: {b['n_significant']} gene(s) pass at {b['fdr']:g} FDR"
                  + (f"; the best {len(rows)}:" if b["n_significant"] > len(rows) else ":"), "",
                  _md_table(header, rows), "", *above_line, *controls_line]
    return lines


def _clustering_section(cl: dict | None) -> list[str]:
    if not cl:
        return []
    lines = ["## Pathology clustering (K-means, k=2, on predicted expression)", ""]
    if "skipped" in cl:
        return lines + [f"Not run: {cl['skipped']}.", ""]
    rows = []
    for s, e in cl.get("sections", {}).items():
        for src in ("predicted", "measured"):
            if src in e:
                rows.append([s, src, e["n_spots"], e["n_cancer"], f"{e[src]['agreement']} / {e['n_spots']}",
                             e[src]["adjusted_rand_index"], json.dumps(e[src]["contingency"]["table"])])
    lines.append(f"Cancer = labels in `{cl.get('cancer_labels')}`; agreement under the better matching of "
                 "clusters to classes (the paper: 258 of 295 spots). `measured` clusters the measured expression "
                 "(reference).")
    lines += ["", _md_table(["section", "clustered", "spots", "cancer", "agreement", "ARI",
                             "table [truth x cluster]"], rows), ""]
    return lines


def _model_section(info: dict | None) -> list[str]:
    if not info:
        return []
    lines = ["## Model", ""]
    for k, v in info.items():
        if k.endswith("_bytes"):
            v = f"{v:,} bytes ({v / 2 ** 20:.1f} MiB)"
        elif isinstance(v, int):
            v = f"{v:,}"
        lines.append(f"- {k}: {v}")
    return lines + [""]


def write_report(workdir: str, results: dict, *, per_gene=None, genes=None) -> str:
    mode = results.get("mode") or results.get("config", {}).get("mode", "?")
    lines = [f"# histospace_jax run: {mode}", "", f"Workdir `{workdir}`; elapsed {results.get('elapsed_s')} s. "
             "Numbers: `results.json`.", ""]
    lines += _provenance(results)
    if mode == "loo":
        lines += [f"## {console.protocol_title(results.get('held_out_unit'))}: model and controls", ""]
        summ = results["summary"]
        if summ.get("n_folds_failed"):
            lines += [f"> **{summ['n_folds_failed']} of {summ['n_folds']} folds FAILED** "
                      f"({', '.join(summ['failed_folds'])}): the model's mean over folds is undefined. A fold fails "
                      "when its predictions are constant for more than 5% of the genes or no gene has a defined r.",
                      ""]
        rows = []
        for f in results["folds"]:
            rows += _metric_rows(f"held out {f['held_out']}", f, f["n_spots"])
        rows += _metric_rows("mean over folds", results["summary"], sum(f["n_spots"] for f in results["folds"]))
        lines += [_md_table(METRIC_HEADER, rows), ""]
        lines += [f"- {k}: {v}" for k, v in CONTROL_NOTES.items()
                  if k in results["summary"].get("controls", {})]
        lines += [f"- {k}: {v}" for k, v in results.get("metric_notes", {}).items()
                  if k in ("per_gene_pearson", "n_genes_significant", "per_spot_pearson")] + [""]
        lines += _fold_details(results)
        if per_gene and genes:
            lines += _genes_section(genes, per_gene)
        lines += _beyond_depth_section(results.get("genes_beyond_depth"))
        lines += _clustering_section(results.get("clustering"))
        lines += _model_section(results.get("model"))
    elif mode == "external":
        e = results["external"]
        lines += ["## External test", "",
                  f"Trained on `{e['train']['store']}` patients {e['train']['patients']} ({e['train']['n_spots']} "
                  f"spots); tested on `{e['test']['store']}` patients {e['test']['patients']} "
                  f"({e['test']['n_spots']} spots); {e['n_shared_genes']} shared genes.", ""]
        if e["model"].get("failed"):
            lines += [f"> **The model FAILED on the test set**: {e['model']['failure']}. Its per-gene r is not a "
                      "result.", ""]
        for w in e.get("warnings", []):
            lines += [f"> {w}", ""]
        lines += [f"Overlap check: `{json.dumps(e['overlap'])}`", ""]
        lines += [_md_table(METRIC_HEADER, _metric_rows("test set", _ext_block(e), e["test"]["n_spots"])), ""]
        lines += _external_uncertainty_lines(e)
        lines += [f"- {k}: {v}" for k, v in CONTROL_NOTES.items() if k in e.get("controls", {})]
        base = e["train"].get("output_base") or {}
        if base.get("base") == "counting":
            lines.append("- output base: counting (the model is the counting model at the depth read from each test "
                         "tile, image_depth_sampling, plus the heads' output)")
        lines += counting_blend_lines(e.get("counting_blend"))
        if e.get("test_image_depth_r") is not None:
            lines.append(f"- the depth ridge, fitted on the training store's features, reads the test spots' log "
                         f"library size at r {e['test_image_depth_r']:.3f}")
        if e.get("noise_ceiling"):
            nc = e["noise_ceiling"]
            lines.append(f"- noise ceiling of the test set's counts (binomial split, as leave-one-patient-out "
                         f"reports per held-out patient): per-gene r {_f(nc.get('ceiling_r_mean'), 3)}, "
                         f"depth-adjusted {_f(nc.get('depth_adjusted_ceiling_r_mean'), 3)}")
        if e.get("neighbour_reference"):
            nb = e["neighbour_reference"]
            lines.append(f"- neighbours' measurements (each test spot against the mean measured expression of its "
                         f"adjacent spots; a reference, not a predictor): per-gene r "
                         f"{_f(nb.get('per_gene_pearson'), 3)}, depth-adjusted "
                         f"{_f(nb.get('depth_adjusted_per_gene_pearson'), 3)}")
        lines += smoothing_lines(e.get("smoothing")) + [""]
        lines += _depth_relation_lines({"test set": e["depth_relation"]} if e.get("depth_relation") else {})
        lines += _beyond_depth_section(e.get("genes_beyond_depth"))
        lines += ["## Genes by per-gene r", "", "Top 10:", "", _md_table(["gene", "r"], e["top_genes"]), "",
                  "Bottom 10:", "", _md_table(["gene", "r"], e["bottom_genes"]), "",
                  f"Mapped genes: {json.dumps(e['map_genes'])}", ""]
        lines += _clustering_section(e.get("clustering"))
        lines += _model_section(e.get("model_export", {}) and
                                {k: v for k, v in e["model_export"].items()
                                 if k in ("encoder_params", "head_params_per_member", "ensemble", "checkpoint_bytes", "tile_size",
                                          "microns_per_pixel")})
        lines += [f"Deployable model: `{os.path.join(workdir, 'model')}` "
                  f"(`python -m histospace_jax.predict --checkpoint={os.path.join(workdir, 'model')} ...`)", ""]
    elif mode == "train":
        t = results["train"]
        lines += ["## Trained model", "",
                  f"Trained on `{t['store']}` patients {t['patients']} ({t['n_spots']} spots, {t['n_genes']} genes, "
                  f"{t['epochs']} epochs). Nothing was held out, so this run measures no accuracy: "
                  "leave-one-patient-out (`configs/loo.py`) does.", ""]
        lines += _model_section({k: v for k, v in results["model_export"].items()
                                 if k in ("encoder_params", "head_params_per_member", "ensemble", "checkpoint_bytes", "tile_size",
                                          "microns_per_pixel")})
        lines += [f"Deployable model: `{os.path.join(workdir, 'model')}` "
                  f"(`python -m histospace_jax.predict --checkpoint={os.path.join(workdir, 'model')} ...`)", ""]
    elif mode == "ae_study":
        lines += ["## Autoencoder variants", "", ae_study_markdown(results), ""]
    elif mode == "pretrain_ae":
        a = results.get("autoencoder", {})
        lines += ["## Autoencoder", "", f"- variant {a.get('variant')}: final train MSE "
                  f"{_f(a.get('final_train_mse'), 5)}, validation MSE {_f(a.get('final_val_mse'), 5)}", ""]
    lines += _config_section(results)
    lines += _figures(workdir)
    path = os.path.join(workdir, "report.md")
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def _depth_relation_lines(relations: dict) -> list[str]:
    """results.json depth_relation: how genes follow sequencing depth in each held-out patient (or the external
    test set) and its training patients, and the model's r where that relation reverses."""
    if not relations:
        return []
    rows = []
    for name, d in relations.items():
        rising = d.get("share_genes_rising_with_depth", {})
        rows.append([name, f"{_f(d.get('held_out_median_library_size'), 0)} / "
                           f"{_f(d.get('training_median_library_size'), 0)}",
                     f"{_pct(rising.get('held_out'))} / {_pct(rising.get('training'))}",
                     f"{d.get('n_genes_reversed', '-')} of {d.get('n_genes_compared', '-')}",
                     _f(d.get("model_per_gene_pearson_reversed"), 3), _f(d.get("model_per_gene_pearson_rest"), 3)])
    min_r = next(iter(relations.values())).get("min_abs_r")
    return ["### How genes follow sequencing depth", "",
            _md_table(["held out", "median library size per spot: held out / training",
                       "genes rising with depth: held out / training",
                       f"genes whose relation to depth reverses (r at least {_f(min_r, 2)} from 0 on both sides, "
                       "opposite signs)",
                       "model's per-gene r on those genes", "on the other genes"], rows), "",
            "- Each gene's r with the spot's log library size, both centred within each section, in the held-out "
            "patient and in the fold's training patients (per gene: `per_gene.csv` held_out_depth_r, "
            "training_depth_r). Log-normalised expression is a curved function of depth: on a shallow section most "
            "counts are 0 or 1 and nearly every gene rises with depth, while on a deep one the genes of tissue with "
            "few transcripts per spot (often stroma) fall with it. The heads learn the training patients' relation, "
            "so where it reverses they predict the gene backwards: nothing in training patients of one depth "
            "regime shows the other's. A reference that reads the held-out counts, not a predictor.",
            *_training_patient_regime_lines(relations), ""]


def _training_patient_regime_lines(relations: dict, shown: int = 8) -> list[str]:
    """Per held-out patient with several training patients (results.json depth_relation.training_patients): which
    of them count in its regime, closest first (the first `shown` - 3 and the last 3 when there are more)."""
    lines = []
    for name, d in relations.items():
        patients = list((d.get("training_patients") or {}).items())
        if len(patients) < 2:
            continue
        cells = [f"{p} {_f(b['agreement_r'], 2)} ({_f(b['median_library_size'], 0)} UMIs, {b['n_genes_reversed']} "
                 "reversed)" for p, b in patients]
        if len(cells) > shown:
            cells = cells[:shown - 3] + [f"... {len(cells) - shown} more ..."] + cells[-3:]
        lines.append(f"- Held out {name}, its training patients by how alike their genes follow depth (r over genes "
                     "between the two patients' per-gene r with depth; median UMIs per spot, genes reversed): "
                     + ", ".join(cells))
    return lines


def _fold_details(results: dict) -> list[str]:
    """What a sceptical reader asks next, per held-out patient."""
    rows = []
    ceilings = results.get("noise_ceiling", {})
    neighbours = results.get("neighbour_reference", {})
    for f in results["folds"]:
        ci = f.get("per_gene_pearson_ci95") or [float("nan")] * 2
        sections = ", ".join(f"{s} {r:.3f}" for s, r in f.get("per_section_pearson", {}).items())
        rows.append([f["held_out"], f"[{_f(ci[0], 3)}, {_f(ci[1], 3)}] ({f.get('ci_units', '')})", sections,
                     f"{f.get('n_genes_significant_spatial', '-')} (t-test {f.get('n_genes_significant', '-')})",
                     _f(f.get("n_genes_significant_depth_adjusted_spatial")),
                     _f(ceilings.get(f["held_out"], {}).get("ceiling_r_mean"), 3),
                     _f(ceilings.get(f["held_out"], {}).get("depth_adjusted_ceiling_r_mean"), 3),
                     _f(neighbours.get(f["held_out"], {}).get("per_gene_pearson"), 3),
                     _f(neighbours.get(f["held_out"], {}).get("depth_adjusted_per_gene_pearson"), 3)])
    gaps = console.gap_rows(results)
    gap_lines = (["## Model against each control", "", GAP_NOTE, "", _md_table(console.GAP_HEADER, gaps), ""]
                 if gaps else [])
    gap_lines += _draw_bullets(console.random_draw_lines(results))
    lines = ["## Per held-out patient", "",
             _md_table(["held out", "per-gene r, 95% bootstrap interval", "per-section r",
                        "genes significant: spatial block permutation (independent-spots t-test)",
                        "genes significant beyond depth (block permutation of the depth residuals)",
                        "noise ceiling of per-gene r", "noise ceiling of depth-adjusted r",
                        "neighbours' measurements: per-gene r", "neighbours' measurements: depth-adjusted r"],
                       rows), "",
             "- Depth-adjusted r: truth and prediction residualised per gene on a cubic in the spot's log library "
             "size within the held-out patient, then per-gene r: gene-specific signal beyond sequencing depth (a "
             "cubic, because counting makes expression a curved function of depth that a line leaves behind).",
             "- Noise ceiling: the mean over genes of sqrt(split-half reliability, Spearman-Brown corrected) from a "
             "binomial split of each spot's counts: about the best per-gene r any predictor could reach against "
             "this noisy measurement. Its depth-adjusted twin residualises both halves on the cubic in log library "
             "size first: the ceiling for depth-adjusted r, low on shallow sections where depth is most of the "
             "agreement.",
             "- Neighbours' measurements (a reference, not a predictor: it reads the held-out counts): each spot "
             "scored against the mean measured expression of its adjacent spots. How much of the patient's "
             "expression, and of its gene-specific part beyond depth, neighbouring spots share; a tile that "
             "covers the neighbourhood is unlikely to tell more about a gene than the neighbours' own counts do.", ""]
    lines = gap_lines + lines + _depth_relation_lines(results.get("depth_relation") or {})
    t = results.get("training", {})
    if t:
        lines += ["## How the heads were trained", "", f"- recipe: `{t.get('recipe')}`"]
        loss = t.get("loss")
        if loss:
            lines.append(f"- loss: Huber, delta {loss['delta']:g} ({loss['units']})")
        base = t.get("output_base")
        if base:
            lines.append(f"- output base: {base['base']} ({base['what']})")
            for name, b in (base.get("per_fold") or {}).items():
                lines.append(f"  - holding out {name}: the depth ridge (alpha {b['depth_ridge_alpha']:g}) reads the "
                             f"held-out spots' log library size at r {b['held_out_depth_r']:.3f} (a diagnostic; "
                             "nothing is chosen on it)")
        if t.get("refit"):
            lines.append("- refit: after inner validation chose each head's epoch, the head was trained again from "
                         "the same initialisation on every training spot of its fold (inner-validation spots "
                         "included) and kept at that epoch; the inner-validation scores below are of the heads "
                         "before the refit")
        aug = t.get("augmentation")
        if aug:
            jitter = (f"; HED stain jitter {aug['stain_jitter']:g} on views 1-7 (view 0 is the tile itself)"
                      if aug.get("stain_jitter") else "")
            lines.append(f"- augmentation: {aug['views']} view(s) cached per spot, one sampled per example and all "
                         f"averaged at prediction{jitter}")
        ctx = t.get("context")
        if ctx:
            lines.append(f"- neighbourhood context: {ctx['input']}, within {ctx['radius_spacings']:g} spot spacings "
                         f"(median {ctx['neighbours_median']:g} neighbours, {ctx['n_without_neighbours']} spots "
                         "without one use their own)")
        lines += counting_blend_lines(t.get("counting_blend"))
        lines += smoothing_lines(t.get("smoothing"))
        for name, how in t.get("inner_validation", {}).items():
            lines.append(f"- holding out {name}: inner validation {how}; best epoch per head "
                         f"{t.get('best_epoch', {}).get(name)}")
            live = t.get("live_units", {}).get(name)
            if live is not None:
                lines.append(f"  - live hidden units of its heads: {live:.0%} (active on at least one spot; a "
                             "head whose units all die predicts one profile for every spot)")
            score = t.get("inner_validation_score", {}).get(name)
            if score:
                lines.append(f"  - on those spots: MSE {score['mse_sd_units']:.4f} training SDs² (training mean "
                             f"{score['mean_profile_mse_sd_units']:.4f}), per-gene r "
                             f"{score['per_gene_pearson']:.4f}: the score settings are compared on")
        for control, by_fold in t.get("control_ridge_alpha", {}).items():
            lines.append(f"- {control} ridge penalty (leave-one-group-out on training patients): {by_fold}")
        read = {k: round(v, 3) for k, v in (t.get("image_depth_read_r") or {}).items() if v is not None}
        if read:
            lines.append(f"- how well the frozen features tell sequencing depth: r between the log library size the "
                         f"image_depth ridge reads from the held-out tiles and the measured one, {read}")
        lines.append("")
    ae = results.get("autoencoder", {})
    if ae:
        lines += ["## What the autoencoder saw", ""]
        lines += [f"- {name}: {a.get('tiles_seen', a.get('loaded_from', '?'))}" for name, a in ae.items()
                  if isinstance(a, dict)]
        lines += [f"- gene selection: {results.get('gene_selection', 'not recorded')}", ""]
    return lines


def ae_study_markdown(results: dict) -> str:
    st = results["ae_study"]
    return (f"Image store `{st['image_store']}` ({st['n_tiles']} tiles, {st['n_val_tiles']} held out for "
            f"validation).\n\n" + _md_table(console.AE_HEADER, console.ae_rows(results)))


GAP_NOTE = ("The model's mean per-gene r minus the control's, with a 95% paired percentile-bootstrap interval: "
            "both scored on the same resampled units in each of 200 draws: sections where the held-out set has "
            "at least 10, else the 4x4-spot blocks of its grid. \"model above\" or \"model BELOW\" only when "
            "the interval excludes 0; with few units the interval is too narrow.")


def _external_uncertainty_lines(e: dict) -> list[str]:
    """The external test's bootstrap interval, per-section r, spatial significance and the model against each
    control with its paired interval: what leave-one-patient-out gives each held-out patient."""
    m = e["model"]
    lines = []
    if m.get("per_gene_pearson_ci95"):
        ci = m["per_gene_pearson_ci95"]
        sections = ", ".join(f"{s} {r:.3f}" for s, r in m.get("per_section_pearson", {}).items())
        lines += [f"- per-gene r {_f(m.get('per_gene_pearson'), 3)}, 95% bootstrap interval [{_f(ci[0], 3)}, "
                  f"{_f(ci[1], 3)}] over {m.get('ci_units', '')}; per section: {sections}",
                  f"- genes significant: {_f(m.get('n_genes_significant_spatial'))} by the spatial block "
                  f"permutation ({_f(m.get('n_genes_significant'))} by the independent-spots t-test), "
                  f"{_f(m.get('n_genes_significant_depth_adjusted_spatial'))} beyond depth", ""]
    gaps = console.held_out_gap_rows("test set", e.get("model_minus_control", {}))
    if gaps:
        lines += ["### Model against each control", "", GAP_NOTE, "", _md_table(console.GAP_HEADER, gaps), ""]
    return lines + _draw_bullets(console.random_draw_lines({"random_encoder_draws": e.get("random_encoder_draws")}))


def _draw_bullets(draws: list[str]) -> list[str]:
    """console.random_draw_lines as a markdown bullet with one sub-bullet per held-out set."""
    return ([f"- {draws[0]}:"] + [f"  - {line.strip()}" for line in draws[1:]] + [""]) if draws else []


def _ext_block(e: dict) -> dict:
    return {**e["model"], "controls": e["controls"]}
