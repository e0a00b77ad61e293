"""HED stain jitter (train.stain_jitter): the colour transform against a hand-built tile of known stain
concentrations, its draws, the views it produces, the feature cache and the configuration checks."""

import os

import numpy as np
import pytest

from histospace_jax import checkpointing, config as config_lib, features
from histospace_jax.errors import ConfigError
from histospace_jax.ingest import stain

# Ruifrok & Johnston's optical-density colours of haematoxylin, eosin and DAB, normalised, written out here so
# the test does not read them from the module it checks.
H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
D = np.array([0.27, 0.57, 0.78]) / np.linalg.norm([0.27, 0.57, 0.78])


def tile_from_concentrations(conc: np.ndarray) -> np.ndarray:
    """[..., 3] (H, E, DAB) concentrations -> uint8 RGB by Beer-Lambert, I = 256 exp(-OD) - 1."""
    od = conc[..., :1] * H + conc[..., 1:2] * E + conc[..., 2:] * D
    return np.round(np.clip(256.0 * np.exp(-od) - 1.0, 0, 255)).astype(np.uint8)


def test_hed_jitter_scales_and_shifts_each_stain():
    rng = np.random.default_rng(0)
    conc = np.stack([rng.uniform(0.0, 1.0, (2, 8, 8)), rng.uniform(0.0, 0.8, (2, 8, 8)), np.zeros((2, 8, 8))], -1)
    tiles = tile_from_concentrations(conc)
    scale = np.array([[1.2, 0.8, 1.0], [0.9, 1.1, 1.0]])
    shift = np.array([[0.05, -0.03, 0.0], [0.0, 0.02, 0.04]])
    out = stain.hed_jitter(tiles, scale, shift)
    expected = tile_from_concentrations(conc * scale[:, None, None] + shift[:, None, None])
    # Within 2 grey levels: the input tile was itself rounded to uint8 before its concentrations were recovered.
    assert np.abs(out.astype(int) - expected).max() <= 2
    assert np.abs(out.astype(int) - tiles).max() > 10  # and the change is not small


def test_hed_jitter_at_scale_one_and_shift_zero_returns_the_tiles():
    tiles = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = stain.hed_jitter(tiles, np.ones((3, 3)), np.zeros((3, 3)))
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - tiles).max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        stain.hed_jitter(tiles.astype(np.float32), np.ones((3, 3)), np.zeros((3, 3)))


def test_draws_depend_on_the_tile_not_on_its_batch():
    scale, shift = features.stain_jitter_draws(0.2, 7, 3, np.array([5, 6, 7, 8]))
    s2, h2 = features.stain_jitter_draws(0.2, 7, 3, np.array([8, 6]))
    np.testing.assert_array_equal(s2, scale[[3, 1]])
    np.testing.assert_array_equal(h2, shift[[3, 1]])
    assert scale.min() >= 0.8 and scale.max() <= 1.2 and np.abs(shift).max() <= 0.2
    other_view, _ = features.stain_jitter_draws(0.2, 7, 4, np.array([5, 6, 7, 8]))
    other_seed, _ = features.stain_jitter_draws(0.2, 8, 3, np.array([5, 6, 7, 8]))
    assert not np.allclose(other_view, scale) and not np.allclose(other_seed, scale)


def test_augmented_view_leaves_view_zero_and_jitters_the_others():
    tiles = np.random.default_rng(2).integers(40, 230, (4, 8, 8, 3), dtype=np.uint8)
    ids = np.arange(4)
    np.testing.assert_array_equal(features.augmented_view(tiles, 0, stain_jitter=0.3, ids=ids), tiles)
    for v in (1, 5):
        plain = features.dihedral(tiles, v)
        np.testing.assert_array_equal(features.augmented_view(tiles, v), plain)
        jittered = features.augmented_view(tiles, v, stain_jitter=0.3, ids=ids, seed=1)
        scale, shift = features.stain_jitter_draws(0.3, 1, v, ids)
        np.testing.assert_array_equal(jittered, stain.hed_jitter(plain, scale, shift))
        assert np.abs(jittered.astype(int) - plain).max() > 5
    with pytest.raises(ValueError, match="one id per tile"):
        features.augmented_view(tiles, 2, stain_jitter=0.3)


def test_feature_cache_with_stain_jitter(tmp_path):
    """The jittered cache has its own key; view 0 matches the plain cache; the other views differ from it and
    do not depend on the batch size they were computed with."""
    from tests.test_parallel import TILE, tiny_config

    from histospace_jax import builders
    from histospace_jax.data import open_store

    config = tiny_config(str(tmp_path / "demo"))
    store = open_store(config.data.store)
    enc = builders.random_encoder_variables(config, seed=3)
    kw = dict(variant="relu_bn", encoder_features=(4, 8, 8), views=8)
    plain, p_plain = features.cached_features(str(tmp_path / "c"), store, enc, **kw)
    jit, p_jit = features.cached_features(str(tmp_path / "c"), store, enc, stain_jitter=0.2, jitter_seed=1,
                                          batch_size=16, **kw)
    jit_b4, _ = features.cached_features(str(tmp_path / "other"), store, enc, stain_jitter=0.2, jitter_seed=1,
                                         batch_size=4, **kw)
    assert p_plain != p_jit and jit.shape == plain.shape == (8, store.n_spots, TILE // 8, TILE // 8, 8)
    np.testing.assert_array_equal(jit[0], plain[0])
    assert np.abs(jit[1:] - plain[1:]).max() > 1e-3
    np.testing.assert_allclose(jit_b4, jit, rtol=1e-5, atol=1e-6)
    other_seed = features.cache_key(store, enc, "relu_bn", 8, "float32", 0.2, 2)
    assert other_seed != os.path.basename(p_jit).split("-", 1)[1]


def test_config_checks_stain_jitter():
    c = config_lib.get_config()
    c.train.stain_jitter = 1.0
    with pytest.raises(ConfigError, match=r"train.stain_jitter=1.0: must be a number in \[0, 1\)"):
        config_lib.validate(c)
    c.train.stain_jitter, c.train.augment = 0.2, "none"
    with pytest.raises(ConfigError, match="augment=dihedral"):
        config_lib.validate(c)
    c.train.augment = "auto"
    config_lib.validate(c)  # auto is resolved later: on the demo it means no augmentation
    with pytest.raises(ConfigError, match="augment=auto's choice on the synthetic demo"):
        config_lib.resolve_auto(c, log=lambda *_: None)
    # Head checkpoints written before the setting existed were trained without jitter.
    assert checkpointing.ADDED_LATER["train.stain_jitter"] == 0.0
