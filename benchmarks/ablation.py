"""Ablation of the training recipe on a real store: leave-one-patient-out once per variant, each element of the
standard recipe switched off in turn, plus the paper's recipe. Prints a per-fold table and writes
ablation.json / ablation.csv under --root.

    python benchmarks/ablation.py --store=STORE --root=DIR [--variants=standard,paper,...] [-- --config.KEY=V ...]

Every variant runs `python -m histospace_jax.main --config=configs/loo.py` in DIR/<variant>. The autoencoders
and the feature caches of the first variant are linked into the others (same settings, same weights: the
checkpoints resume as finished and the caches hit), so a variant costs its heads and its evaluation only.
The random-encoder control is off here (it doubles the time); the other controls are computed in every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VARIANTS = {
    "standard": [],
    "no_standardise": ["--config.train.standardise_targets=off", "--config.model.output_init=lecun"],
    "no_augment": ["--config.train.augment=none"],
    "one_head": ["--config.train.ensemble=1"],
    "no_inner_validation": ["--config.train.select_epoch=off"],
    "paper": ["--config.recipe=paper"],
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


def run_variant(name: str, store: str, workdir: str, extra: list[str], seed_from: str | None) -> dict:
    if seed_from:
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
        for f in res["folds"]}, "summary": {k: res["summary"].get(k) for k in KEYS if k != "failed"}}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reuse", default="", help="a finished LOO workdir of the same store and settings whose "
                                               "autoencoders and feature caches every variant starts from")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    os.makedirs(args.root, exist_ok=True)
    rows, first = [], (os.path.abspath(args.reuse) if args.reuse else None)
    for name in names:
        workdir = os.path.join(os.path.abspath(args.root), name)
        print(f"[ablation] {name} ...", flush=True)
        r = run_variant(name, args.store, workdir, extra, first)
        first = first or workdir
        rows.append(r)
        for fold, m in r["folds"].items():
            print(f"[ablation] {name:20s} {fold}: per-gene r {m['per_gene_pearson']:.4f}  depth-adjusted "
                  f"{m['depth_adjusted_per_gene_pearson']:.4f}  per-spot r {m['per_spot_pearson']:.4f}  "
                  f"MSE {m['mse']:.4f} (mean profile {m['mean_profile_mse']:.4f})"
                  f"{'  FAILED' if m['failed'] else ''}  [{r['seconds']} s]", flush=True)
    with open(os.path.join(args.root, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.root, "ablation.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "held_out", *KEYS, "linear_probe_r", "trivial_image_r", "depth_oracle_r",
                    "image_depth_r"])
        for r in rows:
            for fold, m in r["folds"].items():
                w.writerow([r["variant"], fold, *(m[k] for k in KEYS), m.get("linear_probe_per_gene_pearson"),
                            m.get("trivial_image_per_gene_pearson"), m.get("depth_oracle_per_gene_pearson"),
                            m.get("image_depth_per_gene_pearson")])
    print(f"[ablation] wrote {os.path.join(args.root, 'ablation.json')} and ablation.csv", flush=True)


if __name__ == "__main__":
    main()
