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
}


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


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
    r = np.nanmean(np.stack([np.asarray(x, np.float64) for _, x in per_gene]), axis=0) if len(per_gene) > 1 \
        else np.asarray(per_gene[0][1], np.float64)
    ok = np.flatnonzero(np.isfinite(r))
    order = ok[np.argsort(-r[ok], kind="stable")]
    folds = [name for name, _ in per_gene]
    header = ["gene", "mean r"] + ([f"r ({f})" for f in folds] if len(folds) > 1 else [])

    def rows(idx):
        return [[genes[i], float(r[i])] + ([float(x[i]) for _, x in per_gene] if len(folds) > 1 else [])
                for i in idx]

    return ["## Genes by per-gene r (mean over folds)", "", f"Top {k}:", "", _md_table(header, rows(order[:k])), "",
            f"Bottom {k}:", "", _md_table(header, rows(order[::-1][:k])), "", "All genes: `per_gene.csv`.", ""]


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
        lines += ["## Leave-one-patient-out: model and controls", ""]
        rows = []
        for f in results["folds"]:
            rows += _metric_rows(f"held out {f['held_out']}", f, f["n_spots"])
        rows += _metric_rows("mean over folds", results["summary"], sum(f["n_spots"] for f in results["folds"]))
        lines += [_md_table(METRIC_HEADER, rows), ""]
        lines += [f"- {k}: {v}" for k, v in CONTROL_NOTES.items()
                  if k in results["summary"].get("controls", {})]
        lines += [f"- {k}: {v}" for k, v in results.get("metric_notes", {}).items()
                  if k in ("per_gene_pearson", "n_genes_significant", "per_spot_pearson")] + [""]
        if per_gene and genes:
            lines += _genes_section(genes, per_gene)
        lines += _clustering_section(results.get("clustering"))
        lines += _model_section(results.get("model"))
    elif mode == "external":
        e = results["external"]
        lines += ["## External test", "",
                  f"Trained on `{e['train']['store']}` patients {e['train']['patients']} ({e['train']['n_spots']} "
                  f"spots); tested on `{e['test']['store']}` patients {e['test']['patients']} "
                  f"({e['test']['n_spots']} spots); {e['n_shared_genes']} shared genes.", ""]
        for w in e.get("warnings", []):
            lines += [f"> {w}", ""]
        lines += [f"Overlap check: `{json.dumps(e['overlap'])}`", ""]
        lines += [_md_table(METRIC_HEADER, _metric_rows("test set", _ext_block(e), e["test"]["n_spots"])), ""]
        lines += [f"- {k}: {v}" for k, v in CONTROL_NOTES.items() if k in e.get("controls", {})] + [""]
        lines += ["## Genes by per-gene r", "", "Top 10:", "", _md_table(["gene", "r"], e["top_genes"]), "",
                  "Bottom 10:", "", _md_table(["gene", "r"], e["bottom_genes"]), "",
                  f"Mapped genes: {json.dumps(e['map_genes'])}", ""]
        lines += _clustering_section(e.get("clustering"))
        lines += _model_section(e.get("model_export", {}) and
                                {k: v for k, v in e["model_export"].items()
                                 if k in ("encoder_params", "head_params", "checkpoint_bytes", "tile_size",
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
                                 if k in ("encoder_params", "head_params", "checkpoint_bytes", "tile_size",
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


def ae_study_markdown(results: dict) -> str:
    st = results["ae_study"]
    return (f"Image store `{st['image_store']}` ({st['n_tiles']} tiles, {st['n_val_tiles']} held out for "
            f"validation).\n\n" + _md_table(console.AE_HEADER, console.ae_rows(results)))


def _ext_block(e: dict) -> dict:
    return {**e["model"], "controls": e["controls"]}
