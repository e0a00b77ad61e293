"""Ablation of the training recipe on a real store: leave-one-patient-out once per variant, each element of the
standard recipe switched off in turn (dropout, which it lacks, added at 0.5), the paper's recipe, and the
standard recipe's settings (weight decay, learning rate, epochs, heads) each moved once. Prints a per-fold
table with each variant's inner-validation score (training patients only) and which variant that score prefers,
and writes ablation.json / ablation.csv under --root.

    python benchmarks/ablation.py --store=STORE --root=DIR [--variants=standard,paper,...] [--head_seeds=0,1,2]
        [-- --config.KEY=V ...]

Every variant runs `python -m histospace_jax.main --config=configs/loo.py` in DIR/<variant>. With --head_seeds
each variant runs once per head seed (train.head_seed: the heads' initialisation, batches, views and dropout; the
autoencoders and the inner-validation split stay), in DIR/<variant>/seed<S>: the table then gives the mean over
seeds and the spread of the inner-validation score between seeds, the noise a preference must exceed. The autoencoders
and the feature caches of the first variant are linked into the others (same settings, same weights: the
checkpoints resume as finished and the caches hit), so a variant costs its heads and its evaluation only;
a variant that changes the autoencoder's own settings (ae.*, e.g. ae_epochs_30) pretrains its own instead.
The random-encoder control is off here (it doubles the time); the other controls are computed in every run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np

from histospace_jax import checkpointing

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VARIANTS = {
    "standard": [],
    "no_standardise": ["--config.train.standardise_targets=off", "--config.model.output_init=lecun"],
    "centre_targets": ["--config.train.standardise_targets=centre"],
    "no_augment": ["--config.train.augment=none"],
    "one_head": ["--config.train.ensemble=1"],
    "no_inner_validation": ["--config.train.select_epoch=off"],
    "no_refit": ["--config.train.refit=off"],
    "dropout_0.5": ["--config.model.dropout_rate=0.5"],
    "paper": ["--config.recipe=paper"],
    # The standard recipe's settings, each moved once: the defaults stay where inner validation (training
    # patients only) puts them, never where the held-out patient does.
    "weight_decay_1": ["--config.train.weight_decay=1.0"],
    "learning_rate_1e-3": ["--config.train.learning_rate=1e-3"],
    "learning_rate_1e-4": ["--config.train.learning_rate=1e-4"],
    "epochs_10": ["--config.train.epochs=10"],
    "epochs_30": ["--config.train.epochs=30"],
    # The standard recipe before learning rate 3e-4 for 20 epochs was chosen.
    "learning_rate_1e-3_epochs_10": ["--config.train.learning_rate=1e-3", "--config.train.epochs=10"],
    "ensemble_10": ["--config.train.ensemble=10"],
    "context": ["--config.model.context=neighbours"],
    "no_smoothing": ["--config.model.smoothing=none"],
    "smoothing_fixed_0.5": ["--config.model.smoothing=neighbours", "--config.model.smoothing_weight=0.5"],
    "stain_jitter": ["--config.train.stain_jitter=0.2"],
    "huber_delta_1": ["--config.train.huber_delta=1.0"],
    "huber_delta_10": ["--config.train.huber_delta=10.0"],
    # Pretraining: each fold's autoencoder on its training patients' tiles for 30 epochs instead of 3 (the fold
    # holding out a one-section patient otherwise pretrains for ~20 steps).
    "ae_epochs_30": ["--config.ae.epochs=30"],
    # The paper's other two autoencoders (encoder blocks conv -> maxpool, and conv -> ReLU -> maxpool; the
    # standard is conv -> BN -> ReLU -> maxpool), each pretrained and used frozen as in the paper.
    "encoder_pool": ["--config.model.variant=pool"],
    "encoder_relu": ["--config.model.variant=relu"],
    # The heads' output on the counting model at the depth read from the image instead of the training mean.
    "output_base_counting": ["--config.model.output_base=counting"],
    # The heads' predictions alone, without the blend with the counting model that inner validation weighs.
    "no_counting_blend": ["--config.model.counting_blend=none"],
}
KEYS = ("per_gene_pearson", "depth_adjusted_per_gene_pearson", "per_spot_pearson", "mse", "failed")


def link_tree(src: str, dst: str) -> None:
    """Hard-links every file of src into dst (directories recreated), so runs share finished work."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            target = os.path.join(dst, rel, f)
            if not os.path.exists(target):
                os.link(os.path.join(root, f), target)


def borrows_autoencoders(name: str, extra: list[str]) -> bool:
    """Whether a variant may reuse the first variant's autoencoders and feature caches: not when it sets a key the
    autoencoder's checkpoints are signed with (checkpointing.AE_KEYS, e.g. model.variant) or any ae.* key: the
    checkpoints would not match and resume would refuse them."""
    keys = [a[len("--config."):].split("=", 1)[0] for a in VARIANTS[name] + list(extra) if a.startswith("--config.")]
    return not any(k.startswith("ae.") or k in checkpointing.AE_KEYS for k in keys)


