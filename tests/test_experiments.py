"""Fold isolation of the fold-parallel heads, ensembles and standardised targets, inner-validation splits,
pathology clustering, store overlap checks (the modes end to end: test_modes.py)."""

import json
import os
import types

import flax
import jax
import numpy as np
import pytest

from histospace_jax import builders, clustering, config as config_lib, controls, folds, metric_log, steps
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


def _run(tmp_path, name, feats, expr, patient, fold_ids=(0, 1, 2), select="on", targets="on", ensemble=2,
         refit="off", epochs=3):
    """Trains every fold of `fold_ids` (held-out patient = fold id) with inner validation on a fixed third of
    each fold's training rows; returns (config, train_heads result, plan)."""
    config = tiny_config()
    config.train.select_epoch = select
    config.train.refit = refit
    config.train.epochs = epochs
    config.train.standardise_targets = targets
    config.train.ensemble = ensemble
    plan = folds.FoldPlan(patients=[f"P{i}" for i in range(patient.max() + 1)], spot_patient=patient,
                          folds=list(fold_ids))
    enc = builders.random_encoder_variables(config, 0)
    tr, va = [], []
    for f in range(len(fold_ids)):
        rows = plan.training_rows(f)
        tr.append(rows[rows % 3 != 0])
        va.append(rows[rows % 3 == 0] if select == "on" else rows[:0])
    data = folds.HeadData(names=[plan.name(f) for f in range(len(fold_ids))], train_rows=tr, val_rows=va,
                          encoder_of_fold=[0] * len(fold_ids), features=feats[None, None], expression=expr,
                          encoder_variables=[enc])
    writer = metric_log.MetricWriter(str(tmp_path / name / "metrics.jsonl"))
    res = folds.train_heads(config, str(tmp_path / name), data, tag="loo_t", writer=writer)
    return config, res, plan


@pytest.mark.parametrize("poison", ["huge", "nan"])
def test_held_out_patient_never_reaches_training(tmp_path, poison):
    """Fold 0 holds out P0. Replacing P0's features and expression by anything leaves fold 0's trained heads
    bit-identical (their predictions on the training patients, loss and inner-validation curves, chosen
    epochs), while the other folds change: no batch, no standardisation and no model selection of fold 0
    reads P0."""
    feats, expr, patient = _data()
    # With NaN, only fold 0 can train: P0's rows are training rows of the other folds, and the NaN guard
    # rightly stops a job whose training loss is NaN.
    fold_ids = (0,) if poison == "nan" else (0, 1, 2)
    _, base, plan = _run(tmp_path, "base", feats, expr, patient, fold_ids=fold_ids)
    f2, e2 = feats.copy(), expr.copy()
    held = patient == 0
    if poison == "nan":
        f2[held] = np.nan
        e2[held] = np.nan
    else:
        f2[held] = 1e4 * np.random.default_rng(1).normal(size=f2[held].shape)
        e2[held] = -1e4
    _, pert, _ = _run(tmp_path, "pert", f2, e2, patient, fold_ids=fold_ids)
    train_rows = plan.training_rows(0)
    assert np.array_equal(base["predict"]([train_rows] + [train_rows[:0]] * (len(fold_ids) - 1))[0],
                          pert["predict"]([train_rows] + [train_rows[:0]] * (len(fold_ids) - 1))[0])
    curve = lambda res: [(r["train_huber"], r["val_mse"]) for r in res["curve"] if r["fold"] == "P0"]  # noqa: E731
    assert curve(base) == curve(pert) and len(curve(base)) == 3
    assert base["best_epoch"]["P0"] == pert["best_epoch"]["P0"]
    if poison == "huge":  # sanity: the perturbation does reach the folds that train on P0
        rows1 = plan.training_rows(1)
        assert not np.array_equal(base["predict"]([rows1] * 3)[1], pert["predict"]([rows1] * 3)[1])


