"""Layer shapes, parameter counts and variants of the HistoSPACE models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histospace_jax import models


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def conv_params(k, cin, cout):
    return k * k * cin * cout + cout


@pytest.fixture(scope="module")
def x():
    return jnp.zeros((2, 128, 128, 3), jnp.float32)


def test_encoder_shapes_and_parameter_count(x):
    enc = models.Encoder()
    v = enc.init(jax.random.PRNGKey(0), x)
    # 3 convs + BatchNorm scale/bias per block, counted by hand: 896+64, 18496+128, 73856+256.
    expected = sum(conv_params(3, a, b) + 2 * b for a, b in [(3, 32), (32, 64), (64, 128)])
    assert expected == 93_696
    assert n_params(v["params"]) == 93_696
    out = enc.apply(v, x)
    assert out.shape == (2, 16, 16, 128)


@pytest.mark.parametrize("variant,expected", [
    ("pool", sum(conv_params(3, a, b) for a, b in [(3, 32), (32, 64), (64, 128)])),
    ("relu", sum(conv_params(3, a, b) for a, b in [(3, 32), (32, 64), (64, 128)])),
])
def test_encoder_variants_without_batchnorm(x, variant, expected):
    v = models.Encoder(variant).init(jax.random.PRNGKey(0), x)
    assert n_params(v["params"]) == expected
    assert "batch_stats" not in v


def test_relu_variant_clips_negatives_pool_variant_does_not():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
    p = models.Encoder("pool", (4, 4, 4)).init(jax.random.PRNGKey(0), x)
    out_pool = models.Encoder("pool", (4, 4, 4)).apply(p, x)
    out_relu = models.Encoder("relu", (4, 4, 4)).apply(p, x)
    assert float(out_pool.min()) < 0.0
    assert float(out_relu.min()) >= 0.0


def test_autoencoder_reconstructs_in_unit_range(x):
    ae = models.Autoencoder()
    v = ae.init(jax.random.PRNGKey(0), x)
    y = ae.apply(v, jax.random.uniform(jax.random.PRNGKey(2), x.shape))
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # Decoder: 4x4 transposed convs 128->64->32->3 plus BN scale/bias on the two hidden layers.
    dec_expected = (16 * 128 * 64 + 64) + (16 * 64 * 32 + 32) + (16 * 32 * 3 + 3) + 2 * (64 + 32)
    assert n_params(v["params"]["decoder"]) == dec_expected


def test_regression_head_default_shapes(x):
    g = 37
    hs = models.HistoSpace(n_genes=g)
    v = hs.init(jax.random.PRNGKey(0), x)
    head = v["params"]["head"]
    assert head["conv0"]["Conv_0"]["kernel"].shape == (3, 3, 128, 128)
    assert head["fc0"]["kernel"].shape == (8192, 256)
    assert head["out"]["kernel"].shape == (256, g)
    assert hs.apply(v, x).shape == (2, g)
    feats = hs.apply(v, x, method="encode")
    assert feats.shape == (2, 16, 16, 128)
    # The head on precomputed features equals the full model.
    np.testing.assert_array_equal(hs.apply(v, feats, method="from_features"), hs.apply(v, x))


def test_head_complexity_sweep_keeps_fc_input():
    hs = models.HistoSpace(n_genes=5, conv_features=(128, 128, 128), fc_features=(512, 256))
    v = hs.init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)))
    head = v["params"]["head"]
    assert set(k for k in head if k.startswith("conv")) == {"conv0", "conv1", "conv2"}
    assert head["fc0"]["kernel"].shape == (8192, 512)
    assert head["fc1"]["kernel"].shape == (512, 256)


def test_unknown_variant_is_rejected(x):
    with pytest.raises(ValueError, match="unknown autoencoder variant"):
        models.Encoder("relu_bn_dropout").init(jax.random.PRNGKey(0), x)


def test_batchnorm_matches_flax_and_honours_mask():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 3)) * 3 + 1
    ours = models.BatchNorm(use_running_average=False)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v = ours.init(jax.random.PRNGKey(0), x)
    y, upd = ours.apply(v, x, mutable=["batch_stats"])
    y_ref, upd_ref = ref.apply(ref.init(jax.random.PRNGKey(0), x), x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], upd_ref["batch_stats"]["mean"], atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], upd_ref["batch_stats"]["var"], rtol=1e-5)
    # Masked rows do not enter the statistics: same output on kept rows as BN over the kept rows only.
    mask = jnp.array([1, 1, 0, 1, 0, 1], bool)
    y_m, _ = ours.apply(v, x.at[2].set(1e6), mask=mask, mutable=["batch_stats"])
    y_kept, _ = ours.apply(v, x[np.asarray(mask)], mutable=["batch_stats"])
    np.testing.assert_allclose(y_m[np.asarray(mask)], y_kept, atol=1e-5)


def _autodiff_batchnorm(x, scale, bias, rows, shift, eps=1e-5):
    """The textbook two-pass batch norm of x + shift over the weighted rows, left to autodiff (the reference)."""
    x = x + shift
    w = rows.reshape((-1,) + (1,) * (x.ndim - 1))
    count = rows.sum() * np.prod(x.shape[1:-1])
    mean = (w * x).sum(axis=tuple(range(x.ndim - 1))) / count
    var = (w * jnp.square(x - mean)).sum(axis=tuple(range(x.ndim - 1))) / count
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_train_gradient_matches_autodiff_reference(masked):
    k = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.normal(k[0], (6, 5, 4, 3)) * 2 + 0.5
    scale, bias, shift = (jax.random.normal(k[i], (3,)) for i in (1, 2, 3))
    rows = jnp.array([1, 1, 0, 1, 0, 1] if masked else [1] * 6, jnp.float32)
    ct = jax.random.normal(k[4], x.shape)

    def loss(fn, x, scale, bias):
        return jnp.vdot(fn(x, scale, bias, rows, shift)[0], ct)

    ours = lambda x, s, b, r, sh: models.batch_norm_train(x, s, b, r, sh, 1e-5, None)
    for a, b_ in zip(ours(x, scale, bias, rows, shift), _autodiff_batchnorm(x, scale, bias, rows, shift)):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(x, scale, bias)
    g_ref = jax.grad(lambda *a: loss(_autodiff_batchnorm, *a), argnums=(0, 1, 2))(x, scale, bias)
    for a, b_ in zip(g, g_ref):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
    # shift moves only the statistics: the output, and so every gradient, is the same without it
    g0 = jax.grad(lambda x: jnp.vdot(models.batch_norm_train(x, scale, bias, rows, shift * 0, 1e-5, None)[0], ct))(x)
    np.testing.assert_allclose(g[0], g0, rtol=1e-4, atol=1e-5)


def test_batch_norm_train_over_devices_equals_one_batch():
    """Statistics and gradients summed over an axis (two 'devices' under vmap) equal those of the whole batch."""
    x = jax.random.normal(jax.random.PRNGKey(4), (8, 3, 3, 2)) * 3
    scale, bias, shift = jnp.array([1.5, -0.5]), jnp.array([0.1, 0.2]), jnp.array([0.3, -2.0])
    rows = jnp.array([1, 0, 1, 1, 1, 1, 0, 1], jnp.float32)
    ct = jax.random.normal(jax.random.PRNGKey(5), x.shape)

    def whole(x, scale):
        y, mean, var = models.batch_norm_train(x, scale, bias, rows, shift, 1e-5, None)
        return jnp.vdot(y, ct), (mean, var)

    def split(xs, scale):
        def one(x, r, c):
            y, mean, var = models.batch_norm_train(x, scale, bias, r, shift, 1e-5, "d")
            return jnp.vdot(y, c), (mean, var)
        out, stats = jax.vmap(one, axis_name="d")(xs, rows.reshape(2, 4), ct.reshape(2, 4, 3, 3, 2))
        return out.sum(), stats

    (l1, (m1, v1)), (gx1, gs1) = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(x, scale)
    (l2, (m2, v2)), (gx2, gs2) = jax.value_and_grad(split, argnums=(0, 1), has_aux=True)(x.reshape(2, 4, 3, 3, 2), scale)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(m2[0], m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v2[1], v1, rtol=1e-5)
    np.testing.assert_allclose(gx2.reshape(x.shape), gx1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gs2, gs1, rtol=1e-4, atol=1e-5)


def test_encoder_conv_impls_same_loss_and_gradients():
    """conv_impl changes how XLA computes the encoder's convolutions, not the function or the parameters."""
    imgs = jax.random.uniform(jax.random.PRNGKey(6), (4, 32, 32, 3))
    fast, native = models.Autoencoder(conv_impl="fast"), models.Autoencoder(conv_impl="xla")
    v = fast.init(jax.random.PRNGKey(0), imgs)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(native.init(jax.random.PRNGKey(0), imgs))

    def loss(m, params):
        out, _ = m.apply({"params": params, "batch_stats": v["batch_stats"]}, imgs, True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out - imgs))

    (l1, g1), (l2, g2) = (jax.value_and_grad(lambda p: loss(m, p))(v["params"]) for m in (fast, native))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 + 1e-3 * float(np.abs(b).max()))