def run_variant(name: str, store: str, workdir: str, extra: list[str], seed_from: str | None) -> dict:
    if seed_from and borrows_autoencoders(name, extra):
        for part in ("cache",) + tuple(f"checkpoints/{d}" for d in os.listdir(os.path.join(seed_from, "checkpoints"))
                                         if d.startswith("ae")):
            if os.path.exists(os.path.join(seed_from, part)):
                link_tree(os.path.join(seed_from, part), os.path.join(workdir, part))
    cmd = [sys.executable, "-m", "histospace_jax.main", "--config=configs/loo.py", f"--workdir={workdir}",
           f"--config.data.store={store}", "--config.loo.random_encoder_control=off", *VARIANTS[name], *extra]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"variant {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    return {"variant": name, "seconds": round(time.time() - t0, 1), "folds": {
        f["held_out"]: {**{k: f.get(k) for k in KEYS}, "mean_profile_mse": f["baseline"]["mse"],
                        **{f"{c}_per_gene_pearson": f["controls"][c]["per_gene_pearson"] for c in f["controls"]}}
        for f in res["folds"]}, "summary": {k: res["summary"].get(k) for k in KEYS if k != "failed"},
        "inner_validation": res.get("training", {}).get("inner_validation_score", {})}


def average_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per variant from its runs under several head seeds: every number the mean over the seeds, and per
    fold the inner-validation MSE's standard deviation between seeds (`mse_sd_units_seed_sd`; 0 for one seed)."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        folds = {fold: {k: (float(np.mean([r["folds"][fold][k] for r in runs]))
                            if not isinstance(runs[0]["folds"][fold][k], (bool, type(None)))
                            else any(r["folds"][fold][k] for r in runs))
                        for k in runs[0]["folds"][fold]}
                 for fold in runs[0]["folds"]}
        inner = {}
        for fold in runs[0]["inner_validation"]:
            scores = [r["inner_validation"][fold] for r in runs if fold in r["inner_validation"]]
            inner[fold] = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]
                           if isinstance(scores[0][k], (int, float))}
            inner[fold]["mse_sd_units_seed_sd"] = float(np.std([s["mse_sd_units"] for s in scores], ddof=1)
                                                        if len(scores) > 1 else 0.0)
        # Each seed's mean over the folds (runs scored in every fold), and its spread between seeds.
        per_seed = [np.mean([r["inner_validation"][f]["mse_sd_units"] for f in inner]) for r in runs
                    if inner and set(r["inner_validation"]) >= set(inner)]
        out.append({"variant": variant, "head_seeds": [r.get("head_seed") for r in runs],
                    "seconds": float(np.mean([r["seconds"] for r in runs])), "folds": folds,
                    "summary": runs[0].get("summary", {}) if len(runs) == 1 else {},
                    "inner_validation": inner,
                    "inner_validation_over_folds": ({"mse_sd_units": float(np.mean(per_seed)),
                                                     "mse_sd_units_seed_sd": float(np.std(per_seed, ddof=1))
                                                     if len(per_seed) > 1 else 0.0} if per_seed else None)})
    return out


def margin_over_standard(rows: list[dict], variant: str | None) -> dict | None:
    """How far `variant` is below the standard recipe in inner-validation MSE over folds (rows from
    average_over_seeds), against the larger of the two seed spreads: a margin under twice that spread is called
    noise, and such a preference changes no default."""
    by_name = {r["variant"]: r.get("inner_validation_over_folds") for r in rows}
    if not variant or variant == "standard" or not by_name.get(variant) or not by_name.get("standard"):
        return None
    a, b = by_name[variant], by_name["standard"]
    margin = b["mse_sd_units"] - a["mse_sd_units"]
    sd = max(a["mse_sd_units_seed_sd"], b["mse_sd_units_seed_sd"])
    return {"variant": variant, "margin": float(margin), "seed_sd": float(sd),
            "verdict": ("beyond twice the seed spread" if margin > 2 * sd else "within twice the seed spread: noise")}


