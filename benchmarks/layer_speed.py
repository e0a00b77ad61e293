"""Per-layer and whole-AE-step speed: reference Flax layers vs histospace_jax.layers, and PyTorch.

Usage (from the repository root):
    python benchmarks/layer_speed.py [--batch 32] [--repeats 10] [--torch-python PATH]

Prints, at the given batch size:
* forward+backward ms per call of each decoder up-convolution (nn.ConvTranspose vs UpConv
  "subpixel" and "subpixel3x3") and of each encoder max-pool (nn.max_pool vs max_pool_2x2 and
  max_pool_2x2_first), with the ratio reference / fast;
* a full autoencoder train step (fwd + bwd + Adam, BatchNorm in train mode) for a minimal Flax
  AE built here with reference layers and with fast layers, and PyTorch's (benchmarks/
  torch_reference.py, run in a subprocess with the torch venv's Python): ms/step, tiles/s and
  the ratio jax_fast / torch.

Timings are the median over ``--repeats`` calls after a warm-up (compilation) call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REF = "jax reference: nn.Conv, nn.ConvTranspose, nn.max_pool"
FAST = "jax fast: ConvSame, UpConv subpixel, max_pool_2x2"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DECODER_LAYERS = [  # (H=W in, Cin, Cout)
    (16, 128, 64),
    (32, 64, 32),
    (64, 32, 3),
]
ENCODER_CONVS = [  # (H=W, Cin, Cout)
    (128, 3, 32),
    (64, 32, 64),
    (32, 64, 128),
]
POOL_LAYERS = [  # (H=W in, C) of the encoder's three pools
    (128, 32),
    (64, 64),
    (32, 128),
]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- torch side


def torch_main(batch: int, repeats: int) -> None:
    """Runs in the torch venv: prints one JSON line with torch's AE step time."""
    sys.path.insert(0, HERE)
    import torch
    from torch_reference import setup_threads, torch_ae_train_step_fn

    threads = setup_threads()
    step = torch_ae_train_step_fn(batch)
    step()
    ms = _median_ms(step, repeats)
    print(json.dumps({"torch_version": torch.__version__, "num_threads": threads, "ae_step_ms": ms}))


