"""HistoSPACE models as pure Flax linen modules.

Shapes with the defaults: 128x128x3 tile -> Encoder -> 16x16x128 -> RegressionHead conv block -> 8x8x128
-> 8192 -> 256 -> G genes. Images enter as float32 in [0, 1], the range of the decoder's sigmoid output.

The paper's three autoencoder variants are selected by `variant`:
  "pool"     conv -> maxpool                  (pooling only)
  "relu"     conv -> ReLU -> maxpool
  "relu_bn"  conv -> BatchNorm -> ReLU -> maxpool (the paper's choice; the default)
The decoder mirrors the encoder's variant with 4x4 stride-2 transposed convolutions.

Mixed precision: `dtype` (default float32) is the compute dtype of convolutions and dense layers; parameters
stay float32, BatchNorm statistics are computed in float32, and the models' outputs (reconstruction,
predicted expression) are float32, so losses and optimizer updates never run in bfloat16.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from histospace_jax.layers import ConvSame, UpConv, max_pool_2x2_first, relu_max_pool_2x2

VARIANTS = ("pool", "relu", "relu_bn")


def _channel_sums(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def batch_norm_train(x, scale, bias, rows, shift, epsilon, axis_name):
    """Training-mode batch normalisation of `x + shift` over the rows where `rows` is 1, applied to all rows.

    x: (N, ..., C) float32; scale, bias, shift: (C,); rows: (N,) float32, 1 = in the statistics, 0 = not.
    Returns the output and the batch mean and (biased) variance of `x + shift`, for the running averages. Sums are over all
    devices of `axis_name`. `shift` is a constant added before normalisation (a preceding layer's bias): it
    moves only the mean, so it never has to be added to the full activation.

    The gradient is written out (the textbook form: two channel sums of the cotangent, then one elementwise
    pass) rather than left to autodiff of the two-pass statistics, which materialises several full-size
    intermediates; on XLA:CPU that is most of the encoder's non-convolution time.
    """
    return _bn_forward(x, scale, bias, rows, shift, epsilon, axis_name)[0]


def _bn_forward(x, scale, bias, rows, shift, epsilon, axis_name):
    axes = tuple(range(x.ndim - 1))
    w = rows.reshape((-1,) + (1,) * (x.ndim - 1))
    per_row = 1
    for d in x.shape[1:-1]:
        per_row *= d
    keep = w > 0  # `where`, not a product: a NaN or inf in an excluded row must not reach the sums
    count, total = _channel_sums((rows.sum() * per_row, jnp.where(keep, x, 0.0).sum(axes)), axis_name)
    count = jnp.maximum(count, 1.0)
    mean_x = total / count
    # two-pass variance: no cancellation
    sq = _channel_sums(jnp.where(keep, jnp.square(x - mean_x), 0.0).sum(axes), axis_name)
    var = sq / count
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean_x) * (rstd * scale) + bias
    return (y, mean_x + shift, var), (x, scale, rows, mean_x, rstd, count)


def _bn_bwd(epsilon, axis_name, res, cotangents):
    x, scale, rows, mean_x, rstd, count = res
    g = cotangents[0]  # the statistics' own outputs feed only the running averages, never a loss
    axes = tuple(range(x.ndim - 1))
    w = rows.reshape((-1,) + (1,) * (x.ndim - 1))
    xhat = (x - mean_x) * rstd
    # d bias and d scale sum every row's cotangent (all rows are normalised); the statistics, and so the
    # gradient through them, come from the weighted rows only, summed over devices like the statistics.
    sum_g, sum_gx = g.sum(axes), (g * xhat).sum(axes)
    all_g, all_gx = _channel_sums((sum_g, sum_gx), axis_name)
    k = scale * rstd
    dx = k * g - jnp.where(w > 0, (k / count) * (all_g + xhat * all_gx), 0.0)
    # The output does not depend on `shift` (it moves the mean it is normalised by): its gradient is exactly 0.
    return dx, sum_gx, sum_g, jnp.zeros_like(rows), jnp.zeros_like(mean_x)


batch_norm_train.defvjp(_bn_forward, _bn_bwd)


class BatchNorm(nn.Module):
    """Batch normalisation whose statistics are exact over the global batch.

    Unlike averaging per-device means, sums and counts are added across devices (`axis_name`), so a batch split
    over 1 or N devices, or with masked rows (padding, a held-out patient's spots), normalises identically.
    Variables match flax.linen.BatchNorm: params {scale, bias}, batch_stats {mean, var} (biased variance).
    `shift` (optional, (C,)) is added to the input first; see `batch_norm_train`.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, mask=None, shift=None):
        out_dtype = x.dtype
        x = x.astype(jnp.float32)  # statistics of bfloat16 activations lose too much in the sums
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        shift = jnp.zeros((c,), jnp.float32) if shift is None else shift.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            return ((x + shift - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias).astype(out_dtype)
        rows = jnp.ones((x.shape[0],), jnp.float32) if mask is None else mask.reshape(x.shape[0]).astype(jnp.float32)
        y, mean, var = batch_norm_train(x, scale, bias, rows, shift, self.epsilon, self.axis_name)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
        return y.astype(out_dtype)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown autoencoder variant {variant!r}; choose one of {VARIANTS}")


class ConvBlock(nn.Module):
    """conv3x3 -> [BatchNorm] -> [ReLU] -> [maxpool 2x2]."""

    features: int
    use_bn: bool = True
    use_relu: bool = True
    pool: bool = True
    axis_name: str | None = None  # set under pmap so BatchNorm statistics are global across devices
    # "fast": nn.Conv's function with the kernel gradient as one im2col matmul (XLA:CPU's default lowering);
    # "xla": lax.conv_general_dilated throughout (see xla_tuning.conv_impl_for for when it is faster).
    conv_impl: str = "fast"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        # Named like nn.Conv's auto-name so parameter trees (and checkpoints) do not depend on conv_impl.
        x = ConvSame(self.features, (3, 3), impl=self.conv_impl, use_bias=False, dtype=self.dtype, name="Conv_0")(x)
        # The conv bias (kept so the architecture and its parameter count match the paper's) is followed by
        # BatchNorm, which removes any constant shift: its exact gradient is zero. Making that zero exact
        # matters: Adam would otherwise turn float rounding noise into +-learning-rate steps, so results
        # would depend on summation order (device count, fold grouping).
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if self.use_bn:
            # `mask` excludes rows (padding, a held-out patient) from the batch statistics. The bias enters as
            # BatchNorm's `shift`: it moves only the mean, so no pass over the full activation adds it.
            x = BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x, mask, shift=bias)
        else:
            x = x + bias.astype(x.dtype)
        if self.use_relu and self.pool:
            x = relu_max_pool_2x2(x)  # = max_pool_2x2_first(relu(x)), value and gradient, in one pass
        elif self.use_relu:
            x = nn.relu(x)
        elif self.pool:
            x = max_pool_2x2_first(x)
        return x


class Encoder(nn.Module):
    """Three conv blocks, 128x128x3 -> 16x16x128."""

    variant: str = "relu_bn"
    features: Sequence[int] = (32, 64, 128)
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "fast"  # ConvBlock.conv_impl: same function and parameters either way

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_variant(self.variant)
        for i, f in enumerate(self.features):
            x = ConvBlock(
                f,
                use_bn=self.variant == "relu_bn",
                use_relu=self.variant != "pool",
                axis_name=self.axis_name,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
                name=f"block{i}",
            )(x, train)
        return x


class Decoder(nn.Module):
    """Mirror of the encoder: 4x4 stride-2 transposed convs, 16x16x128 -> 128x128x3 in [0, 1]."""

    variant: str = "relu_bn"
    features: Sequence[int] = (64, 32)
    out_channels: int = 3
    upconv_impl: str = "subpixel"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool = False):
        _check_variant(self.variant)
        x = z
        for i, f in enumerate(self.features):
            x = UpConv(f, impl=self.upconv_impl, dtype=self.dtype, name=f"up{i}")(x)
            if self.variant == "relu_bn":
                x = BatchNorm(use_running_average=not train, axis_name=self.axis_name, name=f"bn{i}")(x)
            if self.variant != "pool":
                x = nn.relu(x)
        x = UpConv(self.out_channels, impl=self.upconv_impl, dtype=self.dtype, name=f"up{len(self.features)}")(x)
        return nn.sigmoid(x.astype(jnp.float32))