def test_head_conv_impls_same_prediction_and_gradients():
    """HistoSpace.conv_impl reaches the head's conv: the same function and parameter tree either way, with the
    options the heads are compiled with (xla_tuning.conv_step_options)."""
    from histospace_jax import xla_tuning

    feats = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 16, 128))
    y = jax.random.normal(jax.random.PRNGKey(4), (4, 5))
    fast, native = (models.HistoSpace(n_genes=5, conv_impl=impl) for impl in ("fast", "xla"))
    v = fast.init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)))
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
        native.init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3))))
    opts = xla_tuning.conv_step_options() or None

    def loss(m, params):
        out, _ = m.apply({**v, "params": params}, feats, True, method="from_features", mutable=["batch_stats"])
        return jnp.mean(jnp.square(out - y))

    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)), compiler_options=opts)(v["params"])
                          for m in (fast, native))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1["head"]), jax.tree_util.tree_leaves(g2["head"])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 + 1e-3 * float(np.abs(b).max()))
    p1, p2 = (m.apply(v, feats, method="from_features") for m in (fast, native))
    np.testing.assert_allclose(p1, p2, rtol=1e-4, atol=1e-5)
    # and the setting reaches the head: "fast" is conv2d's custom VJP, "xla" plain lax (the pool's VJP is in both)
    vjps = [str(jax.make_jaxpr(lambda f, m=m: m.apply(v, f, method="from_features"))(feats)).count("custom_vjp_call")
            for m in (fast, native)]
    assert vjps[0] == vjps[1] + 1, vjps


