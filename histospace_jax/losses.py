"""Losses. Pure functions of arrays; `mask` weights rows (1 = counts, 0 = padding or held-out)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def row_mse(pred, target):
    """Mean squared error per row (over all trailing axes)."""
    sq = jnp.square(pred - target)
    return sq.reshape(sq.shape[0], -1).mean(axis=1)


def row_huber(pred, target, delta: float):
    """optax.huber_loss (0.5 x^2 for |x| <= delta, delta (|x| - delta/2) beyond) averaged over genes, per row."""
    return optax.huber_loss(pred, target, delta=delta).mean(axis=-1)


def masked_sum(row_losses, mask=None):
    """Sum of row losses where mask is set, and the number of rows counted.

    Masked rows go through `where`, not a multiplication, so a NaN in a held-out row cannot leak into the sum.
    """
    if mask is None:
        return row_losses.sum(), jnp.asarray(row_losses.shape[0], row_losses.dtype)
    mask = mask.astype(bool)
    return jnp.where(mask, row_losses, 0.0).sum(), mask.sum().astype(row_losses.dtype)
