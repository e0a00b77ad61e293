"""predict.py on a synthetic slide with known spot positions: one row per spot, in the spots file's order,
each row the model's output on that spot's tile."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from histospace_jax import checkpointing, models, predict
from histospace_jax.errors import BadInputError


def _model_dir(path, genes=("G0", "G1", "G2")):
    model = models.HistoSpace(n_genes=len(genes), variant="relu_bn", encoder_features=(4, 4, 8),
                              conv_features=(8,), fc_features=(16,))
    variables = jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))))
    ck = checkpointing.Checkpointer(os.path.join(path, "checkpoint"), max_to_keep=1)
    ck.save(0, jax.tree_util.tree_map(lambda x: x[None], variables))  # an ensemble of one member
    ck.close()
    info = {"format": "histospace-model", "version": 2, "genes": list(genes),
            "model": {"variant": "relu_bn", "encoder_features": [4, 4, 8], "head_conv_features": [8],
                      "head_fc_features": [16], "dropout_rate": 0.0},
            "ensemble": 1, "views": 1, "target_mean": [0.0] * len(genes), "target_sd": [1.0] * len(genes),
            "tile_size": 16, "microns_per_pixel": 1.0, "colour_cast": {"enabled": False},
            "stain_normalisation": {"method": "none"}}
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(info, f)
    return model, variables


def _slide_with_spots(tmp_path, shuffle: bool):
    """slide.png (a textured 16 px patch under each of 5 x 4 spots, 30 px apart in x and 25 in y on glass) and
    spots.csv listing them (shuffled or in order): (slide, centres [20, 2], the file's order of the centres)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    slide = np.full((120, 160, 3), 235, np.uint8)
    centres = np.array([(20 + 30 * i, 20 + 25 * j) for j in range(4) for i in range(5)], float)
    for x, y in centres.astype(int):
        slide[y - 8:y + 8, x - 8:x + 8] = rng.integers(30, 220, size=(16, 16, 3))
    Image.fromarray(slide).save(tmp_path / "slide.png")
    order = rng.permutation(len(centres)) if shuffle else np.arange(len(centres))
    with open(tmp_path / "spots.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["spot_id", "pixel_x", "pixel_y"])
        w.writerows([f"s{k}", *centres[k]] for k in order)
    return slide, centres, order


def test_predict_one_row_per_spot_in_order(tmp_path):
    from PIL import Image

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model, variables = _model_dir(str(model_dir))
    rng = np.random.default_rng(0)
    slide = np.full((120, 160, 3), 235, np.uint8)
    centres = [(20 + 30 * i, 20 + 25 * j) for j in range(4) for i in range(5)]
    for k, (x, y) in enumerate(centres):  # a distinct textured patch under every spot
        slide[y - 8:y + 8, x - 8:x + 8] = rng.integers(30, 220, size=(16, 16, 3))
    Image.fromarray(slide).save(tmp_path / "slide.png")
    order = rng.permutation(len(centres))
    with open(tmp_path / "spots.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["spot_id", "pixel_x", "pixel_y"])
        for k in order:
            w.writerow([f"s{k}", centres[k][0], centres[k][1]])
    out = tmp_path / "out"
    summary = predict.predict_slide(str(model_dir), str(tmp_path / "slide.png"), str(out),
                                    spots_csv=str(tmp_path / "spots.csv"), source_mpp=1.0, genes="G1",
                                    batch_size=8, log=lambda m: None)
    assert summary["n_predicted"] == len(centres)
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["spot_id"] for r in rows] == [f"s{k}" for k in order]
    tiles = np.stack([slide[centres[k][1] - 8:centres[k][1] + 8, centres[k][0] - 8:centres[k][0] + 8] for k in order])
    expected = np.asarray(model.apply(variables, models.to_unit_range(tiles), False))
    got = np.array([[float(r[g]) for g in ("G0", "G1", "G2")] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    zarr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "predictions.zarr")}}).result()
    np.testing.assert_allclose(zarr.read().result(), expected, rtol=1e-5, atol=1e-6)
    assert (out / "overlay_G1.png").exists()
    assert not any(p.name.startswith("out.tmp") for p in tmp_path.iterdir())


