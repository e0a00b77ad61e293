"""Speed of histospace_jax against a PyTorch implementation of the same architecture and protocol.

Usage (from the repository root):
    /work/venv/bin/python benchmarks/speed.py [--json] [--batch 32] [--repeats 10]
        [--torch-python /work/torchvenv/bin/python] [--loo-epochs 2] [--skip-loo]
        [--her2st-store STORE | --her2st-input ../shared/data/her2st/data]

Measures, in one run, on the same inputs and machine (torch runs in a subprocess with the torch venv's
Python, since torch is only in the optional `bench` extra):

* tiles/s of the autoencoder train step (fwd + MSE + bwd + Adam, BatchNorm in train mode): histospace_jax's
  models.Autoencoder (upconv_impl="subpixel") with steps.ae_train_step under jax.jit, vs
  torch_reference.torch_ae_train_step_fn;
* tiles/s of the regression train step on tiles (frozen encoder recomputed + head fwd/bwd + Huber + Adam):
  steps.regression_train_step vs torch_reference.torch_reg_train_step_fn; and, for information, the JAX step
  on cached features (what the LOO actually runs);
* tiles/s of inference (frozen encoder + head, eval mode);
* wall time of a complete leave-one-patient-out (all folds, fixed epochs, same batch size and random frozen
  encoder seed) on a small demo store and on a HER2ST store when available: this project (modes/loo.train_all_folds:
  feature cache computed once, all folds in one program, compilation included) vs the PyTorch protocol
  (torch_reference.torch_loo_protocol: folds one after the other, encoder recomputed every step).

Step timings are medians over --repeats calls after a warm-up (compilation) call. `--json` prints
{"ae_step": {"jax_tiles_per_s", "torch_tiles_per_s", "ratio"}, "reg_step": {...}, "predict": {...},
 "loo": {"jax_s", "torch_s", "ratio", ...}, "loo_her2st": {...} | null, "machine": {...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TORCH_PYTHON = "/work/torchvenv/bin/python"


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ torch side


def torch_main(args) -> None:
    """Runs inside the torch venv; prints one JSON line."""
    sys.path.insert(0, HERE)
    import numpy as np
    import torch
    import torch_reference as tr

    threads = tr.setup_threads()
    out = {"torch_version": torch.__version__, "num_threads": threads}
    if args.torch_task == "steps":
        b = args.batch
        out["ae_step_s"] = _median_s(tr.torch_ae_train_step_fn(b), args.repeats)
        out["reg_step_s"] = _median_s(tr.torch_reg_train_step_fn(b, args.genes), args.repeats)
        out["predict_s"] = _median_s(tr.torch_predict_fn(b, args.genes), args.repeats)
    else:
        data = np.load(args.torch_task)
        res = tr.torch_loo_protocol(data["tiles"], data["expression"], data["patients"], int(data["epochs"]),
                                    int(data["batch_size"]))
        out["loo_s"] = res["wall_s"]
        out["fold_s"] = {str(k): v for k, v in res["fold_wall_s"].items()}
    print(json.dumps(out))


def run_torch(torch_python: str, task: str, args) -> dict | None:
    if not os.path.exists(torch_python):
        print(f"(torch skipped: {torch_python} not found; install the bench extra in a venv: "
              "`pip install torch==2.13.0 numpy`)", file=sys.stderr)
        return None
    cmd = [torch_python, os.path.abspath(__file__), "--torch-task", task, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--genes", str(args.genes)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"(torch run failed: {out.stderr.strip()[-3000:]})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ jax side


def jax_steps(batch: int, genes: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from histospace_jax import models, steps

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (batch, 128, 128, 3), dtype=np.uint8)
    y = rng.standard_normal((batch, genes)).astype(np.float32)
    out = {}

    ae = models.Autoencoder(upconv_impl="subpixel")
    state = steps.create_train_state(ae, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)),
                                     steps.make_ae_optimizer(1e-3))
    ae_step = jax.jit(steps.ae_train_step, donate_argnums=(0,))
    x = jax.device_put(tiles)
    box = [state]

    def run_ae():
        box[0], m = ae_step(box[0], {"image": x})
        m["loss"].block_until_ready()

    out["ae_step_s"] = _median_s(run_ae, repeats)

    model = models.HistoSpace(n_genes=genes)
    enc = models.Encoder().init(jax.random.PRNGKey(1), jnp.zeros((1, 128, 128, 3)))
    tx = steps.make_regression_optimizer(1e-3)
    rstate = steps.create_regression_state(model, jax.random.PRNGKey(2), enc, tx)
    reg_step = jax.jit(steps.regression_train_step, donate_argnums=(0,))
    yb = jax.device_put(y)
    rbox = [rstate]

    def run_reg():
        rbox[0], m = reg_step(rbox[0], {"image": x, "expression": yb})
        m["loss"].block_until_ready()

    out["reg_step_s"] = _median_s(run_reg, repeats)

    enc_vars = {"params": rbox[0].params["encoder"], "batch_stats": rbox[0].batch_stats["encoder"]}
    feats = jax.jit(lambda v, im: steps.encode_step(models.Encoder(), v, im))(enc_vars, x)
    fbox = [jax.tree_util.tree_map(jnp.array, rbox[0])]

    def run_reg_cached():
        fbox[0], m = reg_step(fbox[0], {"features": feats, "expression": yb})
        m["loss"].block_until_ready()

    out["reg_step_cached_s"] = _median_s(run_reg_cached, repeats)

    predict = jax.jit(steps.predict_step)
    pstate = rbox[0]
    out["predict_s"] = _median_s(lambda: predict(pstate, {"image": x}).block_until_ready(), repeats)
    return out


def demo_store(root: str):
    from histospace_jax.data import demo

    spec = demo.DemoSpec(n_patients=4, sections_per_patient=1, grid=(12, 12), n_genes=64,
                         n_pretrain_patients=1, pretrain_grid=(4, 4), seed=0)
    reg, _ = demo.build_demo(root, spec)
    return reg


def jax_loo(store_path: str, workdir: str, epochs: int, batch: int) -> dict:
    """Complete LOO with this project's protocol, from an empty workdir (feature cache and compile included)."""
    import jax

    from histospace_jax import builders, config as config_lib, metric_log
    from histospace_jax.data import open_store
    from histospace_jax.modes import loo

    c = config_lib.get_config()
    c.data.store = store_path
    c.train.epochs, c.train.batch_size = epochs, batch
    c.eval_batch_size = 128
    c.log_every_steps = 10 ** 9
    c.checkpoint.every_steps = 10 ** 9  # checkpoints at epoch ends only, as a real run
    t0 = time.perf_counter()
    store = open_store(store_path)
    enc = builders.random_encoder_variables(c, seed=0)
    writer = metric_log.MetricWriter(os.path.join(workdir, "metrics.jsonl"))
    out = loo.train_all_folds(c, workdir, store, enc, writer)
    jax.effects_barrier()
    wall = time.perf_counter() - t0
    return {"jax_s": wall, "n_spots": int(store.n_spots), "n_folds": len(out["plan"].folds),
            "n_genes": len(store.genes), "epochs": epochs, "batch_size": batch}


