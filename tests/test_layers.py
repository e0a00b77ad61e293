"""histospace_jax.layers computes the same functions (values and gradients) as the Flax reference layers.

Tolerance: float32 arithmetic summed in a different order, so results agree to
``|fast - ref| <= 1e-4 * max|ref|`` elementwise (``_close``); max-pool forward is exact.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histospace_jax.layers import (
    UPCONV_IMPLS,
    ConvSame,
    UpConv,
    conv2d,
    max_pool_2x2,
    max_pool_2x2_first,
    relu_max_pool_2x2,
    same_padding,
    upconv_kernel_2x2,
    upconv_kernel_3x3,
)

RTOL = 1e-4


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.abs(b).max()), 1e-6)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def _grads(apply, variables, x, ct):
    """Gradients of <apply(variables, x), ct> w.r.t. (variables, x)."""
    return jax.grad(lambda v, x: jnp.vdot(apply(v, x), ct), argnums=(0, 1))(variables, x)


def _tree_close(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        _close(x, y)


UPCONV_CASES = [  # (N, H, W, Cin, Cout)
    (1, 1, 1, 1, 1),
    (2, 5, 7, 3, 4),
    (3, 4, 6, 16, 8),
]


@pytest.mark.parametrize("impl", UPCONV_IMPLS)
@pytest.mark.parametrize("shape", UPCONV_CASES)
def test_upconv_matches_conv_transpose(impl, shape):
    n, h, w, cin, cout = shape
    x = _normal(sum(shape), (n, h, w, cin))
    ref = nn.ConvTranspose(cout, kernel_size=(4, 4), strides=(2, 2), padding="SAME")
    # non-zero bias so the bias path is checked too
    variables = {"params": {"kernel": _normal(2, (4, 4, cin, cout)) * 0.3, "bias": _normal(3, (cout,))}}
    fast = UpConv(cout, impl=impl)
    ct = _normal(sum(shape) + 1, (n, 2 * h, 2 * w, cout))

    @jax.jit  # one compilation for both (ct is an argument: closed-over arrays get constant-folded)
    def both(v, x, ct):
        return [(m.apply(v, x), _grads(m.apply, v, x, ct)) for m in (ref, fast)]

    (y_ref, (gv_ref, gx_ref)), (y, (gv, gx)) = both(variables, x, ct)
    assert y.shape == (n, 2 * h, 2 * w, cout)
    _close(y, y_ref)
    _close(gx, gx_ref)
    _close(gv["params"]["kernel"], gv_ref["params"]["kernel"])
    _close(gv["params"]["bias"], gv_ref["params"]["bias"])


@pytest.mark.parametrize("impl", UPCONV_IMPLS)
def test_upconv_param_tree_identical_to_conv_transpose(impl):
    x = jnp.zeros((2, 4, 4, 5))
    key = jax.random.key(3)
    ref_vars = jax.jit(nn.ConvTranspose(7, kernel_size=(4, 4), strides=(2, 2), padding="SAME").init)(key, x)
    vars_ = jax.jit(UpConv(7, impl=impl).init)(key, x)
    assert jax.tree_util.tree_structure(vars_) == jax.tree_util.tree_structure(ref_vars)
    assert jax.tree.map(jnp.shape, vars_) == {"params": {"kernel": (4, 4, 5, 7), "bias": (7,)}}
    # same initialisers and names -> identical values from the same key
    for a, b in zip(jax.tree_util.tree_leaves(vars_), jax.tree_util.tree_leaves(ref_vars)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_upconv_checkpoints_interchangeable_between_impls():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 6, 6, 8)), jnp.float32)
    v = jax.eval_shape(UpConv(4, impl="transpose").init, jax.random.key(1), x)
    v = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(1).standard_normal(s.shape), s.dtype), v)
    outs = jax.jit(lambda v, x: [UpConv(4, impl=impl).apply(v, x) for impl in UPCONV_IMPLS])(v, x)
    for y in outs[1:]:
        _close(y, outs[0])


def test_upconv_kernel_rearrangements():
    w = jax.random.normal(jax.random.key(0), (4, 4, 2, 3))
    k2 = np.asarray(upconv_kernel_2x2(w)).reshape(2, 2, 2, 2, 2, 3)  # [u, v, ci, a, b, c]
    k3 = np.asarray(upconv_kernel_3x3(w)).reshape(3, 3, 2, 2, 2, 3)  # [i, j, ci, a, b, c]
    wn = np.asarray(w)
    for a in range(2):
        for b in range(2):
            for u in range(2):
                for v in range(2):
                    np.testing.assert_array_equal(k2[u, v, :, a, b], wn[2 * u + a, 2 * v + b])
            for i in range(3):
                for j in range(3):
                    ki, kj = 2 * i - a, 2 * j - b
                    expect = wn[ki, kj] if 0 <= ki < 4 and 0 <= kj < 4 else np.zeros((2, 3))
                    np.testing.assert_array_equal(k3[i, j, :, a, b], expect)


def test_upconv_rejects_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        UpConv(3, impl="nope").init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))


CONV_CASES = [  # (N, H, W, Cin, Cout, kernel_size)
    (2, 5, 7, 3, 4, (3, 3)),
    (3, 8, 8, 16, 8, (3, 3)),
    (2, 6, 6, 4, 5, (2, 2)),
    (2, 7, 9, 3, 2, (5, 3)),
]


@pytest.mark.parametrize("impl", ["fast", "xla"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_same_matches_nn_conv(impl, case):
    n, h, w, cin, cout, ks = case
    x = _normal(h * w + cin, (n, h, w, cin))
    ref = nn.Conv(cout, ks, padding="SAME")
    variables = {"params": {"kernel": _normal(1, ks + (cin, cout)) * 0.3, "bias": _normal(2, (cout,))}}
    fast = ConvSame(cout, ks, impl=impl)
    assert jax.tree.map(jnp.shape, jax.eval_shape(ref.init, jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    ct = _normal(3, (n, h, w, cout))

    @jax.jit
    def both(v, x, ct):
        return [(m.apply(v, x), _grads(m.apply, v, x, ct)) for m in (ref, fast)]

    (y_ref, (gv_ref, gx_ref)), (y, (gv, gx)) = both(variables, x, ct)
    _close(y, y_ref)
    _close(gx, gx_ref)
    _tree_close(gv, gv_ref)


def test_conv_same_param_tree_identical_to_nn_conv():
    x = jnp.zeros((1, 4, 4, 3))
    key = jax.random.key(5)
    a = jax.jit(nn.Conv(8, (3, 3), padding="SAME").init)(key, x)
    b = jax.jit(ConvSame(8).init)(key, x)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_conv2d_custom_gradient_asymmetric_padding():
    x = _normal(7, (2, 6, 5, 3))
    w = _normal(8, (2, 3, 3, 4))
    pad = ((0, 2), (1, 0))
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fn = lambda x, w: conv2d(x, w, pad)
    y = ref(x, w)
    _close(conv2d(x, w, pad), y)
    ct = _normal(9, y.shape)
    g_ref, g = jax.jit(
        lambda x, w, ct: [jax.grad(lambda x, w: jnp.vdot(f(x, w), ct), argnums=(0, 1))(x, w) for f in (ref, fn)]
    )(x, w, ct)
    _close(g[0], g_ref[0])
    _close(g[1], g_ref[1])


def test_same_padding_matches_lax():
    for ks in [(1, 1), (2, 2), (3, 3), (4, 5)]:
        expect = jax.lax.padtype_to_pads((9, 9), ks, (1, 1), "SAME")
        assert [tuple(p) for p in expect] == list(same_padding(ks))


def _ref_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


POOL_FNS = [max_pool_2x2, max_pool_2x2_first]


@pytest.mark.parametrize("pool", POOL_FNS)
@pytest.mark.parametrize("shape", [(1, 2, 2, 1), (3, 7, 9, 5), (2, 1, 4, 2), (4, 16, 16, 32)])
def test_max_pool_forward_and_gradient_without_ties(pool, shape):
    x = _normal(shape[1] * 31 + shape[2], shape)  # continuous values: no ties
    ct = _normal(1, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

    @jax.jit
    def both(x, ct):
        return [(f(x), jax.grad(lambda x: jnp.vdot(f(x), ct))(x)) for f in (_ref_pool, pool)]

    (y_ref, g_ref), (y, g) = both(x, ct)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))


@pytest.mark.parametrize("pool", POOL_FNS)
def test_max_pool_after_relu_gradient_equal_despite_zero_ties(pool):
    """In conv -> BN -> ReLU -> pool, windows of zeros tie; the ReLU gradient there is zero anyway."""
    x = _normal(11, (4, 10, 12, 6)) - 1.0  # ~84% negative: many all-zero windows after ReLU
    relu_windows = np.asarray(nn.relu(x)).reshape(4, 5, 2, 6, 2, 6).max(axis=(2, 4))
    assert (relu_windows == 0).mean() > 0.3  # the case is really exercised
    ct = _normal(12, (4, 5, 6, 6))
    g_ref, g = jax.jit(lambda x, ct: [jax.grad(lambda x: jnp.vdot(f(nn.relu(x)), ct))(x) for f in (_ref_pool, pool)])(
        x, ct
    )
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))


def test_max_pool_ties_first_matches_reference_plain_splits():
    x = jnp.round(_normal(12, (2, 8, 10, 4)))  # integers: many ties among maxima
    ct = _normal(13, (2, 4, 5, 4))
    fns = (_ref_pool, max_pool_2x2_first, max_pool_2x2)
    g_ref, g_first, g_split = jax.jit(lambda x, ct: [jax.grad(lambda x: jnp.vdot(f(x), ct))(x) for f in fns])(x, ct)
    np.testing.assert_array_equal(np.asarray(g_first), np.asarray(g_ref))
    # max_pool_2x2 splits the cotangent among tied maxima: different placement, same window sums
    assert not np.allclose(np.asarray(g_split), np.asarray(g_ref))
    win = lambda g: np.asarray(g).reshape(2, 4, 2, 5, 2, 4).sum(axis=(2, 4))
    np.testing.assert_allclose(win(g_split), win(g_ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 10, 4), (3, 7, 9, 5), (1, 2, 4, 1)])
def test_relu_max_pool_equals_pool_of_relu_value_and_gradient_with_ties(shape):
    """The fused ReLU + first-max pool is max_pool_2x2_first(relu(x)) (itself nn.max_pool's gradient) bit for bit:
    integer inputs give ties among positive maxima, all-negative windows and mixed zero windows."""
    x = jnp.round(_normal(21, shape) * 1.5)
    if shape[1] >= 4:
        x = x.at[0, :2, :2, :].set(0.0)  # a window of exact zeros
    ct = _normal(22, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    ref = lambda x: max_pool_2x2_first(nn.relu(x))
    (y_ref, g_ref), (y, g) = jax.jit(
        lambda x, ct: [(f(x), jax.grad(lambda x: jnp.vdot(f(x), ct))(x)) for f in (ref, relu_max_pool_2x2)])(x, ct)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
    # and against the Flax reference layers outright
    g_flax = jax.grad(lambda x: jnp.vdot(_ref_pool(nn.relu(x)), ct))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_flax))
    assert np.count_nonzero(np.asarray(g)) > 0


def test_small_network_gradients_equal_reference():
    """conv -> ReLU -> pool -> up-conv chain: reference layers vs fast layers, same parameters."""

    class Net(nn.Module):
        fast: bool

        @nn.compact
        def __call__(self, x):
            # explicit names: auto-names follow the class (Conv_0 vs ConvSame_0)
            for i, c in enumerate((8, 16)):
                name = f"conv{i}"
                conv = ConvSame(c, name=name) if self.fast else nn.Conv(c, (3, 3), padding="SAME", name=name)
                x = nn.relu(conv(x))
                x = max_pool_2x2(x) if self.fast else _ref_pool(x)
            for i, c in enumerate((8, 3)):
                name = f"up{i}"
                up = (
                    UpConv(c, name=name)
                    if self.fast
                    else nn.ConvTranspose(c, (4, 4), strides=(2, 2), padding="SAME", name=name)
                )
                x = up(x)
            return nn.sigmoid(x)

    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 16, 16, 3)), jnp.float32)
    ref, fast = Net(False), Net(True)
    v = jax.jit(ref.init)(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, jax.eval_shape(fast.init, jax.random.key(1), x)) == jax.tree.map(jnp.shape, v)
    loss = lambda m: (lambda v, x: jnp.mean((m.apply(v, x) - x) ** 2))
    (l_ref, g_ref), (l_fast, g_fast) = jax.jit(lambda v, x: [jax.value_and_grad(loss(m))(v, x) for m in (ref, fast)])(
        v, x
    )
    _close(l_fast, l_ref)
    _tree_close(g_fast, g_ref)