def test_ensemble_members_and_standardised_targets(tmp_path):
    """Each fold's prediction is the mean of its members mapped back from standardised units: before
    training (zero-initialised output) it is exactly the fold's training mean on every row."""
    feats, expr, patient = _data()
    config, res, plan = _run(tmp_path, "a", feats, expr, patient, fold_ids=(0, 1), select="off")
    held = [plan.held_out_rows(f) for f in range(2)]
    untrained, trained = res["untrained"](held), res["predict"](held)
    for f in range(2):
        rows = held[f]
        tr = plan.training_rows(f)
        expected = expr[tr[tr % 3 != 0]].mean(0)
        np.testing.assert_allclose(untrained[f], np.broadcast_to(expected, (len(rows), 5)), rtol=1e-5, atol=1e-6)
        pred = trained[f]
        assert pred.shape == (len(rows), 5) and np.isfinite(pred).all()
        assert np.std(pred, 0).min() > 0  # trained heads are not constant
    assert [len(v) for v in res["best_epoch"].values()] == [2, 2]  # two members per fold
    lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert {(x["fold"], x["epoch"]) for x in lines} == {(p, e) for p in ("P0", "P1") for e in (1, 2, 3)}


@pytest.mark.parametrize("targets", ["on", "centre"])
def test_inner_validation_scores_every_target_scaling_in_training_sds(tmp_path, targets):
    """The inner-validation MSE that picks each head's epoch, and that ablations compare recipes on, is in SDs
    of each gene on the fold's training rows whatever the targets' scaling: centred targets (whose loss weighs
    genes by their variance) are scored on the same scale as standardised ones. Both start at the mean."""
    feats, expr, patient = _data()
    expr = expr * np.array([0.1, 0.5, 1.0, 2.0, 10.0], np.float32) + 3.0  # genes of very different variance
    _, res, plan = _run(tmp_path, targets, feats, expr, patient, fold_ids=(0,), targets=targets, ensemble=1)
    rows = plan.training_rows(0)
    tr, va = rows[rows % 3 != 0], rows[rows % 3 == 0]
    mean, sd = expr[tr].astype(np.float64).mean(0), expr[tr].astype(np.float64).std(0)
    mu, scale = folds.standardisation(expr, tr, targets)
    np.testing.assert_allclose(mu, mean, rtol=1e-5)
    np.testing.assert_allclose(scale, sd if targets == "on" else np.ones(5), rtol=1e-5)
    np.testing.assert_allclose(res["untrained"]([va])[0], np.broadcast_to(mean, (len(va), 5)), rtol=1e-5)
    best = min(r["val_mse"] for r in res["curve"] if r["fold"] == "P0")  # the chosen epoch's score
    pred = res["predict"]([va])[0]
    assert np.mean(((pred - expr[va]) / sd) ** 2) == pytest.approx(best, rel=1e-4)


def test_refit_keeps_each_head_at_its_chosen_epoch_trained_on_every_training_row(tmp_path):
    """train.refit: a head kept at epoch 2 of a 3-epoch pass over its rows is, bit for bit, the head trained
    2 epochs on those rows and taken at its final epoch (same initialisation, same batches); and train_heads
    refits each head up to the epoch inner validation chose for it, on its inner-validation rows too."""
    feats, expr, patient = _data()
    config, plain, plan = _run(tmp_path, "two_epochs", feats, expr, patient, fold_ids=(0, 1), select="off",
                               epochs=2)
    every = [plan.training_rows(f)[plan.training_rows(f) % 3 != 0] for f in range(2)]  # what _run trains on
    data = folds.HeadData(names=["P0", "P1"], train_rows=every, val_rows=[r[:0] for r in every],
                          encoder_of_fold=[0, 0], features=feats[None, None], expression=expr,
                          encoder_variables=[builders.random_encoder_variables(config, 0)])
    config.train.epochs = 3
    writer = metric_log.MetricWriter(str(tmp_path / "kept" / "metrics.jsonl"))
    kept = folds._train_members(config, str(tmp_path / "kept"), data, tag="loo_kept", writer=writer,
                                keep_epoch=np.full(4, 2), epochs=3)
    held = [plan.held_out_rows(f) for f in range(2)]
    for a, b in zip(kept["predict"](held), plain["predict"](held)):
        np.testing.assert_array_equal(a, b)

    _, refit, _ = _run(tmp_path, "refit", feats, expr, patient, fold_ids=(0, 1), refit="on")
    assert refit["refit"]
    for fold, epochs in refit["best_epoch"].items():
        refit_epochs = [r["epoch"] for r in refit["curve"] if r["fold"] == f"{fold} (refit)"]
        assert refit_epochs == list(range(1, max(epochs) + 1))
    # Each kept head took 4 steps of 8 rows per chosen epoch: its fold's 32 training rows, the inner-validation
    # third back in (2 steps per epoch before the refit).
    chosen = np.concatenate([refit["best_epoch"][f] for f in ("P0", "P1")])
    np.testing.assert_array_equal(np.asarray(refit["states"].step), 4 * chosen)
    assert not np.array_equal(refit["predict"](held)[0], refit["selected_predict"](held)[0])


