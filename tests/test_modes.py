"""Every mode and the predict command, run as the README writes them (python -m ..., config files by path,
from a directory other than the repository) on tiny stores: train -> predict, external on two stores, loo,
pretrain_ae and ae_study."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from histospace_jax import evaluation, metrics
from histospace_jax.data import store as store_lib
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.subprocess

TINY = ["--config.data.tile_size=16", "--config.model.encoder_features=(4,4,8)",
        "--config.model.head_conv_features=(8,)", "--config.model.head_fc_features=(16,)", "--config.ae.epochs=1",
        "--config.ae.batch_size=8", "--config.train.epochs=2", "--config.train.batch_size=8",
        "--config.eval_batch_size=16"]


def _store(path, patients, genes, fmt, seed, depth=False, sections=None):
    """Random tiles and expression; with `depth`, each spot also has a library size, and its expression is log1p
    of counts per 10k drawn by Poisson at a share of the library that follows the log library size with a gene's
    own slope (what the depth-oracle controls read), recorded in the manifest as a prepared store does."""
    rng = np.random.default_rng(seed)
    n = len(patients)
    tiles = rng.integers(0, 255, size=(n, 16, 16, 3), dtype=np.uint8)
    expr = rng.normal(size=(n, len(genes))).astype(np.float32)
    obs = {"section": np.array(sections if sections is not None else [f"{p}1" for p in patients]),
           "patient": np.array(patients),
           "array_x": np.arange(n) % 6, "array_y": np.arange(n) // 6, "pixel_x": np.arange(n) % 6 * 10.0, "pixel_y": np.arange(n) // 6 * 10.0}
    manifest = {"source_format": fmt, "microns_per_pixel": 1.0, "tile_size": 16, "colour_cast": {"enabled": False},
                "stain_normalisation": {"method": "none"}}
    if depth:
        obs["library_size"] = rng.integers(200, 20000, size=n)
        obs["n_genes_detected"] = obs["library_size"] // 4
        slopes = np.array([0.9, -0.5, 0.3, 0.7, 0.1])[[int(g[1:]) % 5 for g in genes]]
        log_lib = np.log(obs["library_size"])
        shares = 2e-3 * np.exp(np.outer(log_lib - log_lib.mean(), slopes) + 0.3 * expr)
        counts = rng.poisson(obs["library_size"][:, None] * shares)
        expr = np.log1p(counts / obs["library_size"][:, None] * 1e4).astype(np.float32)
        manifest["expression"] = {"normalisation": "library_size", "scale": 1e4, "log": "log1p", "log_base": "e"}
    return store_lib.write_store(str(path), tiles, expr, list(genes), obs, manifest=manifest)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    a = _store(root / "a", ["E"] * 24 + ["F"] * 24, ["G1", "G2", "G3", "G4"], "her2st", 0)
    b = _store(root / "b", ["BC23567"] * 12 + ["X"] * 24, ["G4", "G2", "G9", "G1"], "stnet", 1)
    return root, a, b


@pytest.fixture(scope="module")
def depth_stores(tmp_path_factory):
    """The two stores of `stores`, each spot with a library size that its expression follows."""
    root = tmp_path_factory.mktemp("modes_depth")
    a = _store(root / "a", ["E"] * 24 + ["F"] * 24, ["G1", "G2", "G3", "G4"], "her2st", 0, depth=True)
    b = _store(root / "b", ["BC23567"] * 12 + ["X"] * 24, ["G4", "G2", "G9", "G1"], "stnet", 1, depth=True)
    return root, a, b


def run(cwd, module, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def config(name):
    return f"--config={os.path.join(REPO_ROOT, 'configs', name)}"


def _predict_slide(tmp_path, workdir, slide: np.ndarray, centres, *args):
    """slide.png and spots.csv (spots s0, s1, ... at `centres`) under tmp_path, then predict as the README writes
    it with workdir's model at 1 um/px; returns the output directory."""
    from PIL import Image

    Image.fromarray(slide).save(tmp_path / "slide.png")
    with open(tmp_path / "spots.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["spot_id", "pixel_x", "pixel_y"])
        wr.writerows([f"s{k}", x, y] for k, (x, y) in enumerate(centres))
    out = tmp_path / "out"
    run(tmp_path, "histospace_jax.predict", f"--checkpoint={workdir}/model", f"--image={tmp_path}/slide.png",
        f"--spots={tmp_path}/spots.csv", f"--output={out}", "--source_mpp=1.0", *args)
    return out


def test_train_mode_exports_a_model_that_predict_reads(stores, tmp_path):
    root, a, _ = stores
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("train.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY)
    res = json.load(open(w / "results.json"))
    assert res["mode"] == "train" and res["train"]["n_spots"] == 48 and res["train"]["patients"] == ["E", "F"]
    # The exported heads are refitted on every spot; train.csv is their own training, epochs 1 to the latest chosen.
    assert res["train"]["refit"] is True and 0 < res["train"]["live_units"] <= 1
    with open(w / "curves" / "train.csv") as f:
        epochs = [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]
    assert epochs == list(range(1, max(res["train"]["best_epoch"]) + 1))
    info = json.load(open(w / "model" / "model.json"))
    assert info["genes"] == ["G1", "G2", "G3", "G4"] and info["tile_size"] == 16
    chosen = res["train"]["smoothing"]  # predict smooths as the inner validation chose
    assert info["model"]["smoothing"] == (None if chosen["self_weight"] == 1 else
                                          {"radius": 1.5, "self_weight": chosen["self_weight"]})
    assert "Trained model" in open(w / "report.md").read()
    # predict, as the README writes it, on a slide with spots
    rng = np.random.default_rng(0)
    slide = rng.integers(40, 200, size=(80, 96, 3), dtype=np.uint8)
    centres = [(16 + 20 * i, 16 + 20 * j) for j in range(3) for i in range(4)]
    out = _predict_slide(tmp_path, w, slide, centres, "--genes=G2")
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["spot_id"] for r in rows] == [f"s{k}" for k in range(len(centres))]
    assert all(np.isfinite(float(r[g])) for r in rows for g in ("G1", "G2", "G3", "G4"))
    assert (out / "overlay_G2.png").exists()
    # The .h5ad in scanpy's spatial layout: the same predictions, spot centres, and the slide as hires image.
    import anndata

    ad = anndata.read_h5ad(out / "predictions.h5ad")
    assert list(ad.obs["spot_id"]) == [r["spot_id"] for r in rows] and list(ad.var_names) == ["G1", "G2", "G3", "G4"]
    np.testing.assert_allclose(ad.X, [[float(r[g]) for g in ad.var_names] for r in rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ad.obsm["spatial"], np.asarray(centres, float))
    lib = ad.uns["spatial"]["slide"]
    scale = lib["scalefactors"]["tissue_hires_scalef"]
    assert lib["images"]["hires"].shape[:2] == (round(80 * scale), round(96 * scale))


def test_external_mode_on_two_stores(depth_stores, tmp_path):
    """Evaluated on the shared genes; a re-released patient (HER2ST E == STNet BC23567) is left out of the
    evaluation; controls present (the depth oracle against NumPy lines fitted on A); a flat model is FAILED
    in results.json, the printed table and report.md; model exported (with model.output_base=counting)."""
    root, a, b = depth_stores
    w = tmp_path / "w"
    r = run(tmp_path, "histospace_jax.main", config("external.py"), f"--workdir={w}", f"--config.data.store={a}",
            f"--config.external.store={b}", "--config.external.map_genes=G2,G404",
            "--config.model.output_base=counting", "--config.loo.random_encoder_draws=2", *TINY)
    assert "External test" in r.stdout
    e = json.load(open(w / "results.json"))["external"]
    # On the counting base (the heads and the random-encoder control's heads alike), exported with the model.
    assert e["train"]["output_base"]["base"] == "counting" and e["train"]["output_base"]["depth_ridge_alpha"] > 0
    assert json.load(open(w / "model" / "model.json"))["output_base"] == "counting"
    assert e["n_shared_genes"] == 3  # G1, G2, G4 in A's order
    assert e["overlap"]["shared_patients"] == ["BC23567"]
    assert e["test"]["patients"] == ["X"] and e["test"]["n_spots"] == 24
    assert e["train"]["refit"] is True and 0 < e["train"]["live_units"] <= 1
    gapped = {"depth_oracle", "depth_oracle_sampling", "image_depth_sampling", "random_encoder", "random_encoder_2",
              "model_unsmoothed", "trivial_image", "linear_probe", "image_depth"}
    assert set(e["controls"]) == gapped | {"mean_predictor"}
    assert set(e["control_ridge_alpha"]) == {"trivial_image", "linear_probe", "image_depth"}
    assert -1 <= e["test_image_depth_r"] <= 1
    report = open(w / "report.md").read()
    assert "- output base: counting (the model is the counting model" in report
    assert f"reads the test spots' log library size at r {e['test_image_depth_r']:.3f}" in report
    sa, sb = store_lib.open_store(str(a)), store_lib.open_store(str(b))
    rows_b = np.flatnonzero(sb.obs["patient"] == "X")
    truth, depth_oracle_r, sampling_r = sb.expression[rows_b][:, sb.gene_index(["G1", "G2", "G4"])], [], []
    lib_a, lib_b = sa.obs["library_size"].astype(np.float64), sb.obs["library_size"][rows_b].astype(np.float64)
    for j, g in enumerate(["G1", "G2", "G4"]):
        x_a = sa.expression[:, sa.gene_index([g])[0]].astype(np.float64)
        slope, icpt = np.polyfit(np.log(lib_a), x_a, 1)
        depth_oracle_r.append(np.corrcoef(icpt + slope * np.log(lib_b), truth[:, j])[0, 1])
        # The counting model by hand: the gene's share of A's libraries, each test spot's expected log1p value
        # summed over the Poisson distribution of its count.
        share = np.rint(np.expm1(x_a) * lib_a / 1e4).sum() / lib_a.sum()
        expected = []
        for L in lib_b:
            c = np.arange(0, int(L * share + 40 * np.sqrt(L * share) + 60))
            expected.append(np.sum(scipy.stats.poisson.pmf(c, L * share) * np.log1p(1e4 * c / L)))
        sampling_r.append(np.corrcoef(expected, truth[:, j])[0, 1])
    np.testing.assert_allclose(e["controls"]["depth_oracle"]["per_gene_pearson"], np.mean(depth_oracle_r), rtol=1e-4)
    np.testing.assert_allclose(e["controls"]["depth_oracle_sampling"]["per_gene_pearson"], np.mean(sampling_r),
                               rtol=1e-4)
    # Depth-adjusted r is undefined for predictors that are lines in depth (or constant), defined otherwise.
    for name in ("depth_oracle", "mean_predictor"):
        assert np.isnan(e["controls"][name]["depth_adjusted_per_gene_pearson"])
    assert np.isfinite(e["controls"]["random_encoder"]["depth_adjusted_per_gene_pearson"])
    assert 0 <= e["model"]["share_genes_r2_positive"] <= 1
    # Random tiles and two epochs: whether the heads left the training mean decides failed, never the reverse.
    m = e["model"]
    assert m["failed"] == (m["constant_gene_fraction"] > 0.05)
    assert ("The model FAILED" in r.stdout) == m["failed"]
    assert ("The model FAILED" in open(w / "report.md").read()) == m["failed"]
    assert e["controls"]["mean_predictor"]["failed"] is False
    # The mean profile against itself: R² exactly 0, so no gene counts as beating it.
    assert (e["controls"]["mean_predictor"]["r2_mean"], e["controls"]["mean_predictor"]["share_genes_r2_positive"]) == (
        0.0, 0.0)
    chosen = e["smoothing"]["sets"]["test"]
    assert chosen["n_without_neighbours"] == 0 and len(chosen["inner_validation_mse"]) == 4
    # The exported model smooths as the training store's inner validation chose (nothing when it chose w = 1).
    exported = json.load(open(w / "model" / "model.json"))["model"]["smoothing"]
    assert exported == (None if chosen["self_weight"] == 1 else {"radius": 1.5, "self_weight": chosen["self_weight"]})
    assert e["warnings"] and list(e["map_genes"]) == ["G2"]
    assert (w / "figures" / "external_spatial_maps.png").exists()
    assert json.load(open(w / "model" / "model.json"))["genes"] == ["G1", "G2", "G4"]
    assert "External test" in open(w / "report.md").read()
    # per_gene.csv: the model's depth-adjusted r per gene, against NumPy on the saved predictions.
    table = list(csv.DictReader(open(w / "per_gene.csv")))
    saved = np.load(w / "predictions.npz")
    ld = np.log(sb.obs["library_size"][rows_b])
    res_ = lambda v: v - np.polyval(np.polyfit(ld, v, 3), ld)  # noqa: E731
    expected = [np.corrcoef(res_(saved["truth"][:, j].astype(np.float64)),
                            res_(saved["pred"][:, j].astype(np.float64)))[0, 1] for j in range(3)]
    np.testing.assert_allclose([float(x["depth_adjusted_r"] or "nan") for x in table], expected, atol=5e-4)
    assert {"random_encoder_r", "random_encoder_depth_adjusted_r"} <= set(table[0])
    # The model against every control, as leave-one-patient-out gives each held-out patient: per-gene r of each
    # control (per_gene.csv) and the gap in mean per-gene r (results.json), against NumPy on the saved predictions;
    # the paired interval over the test section's 4x4-spot blocks, counted by hand.
    gene_r = lambda p: np.array([np.corrcoef(saved["truth"][:, j], p[:, j])[0, 1] for j in range(3)])  # noqa: E731
    assert set(e["model_minus_control"]) == gapped
    xs, ys, ss = sb.obs["array_x"][rows_b], sb.obs["array_y"][rows_b], np.asarray(sb.obs["section"])[rows_b]
    assert len(set(ss)) < 3  # so the units are grid blocks
    n_blocks = len({(s, int(round(x)) // 4, int(round(y)) // 4) for s, x, y in zip(ss, xs, ys)})
    for name in gapped:
        r_c = gene_r(saved[f"control_{name}"].astype(np.float64))
        np.testing.assert_allclose([float(x[f"{name}_r"] or "nan") for x in table], r_c, atol=1e-5)
        gap = e["model_minus_control"][name]
        np.testing.assert_allclose(gap["per_gene_pearson"], np.nanmean(gene_r(saved["pred"].astype(np.float64)))
                                   - np.nanmean(r_c), atol=1e-5)
        assert gap["ci_units"] == f"{n_blocks} grid blocks"
    ci = e["model"]["per_gene_pearson_ci95"]
    assert ci[0] <= e["model"]["per_gene_pearson"] <= ci[1] and set(e["model"]["per_section_pearson"]) == set(ss)
    assert "Model minus each control, per-gene r, with a paired bootstrap interval" in r.stdout
    # Two untrained encoders (seeds 12345 and 12346), each with its own heads, as leave-one-patient-out draws them.
    assert not np.allclose(saved["control_random_encoder"], saved["control_random_encoder_2"])
    draws = e["random_encoder_draws"]
    assert draws["seeds"] == [12345, 12346] and list(draws["folds"]) == ["test"]
    d = draws["folds"]["test"]
    assert d["per_gene_pearson"] == [e["controls"][n]["per_gene_pearson"] for n in draws["controls"]]
    assert d["readings"] == [metrics.interval_reading(*e["model_minus_control"][n]["ci95"])
                             for n in ("random_encoder", "random_encoder_2")]
    assert "Random-encoder control over 2 draws" in r.stdout and "Random-encoder control over 2 draws" in report
    assert set(e["smoothing"]["random_encoder_self_weight"]) == {"test", "test (random_encoder_2)"}
    # The genes beyond depth: the count is the model's q-values at 5% FDR (per_gene.csv), each control's count
    # beside it, and the report's section.
    q_adj = np.array([float(x["q_depth_adjusted_spatial"] or "nan") for x in table])
    assert np.all((q_adj > 0) & (q_adj <= 1))
    beyond = e["genes_beyond_depth"]["test"]
    assert beyond["n_significant"] == int(np.sum(q_adj <= 0.05)) == e["model"][
        "n_genes_significant_depth_adjusted_spatial"]
    assert set(beyond["controls_n_significant"]) == gapped
    assert "## Genes predicted beyond sequencing depth" in report and "Held out test: " in report
    assert "Genes predicted beyond sequencing depth (depth-adjusted r, spatial block permutation, 0.05 FDR): test " in (
        r.stdout)
    assert "### Model against each control" in report and "95% bootstrap interval [" in report
    # Each gene's r with log library size within each training section of A, as NumPy computes it.
    secs_a, ld_a = np.asarray(sa.obs["section"]).astype(str), np.log(lib_a)
    cent = lambda v: v - np.array([v[secs_a == s].mean(0) for s in secs_a])  # noqa: E731
    train_r = [np.corrcoef(cent(sa.expression[:, sa.gene_index([g])[0]].astype(np.float64)), cent(ld_a))[0, 1]
               for g in ["G1", "G2", "G4"]]
    np.testing.assert_allclose([float(x["training_depth_r"] or "nan") for x in table], train_r, atol=1e-5)
    assert e["depth_relation"]["training_median_library_size"] == pytest.approx(np.median(lib_a))
    # The test set's references, as leave-one-patient-out gives each held-out patient: the neighbour reference
    # against NumPy (each test spot against the mean of its adjacent spots' measurements), and a noise ceiling.
    xy = np.stack([sb.obs["pixel_x"][rows_b], sb.obs["pixel_y"][rows_b]], 1).astype(np.float64)
    secs_b = np.asarray(sb.obs["section"]).astype(str)[rows_b]
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    spacing = np.median(np.sort(d + np.eye(len(d)) * 1e9, 1)[:, 0])
    near = (d > 0) & (d <= 1.5 * spacing) & (secs_b[:, None] == secs_b[None])
    has = near.any(1)
    around = near[has] @ truth.astype(np.float64) / near[has].sum(1, keepdims=True)
    expected_nb = [np.corrcoef(truth[has, j], around[:, j])[0, 1] for j in range(3)]
    np.testing.assert_allclose([float(x["neighbour_reference_r"] or "nan") for x in table], expected_nb, atol=1e-5)
    assert e["neighbour_reference"]["n_spots_used"] == int(has.sum())
    assert 0 < e["noise_ceiling"]["ceiling_r_mean"] <= 1 and "noise_ceiling_depth_adjusted_r" in table[0]
    assert "- neighbours' measurements (each test spot against" in report
    assert "### How genes follow sequencing depth" in report
    assert ("Genes whose relation to sequencing depth reverses between the held-out and the training patients: "
            "test set ") in r.stdout


def test_loo_scored_on_inner_validation_says_its_encoders_saw_the_scored_tiles(tmp_path):
    """loo.evaluate_on=inner_validation scores each fold on its training patients' inner-validation spots, whose
    tiles the fold's autoencoder learnt from: results.json says so beside the tiles it saw, and says what was
    evaluated."""
    a = _store(tmp_path / "a", ["E"] * 96 + ["F"] * 96, ["G1", "G2", "G3", "G4"], "her2st", 3)
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("loo.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY,
        "--config.loo.evaluate_on=inner_validation", "--config.loo.random_encoder_control=off")
    res = json.load(open(w / "results.json"))
    assert "inner" in json.dumps(res["evaluated_on"])
    for fold in ("E", "F"):
        seen = res["autoencoder"][fold]["tiles_seen"]
        assert seen.startswith(f"the 96 tiles of the training patients of the fold holding out {fold}; the "
                               "inner-validation spots that loo.evaluate_on=inner_validation scores are among them")


def test_loo_mode_on_a_store(depth_stores, tmp_path):
    root, a, _ = depth_stores
    w = tmp_path / "w"
    r = run(tmp_path, "histospace_jax.main", config("loo.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY,
            "--config.loo.random_encoder_draws=2")
    res = json.load(open(w / "results.json"))
    assert [f["held_out"] for f in res["folds"]] == ["E", "F"]
    assert set(res["folds"][0]["controls"]) == {"mean_predictor", "random_encoder", "random_encoder_2",
                                                "trivial_image", "linear_probe", "model_unsmoothed",
                                                "depth_oracle", "image_depth", "depth_oracle_sampling",
                                                "image_depth_sampling"}
    # Two untrained encoders (seeds 12345 and 12346), each with its own heads: different predictions, and the
    # summary of the draws carries each one's per-gene r and the reading of its paired interval.
    npz = np.load(w / "predictions.npz")
    assert not np.allclose(npz["random_encoder_E"], npz["random_encoder_2_E"])
    draws = res["random_encoder_draws"]
    assert draws["seeds"] == [12345, 12346] and list(draws["folds"]) == ["E", "F"]
    for f in res["folds"]:
        d = draws["folds"][f["held_out"]]
        assert d["per_gene_pearson"] == [f["controls"][n]["per_gene_pearson"] for n in draws["controls"]]
        assert d["readings"] == [metrics.interval_reading(*f["model_minus_control"][n]["ci95"])
                                 for n in draws["controls"]]
    assert "Random-encoder control over 2 draws" in r.stdout
    assert "- Random-encoder control over 2 draws" in open(w / "report.md").read()
    # The standard recipe smooths the model and the image-based controls over adjacent spots, with the weight
    # each fold's inner validation preferred: the saved model predictions are the unsmoothed ones blended by hand
    # with their 8-neighbourhood (spots 10 px apart).
    expression = np.asarray(store_lib.open_store(a).expression, np.float64)
    for fold, chosen in res["training"]["smoothing"]["sets"].items():
        assert set(chosen["inner_validation_mse"]) == {"1", "0.75", "0.5", "0.25"}
        assert chosen["inner_validation_mse"][f"{chosen['self_weight']:g}"] == min(
            chosen["inner_validation_mse"].values())
        assert (chosen["neighbours_median"], chosen["n_without_neighbours"]) == (5.0, 0)
        npz = np.load(w / "predictions.npz")
        rows = npz[f"rows_{fold}"]
        xy = np.stack([rows % 6 * 10.0, rows // 6 * 10.0], 1)
        d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
        near = (d > 0) & (d <= 15.0)
        raw, wt = npz[f"model_unsmoothed_{fold}"].astype(np.float64), chosen["self_weight"]
        np.testing.assert_allclose(npz[f"pred_{fold}"], wt * raw + (1 - wt) * near @ raw / near.sum(1, keepdims=True),
                                   rtol=1e-4, atol=1e-5)
        # The neighbour reference: each held-out spot against the mean of its 8-neighbourhood's measurements.
        truth = expression[rows]
        around = near @ truth / near.sum(1, keepdims=True)
        expected = np.mean([np.corrcoef(truth[:, g], around[:, g])[0, 1] for g in range(truth.shape[1])])
        ref = res["neighbour_reference"][fold]
        assert ref["n_spots_used"] == len(rows) and ref["radius_spacings"] == 1.5
        assert np.isclose(ref["per_gene_pearson"], expected, atol=1e-9)
        # per_gene.csv: every gene's figures for this fold, against NumPy on the saved predictions.
        table = [x for x in csv.DictReader(open(w / "per_gene.csv")) if x["fold"] == fold]
        assert [x["gene"] for x in table] == store_lib.open_store(a).genes
        col = lambda name: np.array([float(x[name] or "nan") for x in table])  # noqa: E731  (NaN is written empty)
        ld = np.log(store_lib.open_store(a).obs["library_size"][rows])
        res_ = lambda v: v - np.polyval(np.polyfit(ld, v, 3), ld)  # noqa: E731
        # The controls' columns are checked in float64 by test_evaluation's held_out_results test: here the ridge
        # controls may shrink to near-constant predictions, whose float32 copy in predictions.npz loses their r.
        for name, pred in (("depth_adjusted_r", npz[f"pred_{fold}"]),):
            expected = [np.corrcoef(res_(truth[:, g]), res_(pred[:, g].astype(np.float64)))[0, 1]
                        for g in range(truth.shape[1])]
            # predictions.npz keeps float32: the residuals of a prediction that is nearly a line in depth
            # carry its rounding at ~1e-4 of r.
            np.testing.assert_allclose(col(name), expected, atol=5e-4)
        np.testing.assert_allclose(col("neighbour_reference_r"),
                                   [np.corrcoef(truth[:, g], around[:, g])[0, 1] for g in range(truth.shape[1])],
                                   atol=1e-5)  # the CSV keeps 6 significant digits
        np.testing.assert_allclose(col("held_out_mean_expression"), truth.mean(0), rtol=1e-5)
        # Each gene's r with log library size, within each held-out section, and the reversals counted from it.
        secs = np.asarray(store_lib.open_store(a).obs["section"]).astype(str)[rows]
        cent = lambda v: v - np.array([v[secs == s].mean(0) for s in secs])  # noqa: E731
        held_r = [np.corrcoef(cent(truth[:, g]), cent(ld))[0, 1] for g in range(truth.shape[1])]
        np.testing.assert_allclose(col("held_out_depth_r"), held_r, atol=1e-5)
        rel, tr_r = res["depth_relation"][fold], col("training_depth_r")
        assert rel["n_genes_reversed"] == int(np.sum((np.abs(held_r) >= 0.1) & (np.abs(tr_r) >= 0.1)
                                                     & (np.sign(held_r) != np.sign(tr_r))))
        assert rel["held_out_median_library_size"] == pytest.approx(np.median(np.exp(ld)))
        other = "F" if fold == "E" else "E"  # the fold's one training patient is the whole training relation
        assert list(rel["training_patients"]) == [other]
        assert rel["training_patients"][other]["median_library_size"] == pytest.approx(
            rel["training_median_library_size"])
        assert rel["training_patients"][other]["n_genes_reversed"] == rel["n_genes_reversed"]
        assert np.all((col("q_depth_adjusted_spatial") > 0) & (col("q_depth_adjusted_spatial") <= 1))
        assert np.isfinite(col("noise_ceiling_depth_adjusted_r")).any()
        fold_block = next(f for f in res["folds"] if f["held_out"] == fold)
        assert fold_block["n_genes_significant_depth_adjusted_spatial"] == int(
            np.sum(col("q_depth_adjusted_spatial") <= 0.05)) == res["genes_beyond_depth"][fold]["n_significant"]
        assert not any(k in fold_block for k in evaluation.PER_GENE_ARRAYS)
    assert "## Genes predicted beyond sequencing depth" in open(w / "report.md").read()
    assert "### How genes follow sequencing depth" in open(w / "report.md").read()
    assert "Genes whose relation to sequencing depth reverses between the held-out and the training patients: E " in (
        r.stdout)
    assert "The same test on each control's predictions passes: random_encoder " in open(w / "report.md").read()
    assert set(res["genes_beyond_depth"]["E"]["controls_n_significant"]) == {
        "random_encoder", "random_encoder_2", "trivial_image", "linear_probe", "depth_oracle", "image_depth",
        "depth_oracle_sampling", "image_depth_sampling", "model_unsmoothed"}
    assert "Genes predicted beyond sequencing depth (depth-adjusted r, spatial block permutation, 0.05 FDR): E " in (
        r.stdout)
    assert "- neighbour smoothing of predictions: each spot's prediction x self_weight" in open(w / "report.md").read()
    assert set(res["training"]["smoothing"]["random_encoder_self_weight"]) == {"E", "F", "E (random_encoder_2)",
                                                                             "F (random_encoder_2)"}
    # No ae.store: one autoencoder per fold, on that fold's training patients only.
    assert set(res["autoencoder"]) == {"E", "F"}
    assert "training patients of the fold holding out E" in res["autoencoder"]["E"]["tiles_seen"]
    # The score settings are compared on: the heads on their inner-validation spots, never the held-out patient.
    inner = res["training"]["inner_validation_score"]
    assert set(inner) == {"E", "F"} and all(0 < v["n_spots"] < 24 for v in inner.values())
    assert all(np.isfinite(v["mse_sd_units"]) and v["mean_profile_mse_sd_units"] > 0 for v in inner.values())
    assert "the score settings are compared on" in open(w / "report.md").read()
    # The standard recipe's loss, in the per-gene SDs of the standardised targets, is recorded and reported.
    assert res["training"]["loss"] == {"name": "huber", "delta": 3.0, "targets": "on",
                                       "units": "standard deviations of each gene on the fold's training rows"}
    # The standard recipe adds the heads' output to the training mean (its inner validation's choice).
    assert res["training"]["output_base"]["base"] == "mean"
    assert set(res["training"]["image_depth_read_r"]) == {"E", "F"}
    assert "- how well the frozen features tell sequencing depth: r between" in open(w / "report.md").read()
    assert "- output base: mean (the heads' output is added to the training mean" in open(w / "report.md").read()
    assert res["evaluated_on"] == "held_out" and res["training"]["refit"] is True
    assert res["held_out_unit"] == {"unit": "patient"}
    assert "- refit: after inner validation chose each head's epoch" in open(w / "report.md").read()
    live = res["training"]["live_units"]
    assert set(live) == {"E", "F"} and all(0 < v <= 1 for v in live.values())
    assert "  - live hidden units of its heads: " in open(w / "report.md").read()
    assert "- loss: Huber, delta 3 (standard deviations" in open(w / "report.md").read()
    assert "Leave-one-patient-out on a" in r.stdout
    lines = [json.loads(x) for x in open(w / "metrics.jsonl")]
    assert {x["loop"] for x in lines} == {"ae E", "ae F", "loo main", "loo random_encoder", "loo main_refit",
                                          "loo random_encoder_refit", "loo random_encoder_2",
                                          "loo random_encoder_2_refit"}


def test_leave_one_section_out_holds_out_sections_and_says_so(tmp_path):
    # Two patients of two sections each: every fold holds out one section, its patient's other section trains.
    patients = ["E"] * 24 + ["F"] * 24
    sections = ["E1"] * 12 + ["E2"] * 12 + ["F1"] * 12 + ["F2"] * 12
    a = _store(tmp_path / "a", patients, ["G1", "G2", "G3", "G4"], "her2st", 0, depth=True, sections=sections)
    w = tmp_path / "w"
    r = run(tmp_path, "histospace_jax.main", config("loo.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY,
            "--config.loo.random_encoder_control=off", "--config.loo.hold_out=section")
    res = json.load(open(w / "results.json"))
    assert [f["held_out"] for f in res["folds"]] == ["E1", "E2", "F1", "F2"]
    assert res["held_out_unit"]["unit"] == "section"
    assert res["held_out_unit"]["patient_of_section"] == {"E1": "E", "E2": "E", "F1": "F", "F2": "F"}
    npz = np.load(w / "predictions.npz")
    for k, name in enumerate(["E1", "E2", "F1", "F2"]):
        np.testing.assert_array_equal(npz[f"rows_{name}"], np.arange(12 * k, 12 * k + 12))
        # Each fold's autoencoder saw the other three sections' tiles, its own patient's other section included.
        assert "the 36 tiles of the training patients of the fold holding out " + name in (
            res["autoencoder"][name]["tiles_seen"])
        # Three training sections: inner validation holds back a whole one, as the outer protocol does.
        assert res["training"]["inner_validation"][name] == "12 of 36 training spots by whole sections"
    assert "loo.hold_out=section: leave-one-section-out over 4 sections" in r.stdout
    assert "> **Leave-one-section-out** (loo.hold_out=section)" in open(w / "report.md").read()
    # Titles name the protocol, and the dataset's patients are the real ones (the folds name the sections).
    assert "Leave-one-section-out on " in r.stdout and "Leave-one-patient-out" not in r.stdout
    assert "## Leave-one-section-out: model and controls" in open(w / "report.md").read()
    assert res["dataset"]["patients"] == ["E", "F"]
    import anndata

    # predictions.h5ad keeps each spot's real patient beside its section and fold.
    ad = anndata.read_h5ad(w / "predictions.h5ad")
    assert list(ad.obs["patient"]) == patients and list(ad.obs["fold"]) == sections


def test_leave_one_section_out_refuses_a_section_name_two_patients_share(tmp_path):
    from histospace_jax import folds
    from histospace_jax.errors import BadInputError

    a = _store(tmp_path / "a", ["E"] * 6 + ["F"] * 6, ["G1", "G2"], "her2st", 0, sections=["S1"] * 12)
    with pytest.raises(BadInputError, match=r"section 'S1' belongs to patients 'E' and 'F'.*unique across patients"):
        folds.sections_as_patients(store_lib.open_store(a))
    b = _store(tmp_path / "b", ["E"] * 6 + ["F"] * 6, ["G1", "G2"], "her2st", 0, sections=["S1"] * 6 + ["S2"] * 6)
    store, owner = folds.sections_as_patients(store_lib.open_store(b))
    assert owner == {"S1": "E", "S2": "F"} and store.patients == ["S1", "S2"]
    assert list(store_lib.open_store(b).obs["patient"]) == ["E"] * 6 + ["F"] * 6  # the opened store is untouched
    # loo.patients then names sections, and an unknown one is refused with the sections it could name.
    assert folds.plan_leave_one_patient_out(store, "S2", "sections").folds == [1]
    with pytest.raises(BadInputError, match=r"loo.patients names \['E'\].*\(sections: \['S1', 'S2'\]\)"):
        folds.plan_leave_one_patient_out(store, "E", "sections")


def test_loo_with_a_bfloat16_feature_cache_stores_half_the_bytes_and_predicts_as_float32_does(stores, tmp_path):
    """train.feature_cache_dtype=bfloat16 end to end: the cache on disk holds bfloat16 at half the float32
    cache's bytes, the heads train on it in float32, and the held-out predictions stay within bfloat16 rounding's
    reach of the float32 run's."""
    root, a, b = stores
    preds, sizes = {}, {}
    for dtype in ("float32", "bfloat16"):
        w = tmp_path / dtype
        run(tmp_path, "histospace_jax.main", config("loo.py"), f"--workdir={w}", f"--config.data.store={a}",
            "--config.loo.random_encoder_control=off", f"--config.train.feature_cache_dtype={dtype}", *TINY)
        caches = [c for c in os.listdir(w / "cache") if c.startswith("features-")]
        assert len(caches) == 2  # one autoencoder per fold
        meta = [json.load(open(w / "cache" / c / "zarr.json")) for c in caches]
        assert {m["data_type"] for m in meta} == {dtype}
        sizes[dtype] = sum(cached_array(w / "cache" / c).nbytes for c in caches)
        with np.load(w / "predictions.npz") as npz:
            preds[dtype] = {k: npz[k].astype(np.float64) for k in npz.files if k.startswith("pred_")}
        assert json.load(open(w / "results.json"))["config"]["train"]["feature_cache_dtype"] == dtype
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    for k, p in preds["float32"].items():
        np.testing.assert_allclose(preds["bfloat16"][k], p, atol=0.05 * float(np.abs(p).max()))


def cached_array(path) -> np.ndarray:
    import tensorstore as ts
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()


def test_loo_and_external_modes_with_neighbourhood_context_and_stain_jitter(stores, tmp_path):
    """model.context=neighbours and train.stain_jitter end to end: LOO records the neighbourhoods and the
    jitter; the external mode trains on one store and predicts the other with each store's own neighbours, and
    exports a model that says so (predict then jitters its views the same way)."""
    root, a, b = stores
    w = tmp_path / "loo"
    run(tmp_path, "histospace_jax.main", config("loo.py"), f"--workdir={w}", f"--config.data.store={a}",
        "--config.model.context=neighbours", "--config.loo.random_encoder_control=off",
        "--config.train.stain_jitter=0.2", "--config.model.smoothing=neighbours", "--config.model.smoothing_weight=0.4",
        *TINY)
    res = json.load(open(w / "results.json"))
    fixed = res["training"]["smoothing"]["sets"]["E"]
    assert (fixed["self_weight"], fixed["chosen_by"]) == (0.4, "model.smoothing_weight")
    npz = np.load(w / "predictions.npz")
    raw, rows = npz["model_unsmoothed_E"].astype(np.float64), npz["rows_E"]
    xy = np.stack([rows % 6 * 10.0, rows // 6 * 10.0], 1)
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    near = (d > 0) & (d <= 15.0)
    np.testing.assert_allclose(npz["pred_E"], 0.4 * raw + 0.6 * near @ raw / near.sum(1, keepdims=True), rtol=1e-5,
                               atol=1e-8)
    assert res["training"]["augmentation"] == {"views": 8, "stain_jitter": 0.2}
    assert "HED stain jitter 0.2 on views 1-7" in open(w / "report.md").read()
    ctx = res["training"]["context"]
    # 24 spots per section on a 6 x 4 grid, 10 px apart: 8 neighbours inside, 3 in the corners.
    assert ctx["neighbours_max"] == 8 and ctx["n_without_neighbours"] == 0 and ctx["radius_spacings"] == 1.5
    # Random tiles and random expression: nothing to learn, so two epochs leave the heads at the training mean
    # and the folds must say so (flat predictions are a failed fold, never a healthy one).
    assert all(np.isfinite(f["mse"]) for f in res["folds"])
    assert all(f["failed"] == (f["constant_gene_fraction"] > 0.05) for f in res["folds"])
    assert "neighbourhood context" in open(w / "report.md").read()
    w = tmp_path / "ext"
    run(tmp_path, "histospace_jax.main", config("external.py"), f"--workdir={w}", f"--config.data.store={a}",
        f"--config.external.store={b}", "--config.model.context=neighbours", "--config.loo.random_encoder_control=off",
        "--config.train.stain_jitter=0.2", "--config.seed=5", *TINY)
    e = json.load(open(w / "results.json"))["external"]
    assert np.isfinite(e["model"]["mse"]) and e["context"]["test"]["neighbours_max"] == 8
    info = json.load(open(w / "model" / "model.json"))
    assert info["model"]["context"] == "neighbours"
    assert (info["stain_jitter"], info["jitter_seed"], info["views"]) == (0.2, 5, 8)


def test_pretrain_ae_and_ae_study_modes(stores, tmp_path):
    root, a, _ = stores
    w = tmp_path / "pre"
    run(tmp_path, "histospace_jax.main", config("pretrain_ae.py"), f"--workdir={w}", f"--config.ae.store={a}",
        f"--config.data.store={a}", *TINY)
    res = json.load(open(w / "results.json"))
    assert res["mode"] == "pretrain_ae" and np.isfinite(res["autoencoder"]["final_val_mse"])
    assert os.path.isdir(w / "checkpoints" / "ae")
    w = tmp_path / "study"
    r = run(tmp_path, "histospace_jax.main", config("ae_study.py"), f"--workdir={w}", f"--config.ae.store={a}",
            f"--config.data.store={a}", "--config.ae_study.n_grid_tiles=4", *TINY)
    res = json.load(open(w / "results.json"))
    assert set(res["ae_study"]["variants"]) == {"pool", "relu", "relu_bn"}
    for s in res["ae_study"]["variants"].values():
        assert np.isfinite(s["final_val_mse"]) and s["paper_mse_iciar"] > 0
    for name in ("figures/ae_study_curves.png", "figures/ae_study_reconstructions.png", "curves/ae_study.csv"):
        assert (w / name).exists(), name
    assert "Autoencoder variants" in r.stdout and "Autoencoder variants" in open(w / "report.md").read()


def test_prepare_command_on_real_her2st_sections(shared_data, tmp_path):
    """The README's prepare command on two real HER2ST sections (one per patient)."""
    out = tmp_path / "store"
    run(tmp_path, "histospace_jax.prepare", "--format=her2st", f"--input={shared_data}/her2st/data",
        f"--output={out}", "--sections=B4,C3")
    s = store_lib.open_store(str(out))
    assert s.patients == ["B", "C"] and s.n_spots == 281 + 179
    assert {"library_size", "n_genes_detected"} <= set(s.obs)


def _poisson_log1p(depth: float, share: float) -> float:
    lam = depth * share
    c = np.arange(0, int(lam + 40 * np.sqrt(lam) + 60))
    return float(np.sum(scipy.stats.poisson.pmf(c, lam) * np.log1p(1e4 * c / depth)))


def _residual_mean_by_hand(expr: np.ndarray, lib: np.ndarray, patients: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The mean over `rows` of what the heads learn under the counting base: expression minus the Poisson
    expectation at each spot's depth with its own patient's library shares (counts recovered by hand)."""
    out = np.zeros((len(rows), expr.shape[1]))
    for k, i in enumerate(rows):
        mine = np.flatnonzero(patients == patients[i])
        counts = np.rint(np.expm1(expr[mine].astype(np.float64)) * lib[mine, None] / 1e4)
        shares = counts.sum(0) / lib[mine].sum()
        out[k] = [expr[i, j] - _poisson_log1p(lib[i], shares[j]) for j in range(expr.shape[1])]
    return out.mean(0)


# The heads barely move (learning rate 1e-12 with a zero output layer), so each prediction is the training mean
# of their targets plus the counting base: both can be computed by hand.
FROZEN_HEADS = ["--config.model.output_base=counting", "--config.train.learning_rate=1e-12",
                "--config.model.smoothing=none"]


def test_loo_with_the_counting_base_adds_it_to_the_heads(depth_stores, tmp_path):
    """model.output_base=counting in leave-one-patient-out: the heads learn expression minus the counting model at
    each training spot's measured depth (own patient's shares), and every held-out prediction is the fold's
    counting model at the depth read from the image (the image_depth_sampling control, computed independently by
    the reviewer's controls) plus the heads' output."""
    root, a, _ = depth_stores
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("loo.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY,
        *FROZEN_HEADS, "--config.loo.random_encoder_control=off")
    res = json.load(open(w / "results.json"))
    base = res["training"]["output_base"]
    assert base["base"] == "counting" and base["scale"] == 1e4 and set(base["per_fold"]) == {"E", "F"}
    assert all(-1 <= v["held_out_depth_r"] <= 1 and v["depth_ridge_alpha"] > 0 for v in base["per_fold"].values())
    s = store_lib.open_store(str(a))
    expr, lib, patients = np.asarray(s.expression), s.obs["library_size"].astype(np.float64), s.obs["patient"]
    npz = np.load(w / "predictions.npz")
    for fold, other in (("E", "F"), ("F", "E")):
        mu = _residual_mean_by_hand(expr, lib, patients, np.flatnonzero(patients == other))
        heads = npz[f"pred_{fold}"].astype(np.float64) - npz[f"image_depth_sampling_{fold}"]
        np.testing.assert_allclose(heads, np.broadcast_to(mu, heads.shape), atol=2e-4)
    report = open(w / "report.md").read()
    assert "- output base: counting (each prediction is the counting model at the depth" in report
    assert "  - holding out E: the depth ridge (alpha " in report


def test_train_with_the_counting_base_exports_it_and_predict_adds_it(depth_stores, tmp_path):
    """The README's train -> predict path with model.output_base=counting: model.json says so, the base's arrays
    sit beside it, and predict's value for each spot is the heads' (the training mean of their targets) plus the
    counting model at the depth the exported ridge reads from that spot's tile, by hand."""
    from histospace_jax import model_export

    root, a, _ = depth_stores
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("train.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY,
        *FROZEN_HEADS)
    res = json.load(open(w / "results.json"))
    assert res["train"]["output_base"] == "counting"
    info = json.load(open(w / "model" / "model.json"))
    assert info["output_base"] == "counting" and (w / "model" / model_export.COUNTING_NPZ).exists()
    s = store_lib.open_store(str(a))
    expr, lib, patients = np.asarray(s.expression), s.obs["library_size"].astype(np.float64), s.obs["patient"]
    base = model_export.load_counting_base(str(w / "model"), info)
    counts = np.rint(np.expm1(expr.astype(np.float64)) * lib[:, None] / 1e4)
    np.testing.assert_allclose(base.shares, counts.sum(0) / lib.sum(), rtol=1e-9)  # every training spot's
    # A slide with six of the store's tiles at known centres, predicted as the README writes it.
    slide, centres, tiles = _slide_of_store_tiles(s, np.array([0, 5, 11, 24, 30, 47]))
    out = _predict_slide(tmp_path, w, slide, centres)
    with open(out / "predictions.csv") as f:
        got = np.array([[float(r[g]) for g in info["genes"]] for r in csv.DictReader(f)])
    mu = _residual_mean_by_hand(expr, lib, patients, np.arange(len(expr)))
    np.testing.assert_allclose(got, mu + _counting_by_hand(w / "model", base, tiles), atol=3e-4)


def _slide_of_store_tiles(store, picked):
    """A slide with the store's tiles `picked` at known centres: (slide, centres, tiles)."""
    tiles = np.asarray(store.tiles[picked])
    slide = np.full((40, 20 * len(picked) + 20, 3), 235, np.uint8)
    centres = [(10 + 20 * k, 20) for k in range(len(picked))]
    for (x, y), t in zip(centres, tiles):
        slide[y - 8:y + 8, x - 8:x + 8] = t
    return slide, centres, tiles


def _counting_by_hand(model_dir, base, tiles) -> np.ndarray:
    """The exported counting model on `tiles` by hand: the depth its ridge reads from the pooled encoder maps of
    the exported encoder, then the Poisson expectation of log1p counts per 10k at each gene's share."""
    from histospace_jax import controls, model_export, models

    _, model, variables = model_export.load(str(model_dir))
    encoder = {k: {"encoder": jax_tree_first(v["encoder"])} for k, v in variables.items() if "encoder" in v}
    maps = np.asarray(model.apply(encoder, models.to_unit_range(tiles), method="encode"))
    pooled = controls.pooled_feature_maps(maps)
    depth = np.exp((((pooled - base.feature_mean) / base.feature_scale) - base.pca_mean) @ base.components.T
                   @ base.depth_coef + base.depth_intercept)
    return np.array([[_poisson_log1p(d, sh) for sh in base.shares] for d in depth])


# Heads that barely move on the training mean as base: each prediction before the blend is the training mean.
FROZEN_MEAN_HEADS = ["--config.model.output_base=mean", "--config.train.learning_rate=1e-12",
                     "--config.model.smoothing=none"]


def test_loo_blends_the_heads_with_the_counting_model_at_the_validated_weight(depth_stores, tmp_path):
    """model.counting_blend (the standard recipe's on a store of counts): per fold, inner validation picks the
    candidate weight with the lowest MSE, and every held-out prediction is (1 - w) x the heads' (here the
    training mean) + w x the fold's counting model at the image's depth (the image_depth_sampling control,
    computed independently by the reviewer's controls). The random-encoder control chooses its own weight."""
    root, a, _ = depth_stores
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("loo.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY,
        *FROZEN_MEAN_HEADS, "--config.model.counting_blend_weights=(0.0,0.3,0.7,1.0)")
    res = json.load(open(w / "results.json"))
    blend = res["training"]["counting_blend"]
    assert res["training"]["output_base"]["base"] == "mean" and blend["candidates"] == [0.0, 0.3, 0.7, 1.0]
    assert set(blend["per_fold"]) == {"E", "F"} and set(blend["random_encoder_weight"]) == {"E", "F"}
    s = store_lib.open_store(str(a))
    expr, patients = np.asarray(s.expression, np.float64), s.obs["patient"]
    npz = np.load(w / "predictions.npz")
    for fold, other in (("E", "F"), ("F", "E")):
        choice = blend["per_fold"][fold]
        scores = choice["inner_validation_mse"]
        assert choice["weight"] == float(min(scores, key=scores.get)) and len(scores) == 4
        wt = choice["weight"]
        mean = expr[patients == other].mean(0)
        expected = (1 - wt) * mean + wt * npz[f"image_depth_sampling_{fold}"].astype(np.float64)
        np.testing.assert_allclose(npz[f"pred_{fold}"], expected, atol=2e-4)
    report = open(w / "report.md").read()
    assert "- blend with the counting model: the final prediction is (1 - weight)" in report
    assert f"  - E: weight {blend['per_fold']['E']['weight']:g} (inner-validation MSE w 0: " in report


def test_external_blends_as_the_training_stores_inner_validation_chose(depth_stores, tmp_path):
    """The external test under the blend: every test prediction is (1 - w) x the heads' (the training mean) +
    w x the exported counting model read from that test spot's tile by hand; the weight, the random-encoder
    control's own and the exported model say so."""
    from histospace_jax import model_export

    root, a, b = depth_stores
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("external.py"), f"--workdir={w}", f"--config.data.store={a}",
        f"--config.external.store={b}", *TINY, *FROZEN_MEAN_HEADS, "--config.model.counting_blend_weights=(0.3,)")
    e = json.load(open(w / "results.json"))["external"]
    assert e["counting_blend"]["per_fold"]["test"]["weight"] == 0.3
    assert e["counting_blend"]["random_encoder_weight"] == {"test": 0.3}
    info = json.load(open(w / "model" / "model.json"))
    assert (info["output_base"], info["counting_weight"]) == ("blend", 0.3)
    sa, sb = store_lib.open_store(str(a)), store_lib.open_store(str(b))
    npz = np.load(w / "predictions.npz")
    genes = ["G1", "G2", "G4"]
    base = model_export.load_counting_base(str(w / "model"), info)
    counting = _counting_by_hand(w / "model", base, np.asarray(sb.tiles[npz["rows_B"]]))
    mean = np.asarray(sa.expression, np.float64)[:, sa.gene_index(genes)].mean(0)
    np.testing.assert_allclose(npz["pred"], 0.7 * mean + 0.3 * counting, atol=3e-4)
    assert "  - test: weight 0.3 (inner-validation MSE w 0.3: " in open(w / "report.md").read()


def test_external_within_one_store_pretrains_on_the_training_patients_tiles_only(stores, tmp_path):
    """Train and test patients of one store (external.train_patients / test_patients): the autoencoder learns
    from the training patients' 24 tiles, not from all 48 (the test patient's included), and results.json says
    which tiles it saw."""
    root, a, _ = stores
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("external.py"), f"--workdir={w}", f"--config.data.store={a}",
        "--config.external.train_patients=E", "--config.external.test_patients=F", *TINY,
        "--config.loo.random_encoder_control=off")
    ae = json.load(open(w / "results.json"))["external"]["autoencoder"]
    assert ae["n_train_tiles"] + ae["n_val_tiles"] == 24
    assert ae["tiles_seen"] == f"the 24 tiles of the training patients ['E'] of {a}"


def test_external_refuses_a_test_store_of_another_counts_scale_before_training(depth_stores, tmp_path):
    """A counting model fitted on A (the blend, or the counting base) cannot predict a store whose expression is
    log1p counts per another scale: the run stops with exit 65 before any pretraining, naming B and the setting
    that turns the counting model off."""
    root, a, _ = depth_stores
    b = _store(tmp_path / "b", ["X"] * 24, ["G4", "G2", "G1"], "stnet", 2, depth=True)
    manifest = json.load(open(os.path.join(b, "manifest.json")))
    manifest["expression"]["scale"] = 1e6
    with open(os.path.join(b, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    for extra, fix in (((), "--config.model.counting_blend=none"),
                       (("--config.model.output_base=counting",), "--config.model.output_base=mean")):
        w = tmp_path / f"w{len(extra)}"
        r = subprocess.run([sys.executable, "-m", "histospace_jax.main", config("external.py"), f"--workdir={w}",
                            f"--config.data.store={a}", f"--config.external.store={b}", *TINY, *extra],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 65, r.stderr[-3000:]
        assert f"{b}: its expression is not log1p counts per 10000 as {a}'s is" in r.stderr and fix in r.stderr
        assert not (w / "checkpoints" / "ae").exists()  # refused before the autoencoder trained


def test_train_with_the_blend_exports_it_and_predict_blends(depth_stores, tmp_path):
    """The README's train -> predict path under the blend: model.json says output_base "blend" and its weight,
    and predict's value for each spot is (1 - w) x the heads' (the training mean) + w x the counting model at the
    depth the exported ridge reads from that spot's tile, by hand."""
    from histospace_jax import model_export

    root, a, _ = depth_stores
    w = tmp_path / "w"
    run(tmp_path, "histospace_jax.main", config("train.py"), f"--workdir={w}", f"--config.data.store={a}", *TINY,
        *FROZEN_MEAN_HEADS, "--config.model.counting_blend_weights=(0.4,)")
    res = json.load(open(w / "results.json"))
    assert res["train"]["output_base"] == "mean" and res["train"]["counting_blend"]["weight"] == 0.4
    info = json.load(open(w / "model" / "model.json"))
    assert info["output_base"] == "blend" and info["counting_weight"] == 0.4
    s = store_lib.open_store(str(a))
    base = model_export.load_counting_base(str(w / "model"), info)
    slide, centres, tiles = _slide_of_store_tiles(s, np.array([1, 7, 19, 33, 40]))
    out = _predict_slide(tmp_path, w, slide, centres)
    with open(out / "predictions.csv") as f:
        got = np.array([[float(r[g]) for g in info["genes"]] for r in csv.DictReader(f)])
    mean = np.asarray(s.expression, np.float64).mean(0)
    np.testing.assert_allclose(got, 0.6 * mean + 0.4 * _counting_by_hand(w / "model", base, tiles), atol=3e-4)
    # Inner validation choosing weight 0 exports the heads alone: nothing for predict to read depth with.
    w0 = tmp_path / "w0"
    run(tmp_path, "histospace_jax.main", config("train.py"), f"--workdir={w0}", f"--config.data.store={a}", *TINY,
        *FROZEN_MEAN_HEADS, "--config.model.counting_blend_weights=(0.0,)")
    assert json.load(open(w0 / "results.json"))["train"]["counting_blend"]["weight"] == 0.0
    info0 = json.load(open(w0 / "model" / "model.json"))
    assert info0["output_base"] == "mean" and "counting_weight" not in info0
    assert not (w0 / "model" / model_export.COUNTING_NPZ).exists()


def jax_tree_first(tree):
    """Member 0 of variables stacked over ensemble members."""
    import jax

    return jax.tree_util.tree_map(lambda x: x[0], tree)
