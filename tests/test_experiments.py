"""Fold isolation of the fold-parallel LOO, pathology clustering, store overlap checks (the modes end to end:
test_modes.py)."""

import os

import numpy as np
import pytest

from histospace_jax import builders, clustering, config as config_lib, folds, metric_log
from histospace_jax.data import store as store_lib
from histospace_jax.modes import external


def tiny_config():
    c = config_lib.get_config()
    c.data.tile_size = 16
    c.model.encoder_features = (4, 4, 8)  # 16 px -> 2x2x8 features
    c.model.head_conv_features = (8,)
    c.model.head_fc_features = (16,)
    c.train.epochs = 3
    c.train.batch_size = 8
    c.eval_batch_size = 16
    c.log_every_steps = 1000
    c.checkpoint.every_steps = 1000
    return c


def _data(n_per=(16, 16, 16), g=5, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(n_per)
    feats = rng.normal(size=(n, 2, 2, 8)).astype(np.float32)
    expr = rng.normal(size=(n, g)).astype(np.float32)
    patient = np.repeat(np.arange(len(n_per)), n_per).astype(np.int32)
    return feats, expr, patient


def _run(tmp_path, name, feats, expr, patient, fold_ids=(0, 1, 2)):
    config = tiny_config()
    plan = folds.FoldPlan(patients=[f"P{i}" for i in range(patient.max() + 1)], spot_patient=patient,
                          folds=list(fold_ids))
    enc = builders.random_encoder_variables(config, 0)
    writer = metric_log.MetricWriter(str(tmp_path / name / "metrics.jsonl"))
    res = folds.train_heads(config, str(tmp_path / name), columns={"features": feats, "expression": expr},
                            expression=expr, plan=plan, encoder_variables=enc, fold_group=list(range(len(fold_ids))),
                            tag="loo_t", writer=writer)
    return config, res


@pytest.mark.parametrize("poison", ["huge", "nan"])
def test_held_out_patient_never_reaches_training(tmp_path, poison):
    """Fold 0 holds out P0. Replacing P0's features and expression by anything leaves fold 0's trained model
    bit-identical (its predictions on the training patients, its loss curve), while the other folds change."""
    feats, expr, patient = _data()
    # With NaN, only fold 0 can train: P0's rows are training rows of the other folds, and the NaN guard
    # rightly stops a job whose training loss is NaN.
    fold_ids = (0,) if poison == "nan" else (0, 1, 2)
    _, base = _run(tmp_path, "base", feats, expr, patient, fold_ids=fold_ids)
    f2, e2 = feats.copy(), expr.copy()
    held = patient == 0
    if poison == "nan":
        f2[held] = np.nan
        e2[held] = np.nan
    else:
        f2[held] = 1e4 * np.random.default_rng(1).normal(size=f2[held].shape)
        e2[held] = -1e4
    _, pert = _run(tmp_path, "pert", f2, e2, patient, fold_ids=fold_ids)
    train_rows = ~held
    assert np.array_equal(base["preds"][0][train_rows], pert["preds"][0][train_rows])
    c0 = [r["train_huber"] for r in base["curve"] if r["fold"] == "P0"]
    c1 = [r["train_huber"] for r in pert["curve"] if r["fold"] == "P0"]
    assert c0 == c1
    if poison == "huge":  # sanity: the perturbation does reach the folds that train on P0
        assert not np.array_equal(base["preds"][1][train_rows], pert["preds"][1][train_rows])


def test_no_model_selection_fixed_epochs(tmp_path, monkeypatch):
    """Instrumented: the only reads of held-out rows during train_heads are the final (and the untrained)
    full-store predictions; training runs exactly epochs * steps_per_epoch steps whatever the held-out data."""
    feats, expr, patient = _data()
    reads = {"ordered": 0}
    real_ordered = folds.pipeline.ordered_batches

    def counting_ordered(source, *a, **k):
        reads["ordered"] += 1
        return real_ordered(source, *a, **k)

    monkeypatch.setattr(folds.pipeline, "ordered_batches", counting_ordered)
    config, res = _run(tmp_path, "a", feats, expr, patient, fold_ids=(0,))
    steps_per_epoch = len(expr) // config.train.batch_size
    curve = [r for r in res["curve"] if r["fold"] == "P0"]
    assert [r["epoch"] for r in curve] == list(range(1, config.train.epochs + 1))
    assert reads["ordered"] == 2  # untrained predictions + final predictions; no validation passes
    e2 = expr.copy()
    e2[patient == 0] *= -100  # a held-out set that any selection rule would react to
    _, res2 = _run(tmp_path, "b", feats, e2, patient, fold_ids=(0,))
    assert [r["epoch"] for r in res2["curve"]] == [r["epoch"] for r in curve]
    assert np.array_equal(res["preds"][0], res2["preds"][0])
    metrics_lines = open(tmp_path / "a" / "metrics.jsonl").read().splitlines()
    assert len(metrics_lines) == config.train.epochs and steps_per_epoch > 0


def test_pathology_clustering_on_known_predictions(tmp_path):
    n = 20
    labels = np.array(["invasive cancer"] * 8 + ["connective tissue"] * 10 + ["", "cancer in situ"])
    obs = {"label": labels, "section": np.array(["S1"] * n), "array_x": np.arange(n) % 5,
           "array_y": np.arange(n) // 5}
    pred = np.zeros((n, 3))
    pred[:8] += 5.0
    pred[19] += 5.0
    pred[8] += 5.0  # one non-cancer spot predicted cancer-like
    out = clustering.pathology_clustering(str(tmp_path), obs, np.arange(n), pred,
                                           cancer_labels="invasive cancer,cancer in situ", seed=0)
    e = out["sections"]["S1"]
    assert e["n_spots"] == 19 and e["n_cancer"] == 9  # the unlabelled spot is left out
    assert e["predicted"]["agreement"] == 18
    # ARI by hand (Hubert & Arabie): contingency [[9, 0], [1, 9]] (cancer, non-cancer x clusters), 19 spots;
    # sum C(n_ij, 2) = 72, rows C(9,2) + C(10,2) = 81, columns C(10,2) + C(9,2) = 81, C(19, 2) = 171.
    expected = (72 - 81 * 81 / 171) / ((81 + 81) / 2 - 81 * 81 / 171)
    assert e["predicted"]["adjusted_rand_index"] == pytest.approx(expected)
    assert os.path.exists(tmp_path / e["figure"])
    none = clustering.pathology_clustering(str(tmp_path), {**obs, "label": np.array([""] * n)}, np.arange(n),
                                            pred, cancer_labels="tumour")
    assert "skipped" in none


def _store(path, patients, sections, tiles_seed, genes=("A", "B")):
    n = len(patients)
    rng = np.random.default_rng(tiles_seed)
    tiles = rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8)
    obs = {"section": np.array(sections), "patient": np.array(patients), "array_x": np.arange(n),
           "array_y": np.zeros(n, int), "pixel_x": np.arange(n, dtype=float), "pixel_y": np.zeros(n)}
    return store_lib.write_store(str(path), tiles, np.zeros((n, len(genes)), np.float32), list(genes), obs,
                                 manifest={"source_format": "her2st" if patients[0] in "EFGH" else "stnet"})


def test_compare_stores_finds_shared_patients_and_tiles(tmp_path):
    a = store_lib.open_store(_store(tmp_path / "a", ["E", "E", "B"], ["E1", "E1", "B1"], 0))
    b = store_lib.open_store(_store(tmp_path / "b", ["BC23567", "X1", "X1"], ["s1", "s2", "s2"], 1))
    out = external.compare_stores(a, np.arange(3), b, np.arange(3))
    assert out["shared_patients"] == ["BC23567"]
    assert out["_rows"].tolist() == [True, False, False]
    same = external.compare_stores(a, np.arange(3), a, np.array([2]))
    assert same["identical_tiles"] == 1 and same["_rows"].tolist() == [True]