def test_inner_validation_plan_scores_folds_on_training_patients_only():
    """loo.evaluate_on=inner_validation: each fold's scored rows are its inner-validation spots and its
    training rows the rest of its training patients' spots; the held-out patient is in neither."""
    config = tiny_config()
    obs = {"patient": np.array(["A"] * 32 + ["B"] * 32), "section": np.array(["A1"] * 32 + ["B1"] * 32),
           "array_x": np.r_[np.arange(32) % 8, np.arange(32) % 8],
           "array_y": np.r_[np.arange(32) // 8, np.arange(32) // 8]}
    plan = folds.FoldPlan(patients=["A", "B"], spot_patient=np.repeat([0, 1], 32), folds=[0, 1])
    inner = folds.inner_validation_plan(config, obs, plan)
    for f in range(2):
        tr, va, _ = folds.inner_split(obs, plan.training_rows(f), config.train.inner_val_fraction, config.seed)
        np.testing.assert_array_equal(inner.held_out_rows(f), va)
        np.testing.assert_array_equal(inner.training_rows(f), tr)
        assert not set(va) & set(plan.held_out_rows(f)) and not set(tr) & set(plan.held_out_rows(f))
        assert len(va) and len(tr) and inner.name(f) == f"{plan.name(f)} inner"


def test_inner_split_uses_sections_or_blocks_of_training_patients():
    obs = {"patient": np.array(["A"] * 6 + ["B"] * 32), "section": np.array(["A1"] * 3 + ["A2"] * 3 + ["B1"] * 32),
           "array_x": np.r_[np.arange(6), np.arange(32) % 8], "array_y": np.r_[np.zeros(6), np.arange(32) // 8]}
    rows = np.arange(38)
    tr, va, how = folds.inner_split(obs, rows, 0.2, seed=0)
    assert sorted(np.r_[tr, va].tolist()) == rows.tolist() and len(va) >= 0.2 * 38
    # A section of A is a unit, never A's only remaining section; B (one section) is split by 4x4 blocks.
    for unit_rows in (va[va < 6], va[va >= 6]):
        if len(unit_rows) and unit_rows[0] < 6:
            assert set(obs["section"][unit_rows]) == {"A2"}
    blocks = controls.grid_blocks(obs["array_x"][6:], obs["array_y"][6:], obs["section"][6:], folds.BLOCK_CELLS)
    val_blocks = set(blocks[va[va >= 6] - 6].tolist())
    assert all(set(np.flatnonzero(blocks == b) + 6) <= set(va.tolist()) for b in val_blocks)  # whole blocks
    assert "sections" in how or "blocks" in how


def test_inner_split_holds_back_whole_patients_when_a_fold_has_enough():
    """With >= 3 training patients the units are whole patients (as leave-one-patient-out's own), at least two
    stay in training, and a patient is never split; with 2 it falls back to sections and blocks, and
    by="sections" keeps the old units whatever the count."""
    sizes = {"P": 10, "Q": 12, "R": 8, "S": 14, "T": 6}
    patients = np.concatenate([[p] * n for p, n in sizes.items()])
    sections = np.array([f"{p}{i % 2}" for i, p in enumerate(patients)])
    n = len(patients)
    obs = {"patient": patients, "section": sections, "array_x": np.arange(n) % 5, "array_y": np.arange(n) // 5}
    rows = np.arange(n)
    for seed in range(6):
        tr, va, how = folds.inner_split(obs, rows, 0.2, seed)
        assert how.endswith("by patients") and len(va) >= 0.2 * n
        assert not set(patients[tr]) & set(patients[va])  # whole patients
        assert len(set(patients[tr])) >= 2
        assert sorted(np.r_[tr, va].tolist()) == rows.tolist()
    # A large fraction still leaves two patients to learn from.
    tr, va, _ = folds.inner_split(obs, rows, 0.9, 0)
    assert len(set(patients[tr])) == 2 and len(set(patients[va])) == 3
    # Two training patients: sections and blocks, as before.
    two = np.isin(patients, ["P", "Q"])
    _, va2, how2 = folds.inner_split(obs, rows[two], 0.2, 0)
    assert how2.endswith("by sections") and set(sections[va2]) <= {"P1", "Q1"}  # never a patient's first
    _, va3, how3 = folds.inner_split(obs, rows, 0.2, 0, by="sections")
    assert "patients" not in how3 and "sections" in how3


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


def test_fold_with_too_few_training_spots_is_named(tmp_path):
    from histospace_jax.errors import BadInputError

    feats, expr, patient = _data(n_per=(16, 4, 4))
    config = tiny_config()
    config.train.ensemble = 1
    plan = folds.FoldPlan(patients=["P0", "P1", "P2"], spot_patient=patient, folds=[0])
    data = folds.HeadData(names=["P0"], train_rows=[plan.training_rows(0)], val_rows=[np.zeros(0, np.int64)],
                          encoder_of_fold=[0], features=feats[None, None], expression=expr,
                          encoder_variables=[builders.random_encoder_variables(config, 0)])
    with pytest.raises(BadInputError, match=r"fold holding out P0: only 8 training spots .*train.batch_size=9"):
        config.train.batch_size = 9
        folds.train_heads(config, str(tmp_path), data, tag="loo_x",
                          writer=metric_log.MetricWriter(str(tmp_path / "m.jsonl")))


def _ablation_module():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "ablation.py")
    spec = importlib.util.spec_from_file_location("ablation", path)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation


def test_ablation_prefers_the_lowest_inner_validation_mse_per_fold():
    """benchmarks/ablation.py chooses settings on the training patients' inner validation alone: the held-out
    numbers of the rows below would prefer the other variant in both folds."""
    ablation = _ablation_module()
    rows = [{"variant": "standard", "folds": {"B": {"per_gene_pearson": 0.3}, "C": {"per_gene_pearson": 0.2}},
             "inner_validation": {"B": {"mse_sd_units": 1.02}, "C": {"mse_sd_units": 0.97}}},
            {"variant": "dropout_0.5", "folds": {"B": {"per_gene_pearson": 0.1}, "C": {"per_gene_pearson": 0.1}},
             "inner_validation": {"B": {"mse_sd_units": 1.01}, "C": {"mse_sd_units": 0.99}}},
            {"variant": "no_inner_validation", "folds": {"B": {"per_gene_pearson": 0.9}}, "inner_validation": {}}]
    # over both folds: standard (mean 0.995) before dropout_0.5 (1.0); the third is not scored in C
    assert ablation.preferred_by_inner_validation(rows) == {"B": "dropout_0.5", "C": "standard",
                                                            "(all folds)": "standard"}
    assert set(ablation.VARIANTS) >= {"standard", "paper", "dropout_0.5", "ensemble_10", "context"}
    # Replicates over head seeds: the mean of each number, and the inner-validation spread between seeds
    # (sample SD: 0.97 and 1.01 -> 0.02 * sqrt(2)).
    seed1 = {**rows[0], "folds": {"B": {"per_gene_pearson": 0.5, "failed": False},
                                  "C": {"per_gene_pearson": 0.4, "failed": True}},
             "inner_validation": {"B": {"mse_sd_units": 0.98}, "C": {"mse_sd_units": 1.01}}}
    seed0 = {**rows[0], "folds": {"B": {"per_gene_pearson": 0.3, "failed": False},
                                  "C": {"per_gene_pearson": 0.2, "failed": False}},
             "seconds": 10.0}
    seed1["seconds"] = 20.0
    avg = ablation.average_over_seeds([seed0, seed1, {**rows[1], "seconds": 5.0}])
    assert [a["variant"] for a in avg] == ["standard", "dropout_0.5"]
    s = avg[0]
    assert s["folds"]["B"]["per_gene_pearson"] == pytest.approx(0.4) and s["folds"]["C"]["failed"] is True
    assert s["inner_validation"]["C"]["mse_sd_units"] == pytest.approx(0.99)
    assert s["inner_validation"]["C"]["mse_sd_units_seed_sd"] == pytest.approx(0.02 * np.sqrt(2))
    assert s["inner_validation"]["B"]["mse_sd_units_seed_sd"] == pytest.approx(0.04 / np.sqrt(2))
    # per-seed means over folds 0.995 and 0.995: no spread
    assert s["inner_validation_over_folds"] == pytest.approx({"mse_sd_units": 0.995, "mse_sd_units_seed_sd": 0.0})
    assert avg[1]["inner_validation"]["B"]["mse_sd_units_seed_sd"] == 0.0 and s["seconds"] == 15.0
    # A preference is reported against twice the larger seed spread (measured: dropout beyond it, context within).
    over = lambda m, sd: {"mse_sd_units": m, "mse_sd_units_seed_sd": sd}  # noqa: E731
    table = [{"variant": "standard", "inner_validation_over_folds": over(0.9981, 0.0016)},
             {"variant": "no_dropout", "inner_validation_over_folds": over(1.0033, 0.0005)},
             {"variant": "context", "inner_validation_over_folds": over(0.9977, 0.0015)}]
    v = ablation.margin_over_standard(table, "context")
    assert v["margin"] == pytest.approx(0.0004) and v["seed_sd"] == 0.0016 and v["verdict"].endswith("noise")
    # Dropout's case: the recipe without it (1.0033) as the reference, with it 0.0052 lower, seed SD 0.0016.
    with_dropout = [{"variant": "standard", "inner_validation_over_folds": over(1.0033, 0.0005)},
                    {"variant": "dropout_0.5", "inner_validation_over_folds": over(0.9981, 0.0016)}]
    v = ablation.margin_over_standard(with_dropout, "dropout_0.5")
    assert v["margin"] == pytest.approx(0.0052) and v["verdict"] == "beyond twice the seed spread"
    assert ablation.margin_over_standard(table, "standard") is None


def test_head_seed_moves_the_heads_and_nothing_else():
    """train.head_seed unset = seed (runs before it existed are unchanged); set, it changes the heads'
    initialisation but not the inner-validation split, which stays on `seed`."""
    import jax

    c = tiny_config()
    enc = builders.random_encoder_variables(c, 0)
    leaves = lambda cfg: jax.tree_util.tree_leaves(builders.head_states(cfg, 5, [enc], [1])[0].params)  # noqa: E731
    base = leaves(c)
    c2 = tiny_config()
    c2.train.head_seed = c.seed
    assert all(np.array_equal(a, b) for a, b in zip(base, leaves(c2)))
    c2.train.head_seed = c.seed + 1
    assert not all(np.array_equal(a, b) for a, b in zip(base, leaves(c2)))
    n = 64
    obs = {"patient": np.array(["P"] * n), "section": np.array(["S"] * n), "array_x": np.arange(n) % 8,
           "array_y": np.arange(n) // 8}
    c.train.select_epoch = c2.train.select_epoch = "on"
    split = lambda cfg: folds.training_split(cfg, obs, np.arange(n))[1]  # noqa: E731
    assert 0 < len(split(c)) < n and np.array_equal(split(c), split(c2))
    c2.train.head_seed = -1
    with pytest.raises(config_lib.ConfigError, match="train.head_seed"):
        config_lib.validate(c2)


def _with_hidden_bias(states, bias_of_unit):
    params = flax.core.unfreeze(jax.tree_util.tree_map(np.array, states.params))
    params["head"]["fc0"]["bias"][:] = bias_of_unit
    return states.replace(params=params)


def test_live_hidden_units_are_counted_and_a_collapsing_head_is_reported(tmp_path, capsys):
    """Live units: the share of the last hidden layer's units active on at least one spot. With every unit's
    bias pushed far below zero none is live (the collapse: one profile for every spot) and the epoch-end hook
    warns; far above, all are; half and half, exactly half. Training records the share per epoch and fold."""
    # A unit is live when it is above zero on any row, not on every row; a member without rows has no share.
    shares = folds.live_share([np.array([[1.0, -1.0, -1.0], [-1.0, 0.0, 2.0]]), np.zeros((0, 3))])
    np.testing.assert_array_equal(shares, [2 / 3, np.nan])
    feats, expr, patient = _data()
    _, res, plan = _run(tmp_path, "a", feats, expr, patient, fold_ids=(0, 1))
    program, states = res["program"], res["states"]
    rows = [plan.held_out_rows(f) for f in program.fold_of]
    units = states.params["head"]["fc0"]["bias"].shape[-1]
    half = np.where(np.arange(units) < units // 2, 1e4, -1e4)
    for bias, expected in ((-1e4, 0.0), (1e4, 1.0), (half, 0.5)):
        live = program.live_units(steps.replicate(_with_hidden_bias(states, bias)), rows)
        np.testing.assert_array_equal(live, np.full(len(program.fold_of), expected))
    assert set(res["live_units"]) == {"P0", "P1"} and all(0 < v <= 1 for v in res["live_units"].values())
    assert all(0 <= r["live_units"] <= 1 for r in res["curve"])

    dead = steps.replicate(_with_hidden_bias(states, -1e4))
    data = folds.HeadData(names=["P0", "P1"], train_rows=[plan.training_rows(f) for f in range(2)],
                          val_rows=[np.zeros(0, np.int64)] * 2, encoder_of_fold=[0, 0], features=feats[None, None],
                          expression=expr, encoder_variables=[builders.random_encoder_variables(tiny_config(), 0)])
    hook = folds._EpochEnd(program, data, select=False, writer=metric_log.MetricWriter(str(tmp_path / "m.jsonl")))
    lp = types.SimpleNamespace(rstate={"train": dead}, spec=types.SimpleNamespace(name="loo t"))
    capsys.readouterr()
    rows_out = hook.on_epoch_end(lp, 1, 6, np.zeros(len(program.fold_of)))
    assert [r["live_units"] for r in rows_out] == [0.0, 0.0]
    warned = capsys.readouterr().out
    assert "holding out P0: at epoch 1 only 0.0% of the heads' 16 last hidden units" in warned and "P1" in warned
    hook.on_epoch_end(lp, 2, 12, np.zeros(len(program.fold_of)))
    assert "WARNING" not in capsys.readouterr().out  # once per fold


def test_smoothing_weight_is_chosen_on_inner_validation_mse_against_a_numpy_reference():
    """choose_smoothing scores each candidate weight on the validation spots (neighbours among them only) in
    training SDs², keeps the lowest, prefers the lighter smoothing on a tie, and without validation smooths
    nothing. Truth smooth in space and predictions = truth + independent noise: smoothing must win; predictions
    equal to the truth: it must lose."""
    ax, ay = np.meshgrid(np.arange(8), np.arange(8))
    obs = {"pixel_x": ax.ravel() * 100.0, "pixel_y": ay.ravel() * 100.0, "section": np.array(["s"] * 64)}
    rng = np.random.default_rng(0)
    truth = (np.sin(ax.ravel() / 3.0)[:, None] * np.array([1.0, 2.0, -1.0])).astype(np.float32)
    expression = truth + 0.01 * rng.normal(size=truth.shape).astype(np.float32)
    train_rows, val_rows = np.arange(0, 32), np.arange(32, 64)
    c = config_lib.get_config()
    noisy = expression[val_rows] + rng.normal(scale=0.5, size=(32, 3))
    got = folds.choose_smoothing(c, obs, expression, train_rows, val_rows, noisy)
    sd = expression[train_rows].astype(np.float64).std(0)
    d = np.hypot(obs["pixel_x"][val_rows, None] - obs["pixel_x"][None, val_rows],
                 obs["pixel_y"][val_rows, None] - obs["pixel_y"][None, val_rows])
    near = (d > 0) & (d <= 150.0)
    ref = {}
    for w in (1.0, 0.75, 0.5, 0.25):
        s = w * noisy + (1 - w) * near @ noisy / near.sum(1, keepdims=True)
        ref[f"{w:g}"] = np.mean(((expression[val_rows] - s) / sd) ** 2)
    np.testing.assert_allclose([got["inner_validation_mse"][k] for k in ref], list(ref.values()), rtol=1e-5)
    assert got["self_weight"] == float(min(ref, key=ref.get)) < 1.0 and got["radius"] == 1.5
    exact = folds.choose_smoothing(c, obs, expression, train_rows, val_rows, expression[val_rows])
    assert exact["self_weight"] == 1.0 and exact["inner_validation_mse"]["1"] == 0.0
    none = folds.choose_smoothing(c, obs, expression, train_rows, val_rows[:0], None)
    assert none["self_weight"] == 1.0 and "no inner validation" in none["chosen_by"]
    assert folds.smooth_predictions(obs, val_rows, noisy, none) is noisy
    c.model.smoothing = "none"
    assert folds.choose_smoothing(c, obs, expression, train_rows, val_rows, noisy) is None
    c.model.smoothing, c.model.smoothing_weight = "neighbours", 0.3
    fixed = folds.choose_smoothing(c, obs, expression, train_rows, val_rows, noisy)
    assert fixed["self_weight"] == 0.3 and folds.exported_smoothing(fixed) == {"radius": 1.5, "self_weight": 0.3}


def _effective_settings(overrides: list[str]) -> dict:
    """The settings a LOO run on a user's store would train with, given ablation-style --config.KEY=V
    overrides: every config value after resolve_auto, with the smoothing candidates as builders.smoothing reads
    them (a weight the chosen smoothing ignores is no setting at all)."""
    config = config_lib.get_config()
    config.data.store = "/a/users/store"
    for arg in overrides:
        key, value = arg.removeprefix("--config.").split("=", 1)
        node = config
        *parents, name = key.split(".")
        for p in parents:
            node = node[p]
        old = node[name]
        node[name] = value if isinstance(old, str) else (int(value) if isinstance(old, int) else float(value))
    config_lib.resolve_auto(config, log=lambda *_: None)
    settings = {k: v for k, v in config_lib.flat_items(config.to_dict())
                if k not in ("model.smoothing_weight", "model.smoothing_weights")}
    settings["smoothing"] = builders.smoothing(config)
    return settings


def test_every_ablation_variant_changes_what_a_run_trains_with():
    """A variant that resolves to the standard recipe's settings (a switch the recipe already sets, or a knob
    the chosen mode ignores) would be reported as an ablation that measured nothing."""
    ablation = _ablation_module()
    standard = _effective_settings(ablation.VARIANTS["standard"])
    for name, overrides in ablation.VARIANTS.items():
        if name != "standard":
            changed = {k for k, v in _effective_settings(overrides).items() if standard.get(k) != v}
            assert changed, f"ablation variant {name} ({overrides}) trains exactly as the standard recipe"
    # Only variants that change the autoencoder itself pretrain their own; the others reuse the first run's.
    assert not ablation.borrows_autoencoders("ae_epochs_30", [])
    assert ablation.borrows_autoencoders("no_refit", [])
    assert not ablation.borrows_autoencoders("standard", ["--config.ae.learning_rate=3e-4"])
    # A different encoder architecture signs its checkpoints differently: borrowing them would be refused.
    assert not ablation.borrows_autoencoders("encoder_pool", [])
    assert not ablation.borrows_autoencoders("standard", ["--config.model.variant=relu"])
    assert ablation.borrows_autoencoders("standard", ["--config.model.dropout_rate=0.5"])
