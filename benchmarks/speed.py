"""Speed of histospace_jax against a PyTorch implementation of the same architecture and training recipes.

Usage (from the repository root, in an environment with `pip install -e ".[bench]"`):
    python benchmarks/speed.py [--json] [--recipes standard,paper] [--stores demo,her2st]
        [--skip-steps] [--skip-loo] [--batch 32] [--repeats 10] [--torch-python PYTHON]
        [--her2st-store STORE | --her2st-input DIR] [--cache-dir DIR]

PyTorch comes from this Python's environment (the `bench` extra), or from --torch-python's; the benchmark stops
with an error when that Python cannot import torch. Measured, on the same inputs and machine:

* tiles/s of the autoencoder train step (fwd + MSE + bwd + Adam, BatchNorm in train mode): models.Autoencoder
  (upconv_impl="subpixel") with steps.ae_train_step under jax.jit, compiled with the options and encoder conv
  formulation that autoencoder pretraining uses (xla_tuning), vs torch_reference.torch_ae_train_step_fn.
  This is the only autoencoder figure: pretraining is not part of the LOO timings below;
* tiles/s of the regression train step on tiles (frozen encoder recomputed + head fwd/bwd + Huber + Adam):
  steps.regression_train_step vs torch_reference.torch_reg_train_step_fn; and, for information, the JAX step
  on cached features (what the LOO runs);
* tiles/s of inference (frozen encoder + head, eval mode);
* wall time of a complete leave-one-patient-out of the regression heads, per store (the synthetic demo store
  with the program's demo spec; a HER2ST store prepared from the shared sections) and per recipe (config.recipe
  "standard" and "paper", every other value the default config's, resolved by config.resolve_auto as a run
  resolves it: on the demo 3 epochs, one head, no augmentation; on a real store 10 epochs and, for "standard",
  5 heads per fold with dihedral augmentation). Both sides start from the same frozen encoder (randomly
  initialised, seed 0; no autoencoder pretraining is timed) and split every fold's training patients into
  the same inner-training and inner-validation rows.
  JAX: modes.loo.train_all_folds, as the LOO mode calls it, from an empty workdir (feature cache of the 1 or 8
  views, every fold's heads in one program, best epochs, held-out predictions, checkpoints), each
  run in its own fresh process with a persistent compilation cache: "cold" with the cache empty (compilation
  included), "warm" in a second process on the cache the cold one filled.
  PyTorch: torch_reference.torch_loo_protocol, the same recipe written as a PyTorch user writes it: folds and
  the ensemble's heads one after the other, the frozen encoder recomputed on every (augmented) batch.
  Both times start after the imports, with the store (JAX) or its exported arrays (PyTorch) still to read.

Step timings are medians over --repeats calls after a warm-up (compilation) call. `--json` prints one object
whose every leaf is a number (versions, backend and paths go to stderr):
  {"machine": {"cpu_count", "jax_cpu" (0/1), "jax_devices", "torch_threads", "load_1min_start", "load_1min_end",
               "batch"},
   "ae_step" | "reg_step" | "predict": {"jax_tiles_per_s", "torch_tiles_per_s", "ratio" (jax / torch)},
   "loo": {STORE: {RECIPE: {"jax_cold_s", "jax_warm_s", "torch_s", "ratio_cold", "ratio_warm" (jax / torch:
          below 1 = JAX faster), "jax_cold_process_s", "jax_warm_process_s" (whole processes, imports included),
          "compile_cache_files" (entries the cold run wrote), "torch_threads", "n_spots", "n_genes", "n_folds",
          "epochs", "ensemble", "views", "standardise", "zero_output_init", "select_epoch" (0/1), "dropout_rate",
          "batch_size",
          "jax_per_gene_r", "torch_per_gene_r" (held-out per-gene Pearson r, mean over genes, then folds)}}}}

Where the two sides differ: random streams (head initialisation, batch order and views are drawn from each
side's own generator, so per-gene r agrees in range, not digit for digit); batches per epoch (JAX: the mean
over folds of training rows // batch size, its stream running on across epochs; PyTorch: each fold's own
rows // batch size, a new shuffle per epoch); BatchNorm's running variance (PyTorch keeps the unbiased one);
the JAX side also writes its checkpoints (every 200 steps and the last) and, for "paper", predicts with the
untrained heads (the LOO mode's untrained-head control).

--epochs, --ensemble, --augment and --demo-* shrink a run while developing (e.g. --demo-patients 3
--demo-sections 1 --demo-grid 8 --epochs 2); the benchmark's figures use their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The shared HER2ST sections sit beside the repository (../shared/data/her2st), never inside it.
DEFAULT_HER2ST_INPUT = os.path.join(os.path.dirname(ROOT), "shared", "data", "her2st", "data")
RECIPES = ("standard", "paper")
STORES = ("demo", "her2st")
ENCODER_SEED = 0  # the frozen encoder both sides use: builders.random_encoder_variables(config, ENCODER_SEED)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load_1min() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _run_task(python: str, task: dict, what: str) -> tuple[dict, float]:
    """Runs this script as `task` under `python` (its progress on our stderr); returns (its result, seconds the
    process took). Stops the benchmark when it fails: a missing figure is an error, never a null."""
    result_path = task["result"]
    t0 = time.perf_counter()
    proc = subprocess.run([python, os.path.abspath(__file__), "--task", json.dumps(task)], cwd=ROOT,
                          stdout=sys.stderr, stderr=sys.stderr, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(result_path):
        raise SystemExit(f"speed.py: {what} failed (exit {proc.returncode}); its output is above")
    with open(result_path) as f:
        return json.load(f), seconds


# ------------------------------------------------------------------------------------------------ torch side


def check_torch(python: str) -> str:
    """torch's version under `python`; stops the benchmark, saying how to fix it, when torch is not there."""
    proc = subprocess.run([python, "-c", "import numpy, torch; print(torch.__version__)"], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(
            f"speed.py: PyTorch is not importable by {python}:\n{proc.stderr.strip()[-800:]}\n"
            "Install the benchmark extra into this environment (pip install -e \".[bench]\"), or pass "
            "--torch-python=PYTHON of an environment with torch==2.13.0 and numpy.")
    return proc.stdout.strip()


def torch_task(task: dict) -> None:
    """Runs under the PyTorch Python (which need not have JAX): step timings or one recipe's LOO."""
    sys.path.insert(0, HERE)
    import numpy as np
    import torch

    import torch_reference as tr

    threads = tr.setup_threads()
    out = {"torch_version": torch.__version__, "num_threads": threads}
    if task["kind"] == "steps":
        b, genes, repeats = task["batch"], task["genes"], task["repeats"]
        out["ae_step_s"] = _median_s(tr.torch_ae_train_step_fn(b), repeats)
        out["reg_step_s"] = _median_s(tr.torch_reg_train_step_fn(b, genes), repeats)
        out["predict_s"] = _median_s(tr.torch_predict_fn(b, genes), repeats)
    else:
        folds, recipe, encoder_arrays = tr.read_protocol(task["protocol"])
        encoder = tr.load_encoder_arrays(tr.TorchEncoder(), encoder_arrays)
        # torch's first optimizer imports torch._dynamo (seconds): import work, untimed as JAX's imports are.
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
        t0 = time.perf_counter()
        with np.load(task["data"]) as data:
            tiles, expression = data["tiles"], data["expression"]
        res = tr.torch_loo_protocol(tiles, expression, folds, recipe, encoder=encoder, log=_log)
        out["loo_s"] = time.perf_counter() - t0
        out["fold_s"] = res["fold_wall_s"]
        np.savez(task["predictions"], predictions=res["predictions"], best_epoch=res["best_epoch"])
    with open(task["result"], "w") as f:
        json.dump(out, f)


# ------------------------------------------------------------------------------------------------ jax side


def loo_config(store_path: str, recipe: str, on_demo: bool, *, epochs: int = 0, ensemble: int = 0,
               augment: str = "auto", log=_log):
    """The default config with `recipe`, its "auto" values resolved as a run resolves them (on_demo: as for the
    built-in demo, whose store is `store_path` here), then the benchmark's explicit overrides (0 / "auto" =
    keep)."""
    from histospace_jax import config as config_lib

    c = config_lib.get_config()
    c.recipe = recipe
    c.data.store = "" if on_demo else store_path
    config_lib.resolve_auto(c, log=log)
    c.data.store = store_path
    if epochs:
        c.train.epochs = epochs
    if ensemble:
        c.train.ensemble = ensemble
    if augment != "auto":
        c.train.augment = augment
    config_lib.validate(c)
    return c


def _task_config(task: dict):
    return loo_config(task["store"], task["recipe"], task["on_demo"], epochs=task["epochs"],
                      ensemble=task["ensemble"], augment=task["augment"])


def jax_task(task: dict) -> None:
    """One recipe's LOO (modes.loo.train_all_folds) from an empty workdir, in this fresh process, with the
    persistent compilation cache in task["compile_cache"]; writes the result JSON and the held-out predictions."""
    import jax

    jax.config.update("jax_compilation_cache_dir", task["compile_cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program, however fast to build
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every size
    import numpy as np

    from histospace_jax import builders, folds, metric_log
    from histospace_jax.data import open_store
    from histospace_jax.modes import loo

    config = _task_config(task)
    # The frozen encoder stands for a pretrained autoencoder's, whose pretraining is not timed.
    encoder = builders.random_encoder_variables(config, ENCODER_SEED)
    workdir = task["workdir"]
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    store = open_store(task["store"])
    plan = folds.plan_leave_one_patient_out(store, config.loo.patients)
    writer = metric_log.MetricWriter(os.path.join(workdir, "metrics.jsonl"))
    out = loo.train_all_folds(config, workdir, store, plan, [encoder], [0] * len(plan.folds), writer)
    wall = time.perf_counter() - t0
    np.savez(task["predictions"], **{f"pred_{f}": out["preds"][f] for f in range(len(plan.folds))})
    with open(task["result"], "w") as f:
        json.dump({"loo_s": wall, "best_epoch": out["best_epoch"]}, f)


def encoder_arrays_for_torch(variables: dict) -> dict:
    """The JAX encoder's {'params', 'batch_stats'} as torch_reference.TorchEncoder state_dict arrays (kernels
    HWIO -> OIHW)."""
    import numpy as np

    params, stats = variables["params"], variables.get("batch_stats", {})
    out = {}
    for i in range(len(params)):
        block, name = params[f"block{i}"], f"blocks.{i}"
        if "BatchNorm_0" not in block:
            raise ValueError("the PyTorch reference mirrors the relu_bn encoder only (model.variant=relu_bn)")
        out[f"{name}.0.weight"] = np.asarray(block["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)
        out[f"{name}.0.bias"] = np.asarray(block["bias"])
        out[f"{name}.1.weight"] = np.asarray(block["BatchNorm_0"]["scale"])
        out[f"{name}.1.bias"] = np.asarray(block["BatchNorm_0"]["bias"])
        out[f"{name}.1.running_mean"] = np.asarray(stats[f"block{i}"]["BatchNorm_0"]["mean"])
        out[f"{name}.1.running_var"] = np.asarray(stats[f"block{i}"]["BatchNorm_0"]["var"])
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def fold_rows(config, obs: dict, plan) -> list[tuple]:
    """(held-out rows, rows the heads learn from, inner-validation rows) per fold, as train_all_folds splits
    them (folds.training_split)."""
    from histospace_jax import folds

    out = []
    for f in range(len(plan.folds)):
        train, val, _ = folds.training_split(config, obs, plan.training_rows(f))
        out.append((plan.held_out_rows(f), train, val))
    return out


def write_protocol(path: str, config, rows: list[tuple], encoder_variables: dict) -> None:
    """What torch_reference.read_protocol reads: the folds' rows, the resolved recipe, the frozen encoder."""
    import numpy as np

    t = config.train
    if t.standardise_targets not in ("on", "off"):
        raise SystemExit(f"train.standardise_targets={t.standardise_targets}: the PyTorch reference protocol "
                         "standardises targets or leaves them raw; choose on or off")
    arrays = {"n_folds": len(rows), "epochs": t.epochs, "batch_size": t.batch_size, "ensemble": t.ensemble,
              "views": 8 if t.augment == "dihedral" else 1, "standardise": int(t.standardise_targets == "on"),
              "zero_output": int(config.model.output_init == "zeros"), "select_epoch": int(t.select_epoch == "on"),
              "refit": int(t.refit == "on" and t.select_epoch == "on"), "learning_rate": t.learning_rate,
              "weight_decay": t.weight_decay, "huber_delta": t.huber_delta, "dropout_rate": float(config.model.dropout_rate),
              "eval_batch_size": config.eval_batch_size, "seed": config.seed}
    for f, (held, train, val) in enumerate(rows):
        arrays.update({f"held_out_{f}": held, f"train_{f}": train, f"val_{f}": val})
    arrays.update({f"encoder.{k}": v for k, v in encoder_arrays_for_torch(encoder_variables).items()})
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})


def jax_steps(batch: int, genes: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from histospace_jax import models, steps, xla_tuning

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (batch, 128, 128, 3), dtype=np.uint8)
    y = rng.standard_normal((batch, genes)).astype(np.float32)
    out = {}

    # The autoencoder step as autoencoder.pretrain compiles it (builders.autoencoder, pmap_step).
    options = xla_tuning.conv_step_options()
    ae = models.Autoencoder(upconv_impl="subpixel", conv_impl=xla_tuning.conv_impl_for(options))
    state = steps.create_train_state(ae, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)),
                                     steps.make_ae_optimizer(1e-3))
    ae_step = jax.jit(steps.ae_train_step, donate_argnums=(0,), compiler_options=options)
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


# ------------------------------------------------------------------------------------------------ stores


def demo_store(root: str, patients: int, sections: int, grid: int) -> str:
    """The synthetic demo's regression store: the default config's demo spec unless sizes are given (0 = keep)."""
    import dataclasses

    from histospace_jax import config as config_lib, datasets
    from histospace_jax.data import demo

    spec = datasets.demo_spec(config_lib.get_config())
    spec = dataclasses.replace(spec, n_patients=patients or spec.n_patients,
                               sections_per_patient=sections or spec.sections_per_patient,
                               grid=(grid, grid) if grid else spec.grid)
    reg, _ = demo.build_demo(os.path.join(root, "demo"), spec)
    return reg


def her2st_store(args, root: str) -> str:
    """--her2st-store, or --her2st-input prepared once into the cache directory; stops when neither exists."""
    if args.her2st_store:
        if not os.path.isdir(args.her2st_store):
            raise SystemExit(f"speed.py: --her2st-store {args.her2st_store} is not a directory")
        return args.her2st_store
    if not os.path.isdir(args.her2st_input):
        raise SystemExit(f"speed.py: no HER2ST release at --her2st-input {args.her2st_input}; pass --her2st-input "
                         "or --her2st-store, or leave HER2ST out with --stores demo")
    out = os.path.join(root, "her2st_store")
    if not os.path.isdir(out):
        _log(f"[speed] preparing the HER2ST store {out} (not timed) ...")
        r = subprocess.run([sys.executable, "-m", "histospace_jax.prepare", "--format=her2st",
                            f"--input={args.her2st_input}", f"--output={out}"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"speed.py: preparing the HER2ST store failed:\n{r.stderr.strip()[-2000:]}")
    return out


# ------------------------------------------------------------------------------------------------ the LOO


def mean_per_gene_r(expression, held_out_rows: list, predictions: list) -> float:
    """Held-out per-gene Pearson r: mean over genes with a defined r, then over folds."""
    import numpy as np

    from histospace_jax import metrics

    return float(np.mean([metrics.nanmean_or_nan(metrics.pearson_per_gene(expression[rows], pred))
                          for rows, pred in zip(held_out_rows, predictions)]))


def loo_benchmark(args, store_name: str, store_path: str, recipe: str, root: str) -> dict:
    """One store and recipe: JAX cold and warm (fresh processes sharing a compilation cache that starts empty),
    then PyTorch on the same folds, recipe and encoder. `root`: this run's scratch directory."""
    import numpy as np

    from histospace_jax import builders, folds
    from histospace_jax.data import open_store

    on_demo = store_name == "demo"
    overrides = {"epochs": args.epochs, "ensemble": args.ensemble, "augment": args.augment}
    config = loo_config(store_path, recipe, on_demo, **overrides)
    t = config.train
    _log(f"[speed] {store_name} {recipe}: epochs={t.epochs} ensemble={t.ensemble} augment={t.augment} "
         f"select_epoch={t.select_epoch} standardise_targets={t.standardise_targets} "
         f"output_init={config.model.output_init} dropout_rate={config.model.dropout_rate:g} "
         f"batch_size={t.batch_size}")
    store = open_store(store_path)
    plan = folds.plan_leave_one_patient_out(store, config.loo.patients)
    rows = fold_rows(config, store.obs, plan)
    expression = np.asarray(store.expression, np.float32)
    tmp = tempfile.mkdtemp(prefix=f"{store_name}_{recipe}_", dir=root)
    data_path = os.path.join(root, f"{store_name}_arrays.npz")
    if not os.path.exists(data_path):  # the store's arrays for PyTorch, once per store and run
        np.savez(data_path, tiles=np.asarray(store.tiles[:]), expression=expression)
    protocol = os.path.join(tmp, "protocol.npz")
    write_protocol(protocol, config, rows, builders.random_encoder_variables(config, ENCODER_SEED))
    task = {"store": store_path, "recipe": recipe, "on_demo": on_demo, **overrides,
            "compile_cache": os.path.join(tmp, "compile_cache")}
    jax_r, jax_preds = {}, {}
    for run in ("cold", "warm"):
        _log(f"[speed] {store_name} {recipe}: JAX LOO, {run} compilation cache ...")
        out, process_s = _run_task(sys.executable, {**task, "side": "jax", "workdir": os.path.join(tmp, f"work_{run}"),
                                                    "result": os.path.join(tmp, f"jax_{run}.json"),
                                                    "predictions": os.path.join(tmp, f"jax_{run}.npz")},
                                   f"JAX LOO ({store_name}, {recipe}, {run})")
        jax_r[run], jax_r[f"{run}_process"] = out["loo_s"], process_s
        if run == "cold":
            cache_files = sum(len(files) for _, _, files in os.walk(task["compile_cache"]))
        with np.load(os.path.join(tmp, f"jax_{run}.npz")) as z:
            jax_preds[run] = [z[f"pred_{f}"] for f in range(len(rows))]
    _log(f"[speed] {store_name} {recipe}: PyTorch LOO ...")
    tout, _ = _run_task(args.torch_python, {"side": "torch", "kind": "loo", "data": data_path, "protocol": protocol,
                                            "result": os.path.join(tmp, "torch.json"),
                                            "predictions": os.path.join(tmp, "torch.npz")},
                        f"PyTorch LOO ({store_name}, {recipe})")
    with np.load(os.path.join(tmp, "torch.npz")) as z:
        torch_pred = z["predictions"]
    held = [r[0] for r in rows]
    result = {
        "jax_cold_s": jax_r["cold"], "jax_warm_s": jax_r["warm"], "torch_s": tout["loo_s"],
        "ratio_cold": jax_r["cold"] / tout["loo_s"], "ratio_warm": jax_r["warm"] / tout["loo_s"],
        "jax_cold_process_s": jax_r["cold_process"], "jax_warm_process_s": jax_r["warm_process"],
        "compile_cache_files": cache_files, "torch_threads": tout["num_threads"],
        "n_spots": int(store.n_spots), "n_genes": len(store.genes), "n_folds": len(rows), "epochs": t.epochs,
        "ensemble": t.ensemble, "views": 8 if t.augment == "dihedral" else 1,
        "standardise": int(t.standardise_targets == "on"), "zero_output_init": int(config.model.output_init == "zeros"),
        "select_epoch": int(t.select_epoch == "on"), "dropout_rate": float(config.model.dropout_rate),
        "batch_size": t.batch_size,
        "jax_per_gene_r": mean_per_gene_r(expression, held, jax_preds["cold"]),
        "torch_per_gene_r": mean_per_gene_r(expression, held, [torch_pred[r] for r in held]),
    }
    return result


# ------------------------------------------------------------------------------------------------ main


def _measure(args, result: dict, recipes: list[str], store_paths: dict, run_dir: str) -> None:
    """The step timings and the LOOs, into `result`."""
    b = args.batch
    if not args.skip_steps:
        _log(f"[speed] step timings, batch {b}, median of {args.repeats} ...")
        js = jax_steps(b, args.genes, args.repeats)
        ts, _ = _run_task(args.torch_python, {"side": "torch", "kind": "steps", "batch": b, "genes": args.genes,
                                              "repeats": args.repeats, "result": os.path.join(run_dir, "steps.json")},
                          "PyTorch step timings")
        result["machine"]["torch_threads"] = ts["num_threads"]
        for key, name in (("ae_step", "ae_step_s"), ("reg_step", "reg_step_s"), ("predict", "predict_s")):
            j, t = b / js[name], b / ts[name]
            result[key] = {"jax_tiles_per_s": j, "torch_tiles_per_s": t, "ratio": j / t}
        result["reg_step"]["jax_cached_features_tiles_per_s"] = b / js["reg_step_cached_s"]
    if not args.skip_loo:
        result["loo"] = {name: {r: loo_benchmark(args, name, path, r, run_dir) for r in recipes}
                         for name, path in store_paths.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--batch", type=int, default=32, help="step timings' batch size")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--genes", type=int, default=64, help="step timings' genes")
    p.add_argument("--torch-python", default=sys.executable,
                   help="Python of the environment with PyTorch (default: this one, with the bench extra)")
    p.add_argument("--skip-loo", action="store_true")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: standard, paper")
    p.add_argument("--stores", default=",".join(STORES), help="comma-separated: demo, her2st")
    p.add_argument("--her2st-store", default="", help="a prepared HER2ST store")
    p.add_argument("--her2st-input", default=DEFAULT_HER2ST_INPUT,
                   help="raw HER2ST release, prepared once into --cache-dir when --her2st-store is not given")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "histospace_speed"),
                   help="the demo and HER2ST stores (kept for later runs) and each run's scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the runs' workdirs, caches and predictions")
    # Smaller runs while developing; the defaults are the benchmark's.
    p.add_argument("--epochs", type=int, default=0, help="override train.epochs (0 = the config's default)")
    p.add_argument("--ensemble", type=int, default=0, help="override train.ensemble (0 = the config's default)")
    p.add_argument("--augment", default="auto", choices=("auto", "dihedral", "none"), help="override train.augment")
    p.add_argument("--demo-patients", type=int, default=0, help="demo store size (0 = the config's demo)")
    p.add_argument("--demo-sections", type=int, default=0)
    p.add_argument("--demo-grid", type=int, default=0)
    p.add_argument("--task", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.task:
        task = json.loads(args.task)
        if task["side"] == "torch":
            torch_task(task)
        else:
            sys.path.insert(0, ROOT)
            jax_task(task)
        return
    recipes = [r for r in args.recipes.split(",") if r]
    stores = [s for s in args.stores.split(",") if s]
    bad = [r for r in recipes if r not in RECIPES] + [s for s in stores if s not in STORES]
    if bad:
        raise SystemExit(f"speed.py: unknown {bad}; --recipes from {RECIPES}, --stores from {STORES}")
    torch_version = check_torch(args.torch_python)
    sys.path.insert(0, ROOT)
    import jax

    os.makedirs(args.cache_dir, exist_ok=True)
    store_paths = {}
    if not args.skip_loo:  # stores first: a missing one stops the run before any timing
        for name in stores:
            store_paths[name] = (demo_store(args.cache_dir, args.demo_patients, args.demo_sections, args.demo_grid)
                                 if name == "demo" else her2st_store(args, args.cache_dir))
            _log(f"[speed] store {name}: {store_paths[name]}")
    _log(f"[speed] jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices, {sys.executable}); "
         f"torch {torch_version} ({args.torch_python})")
    # PyTorch runs on the CPU: a JAX run on an accelerator (jax_cpu 0) is no like-for-like comparison.
    result = {"machine": {"cpu_count": os.cpu_count(), "jax_cpu": int(jax.default_backend() == "cpu"),
                          "jax_devices": jax.device_count(), "load_1min_start": _load_1min(), "batch": args.batch}}
    run_dir = tempfile.mkdtemp(prefix="run_", dir=args.cache_dir)
    try:
        _measure(args, result, recipes, store_paths, run_dir)
    finally:
        if args.keep:
            _log(f"[speed] kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    result["machine"]["load_1min_end"] = _load_1min()
    if args.json:
        print(json.dumps(result))
        return
    for key in ("ae_step", "reg_step", "predict"):
        if key in result:
            r = result[key]
            print(f"{key:9s} jax {r['jax_tiles_per_s']:.1f} tiles/s   torch {r['torch_tiles_per_s']:.1f} tiles/s   "
                  f"ratio {r['ratio']:.2f}x")
    for store_name, per_recipe in result.get("loo", {}).items():
        for recipe, r in per_recipe.items():
            print(f"loo {store_name:6s} {recipe:8s} jax cold {r['jax_cold_s']:.1f} s  warm {r['jax_warm_s']:.1f} s   "
                  f"torch {r['torch_s']:.1f} s   ratio cold {r['ratio_cold']:.3f}  warm {r['ratio_warm']:.3f}   "
                  f"per-gene r jax {r['jax_per_gene_r']:.3f} torch {r['torch_per_gene_r']:.3f}   "
                  f"({r['n_spots']} spots, {r['n_folds']} folds, {r['epochs']} epochs, {r['ensemble']} heads, "
                  f"{r['views']} views)")
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