class Autoencoder(nn.Module):
    variant: str = "relu_bn"
    encoder_features: Sequence[int] = (32, 64, 128)
    upconv_impl: str = "subpixel"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "fast"  # the encoder's ConvBlock.conv_impl

    def setup(self):
        self.encoder = Encoder(self.variant, self.encoder_features, axis_name=self.axis_name, dtype=self.dtype,
                               conv_impl=self.conv_impl)
        decoder_features = tuple(reversed(self.encoder_features[:-1]))
        self.decoder = Decoder(self.variant, decoder_features, upconv_impl=self.upconv_impl,
                               axis_name=self.axis_name, dtype=self.dtype)

    def __call__(self, x, train: bool = False):
        return self.decoder(self.encoder(x, train), train)

    def encode(self, x, train: bool = False):
        return self.encoder(x, train)


def example_dropout(x: jax.Array, rate: float, key: jax.Array, first_example) -> jax.Array:
    """Inverted dropout whose mask for an example depends only on `key` and the example's position in the global
    batch (`first_example` + its row), so a batch split over any number of devices or processes draws the same
    masks as on one device (flax's Dropout draws per device, and results then depend on the layout)."""
    ids = first_example + jnp.arange(x.shape[0])
    keep = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, x.shape[1:]))(ids)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class RegressionHead(nn.Module):
    """Encoder features -> conv blocks -> flatten -> FC layers -> G genes.

    The first conv block pools (16x16 -> 8x8, so the flattened size is 8192 with 128 channels); further
    blocks (the paper's head-complexity sweep) keep the 8x8 grid so the FC input size stays the same.
    """

    n_genes: int
    conv_features: Sequence[int] = (128,)
    fc_features: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    axis_name: str | None = None
    # "zeros": the output layer starts at zero, so the first prediction is exactly the target mean (0 for
    # standardised targets) and there is no random output variance for the optimiser to remove by killing
    # the ReLUs (the collapse seen on real patients). "lecun": flax's default (the paper's).
    output_init: str = "lecun"
    dtype: Any = jnp.float32
    conv_impl: str = "fast"  # ConvBlock.conv_impl: same function and parameters either way
    # With neighbourhood context, a [B, C] vector per example (context.py) joins the flattened conv output at
    # the first FC layer's input.
    use_context: bool = False

    @nn.compact
    def __call__(self, features, train: bool = False, mask=None, context=None):
        _check_context(self.use_context, context)
        x = features.astype(self.dtype)
        for i, f in enumerate(self.conv_features):
            x = ConvBlock(f, pool=(i == 0), axis_name=self.axis_name, dtype=self.dtype, conv_impl=self.conv_impl,
                          name=f"conv{i}")(x, train, mask)
        x = x.reshape((x.shape[0], -1))
        if self.use_context:
            x = jnp.concatenate([x, context.astype(self.dtype)], axis=-1)
        for i, f in enumerate(self.fc_features):
            x = nn.relu(nn.Dense(f, dtype=self.dtype, name=f"fc{i}")(x))
            if self.dropout_rate > 0 and train:
                first = jax.lax.axis_index(self.axis_name) * x.shape[0] if self.axis_name else 0
                x = example_dropout(x, self.dropout_rate, self.make_rng("dropout"), first)
        init = nn.initializers.zeros if self.output_init == "zeros" else nn.linear.default_kernel_init
        return nn.Dense(self.n_genes, kernel_init=init, dtype=self.dtype, name="out")(x).astype(jnp.float32)