def test_predict_grid_mode_skips_background(tmp_path):
    from PIL import Image

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _model_dir(str(model_dir))
    slide = np.full((64, 64, 3), 250, np.uint8)
    slide[:32, :32] = np.random.default_rng(0).integers(60, 160, size=(32, 32, 3))  # tissue-ish, top-left
    Image.fromarray(slide).save(tmp_path / "slide.png")
    s = predict.predict_slide(str(model_dir), str(tmp_path / "slide.png"), str(tmp_path / "o"), grid_step_um=16,
                              source_mpp=1.0, batch_size=4, log=lambda m: None)
    assert s["n_positions"] == 16
    assert 0 < s["n_predicted"] < 16


def test_predict_averages_members_and_views_and_maps_back(tmp_path):
    """A model of 2 heads with 8 test-time views and standardised targets: each prediction is
    mean + sd * (the mean over members and views of the heads' outputs), computed here independently."""
    from histospace_jax import features

    model = models.HistoSpace(n_genes=3, variant="relu_bn", encoder_features=(4, 4, 8), conv_features=(8,),
                              fc_features=(16,))
    members = [jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(k), jnp.zeros((1, 16, 16, 3)))))
               for k in (1, 2)]
    (tmp_path / "model").mkdir()
    ck = checkpointing.Checkpointer(str(tmp_path / "model" / "checkpoint"), max_to_keep=1)
    ck.save(0, jax.tree_util.tree_map(lambda *xs: np.stack(xs), *members))
    ck.close()
    mean, sd = [1.0, 2.0, 3.0], [0.5, 1.0, 2.0]
    info = {"format": "histospace-model", "version": 2, "genes": ["A", "B", "C"],
            "model": {"variant": "relu_bn", "encoder_features": [4, 4, 8], "head_conv_features": [8],
                      "head_fc_features": [16], "dropout_rate": 0.0},
            "ensemble": 2, "views": 8, "target_mean": mean, "target_sd": sd, "tile_size": 16}
    with open(tmp_path / "model" / "model.json", "w") as f:
        json.dump(info, f)
    from histospace_jax import model_export

    info2, m2, variables = model_export.load(str(tmp_path / "model"))
    fn = predict.make_predict_fn(m2, variables, info2)
    tiles = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    z = np.mean([np.asarray(model.apply(v, models.to_unit_range(features.dihedral(tiles, view)), False))
                 for v in members for view in range(8)], 0)
    np.testing.assert_allclose(fn(tiles), np.asarray(mean) + np.asarray(sd) * z, rtol=1e-4, atol=1e-5)
    assert not fn.encoder_shared  # these members' encoders differ: each member runs its own
    # Members sharing one frozen encoder (as trained models do): predict encodes each view once for all heads.
    shared = [members[0], {k: {**v, "head": members[1][k]["head"]} for k, v in members[0].items()}]
    (tmp_path / "model2").mkdir()
    ck = checkpointing.Checkpointer(str(tmp_path / "model2" / "checkpoint"), max_to_keep=1)
    ck.save(0, jax.tree_util.tree_map(lambda *xs: np.stack(xs), *shared))
    ck.close()
    with open(tmp_path / "model2" / "model.json", "w") as f:
        json.dump(info, f)
    _, m4, variables4 = model_export.load(str(tmp_path / "model2"))
    fn4 = predict.make_predict_fn(m4, variables4, info2)
    z4 = np.mean([np.asarray(model.apply(v, models.to_unit_range(features.dihedral(tiles, view)), False))
                  for v in shared for view in range(8)], 0)
    assert fn4.encoder_shared and np.abs(z4 - z).max() > 1e-4
    np.testing.assert_allclose(fn4(tiles), np.asarray(mean) + np.asarray(sd) * z4, rtol=1e-4, atol=1e-5)
    # A model trained on stain-jittered views: predict averages the same jittered views of each tile (by its id).
    with open(tmp_path / "model" / "model.json", "w") as f:
        json.dump({**info, "stain_jitter": 0.3, "jitter_seed": 4}, f)
    info3, m3, variables3 = model_export.load(str(tmp_path / "model"))
    fn3 = predict.make_predict_fn(m3, variables3, info3)
    ids = np.arange(10, 15)
    zj = np.mean([np.asarray(model.apply(v, models.to_unit_range(
        features.augmented_view(tiles, view, stain_jitter=0.3, seed=4, ids=ids)), False))
        for v in members for view in range(8)], 0)
    np.testing.assert_allclose(fn3(tiles, ids=ids), np.asarray(mean) + np.asarray(sd) * zj, rtol=1e-4, atol=1e-5)
    assert np.abs(zj - z).max() > 1e-4  # the jitter reached the views


