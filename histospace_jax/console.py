"""What a run prints: progress lines (step, loss, throughput, ETA) and the result tables."""

from __future__ import annotations

import math
import time
from typing import Sequence

import jax

from histospace_jax import metrics


def log(msg: str) -> None:
    """Prints on process 0 only, so a multi-host job logs once."""
    if jax.process_index() == 0:
        print(msg, flush=True)


class Progress:
    """Step, loss, throughput and ETA lines for long loops."""

    def __init__(self, name: str, total_steps: int, items_per_step: int, start_step: int = 0, *,
                 counts: str = "step ", unit: str = "tiles"):
        self.name, self.total, self.items = name, total_steps, items_per_step
        self.start_step, self.t0 = start_step, time.time()
        self.counts, self.unit = counts, unit

    def line(self, step: int, **values) -> str:
        done = max(step - self.start_step, 1)
        elapsed = time.time() - self.t0
        rate = done * self.items / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / done
        vals = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return (f"[{self.name}] {self.counts}{step}/{self.total} {vals} {rate:.1f} {self.unit}/s "
                f"ETA {format_seconds(eta)}")


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    cells = [list(map(_cell, header))] + [list(map(_cell, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


# ------------------------------------------------------------------------------------------------ result rows
# Shared by the console tables below and report.md (report_md.py).

METRIC_HEADER = ["evaluated", "predictor", "spots", "per-gene r (mean)", "per-gene r (median)",
                 "depth-adjusted r", "genes R²>0", "genes r>0 sig. (FDR)", "per-spot r", "MSE"]
AE_HEADER = ["variant", "train MSE", "validation MSE", "paper MSE (ICIAR)", "encoder params", "AE params",
             "checkpoint bytes"]


def significance_cell(m: dict) -> str:
    sig = m.get("n_genes_significant")
    if sig is None:
        return "-"
    text = f"{sig:.1f}" if isinstance(sig, float) else str(sig)
    if m.get("n_genes_tested") is not None:
        text += f"/{m['n_genes_tested']}"
    return text


def predictor_label(name: str, m: dict) -> str:
    """The predictor's name, marked FAILED (with the folds) where it collapsed: never a silent number."""
    if m.get("failed"):
        return f"{name} FAILED"
    if m.get("n_folds_failed"):
        return f"{name} ({m['n_folds_failed']} FAILED)"
    return name


def metric_rows(label: str, block: dict, n_spots=None) -> list[list]:
    """One row for the model and one per control of a result block (a fold, the summary, an external test)."""
    rows = []
    for name, m in [("model", block)] + list(block.get("controls", {}).items()):
        share = m.get("share_genes_r2_positive", float("nan"))
        rows.append([label, predictor_label(name, m), "" if n_spots is None else n_spots,
                     m.get("per_gene_pearson", float("nan")), m.get("per_gene_pearson_median", float("nan")),
                     m.get("depth_adjusted_per_gene_pearson", float("nan")),
                     "-" if share != share else f"{share:.0%}", significance_cell(m),
                     m.get("per_spot_pearson", float("nan")), m.get("mse", float("nan"))])
    return rows


def ae_rows(results: dict) -> list[list]:
    return [[v, s.get("final_train_mse"), s.get("final_val_mse"), s.get("paper_mse_iciar"), s.get("encoder_params"),
             s.get("autoencoder_params"), s.get("checkpoint_bytes")]
            for v, s in results["ae_study"]["variants"].items()]


GAP_HEADER = ["held out", "model minus", "per-gene r gap", "95% paired bootstrap interval", "units", "reading"]


def gap_rows(results: dict) -> list[list]:
    """Per fold and control: the model's mean per-gene r minus the control's, its paired bootstrap interval and
    what the interval says (results.json folds[].model_minus_control)."""
    rows = []
    for f in results["folds"]:
        rows += held_out_gap_rows(f["held_out"], f.get("model_minus_control", {}))
    return rows


def held_out_gap_rows(label: str, gaps: dict) -> list[list]:
    """gap_rows of one held-out set (a fold, or the external test's `model_minus_control`)."""
    rows = []
    for name, g in gaps.items():
        low, high = (float("nan") if v is None else float(v) for v in g["ci95"])
        rows.append([label, name, g["per_gene_pearson"], f"[{_cell(low)}, {_cell(high)}]", g["ci_units"],
                     metrics.interval_reading(low, high)])
    return rows


def random_draw_lines(results: dict) -> list[str]:
    """One line per fold on the random-encoder control over its draws (results.json random_encoder_draws): the
    model's verdict against one untrained encoder is only as general as that one draw."""
    draws = results.get("random_encoder_draws")
    if not draws or not draws.get("folds"):
        return []
    n = len(draws["seeds"])
    lines = [f"Random-encoder control over {n} draw{'s' if n > 1 else ''} (untrained encoder seeds "
             f"{', '.join(str(s) for s in draws['seeds'])}; loo.random_encoder_draws sets how many)"]
    for fold, d in draws["folds"].items():
        spread = f" (mean {_cell(d['mean'])}, SD {_cell(d['sd'])})" if n > 1 else ""
        scores = ", ".join(_cell(r) + (" FAILED" if bad else "") for r, bad in zip(d["per_gene_pearson"], d["failed"]))
        lines.append(f"  {fold}: control per-gene r {scores}{spread}; "
                     f"model {_cell(d['model_per_gene_pearson'])}: above {d['n_model_above']} of {n}, BELOW "
                     f"{d['n_model_below']} of {n}, not resolved {n - d['n_model_above'] - d['n_model_below']}")
    if n == 1:
        lines.append("  one draw: a verdict against it may not hold for another untrained encoder")
    return lines


# ------------------------------------------------------------------------------------------------ tables


def protocol_title(held_out_unit: dict | None) -> str:
    """What a loo run held out per fold, as a title: results.json's `held_out_unit` (loo.hold_out)."""
    return "Leave-one-section-out" if (held_out_unit or {}).get("unit") == "section" else "Leave-one-patient-out"


def loo_table(results: dict) -> str:
    """Model and controls side by side: per fold and the mean over folds."""
    header = ["held out", "predictor", "spots", "gene r", "gene r med", "depth-adj r", "R²>0", "sig genes",
              "spot r", "MSE"]
    rows = []
    for f in results["folds"]:
        rows += metric_rows(f["held_out"], f, f["n_spots"])
    s = results["summary"]
    rows += metric_rows("MEAN", s, sum(f["n_spots"] for f in results["folds"]))
    title = f"{protocol_title(results.get('held_out_unit'))} on {results['dataset']['name']}"
    if results["dataset"].get("synthetic"):
        title += "  [SYNTHETIC DATA]"
    if s.get("n_folds_failed"):
        title += (f"\n{s['n_folds_failed']} of {s['n_folds']} folds FAILED ({', '.join(s['failed_folds'])}): the "
                  "model's mean over folds is undefined")
    return title + "\n" + format_table(rows, header) + held_out_extras(
        gap_rows(results), random_draw_lines(results), beyond_depth_line(results),
        depth_relation_line(results.get("depth_relation")))


def held_out_extras(gaps: list[list], draws: list[str], beyond: str, regimes: str) -> str:
    """What follows a metric table (leave-one-patient-out's or the external test's), each part where present: the
    model minus each control, the random-encoder draws, the genes beyond depth and the depth regimes."""
    parts = (["Model minus each control, per-gene r, with a paired bootstrap interval\n" + format_table(gaps, GAP_HEADER)]
             if gaps else [])
    parts += ["\n".join(draws)] if draws else []
    parts += [p for p in (beyond, regimes) if p]
    return "".join("\n\n" + p for p in parts)


def beyond_depth_line(results: dict) -> str:
    """How many genes each held-out patient's model predicts beyond sequencing depth (results.json
    genes_beyond_depth), with the best few: the mean depth-adjusted r over 1,000+ genes can be ~0 while a few
    genes carry real signal, or none."""
    beyond = results.get("genes_beyond_depth")
    if not beyond:
        return ""
    parts = []
    for fold, b in beyond.items():
        best = ", ".join(f"{g['gene']} {g['depth_adjusted_r']:.2f}" for g in b["genes"][:3])
        n_above = b.get("n_above_noise_ceiling")
        above = f", {n_above} of them above their noise ceiling" if n_above else ""
        parts.append(f"{fold} {b['n_significant']}" + (f" ({best}, ...{above})" if best else ""))
    fdr = next(iter(beyond.values()))["fdr"]
    return (f"Genes predicted beyond sequencing depth (depth-adjusted r, spatial block permutation, {fdr:g} FDR): "
            + "; ".join(parts) + ". report.md lists them beside the controls.")


def depth_relation_line(relations: dict | None) -> str:
    """Per held-out patient (results.json depth_relation): median library sizes and the genes that follow depth
    the other way in the training patients, with the model's r on them: why a gene can come out backwards."""
    if not relations:
        return ""
    parts = [f"{name} {d['held_out_median_library_size']:,.0f} UMIs/spot against "
             f"{d['training_median_library_size']:,.0f} in training, {d['n_genes_reversed']} genes reversed"
             + (f" (model r {d['model_per_gene_pearson_reversed']:.3f} on them, "
                f"{d['model_per_gene_pearson_rest']:.3f} on the rest)" if d["n_genes_reversed"] else "")
             for name, d in relations.items()]
    return ("Genes whose relation to sequencing depth reverses between the held-out and the training patients: "
            + "; ".join(parts) + ". report.md: How genes follow sequencing depth.")


def external_table(results: dict) -> str:
    e = results["external"]
    rows = [r[1:] for r in metric_rows("test", {**e["model"], "controls": e["controls"]}, e["test"]["n_spots"])]
    title = f"External test: {e['train']['patients']} -> {e['test']['patients']}"
    if e["train"].get("synthetic") or e["test"].get("synthetic"):
        title += "  [SYNTHETIC DATA]"
    if e["model"].get("failed"):
        title += f"\nThe model FAILED on the test set: {e['model']['failure']}"
    return title + "\n" + format_table(rows, METRIC_HEADER[1:]) + held_out_extras(
        held_out_gap_rows("test", e.get("model_minus_control", {})),
        random_draw_lines({"random_encoder_draws": e.get("random_encoder_draws")}),
        beyond_depth_line({"genes_beyond_depth": e.get("genes_beyond_depth")}),
        depth_relation_line({"test set": e["depth_relation"]} if e.get("depth_relation") else None))


def ae_study_table(results: dict) -> str:
    return "Autoencoder variants\n" + format_table(ae_rows(results), AE_HEADER)
