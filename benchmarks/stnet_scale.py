"""Leave-one-patient-out at the scale of the paper's STNet data: time per epoch and peak memory.

Usage (from the repository root):
    python benchmarks/stnet_scale.py [--root DIR] [--steps 20] [--json]
        [--patients 23] [--sections 2] [--grid 26 25] [--genes 250] [-- --config.KEY=VALUE ...]

Builds (once, under --root) a synthetic store shaped like STNet as the paper used it: 23 patients, 2 sections
each of 26 x 25 spots (29,900 spots), 250 genes, 128 px tiles. Then runs the real job,
`python -m histospace_jax.main --config=configs/loo.py`, with the default ("standard") recipe of a real store:
10 epochs, 5 heads per fold, 8 dihedral views (23 folds x 5 heads = 115 heads in one program), one encoder
shared by all folds (pretrained for one epoch on the demo's separate image store, as a user would pretrain on
ICIAR), the random-encoder control off. The 8-view feature cache of 29,900 spots is ~31 GB in float32: the run
decides itself (train.features_in_memory=auto) whether it fits in memory or streams from the on-disk cache.

The job is stopped with SIGTERM (it saves a checkpoint and exits 75, as on a preemption) after --steps logged head
steps, since a whole epoch takes hours on a 2-core CPU. Reported:
  feature_cache_s         the encoder over every tile x 8 views (once per encoder; from its log lines)
  head_step_s             wall time per head step (every head of the first program, batch 32 each), between the
                          first and the last logged step after compilation
  steps_per_epoch         from the job's own step count (total steps / epochs)
  folds_per_program       folds per compiled program (loo.folds_per_program=0 picks it from memory; the programs
                          run one after another)
  epoch_s                 steps_per_epoch x head_step_s x folds / folds_per_program: the projected time of one
                          epoch of every fold's heads (the inner-validation pass at each epoch end not included)
  peak_rss_gib            peak resident memory of the job (ru_maxrss of the child), features and training included
  streamed                1 when the heads streamed their features from disk
  torch_epoch_s           the PyTorch protocol's projected epoch (with --torch): folds and heads one after the
                          other, the encoder recomputed on every batch: 115 x steps per fold-epoch x its measured
                          step time
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEP_LINE = re.compile(r"^\[loo main(?:_0)?\] step (\d+)/(\d+) ")  # the first program's steps
GROUPS_LINE = re.compile(r"^\[loo\] .* programs of up to (\d+) folds")


def build_store(root: str, patients: int, sections: int, grid: tuple[int, int], genes: int) -> tuple[str, str]:
    sys.path.insert(0, ROOT)
    from histospace_jax.data import demo

    spec = demo.DemoSpec(n_patients=patients, sections_per_patient=sections, grid=grid, n_genes=genes,
                         n_pretrain_patients=1, pretrain_grid=(16, 16), seed=0)
    return demo.build_demo(root, spec)


def run_job(store: str, pretrain: str, workdir: str, steps: int, extra: list[str], say) -> dict:
    cmd = [sys.executable, "-u", "-m", "histospace_jax.main", "--config=configs/loo.py", f"--workdir={workdir}",
           f"--config.data.store={store}", f"--config.ae.store={pretrain}", "--config.ae.epochs=1",
           "--config.loo.random_encoder_control=off", "--config.log_every_steps=5", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    features_start = features_end = None
    step_times: list[tuple[int, float]] = []
    total = None
    streamed = False
    folds_in_program = None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        say(line.rstrip())
        if line.startswith("[features]") and features_start is None:
            features_start = now
        if "stream their batches from the on-disk cache" in line:
            streamed = True
        g = GROUPS_LINE.match(line)
        if g:
            folds_in_program = int(g.group(1))
        m = STEP_LINE.match(line)
        if m:
            if features_end is None:
                features_end = now
            step, total = int(m.group(1)), int(m.group(2))
            step_times.append((step, now))
            if len(step_times) > steps:
                proc.send_signal(signal.SIGTERM)
                break
    for _ in proc.stdout:
        pass
    code = proc.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if len(step_times) < 3:
        raise SystemExit(f"the job ended (exit {code}) before logging 3 head steps; see its output above")
    (s0, t_first), (s1, t_last) = step_times[1], step_times[-1]  # the first logged interval includes compilation
    return {"exit_code": code, "total_steps": total, "head_step_s": (t_last - t_first) / (s1 - s0),
            "feature_cache_s": (features_end or 0) - (features_start or 0), "streamed": int(streamed),
            "folds_per_program": folds_in_program,
            "peak_rss_gib": usage.ru_maxrss / 2 ** 20}


def torch_step_s(genes: int, batch: int = 32, repeats: int = 5) -> float:
    """PyTorch's regression step on tiles (encoder recomputed + head fwd/bwd + Adam), median seconds."""
    sys.path.insert(0, HERE)
    import torch_reference as tr

    from speed import _median_s

    tr.setup_threads()
    return _median_s(tr.torch_reg_train_step_fn(batch, genes), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "histospace_stnet_scale"))
    p.add_argument("--steps", type=int, default=20, help="logged head steps to time before stopping the job")
    p.add_argument("--patients", type=int, default=23)
    p.add_argument("--sections", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=2, default=(26, 25))
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--torch", action="store_true", help="also project the PyTorch protocol's epoch")
    p.add_argument("--json", action="store_true", help="print only the JSON result (progress on stderr)")
    p.add_argument("--keep-features", action="store_true",
                   help="keep the job's workdir under --root: a rerun reuses its feature cache (feature_cache_s ~0)")
    p.add_argument("extra", nargs="*", help="further --config.KEY=VALUE for the job (after --)")
    args = p.parse_args()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    os.makedirs(args.root, exist_ok=True)
    t = time.perf_counter()
    store, pretrain = build_store(args.root, args.patients, args.sections, tuple(args.grid), args.genes)
    say(f"[stnet_scale] store {store} ready ({time.perf_counter() - t:.0f} s, not timed)")
    if args.keep_features:
        # The feature cache (and the pretrained encoder it comes from) survive between runs; the heads start over.
        work = os.path.join(args.root, "work")
        for name in glob.glob(os.path.join(work, "checkpoints", "loo_main*")):  # loo_main, or loo_main_<group>
            shutil.rmtree(name)
        r = run_job(store, pretrain, work, args.steps, args.extra, say)
    else:
        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            r = run_job(store, pretrain, os.path.join(tmp, "work"), args.steps, args.extra, say)
    epochs = config_lib.RECIPES["standard"].epochs  # the standard recipe's epochs on a real store
    members = args.patients * 5
    r.update(n_spots=args.patients * args.sections * args.grid[0] * args.grid[1], n_genes=args.genes,
             n_folds=args.patients, heads=members, steps_per_epoch=r["total_steps"] / epochs)
    # Programs of folds run one after another; the first one's step time stands for each fold's share.
    per_program = r["folds_per_program"] or args.patients
    r["folds_per_program"] = per_program
    r["epoch_s"] = r["steps_per_epoch"] * r["head_step_s"] * args.patients / per_program
    if args.torch:
        # Each fold's heads see that fold's training spots per epoch; PyTorch runs them one head at a time.
        train_spots = r["n_spots"] * (args.patients - 1) / args.patients * 0.8  # inner-validation split
        r["torch_step_s"] = torch_step_s(args.genes)
        r["torch_epoch_s"] = members * (train_spots // 32) * r["torch_step_s"]
        r["ratio_epoch"] = r["epoch_s"] / r["torch_epoch_s"]
    if args.json:
        print(json.dumps(r))
    else:
        say(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