def export_for_torch(store_path: str, path: str, epochs: int, batch: int) -> None:
    import numpy as np

    from histospace_jax.data import open_store

    store = open_store(store_path)
    tiles = np.asarray(store.tiles[:])
    np.savez(path, tiles=tiles, expression=np.asarray(store.expression, np.float32),
             patients=np.asarray(store.obs["patient"]).astype(str), epochs=epochs, batch_size=batch)


def her2st_store(args, root: str) -> str | None:
    if args.her2st_store:
        return args.her2st_store if os.path.isdir(args.her2st_store) else None
    if not args.her2st_input or not os.path.isdir(args.her2st_input):
        return None
    out = os.path.join(root, "her2st_store")
    if not os.path.isdir(out):
        r = subprocess.run([sys.executable, "-m", "histospace_jax.prepare", "--format=her2st",
                            f"--input={args.her2st_input}", f"--output={out}"], cwd=ROOT, capture_output=True,
                           text=True)
        if r.returncode != 0:
            print(f"(HER2ST store not built: {r.stderr.strip()[-1500:]})", file=sys.stderr)
            return None
    return out


def _tiles_per_s(batch, s):
    return None if s is None else batch / s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--genes", type=int, default=64)
    p.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON)
    p.add_argument("--loo-epochs", type=int, default=2)
    p.add_argument("--skip-loo", action="store_true")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--her2st-store", default="", help="a prepared HER2ST store")
    p.add_argument("--her2st-input", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "her2st", "data"),
                   help="raw HER2ST release, prepared into a temporary store when --her2st-store is not given")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "histospace_speed"))
    p.add_argument("--torch-task", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_task:
        torch_main(args)
        return
    sys.path.insert(0, ROOT)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    import jax

    result = {"machine": {"cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                          "jax_devices": jax.device_count(), "jax_version": jax.__version__,
                          "load_average_start": _load_average(), "batch": args.batch}}
    b = args.batch
    if not args.skip_steps:
        say(f"[speed] step timings, batch {b}, median of {args.repeats} ...")
        js = jax_steps(b, args.genes, args.repeats)
        ts = run_torch(args.torch_python, "steps", args) or {}
        if ts:
            result["machine"]["torch_version"] = ts.get("torch_version")
            result["machine"]["torch_threads"] = ts.get("num_threads")
        for key, name in (("ae_step", "ae_step_s"), ("reg_step", "reg_step_s"), ("predict", "predict_s")):
            j, t = _tiles_per_s(b, js[name]), _tiles_per_s(b, ts.get(name))
            result[key] = {"jax_tiles_per_s": j, "torch_tiles_per_s": t, "ratio": j / t if t else None}
        result["reg_step"]["jax_cached_features_tiles_per_s"] = _tiles_per_s(b, js["reg_step_cached_s"])
    if not args.skip_loo:
        os.makedirs(args.cache_dir, exist_ok=True)
        stores = [("loo", demo_store(os.path.join(args.cache_dir, "demo")))]
        h = her2st_store(args, args.cache_dir)
        result["loo_her2st"] = None
        if h:
            stores.append(("loo_her2st", h))
        for key, store in stores:
            say(f"[speed] complete LOO on {store}, {args.loo_epochs} epochs ...")
            with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
                with contextlib.redirect_stdout(sys.stderr):  # the job's progress lines; stdout = the JSON
                    r = jax_loo(store, os.path.join(tmp, "work"), args.loo_epochs, b)
                npz = os.path.join(tmp, "data.npz")
                export_for_torch(store, npz, args.loo_epochs, b)
                t = run_torch(args.torch_python, npz, args) or {}
            r["store"] = store
            r["torch_s"] = t.get("loo_s")
            r["ratio"] = r["jax_s"] / r["torch_s"] if r["torch_s"] else None
            result[key] = r
    result["machine"]["load_average_end"] = _load_average()
    if args.json:
        print(json.dumps(result))
        return
    for key in ("ae_step", "reg_step", "predict"):
        if key in result:
            r = result[key]
            say(f"{key:9s} jax {r['jax_tiles_per_s']:.1f} tiles/s   torch "
                f"{(r['torch_tiles_per_s'] or float('nan')):.1f} tiles/s   ratio {(r['ratio'] or float('nan')):.2f}x")
    for key in ("loo", "loo_her2st"):
        r = result.get(key)
        if r:
            say(f"{key:9s} jax {r['jax_s']:.1f} s   torch {(r['torch_s'] or float('nan')):.1f} s   "
                f"ratio {(r['ratio'] or float('nan')):.3f}  ({r['n_spots']} spots, {r['n_folds']} folds, "
                f"{r['epochs']} epochs)")
    say(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
