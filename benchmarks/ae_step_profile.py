"""Where the autoencoder's train step spends its time on this backend: a per-operation table from jax.profiler.

Usage (from the repository root):
    python benchmarks/ae_step_profile.py [--batch 32] [--steps 3] [--top 25] [--xla-defaults] [--json]

Compiles steps.ae_train_step the way autoencoder pretraining does (xla_tuning.conv_step_options() and the encoder
conv formulation that goes with them; --xla-defaults: XLA's default options and conv_impl="fast"), traces --steps
steps with jax.profiler, reads the optimized HLO that XLA dumps, and prints the --top operations by time per step
with the model op each comes from (HLO metadata): e.g. "ynn_fusion.44  71 ms  encoder/block0/Conv_0/conv".

Caveat, XLA:CPU: operations that run on Eigen's thread pool (plain convolutions, dots) are traced at their
dispatch only, so they show ~0 ms here; their cost is the step time minus the listed synchronous operations, and
`benchmarks/layer_speed.py` times them one by one.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _hlo_op_names(dump_dir: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape, model op_name) from XLA's optimized-HLO dump of the step."""
    files = sorted(glob.glob(os.path.join(dump_dir, "*ae_train_step*after_optimizations.txt")))
    if not files:
        raise SystemExit(f"no optimized HLO of ae_train_step was dumped under {dump_dir}")
    out = {}
    for m in re.finditer(r"^\s*%?([\w.\-]+) = (\S+) \w+\((.*)$", open(files[-1]).read(), re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(3))
        out[m.group(1)] = (m.group(2), op.group(1).replace("jit(ae_train_step)/", "") if op else "")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--xla-defaults", action="store_true", help="XLA's default options and conv_impl='fast'")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ae_profile_")
    dump = os.path.join(work, "hlo")
    # Must precede JAX's backend start; only this benchmark's process dumps.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=.*ae_train_step.*").strip()
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from histospace_jax import models, steps, xla_tuning

    options = {} if args.xla_defaults else xla_tuning.conv_step_options()
    ae = models.Autoencoder(conv_impl=xla_tuning.conv_impl_for(options))
    state = steps.create_train_state(ae, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)),
                                     steps.make_ae_optimizer(1e-3))
    step = jax.jit(steps.ae_train_step, donate_argnums=(0,), compiler_options=options or None)
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (args.batch, 128, 128, 3), np.uint8))
    box = [state]

    def run():
        box[0], m = step(box[0], {"image": images})
        m["loss"].block_until_ready()

    run()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    trace_dir = os.path.join(work, "trace")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            run()
    trace = json.load(gzip.open(sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                                               recursive=True))[-1]))
    names = _hlo_op_names(dump)
    per_op = collections.defaultdict(float)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e["name"] in names:
            per_op[e["name"]] += e["dur"] / 1000 / args.steps
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])
    result = {"options": options, "conv_impl": xla_tuning.conv_impl_for(options), "batch": args.batch,
              "step_ms": statistics.median(times) * 1000, "traced_ops_ms": sum(per_op.values()),
              "top": [{"op": k, "ms": round(v, 2), "shape": names[k][0], "source": names[k][1]}
                      for k, v in rows[:args.top]]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"options {options or 'XLA defaults'}, encoder conv_impl={result['conv_impl']}, batch {args.batch}: "
          f"step {result['step_ms']:.0f} ms ({args.batch / result['step_ms'] * 1000:.1f} tiles/s); synchronous "
          f"operations traced: {result['traced_ops_ms']:.0f} ms per step")
    for r in result["top"]:
        print(f"{r['ms']:8.1f} ms  {r['op']:30s} {r['shape'][:30]:30s} {r['source'][:80]}")


if __name__ == "__main__":
    main()