def _check_context(use_context: bool, context) -> None:
    if use_context and context is None:
        raise ValueError("this model was built with neighbourhood context (model.context=neighbours): pass "
                         "context=[B, C] (histospace_jax.context)")
    if not use_context and context is not None:
        raise ValueError("this model has no neighbourhood context input (model.context=none), but a context was "
                         "passed")


class HistoSpace(nn.Module):
    """Frozen encoder + regression head. Params: {'encoder': ..., 'head': ...}.

    The encoder always runs on its BatchNorm running averages and behind `stop_gradient`: it is a fixed
    feature extractor. (The optimizer must also zero its updates; see steps.make_regression_optimizer.)
    """

    n_genes: int
    variant: str = "relu_bn"
    encoder_features: Sequence[int] = (32, 64, 128)
    conv_features: Sequence[int] = (128,)
    fc_features: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    axis_name: str | None = None
    output_init: str = "lecun"
    dtype: Any = jnp.float32
    # The head's ConvBlock.conv_impl (xla_tuning.conv_impl_for). The frozen encoder only runs forward, where the
    # im2col form is the faster one under either option set (263 / 288 against 191 / 227 tiles/s on CPU).
    conv_impl: str = "fast"
    use_context: bool = False  # RegressionHead.use_context: `context` is then a required input
    # The dtype the heads' training read the frozen features in (train.feature_cache_dtype): encoding rounds to
    # it, so features computed here equal the cached ones the heads learnt from. None: not rounded.
    feature_dtype: Any = None

    def setup(self):
        self.encoder = Encoder(self.variant, self.encoder_features, dtype=self.dtype)
        self.head = RegressionHead(self.n_genes, self.conv_features, self.fc_features, self.dropout_rate,
                                   axis_name=self.axis_name, output_init=self.output_init, dtype=self.dtype,
                                   conv_impl=self.conv_impl, use_context=self.use_context)

    def __call__(self, images, train: bool = False, mask=None, context=None):
        return self.head(jax.lax.stop_gradient(self.encode(images)), train, mask, context)

    def encode(self, images):
        features = self.encoder(images, train=False)
        if self.feature_dtype is not None and jnp.finfo(self.feature_dtype).bits < jnp.finfo(features.dtype).bits:
            # Not astype(feature_dtype).astype(...): XLA may drop such a round trip inside a jitted program.
            info = jnp.finfo(self.feature_dtype)
            features = jax.lax.reduce_precision(features, exponent_bits=info.nexp, mantissa_bits=info.nmant)
        return features

    def from_features(self, features, train: bool = False, mask=None, context=None):
        """The head alone, on precomputed (cached) encoder features."""
        return self.head(features, train, mask, context)

    def sample_context(self, batch: int = 1):
        """A zero context of the right shape (for init), or None for a model without context."""
        return jnp.zeros((batch, self.encoder_features[-1]), jnp.float32) if self.use_context else None


def to_unit_range(images_uint8):
    """uint8 tiles -> float32 in [0, 1], the range the sigmoid decoder reproduces."""
    return jnp.asarray(images_uint8, jnp.float32) / 255.0