def run_torch(torch_python: str, batch: int, repeats: int) -> dict | None:
    if not os.path.exists(torch_python):
        print(f"(torch skipped: {torch_python} not found; install the bench extra, `pip install -e \".[bench]\"`, "
              "or pass --torch-python)")
        return None
    out = subprocess.run(
        [torch_python, os.path.abspath(__file__), "--torch-only", "--batch", str(batch), "--repeats", str(repeats)],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        print(f"(torch run failed: {out.stderr.strip()[-2000:]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- jax side


def jax_main(args) -> None:
    sys.path.insert(0, ROOT)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from histospace_jax.layers import ConvSame, UpConv, max_pool_2x2, max_pool_2x2_first

    b, repeats = args.batch, args.repeats
    key = jax.random.key(0)
    print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()} "
          f"cpus={os.cpu_count()} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"batch {b}, median of {repeats} calls after warm-up\n")

    def fwd_bwd(apply, params, x):
        ct = jax.random.normal(jax.random.key(1), jax.eval_shape(apply, params, x).shape)

        @jax.jit
        def f(params, x, ct):  # ct is an argument, not a closed-over constant (XLA would constant-fold it)
            return jax.grad(lambda p, x: jnp.vdot(apply(p, x), ct), argnums=(0, 1))(params, x)

        return lambda: jax.block_until_ready(f(params, x, ct))

    if not args.skip_layers:
        print("decoder up-convolutions (4x4, stride 2, SAME), forward+backward w.r.t. input, kernel, bias:")
        print(f"{'layer':28s} {'transpose ms':>13s} {'subpixel ms':>12s} {'ratio':>6s} {'subpix3x3 ms':>13s} {'ratio':>6s}")
        for h, cin, cout in DECODER_LAYERS:
            x = jax.random.uniform(key, (b, h, h, cin))
            params = UpConv(cout, impl="transpose").init(key, x)
            ms = {}
            for impl in ("transpose", "subpixel", "subpixel3x3"):
                ms[impl] = _median_ms(fwd_bwd(UpConv(cout, impl=impl).apply, params, x), repeats)
            name = f"{h}x{h}x{cin} -> {2 * h}x{2 * h}x{cout}"
            print(f"{name:28s} {ms['transpose']:13.1f} {ms['subpixel']:12.1f} {ms['transpose'] / ms['subpixel']:6.1f} "
                  f"{ms['subpixel3x3']:13.1f} {ms['transpose'] / ms['subpixel3x3']:6.1f}")

        print("\nencoder 3x3 SAME convolutions, forward+backward w.r.t. input, kernel, bias:")
        print(f"{'layer':28s} {'nn.Conv ms':>13s} {'ConvSame ms':>12s} {'ratio':>6s}")
        for h, cin, cout in ENCODER_CONVS:
            x = jax.random.uniform(key, (b, h, h, cin))
            params = nn.Conv(cout, (3, 3), padding="SAME").init(key, x)
            ms_ref = _median_ms(fwd_bwd(nn.Conv(cout, (3, 3), padding="SAME").apply, params, x), repeats)
            ms_fast = _median_ms(fwd_bwd(ConvSame(cout).apply, params, x), repeats)
            name = f"{h}x{h}x{cin} -> {h}x{h}x{cout}"
            print(f"{name:28s} {ms_ref:13.1f} {ms_fast:12.1f} {ms_ref / ms_fast:6.1f}")

        print("\nencoder max-pools (2x2, stride 2), forward+backward w.r.t. input:")
        print(f"{'layer':28s} {'nn.max_pool ms':>14s} {'2x2 ms':>8s} {'ratio':>6s} {'2x2_first ms':>13s} {'ratio':>6s}")
        for h, c in POOL_LAYERS:
            x = jax.random.normal(key, (b, h, h, c))
            ref = lambda p, x: nn.max_pool(x, (2, 2), strides=(2, 2))
            ms_ref = _median_ms(fwd_bwd(ref, {}, x), repeats)
            ms_fast = _median_ms(fwd_bwd(lambda p, x: max_pool_2x2(x), {}, x), repeats)
            ms_first = _median_ms(fwd_bwd(lambda p, x: max_pool_2x2_first(x), {}, x), repeats)
            name = f"{h}x{h}x{c} -> {h // 2}x{h // 2}x{c}"
            print(f"{name:28s} {ms_ref:14.1f} {ms_fast:8.1f} {ms_ref / ms_fast:6.1f} {ms_first:13.1f} {ms_ref / ms_first:6.1f}")

    # ---- minimal AE (benchmark only; the project's model lives in histospace_jax/models.py)
    class AE(nn.Module):
        conv_impl: str  # "nn" (nn.Conv) | "fast" (ConvSame)
        upconv_impl: str
        pool: str  # "ref" | "fast" | "first"

        @nn.compact
        def __call__(self, x, train: bool = True):
            pool = {
                "ref": lambda y: nn.max_pool(y, (2, 2), strides=(2, 2)),
                "fast": max_pool_2x2,
                "first": max_pool_2x2_first,
            }[self.pool]
            bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
            for c in (32, 64, 128):
                conv = nn.Conv(c, (3, 3), padding="SAME") if self.conv_impl == "nn" else ConvSame(c)
                x = pool(nn.relu(bn()(conv(x))))
            for c in (64, 32):
                x = nn.relu(bn()(UpConv(c, impl=self.upconv_impl)(x)))
            return nn.sigmoid(UpConv(3, impl=self.upconv_impl)(x))

    def ae_step(model):
        x = jax.random.uniform(key, (b, 128, 128, 3))
        variables = model.init(key, x)
        tx = optax.adam(1e-3)
        state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

        @jax.jit
        def step(state, x):
            params, stats, opt = state

            def loss_fn(p):
                y, upd = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
                return jnp.mean((y - x) ** 2), upd["batch_stats"]

            (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, updates), stats, opt), loss

        holder = [state]

        def run():
            holder[0], loss = step(holder[0], x)
            jax.block_until_ready(loss)

        return run

    print("\nfull AE train step (fwd + bwd + Adam, BatchNorm train mode):")
    results = {}
    variants = [(REF, "nn", "transpose", "ref"),
                (FAST, "fast", "subpixel", "fast"),
                ("jax fast, max_pool_2x2_first", "fast", "subpixel", "first"),
                ("jax fast, subpixel3x3", "fast", "subpixel3x3", "fast"),
                ("jax nn.Conv + subpixel + max_pool_2x2", "nn", "subpixel", "fast")]
    if args.quick:
        variants = [v for v in variants if v[0] == FAST]
    for name, conv_impl, impl, pool in variants:
        ms = _median_ms(ae_step(AE(conv_impl, impl, pool)), repeats)
        results[name] = ms
        print(f"{name:52s} {ms:8.1f} ms/step {1e3 * b / ms:8.1f} tiles/s")
    torch_res = None if args.no_torch else run_torch(args.torch_python, b, repeats)
    if torch_res is not None:
        tms = torch_res["ae_step_ms"]
        print(f"{'torch ' + torch_res['torch_version'] + ' (threads=' + str(torch_res['num_threads']) + ')':52s} "
              f"{tms:8.1f} ms/step {1e3 * b / tms:8.1f} tiles/s")
        fast = results[FAST]
        print(f"\nratio tiles/s jax_fast / torch = {tms / fast:.2f}")
        if REF in results:
            print(f"ratio tiles/s jax_fast / jax_reference = {results[REF] / fast:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", sys.executable),
                   help="a Python with torch (default: this one, with the bench extra installed)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch AE step")
    p.add_argument("--skip-layers", action="store_true", help="only time the full AE step")
    p.add_argument("--quick", action="store_true", help="AE step: only the fast JAX variant and torch")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_only:
        torch_main(args.batch, args.repeats)
    else:
        jax_main(args)


if __name__ == "__main__":
    main()
