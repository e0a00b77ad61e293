"""Heads that stream their features from the on-disk cache (train.features_in_memory=off, what STNet scale with
8 views needs) train on the same batches as heads reading them from memory, and give the same predictions."""

import numpy as np
import pytest

from histospace_jax import features
from tests.test_smoke import run_main

# Several members per fold, several views, several checkpoints, neighbourhood context (kept in memory beside
# the streamed features): every path the streamed reader feeds.
RECIPE = ["--config.train.augment=dihedral", "--config.train.ensemble=2", "--config.loo.random_encoder_control=off",
          "--config.model.context=neighbours",
          # Two of the three folds: still several folds in one program reading their own rows from the stream.
          "--config.loo.patients=P1,P2"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_streamed_features_give_the_in_memory_results(tmp_path):
    demo = tmp_path / "demo"
    runs = {}
    for setting in ("on", "off"):
        w = tmp_path / setting
        proc = run_main(w, demo, *RECIPE, f"--config.train.features_in_memory={setting}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(w / "predictions.npz") as p:
            runs[setting] = {k: p[k] for k in p.files if k.startswith("pred_")}
    assert runs["on"].keys() == runs["off"].keys() and runs["on"]
    for k in runs["on"]:
        # Same rows and views in every batch; only XLA's fusion of the gather may reorder float sums.
        np.testing.assert_allclose(runs["off"][k], runs["on"][k], rtol=1e-4, atol=1e-4)


def test_feature_stream_reads_the_rows_it_is_asked_for(tmp_path):
    class Store:
        manifest = {"x": 1}
        n_spots = 300  # more than one shard of SHARD_ROWS rows
        tiles = np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)

    from histospace_jax import builders, config as config_lib

    c = config_lib.get_config()
    c.model.encoder_features, c.data.tile_size = (4, 4, 8), 16
    enc = builders.random_encoder_variables(c, seed=0)
    kw = dict(variant="relu_bn", encoder_features=(4, 4, 8), batch_size=64, views=8)
    full, path = features.cached_features(str(tmp_path), Store, enc, **kw)
    stream, path2 = features.cached_features(str(tmp_path), Store, enc, resident=False, **kw)
    assert path == path2 and stream.shape == full.shape and stream.nbytes == full.nbytes
    rng = np.random.default_rng(1)
    views, rows = rng.integers(0, 8, 50), rng.integers(0, 300, 50)
    np.testing.assert_array_equal(stream.rows(views, rows), full[views, rows])
    np.testing.assert_array_equal(stream.view(3)[np.array([299, 0, 257])], full[3, [299, 0, 257]])
    # The cache written batch by batch equals the features computed in one go by the encoder.
    assert np.isfinite(full).all() and full.std() > 0


def test_in_memory_choice_follows_the_budget(monkeypatch):
    from histospace_jax import config as config_lib

    class Store:
        n_spots = 30_000
        tiles = np.zeros((0, 128, 128, 3), np.uint8)  # only its tile size is read

    c = config_lib.get_config()
    c.train.augment = "dihedral"
    need = features.feature_bytes(c, Store)
    assert need == 8 * 30_000 * 16 * 16 * 128 * 4  # STNet scale, 8 views, float32: ~31 GB
    monkeypatch.setattr(features, "resident_bytes_budget", lambda: need)
    assert features.resident_choice(c, Store, 1) and not features.resident_choice(c, Store, 2)
    c.train.features_in_memory = "off"
    assert not features.resident_choice(c, Store, 1)


def test_folds_per_program_auto_splits_folds_to_fit_the_state_budget():
    """loo.folds_per_program=0 keeps all folds in one program when their heads fit, else the fewest equal groups
    that fit; a member's state size is counted from the real state's arrays."""
    import jax

    from histospace_jax import builders, config as config_lib, folds

    c = config_lib.get_config()
    c.train.ensemble = 5
    enc = builders.random_encoder_variables(c, 0)
    real = builders.head_states(c, 250, [enc], [1])[0]
    counted = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(real))
    per_member = folds.member_state_bytes(c, 250, enc)
    assert abs(per_member - counted) <= 8  # the step counter: an int32 in the state, a Python int here
    assert 25e6 < per_member < 35e6  # params + two Adam moments of a ~2.4M-parameter head, 4 bytes each
    per_fold = per_member * folds._MEMORY_PER_STATE * 5
    assert folds.auto_folds_per_program(c, 23, 250, enc, budget=23 * per_fold) == 23
    assert folds.auto_folds_per_program(c, 23, 250, enc, budget=23 * per_fold - 1) == 12  # 2 groups: 12 + 11
    assert folds.auto_folds_per_program(c, 23, 250, enc, budget=3 * per_fold) == 3  # 8 groups of up to 3
    assert folds.auto_folds_per_program(c, 23, 250, enc, budget=1) == 1
