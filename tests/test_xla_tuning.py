"""Per-program compiler options: refused options fall back to defaults; options change speed, never results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histospace_jax import models, steps, xla_tuning


def test_unknown_option_falls_back_to_defaults():
    assert xla_tuning.supported({"xla_cpu_no_such_option_anywhere": "1"}) == {}
    assert xla_tuning.supported({}) == {}
    assert xla_tuning.conv_impl_for({}) == "fast"


def test_ae_step_with_conv_options_equals_default_compilation():
    options = xla_tuning.supported(xla_tuning.CPU_CONV_OPTIONS)
    if jax.default_backend() != "cpu" or not options:
        pytest.skip("these XLA:CPU options are for the CPU backend of a jaxlib that accepts them")
    assert xla_tuning.conv_step_options() == options
    assert xla_tuning.conv_impl_for(options) == "xla"
    images = np.random.default_rng(0).integers(0, 256, (1, 4, 32, 32, 3), dtype=np.uint8)  # [device, batch, ...]
    results = []
    for impl, opts in (("fast", None), ("xla", options)):
        ae = models.Autoencoder(conv_impl=impl, axis_name="batch")
        state = steps.create_train_state(ae, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                         steps.make_ae_optimizer(1e-3))
        step = steps.pmap_step(steps.ae_train_step, axis_name="batch", compiler_options=opts)
        state = steps.replicate(state)
        for _ in range(2):  # the second call reuses the executable compiled for this input signature
            state, metrics = step(state, {"image": images})
        results.append((float(metrics["loss"][0]), steps.unreplicate(state.params)))
    (l1, p1), (l2, p2) = results
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    # Adam moves a parameter by at most ~lr = 1e-3 per step, so summation-order noise in tiny gradients shows
    # up to a few 1e-5 here; a different function would move parameters by whole steps.
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