def test_example_dropout_draws_the_same_masks_on_any_device_split():
    """The mask of an example depends on the key and its global position only: one batch of 8 on one device
    equals the same batch as 4 shards of 2 (pmap, axis_index gives each shard's first example), and the kept
    units are scaled by 1 / (1 - rate) (inverted dropout), about `rate` of them dropped."""
    x = jnp.ones((8, 512))
    key = jax.random.PRNGKey(7)
    whole = models.example_dropout(x, 0.5, key, 0)
    assert set(np.unique(np.asarray(whole))) == {0.0, 2.0}
    assert abs(float(jnp.mean(whole == 0)) - 0.5) < 0.05
    n_dev = jax.local_device_count()
    if 8 % n_dev == 0:
        shards = x.reshape(n_dev, 8 // n_dev, 512)
        split = jax.pmap(lambda s: models.example_dropout(s, 0.5, key, jax.lax.axis_index("d") * s.shape[0]),
                         axis_name="d")(shards)
        np.testing.assert_array_equal(np.asarray(split).reshape(8, 512), np.asarray(whole))
    # Any split: the rows 4..7 drawn as their own batch starting at example 4
    np.testing.assert_array_equal(np.asarray(models.example_dropout(x[4:], 0.5, key, 4)), np.asarray(whole[4:]))
    assert not np.array_equal(np.asarray(whole[:4]), np.asarray(whole[4:]))  # examples differ