def preferred_by_inner_validation(rows: list[dict]) -> dict:
    """Per fold, the variant with the lowest inner-validation MSE (training patients only) among those that
    have one (select_epoch=off variants train on every training spot and have none); under "(all folds)", the
    lowest mean over folds among the variants scored in every fold."""
    best = {}
    for r in rows:
        for fold, score in r["inner_validation"].items():
            if fold not in best or score["mse_sd_units"] < best[fold][1]:
                best[fold] = (r["variant"], score["mse_sd_units"])
    out = {fold: v for fold, (v, _) in best.items()}
    complete = [r for r in rows if best and set(r["inner_validation"]) == set(best)]
    if complete:
        out["(all folds)"] = min(complete, key=lambda r: np.mean([s["mse_sd_units"]
                                                                for s in r["inner_validation"].values()]))["variant"]
    return out


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reuse", default="", help="a finished LOO workdir of the same store and settings whose "
                                               "autoencoders and feature caches every variant starts from")
    p.add_argument("--head_seeds", default="", help="comma-separated train.head_seed values: each variant runs "
                                                    "once per seed (default: once, at the config's seed)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    os.makedirs(args.root, exist_ok=True)
    seeds = [int(s) for s in args.head_seeds.split(",") if s] or [None]
    runs, first = [], (os.path.abspath(args.reuse) if args.reuse else None)
    for name, seed in itertools.product(names, seeds):
        workdir = os.path.join(os.path.abspath(args.root), name, *([f"seed{seed}"] if seed is not None else []))
        label = name if seed is None else f"{name} seed {seed}"
        print(f"[ablation] {label} ...", flush=True)
        r = run_variant(name, args.store, workdir,
                        extra + ([f"--config.train.head_seed={seed}"] if seed is not None else []), first)
        r["head_seed"] = seed
        first = first or workdir
        runs.append(r)
        for fold, m in r["folds"].items():
            inner = r["inner_validation"].get(fold)
            inner_text = (f"inner-val MSE {inner['mse_sd_units']:.4f} "
                          f"(mean {inner['mean_profile_mse_sd_units']:.4f}) r {inner['per_gene_pearson']:.4f}"
                          if inner else "no inner validation")
            print(f"[ablation] {label:20s} {fold}: {inner_text} | held out: per-gene r {m['per_gene_pearson']:.4f}  "
                  f"depth-adjusted {m['depth_adjusted_per_gene_pearson']:.4f}  per-spot r "
                  f"{m['per_spot_pearson']:.4f}  MSE {m['mse']:.4f} (mean profile {m['mean_profile_mse']:.4f})"
                  f"{'  FAILED' if m['failed'] else ''}  [{r['seconds']} s]", flush=True)
    rows = average_over_seeds(runs)
    if len(seeds) > 1:
        for r in rows:
            for fold, m in r["folds"].items():
                inner = r["inner_validation"].get(fold)
                inner_text = (f"inner-val MSE {inner['mse_sd_units']:.4f} +- {inner['mse_sd_units_seed_sd']:.4f} "
                              "(SD over seeds)" if inner else "no inner validation")
                print(f"[ablation] mean of {len(seeds)} seeds {r['variant']:20s} {fold}: {inner_text} | held out: "
                      f"per-gene r {m['per_gene_pearson']:.4f}  depth-adjusted "
                      f"{m['depth_adjusted_per_gene_pearson']:.4f}  MSE {m['mse']:.4f}", flush=True)
        for r in rows:
            o = r["inner_validation_over_folds"]
            if o:
                print(f"[ablation] mean of {len(seeds)} seeds {r['variant']:20s} over folds: inner-val MSE "
                      f"{o['mse_sd_units']:.4f} +- {o['mse_sd_units_seed_sd']:.4f} (SD over seeds)", flush=True)
    preferred = preferred_by_inner_validation(rows)
    for fold, variant in preferred.items():
        where = "over all folds" if fold == "(all folds)" else f"holding out {fold}"
        print(f"[ablation] {where}: inner validation prefers {variant}", flush=True)
    verdict = margin_over_standard(rows, preferred.get("(all folds)"))
    if verdict and len(seeds) > 1:
        print(f"[ablation] {verdict['variant']} against standard over all folds: inner-val MSE lower by "
              f"{verdict['margin']:.4f}; seed SD {verdict['seed_sd']:.4f}: {verdict['verdict']}", flush=True)
    with open(os.path.join(args.root, "ablation.json"), "w") as f:
        json.dump({"variants": rows, "runs": runs, "preferred_by_inner_validation": preferred,
                   "preferred_against_standard": verdict}, f, indent=1)
    with open(os.path.join(args.root, "ablation.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "head_seed", "held_out", "inner_val_mse_sd_units", "inner_val_per_gene_pearson", *KEYS,
                    "linear_probe_r", "trivial_image_r", "depth_oracle_r", "image_depth_r"])
        for r in runs:
            for fold, m in r["folds"].items():
                inner = r["inner_validation"].get(fold, {})
                w.writerow([r["variant"], r["head_seed"], fold, inner.get("mse_sd_units"),
                            inner.get("per_gene_pearson"),
                            *(m[k] for k in KEYS), m.get("linear_probe_per_gene_pearson"),
                            m.get("trivial_image_per_gene_pearson"), m.get("depth_oracle_per_gene_pearson"),
                            m.get("image_depth_per_gene_pearson")])
    print(f"[ablation] wrote {os.path.join(args.root, 'ablation.json')} and ablation.csv", flush=True)


if __name__ == "__main__":
    main()
