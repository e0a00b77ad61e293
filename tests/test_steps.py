"""Pure train/eval/predict steps: learning happens, and the frozen encoder really stays frozen."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import models, steps


def _tiles(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_ae_step_reduces_reconstruction_error():
    ae = models.Autoencoder(encoder_features=(8, 8, 8))
    state = steps.create_train_state(ae, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                     steps.make_ae_optimizer(3e-3))
    batch = {"image": _tiles(8)}
    step = jax.jit(steps.ae_train_step)
    before = float(steps.ae_eval_step(state, batch)["sse"])
    losses = []
    for _ in range(25):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    after = steps.ae_eval_step(state, batch)
    assert float(after["sse"]) < before
    assert float(after["count"]) == 8 * 32 * 32 * 3
    # The reported loss is the MSE on [0, 1] images, computed independently here.
    recon = steps.ae_reconstruct(state, batch["image"])
    assert recon.shape == (8, 32, 32, 3)


def _regression_setup(weight_decay=1e-2, n_genes=5):
    hs = models.HistoSpace(n_genes=n_genes, encoder_features=(8, 16, 128))
    enc = models.Encoder(features=(8, 16, 128))
    enc_vars = enc.init(jax.random.PRNGKey(7), jnp.zeros((1, 128, 128, 3)))
    # Non-trivial running statistics, as after pretraining.
    enc_vars = jax.tree_util.tree_map(lambda x: x, enc_vars)
    enc_vars["batch_stats"] = jax.tree_util.tree_map(lambda x: x + 0.3, enc_vars["batch_stats"])
    tx = steps.make_regression_optimizer(1e-3, weight_decay=weight_decay)
    state = steps.create_regression_state(hs, jax.random.PRNGKey(1), enc_vars, tx)
    return hs, enc, enc_vars, state


def test_frozen_encoder_is_bit_identical_after_regression_steps():
    hs, enc, enc_vars, state = _regression_setup(weight_decay=1e-2)
    rng = np.random.default_rng(0)
    batch = {"image": _tiles(4, size=128), "expression": rng.normal(size=(4, 5)).astype(np.float32)}
    head_before = jax.tree_util.tree_map(np.asarray, state.params["head"])
    step = jax.jit(steps.regression_train_step)
    for _ in range(4):
        state, _ = step(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(state.params["encoder"]), jax.tree_util.tree_leaves(enc_vars["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(state.batch_stats["encoder"]),
                    jax.tree_util.tree_leaves(enc_vars["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... while the head did train. Exception: the bias of a conv feeding BatchNorm, whose exact gradient is
    # zero (BN removes any shift); it stays exactly at its initial value.
    flat_before = flax.traverse_util.flatten_dict(head_before)
    flat_after = flax.traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, state.params["head"]))
    for path, before in flat_before.items():
        moved = not np.array_equal(before, flat_after[path])
        pre_bn_bias = path[0].startswith("conv") and path[1:] == ("bias",)
        assert moved != pre_bn_bias, path


def test_weight_decay_alone_would_move_the_encoder():
    # The reason for set_to_zero: plain AdamW with stop_gradient still decays the encoder's weights.
    import optax

    hs, enc, enc_vars, state = _regression_setup()
    plain = steps.create_regression_state(hs, jax.random.PRNGKey(1), enc_vars, optax.adamw(1e-3, weight_decay=1e-2))
    batch = {"image": _tiles(4, size=128), "expression": np.zeros((4, 5), np.float32)}
    plain, _ = jax.jit(steps.regression_train_step)(plain, batch)
    k0 = np.asarray(enc_vars["params"]["block0"]["Conv_0"]["kernel"])
    k1 = np.asarray(plain.params["encoder"]["block0"]["Conv_0"]["kernel"])
    assert not np.array_equal(k0, k1)


def test_regression_step_on_features_equals_step_on_images(optimised_xla):
    hs, enc, enc_vars, state = _regression_setup()
    rng = np.random.default_rng(0)
    images = _tiles(4, size=128)
    y = rng.normal(size=(4, 5)).astype(np.float32)
    feats = steps.encode_step(enc, {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]},
                              images)
    s_img, m_img = jax.jit(steps.regression_train_step)(state, {"image": images, "expression": y})
    s_feat, m_feat = jax.jit(steps.regression_train_step)(state, {"features": feats, "expression": y})
    np.testing.assert_allclose(float(m_img["loss"]), float(m_feat["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s_img.params["head"]), jax.tree_util.tree_leaves(s_feat.params["head"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_masked_rows_do_not_influence_training():
    hs, enc, enc_vars, state = _regression_setup()
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 16, 16, 128)).astype(np.float32)
    y = rng.normal(size=(6, 5)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
    s1, m1 = jax.jit(steps.regression_train_step)(state, {"features": feats, "expression": y, "mask": mask})
    feats2, y2 = feats.copy(), y.copy()
    feats2[[2, 4]] = 1e4
    y2[[2, 4]] = np.nan
    s2, m2 = jax.jit(steps.regression_train_step)(state, {"features": feats2, "expression": y2, "mask": mask})
    assert float(m1["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_uses_running_averages():
    hs, enc, enc_vars, state = _regression_setup()
    images = _tiles(3, size=128)
    pred_all = steps.predict_step(state, {"image": images})
    pred_one = steps.predict_step(state, {"image": images[:1]})
    # Inference does not depend on the rest of the batch.
    np.testing.assert_allclose(np.asarray(pred_all[:1]), np.asarray(pred_one), rtol=1e-5, atol=1e-6)


def test_predict_with_hidden_returns_the_last_hidden_layer_before_its_relu():
    """The hidden units it returns are the ones the output layer reads: relu(hidden) @ W_out + b_out, computed
    here in NumPy from the parameters, is the prediction (two FC layers: the last one is returned)."""
    hs = models.HistoSpace(n_genes=5, encoder_features=(4, 4, 8), conv_features=(8,), fc_features=(16, 6))
    enc_vars = models.Encoder("relu_bn", (4, 4, 8)).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    state = steps.create_regression_state(hs, jax.random.PRNGKey(1), dict(enc_vars),
                                          steps.make_regression_optimizer(1e-3), tile_size=32)
    feats = np.random.default_rng(2).normal(size=(7, 4, 4, 8)).astype(np.float32)
    pred, hidden = jax.jit(steps.predict_with_hidden_step)(state, {"features": feats})
    assert hidden.shape == (7, 6)
    out = state.params["head"]["out"]
    by_hand = np.maximum(np.asarray(hidden, np.float64), 0) @ np.asarray(out["kernel"], np.float64) + \
        np.asarray(out["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(pred), by_hand, rtol=1e-5, atol=1e-5)
    # Two compiled programs: XLA may fuse them differently (it did on an AVX-512 CPU), so float32 rounding.
    np.testing.assert_allclose(np.asarray(pred), np.asarray(steps.predict_step(state, {"features": feats})),
                               rtol=1e-6, atol=1e-6)


def test_compiled_initialisation_equals_flax_op_by_op_initialisation():
    """create_regression_state compiles model.init and the optimizer's init; the state must be the one flax builds
    op by op (the same values, bit for bit), and an unhashable setting (an array learning rate) still works."""
    hs, enc, enc_vars, state = _regression_setup(weight_decay=1e-2)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(1))
    variables = hs.init(init_key, jnp.zeros((1, 128, 128, 3), jnp.float32))
    params = flax.core.unfreeze(variables["params"])
    params["encoder"] = enc_vars["params"]
    batch_stats = flax.core.unfreeze(variables["batch_stats"])
    batch_stats["encoder"] = enc_vars["batch_stats"]
    tx = steps.make_regression_optimizer(1e-3, weight_decay=1e-2)
    eager = steps.TrainState.create(apply_fn=hs.apply, params=params, tx=tx, batch_stats=batch_stats, key=state_key)
    leaves = lambda s: jax.tree_util.tree_leaves((s.params, s.batch_stats, s.opt_state, s.key))  # noqa: E731
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(eager.opt_state)
    for a, b in zip(leaves(state), leaves(eager), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tx is steps.make_regression_optimizer(1e-3, weight_decay=1e-2)
    arr = steps.create_regression_state(hs, jax.random.PRNGKey(1), enc_vars,
                                        steps.make_regression_optimizer(jnp.asarray(1e-3)))
    for a, b in zip(jax.tree_util.tree_leaves(arr.params), jax.tree_util.tree_leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
