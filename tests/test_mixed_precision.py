"""Mixed precision (model.compute_dtype=bfloat16) and the persistent compilation cache switch."""

import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import builders, config as config_lib, features, main, models, steps


def _tiles(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


class Store:
    """What cached_features reads of a store: its manifest, spot count and tiles."""
    manifest = {"x": 1}
    n_spots = 6
    tiles = _tiles(6)


def test_bfloat16_keeps_float32_parameters_and_outputs_and_tracks_float32():
    x = models.to_unit_range(_tiles())
    f32 = models.HistoSpace(n_genes=5, encoder_features=(8, 16, 32))
    bf16 = models.HistoSpace(n_genes=5, encoder_features=(8, 16, 32), dtype=jnp.bfloat16)
    variables = f32.init(jax.random.PRNGKey(0), x)
    # Same parameter tree and dtypes: a checkpoint moves between precisions unchanged.
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        bf16.init(jax.random.PRNGKey(0), x))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16.init(jax.random.PRNGKey(0), x))} == {
        jnp.dtype(jnp.float32)}
    y32 = f32.apply(variables, x)
    y16 = bf16.apply(variables, x)
    assert y16.dtype == jnp.float32  # losses never run in bfloat16
    # bfloat16 has an 8-bit mantissa (relative rounding 2^-9 per op): agreement to a few percent of the spread.
    spread = float(jnp.std(y32))
    assert float(jnp.max(jnp.abs(y16 - y32))) < 0.1 * spread + 1e-3
    assert float(jnp.max(jnp.abs(y16 - y32))) > 0  # it really computed in bfloat16


def test_bfloat16_batchnorm_statistics_are_float32():
    bn = models.BatchNorm()
    x = (jnp.arange(64, dtype=jnp.float32).reshape(4, 4, 4) * 37.0 + 1000.0).astype(jnp.bfloat16)
    v = bn.init(jax.random.PRNGKey(0), x)
    y, upd = bn.apply(v, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float32).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * ref.mean(0), rtol=1e-6)
    assert upd["batch_stats"]["var"].dtype == jnp.float32


def test_autoencoder_step_in_bfloat16_lowers_the_loss():
    ae = models.Autoencoder(encoder_features=(8, 16, 32), dtype=jnp.bfloat16)
    state = steps.create_train_state(ae, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                     steps.make_ae_optimizer(3e-3))
    batch = {"image": _tiles(8)}
    step = jax.jit(steps.ae_train_step)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.params))


def test_feature_cache_in_bfloat16_is_half_the_size_and_keyed_apart(tmp_path):
    c = config_lib.get_config()
    c.model.encoder_features = (8, 16, 32)
    c.data.tile_size = 32
    enc = builders.random_encoder_variables(c, seed=0)
    f32, p32 = features.cached_features(str(tmp_path), Store, enc, variant="relu_bn", encoder_features=(8, 16, 32),
                                        batch_size=4)
    f16, p16 = features.cached_features(str(tmp_path), Store, enc, variant="relu_bn", encoder_features=(8, 16, 32),
                                        batch_size=4, dtype="bfloat16")
    assert p32 != p16 and f16.dtype == jnp.bfloat16 and f16.nbytes * 2 == f32.nbytes
    np.testing.assert_allclose(np.asarray(f16, np.float32), f32, atol=0.05 * float(np.abs(f32).max()))
    again, _ = features.cached_features(str(tmp_path), Store, enc, variant="relu_bn", encoder_features=(8, 16, 32),
                                        batch_size=4, dtype="bfloat16")
    assert again.dtype == jnp.bfloat16 and np.array_equal(np.asarray(again, np.float32), np.asarray(f16, np.float32))


def test_compute_dtype_is_validated_and_recorded_in_the_architecture():
    c = config_lib.get_config()
    c.model.compute_dtype = "float16"
    try:
        config_lib.validate(c)
        raise AssertionError("float16 accepted")
    except config_lib.ConfigError as e:
        assert "model.compute_dtype" in str(e)
    c.model.compute_dtype = "bfloat16"
    arch = builders.architecture(c)
    assert arch["compute_dtype"] == "bfloat16"
    assert builders.histospace_from_architecture(arch, 3).dtype == jnp.bfloat16


def test_compilation_cache_setting(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        assert main.enable_compilation_cache("") == ""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert main.enable_compilation_cache("auto") == str(tmp_path / "histospace_jax" / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "histospace_jax" / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_bfloat16_feature_cache_keeps_float32_computation_and_rounds_only_the_stored_values(tmp_path):
    """train.feature_cache_dtype=bfloat16: the encoder computes in float32 and only the stored features are
    rounded, so they equal the float32 cache cast to bfloat16, at half its bytes, under their own key (apart from
    the float32 cache and from features computed in bfloat16)."""
    c = config_lib.get_config()
    c.model.encoder_features = (8, 16, 32)
    enc = builders.random_encoder_variables(c, seed=0)
    kw = dict(variant="relu_bn", encoder_features=(8, 16, 32), batch_size=4)
    f32, p32 = features.cached_features(str(tmp_path), Store, enc, **kw)
    stored, p_stored = features.cached_features(str(tmp_path), Store, enc, dtype="bfloat16", compute_dtype="float32",
                                                **kw)
    computed, p_computed = features.cached_features(str(tmp_path), Store, enc, dtype="bfloat16", **kw)
    assert len({p32, p_stored, p_computed}) == 3
    assert stored.dtype == jnp.bfloat16 and stored.nbytes * 2 == f32.nbytes
    np.testing.assert_array_equal(np.asarray(stored, np.float32), np.asarray(f32.astype(jnp.bfloat16), np.float32))
    c.train.feature_cache_dtype = "bfloat16"
    assert features.cache_dtype(c) == "bfloat16"
    c.train.feature_cache_dtype = "auto"
    c.model.compute_dtype = "bfloat16"
    assert features.cache_dtype(c) == "bfloat16"
    c.train.feature_cache_dtype = "float32"
    assert features.cache_dtype(c) == "float32"


def test_an_exported_model_rounds_its_features_as_the_cache_its_heads_learnt_from_did():
    """model.json records the features' dtype, and the model predict rebuilds from it rounds what its encoder
    computes to that dtype (as the bfloat16 cache did), so predict's heads see the values they were trained on;
    models exported before it was recorded are not rounded."""
    c = config_lib.get_config()  # the default encoder on 128-px tiles: where XLA dropped an astype round trip
    c.model.head_conv_features, c.model.head_fc_features = (8,), (8,)
    c.train.feature_cache_dtype = "bfloat16"
    arch = builders.architecture(c)
    assert arch["feature_dtype"] == "bfloat16" and arch["compute_dtype"] == "float32"
    rounded = builders.histospace_from_architecture(arch, 3)
    plain = builders.histospace_from_architecture({k: v for k, v in arch.items() if k != "feature_dtype"}, 3)
    assert plain.feature_dtype is None
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3)), jnp.float32) / 255.0
    variables = plain.init(jax.random.PRNGKey(0), x)
    exact = plain.apply(variables, x, method="encode")
    # Jitted, as predict runs it (XLA may drop an astype round trip inside a program; this must survive).
    got = jax.jit(lambda v, t: rounded.apply(v, t, method="encode"))(variables, x)
    assert got.dtype == jnp.float32 and not np.array_equal(np.asarray(got), np.asarray(exact))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(exact.astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(jax.jit(rounded.apply)(variables, x)),
                                  np.asarray(rounded.apply(variables, got, method="from_features")))
    c.train.feature_cache_dtype = "auto"
    assert builders.architecture(c)["feature_dtype"] == "float32"