def test_predict_with_neighbourhood_context_pools_the_adjacent_spots_per_view(tmp_path):
    """A model with neighbourhood context: each spot's prediction is computed here from its tile and the mean
    pooled encoder features of the spots within 1.5 spacings (brute-force distances), per dihedral view."""
    from histospace_jax import features

    model = models.HistoSpace(n_genes=2, variant="relu_bn", encoder_features=(4, 4, 8), conv_features=(8,),
                              fc_features=(16,), use_context=True)
    variables = jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(3), jnp.zeros((1, 16, 16, 3)),
                                                                   context=model.sample_context())))
    (tmp_path / "model").mkdir()
    ck = checkpointing.Checkpointer(str(tmp_path / "model" / "checkpoint"), max_to_keep=1)
    ck.save(0, jax.tree_util.tree_map(lambda x: x[None], variables))
    ck.close()
    info = {"format": "histospace-model", "version": 2, "genes": ["A", "B"],
            "model": {"variant": "relu_bn", "encoder_features": [4, 4, 8], "head_conv_features": [8],
                      "head_fc_features": [16], "dropout_rate": 0.0, "context": "neighbours", "context_radius": 1.5},
            "ensemble": 1, "views": 2, "target_mean": [0.0, 0.0], "target_sd": [1.0, 1.0], "tile_size": 16,
            "microns_per_pixel": 1.0, "colour_cast": {"enabled": False}, "stain_normalisation": {"method": "none"}}
    with open(tmp_path / "model" / "model.json", "w") as f:
        json.dump(info, f)
    slide, centres, _ = _slide_with_spots(tmp_path, shuffle=False)
    out = tmp_path / "out"
    lines = []
    predict.predict_slide(str(tmp_path / "model"), str(tmp_path / "slide.png"), str(out),
                          spots_csv=str(tmp_path / "spots.csv"), source_mpp=1.0, batch_size=8, log=lines.append)
    assert any(x.startswith("[context] batch 3/3 pooled=20") for x in lines), lines
    with open(out / "predictions.csv") as f:
        got = np.array([[float(r[g]) for g in ("A", "B")] for r in csv.DictReader(f)])
    tiles = np.stack([slide[int(y) - 8:int(y) + 8, int(x) - 8:int(x) + 8] for x, y in centres])
    dist = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    near = (dist <= 1.5 * 25.0) & (dist > 0)  # spacing: 25 px between rows (30 between columns)
    assert near.sum(1).max() == 4 and near.sum(1).min() == 2
    expected = 0.0
    for view in range(2):
        x = models.to_unit_range(features.dihedral(tiles, view))
        pooled = np.asarray(model.apply(variables, x, method="encode")).mean(axis=(1, 2))
        ctx = near.astype(np.float64) @ pooled / near.sum(1, keepdims=True)
        expected = expected + np.asarray(model.apply(variables, x, False, None, jnp.asarray(ctx, jnp.float32))) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_predict_with_smoothing_blends_each_spot_with_its_neighbours_in_a_second_pass(tmp_path):
    """A model exported with neighbour smoothing: every row of predictions.csv and .zarr is the tile's own
    prediction x w + the mean over the spots within 1.5 spacings (brute-force distances) x (1 - w), computed
    here from the model itself, with the spots file in shuffled order and batches smaller than the slide."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model, variables = _model_dir(str(model_dir))
    info = json.load(open(model_dir / "model.json"))
    info["model"]["smoothing"] = {"radius": 1.5, "self_weight": 0.3}
    json.dump(info, open(model_dir / "model.json", "w"))
    slide, centres, order = _slide_with_spots(tmp_path, shuffle=True)
    out = tmp_path / "out"
    lines = []
    summary = predict.predict_slide(str(model_dir), str(tmp_path / "slide.png"), str(out),
                                    spots_csv=str(tmp_path / "spots.csv"), source_mpp=1.0, batch_size=8,
                                    log=lines.append)
    assert any("smooths its predictions" in x for x in lines), lines
    assert summary["smoothing"]["self_weight"] == 0.3
    c = centres[order]
    tiles = np.stack([slide[int(y) - 8:int(y) + 8, int(x) - 8:int(x) + 8] for x, y in c])
    own = np.asarray(model.apply(variables, models.to_unit_range(tiles), False), np.float64)
    dist = np.hypot(*(c[:, None] - c[None]).transpose(2, 0, 1))
    near = (dist <= 1.5 * 25.0) & (dist > 0)  # spacing 25 px (rows); columns are 30 px apart, diagonals 39
    assert near.sum(1).min() == 2 and near.sum(1).max() == 4
    expected = 0.3 * own + 0.7 * (near @ own) / near.sum(1, keepdims=True)
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["spot_id"] for r in rows] == [f"s{k}" for k in order]
    got = np.array([[float(r[g]) for g in ("G0", "G1", "G2")] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    zarr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "predictions.zarr")}}).result()
    np.testing.assert_allclose(zarr.read().result(), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected - own).max() > 1e-3  # the smoothing changed the numbers
    assert not (out / "unsmoothed.zarr").exists()


def test_predict_adds_the_counting_base_read_from_the_untransformed_tiles(tmp_path):
    """A model whose output sits on the counting base (model.output_base=counting): each prediction is
    mean + sd * the heads' view-averaged output plus the counting model at the log depth the exported ridge reads
    from the pooled encoder maps of the tile itself (view 0, never a jittered or rotated view), computed here
    from the saved arrays with NumPy and a SciPy Poisson sum."""
    import scipy.stats

    from histospace_jax import controls, counting_base, features, model_export

    model, variables = _model_dir(str(tmp_path))
    info = json.load(open(tmp_path / "model.json"))
    info.update(views=8, target_mean=[0.5, 1.0, 1.5], target_sd=[1.0, 2.0, 0.5], output_base="counting",
                stain_jitter=0.2, jitter_seed=3)
    with open(tmp_path / "model.json", "w") as f:
        json.dump(info, f)
    rng = np.random.default_rng(5)
    tiles = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    maps = np.asarray(model.apply(variables, models.to_unit_range(tiles), method="encode"))
    p = controls.pooled_feature_maps(maps).shape[1]
    base = counting_base.CountingBase(
        scale=1e4, shares=np.array([1e-3, 2e-4, 0.0]), feature_mean=rng.normal(size=p),
        feature_scale=rng.uniform(0.5, 2.0, p), pca_mean=rng.normal(size=p) * 0.1,
        components=rng.normal(size=(3, p)) / np.sqrt(p), depth_coef=np.array([0.2, -0.1, 0.05]),
        depth_intercept=7.5, alpha=10.0)
    np.savez(tmp_path / model_export.COUNTING_NPZ, **base.arrays())
    loaded_info, m2, v2 = model_export.load(str(tmp_path))
    loaded = model_export.load_counting_base(str(tmp_path), loaded_info)
    fn = predict.make_predict_fn(m2, v2, loaded_info, loaded)
    ids = np.arange(4)
    z = np.mean([np.asarray(model.apply(variables, models.to_unit_range(
        features.augmented_view(tiles, view, stain_jitter=0.2, seed=3, ids=ids)), False)) for view in range(8)], 0)
    pooled = controls.pooled_feature_maps(maps)
    depth = np.exp((((pooled - base.feature_mean) / base.feature_scale) - base.pca_mean) @ base.components.T
                   @ base.depth_coef + base.depth_intercept)
    expected_base = np.array([[sum(scipy.stats.poisson.pmf(c, d * s) * np.log1p(1e4 * c / d)
                                   for c in range(0, int(d * s + 40 * np.sqrt(d * s) + 60))) for s in base.shares]
                              for d in depth])
    assert expected_base[:, :2].std(0).min() > 1e-3  # the tiles' depths differ, so the base varies
    np.testing.assert_allclose(fn(tiles, ids=ids),
                               np.array([0.5, 1.0, 1.5]) + np.array([1.0, 2.0, 0.5]) * z + expected_base,
                               rtol=1e-4, atol=1e-4)
    # model.json says counting but the arrays are gone: an error naming the file, not a silent mean-only model.
    os.remove(tmp_path / model_export.COUNTING_NPZ)
    with pytest.raises(BadInputError, match="counting_base.npz.*export the model again"):
        model_export.load_counting_base(str(tmp_path), loaded_info)
    assert model_export.load_counting_base(str(tmp_path), {**loaded_info, "output_base": "mean"}) is None
