"""Per-program XLA options that make our steps faster on a backend, chosen where they are measured to help.

XLA:CPU (jaxlib 0.10) sends 3x3 convolutions, dots and reductions to its YNNPACK library fusions by default.
On the autoencoder's train step (2-core AMD EPYC, batch 32) YNNPACK's convolutions were the slow part: the encoder
forward took 248 ms against 156 ms with convolutions left to XLA's Eigen path. With YNNPACK kept for reductions
only and the encoder's kernel gradients on XLA's own convolution (`conv_impl="xla"`, which is slower than our
im2col form under the defaults), the whole step takes 652 ms against 887 ms (`benchmarks/ae_step_profile.py`
with and without --xla-defaults; `benchmarks/speed.py` compares it with PyTorch).

The options go to one compiled program (jit/pmap `compiler_options`), never to the process's XLA_FLAGS: a
researcher importing our functions keeps their own settings, and a jaxlib that no longer knows the option falls
back to its defaults instead of aborting (an unknown flag in XLA_FLAGS is fatal).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# YNNPACK for reductions only: convolutions and dots go to XLA's Eigen kernels.
CPU_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros((2,), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - any refusal (unknown option, bad value) means: use the defaults
        return False
    return True


def supported(options: dict) -> dict:
    """`options` when this jaxlib's compiler accepts them, else {} (its defaults)."""
    return dict(options) if options and _accepted(tuple(sorted(options.items()))) else {}


def conv_step_options() -> dict:
    """Compiler options for a program dominated by convolutions (the autoencoder's step, the feature encoder,
    the regression heads' steps and predictions) on this backend.

    None with several processes: steps.pmap_step cannot apply options there (see its docstring), and the
    encoder's conv formulation must match what the step is compiled with."""
    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        return {}
    return supported(CPU_CONV_OPTIONS)


def conv_impl_for(options: dict) -> str:
    """ConvBlock.conv_impl (encoder and head) for a program compiled with `options` (same function either way).

    With CPU_CONV_OPTIONS, XLA's own convolution kernel gradient beats the im2col matmul (encoder block
    64x64x32->64: 91 ms against 154 ms); under XLA:CPU's defaults it is the other way round. The regression
    heads of a leave-one-patient-out run (10 heads vmapped, batch 32, 1,443 genes) train at 526 tiles/s with
    these options and XLA's convolution, against 247 with the defaults and im2col, and predict at 1,499 against
    438 tiles/s. Other backends keep "fast", the form every test and checkpoint of this project has used (no GPU
    or TPU measurement says otherwise yet).
    """
    return "xla" if options == CPU_CONV_OPTIONS else "fast"
