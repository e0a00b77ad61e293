"""The whole path end to end: `python -m histospace_jax.main --config=configs/smoke.py` on a tiny demo."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

TINY = ["--config.data.demo.grid=(5, 5)", "--config.data.demo.pretrain_grid=(6, 6)", "--config.train.epochs=3"]
# For a test that needs heads that learn, not only a path that runs: after TINY's 3 epochs the heads' predictions
# spread only 0.04-3% of the measured spread, so whether one of 16 genes falls under the flat threshold (0.1%;
# then the fold is FAILED) came down to the CPU's float rounding (it did on an AVX-512 machine). After 8 the
# least spread gene is at 0.5%.
LEARNING_HEADS = "--config.train.epochs=8"


def run_main(workdir, demo_root, *extra, config="configs/smoke.py"):
    cmd = [sys.executable, "-m", "histospace_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.data.demo_root={demo_root}", *TINY, *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.subprocess
def test_smoke_loo_end_to_end_and_rerun_resumes(tmp_path):
    workdir, demo_root = tmp_path / "w", tmp_path / "demo"
    proc = run_main(workdir, demo_root, LEARNING_HEADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"]["synthetic"] is True
    assert [f["held_out"] for f in results["folds"]] == ["P1", "P2", "P3"]
    for f in results["folds"]:
        assert f["n_spots"] == 2 * 25
        for key in ("per_gene_pearson", "per_spot_pearson", "mse"):
            assert np.isfinite(f[key])
        assert set(f["baseline"]) == {"per_spot_pearson", "mse"}
        assert set(f["controls"]) >= {"mean_predictor", "trivial_image", "linear_probe", "depth_oracle", "image_depth"}
        assert not f["failed"] and np.isfinite(f["depth_adjusted_per_gene_pearson"])
    s = results["summary"]
    assert s["per_gene_pearson"] == pytest.approx(np.mean([f["per_gene_pearson"] for f in results["folds"]]))
    # Held-out predictions are stored, one row per held-out spot, and reproduce the reported MSE.
    preds = np.load(workdir / "predictions.npz")
    from histospace_jax.data import open_store

    store_path = results["dataset"]["store"]
    expr = open_store(store_path).expression[:]
    f0 = results["folds"][0]
    rows = preds[f"rows_{f0['held_out']}"]
    np.testing.assert_allclose(np.mean((expr[rows] - preds[f"pred_{f0['held_out']}"]) ** 2), f0["mse"], rtol=1e-5)
    for name in ("curves/ae.csv", "curves/ae.png", "curves/loo.csv", "curves/loo.png", "per_gene.csv",
                 "metrics.jsonl"):
        assert (workdir / name).stat().st_size > 0, name
    assert not [p for p in os.listdir(workdir) if ".tmp" in p]

    # Same command again: everything is restored from checkpoints, nothing retrains, same results.
    again = run_main(workdir, demo_root, LEARNING_HEADS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step 1/" not in again.stdout
    results2 = json.loads((workdir / "results.json").read_text())
    assert results2["folds"] == results["folds"]

    # The held-out predictions as AnnData for scanpy/squidpy: X beside the truth, each section on its image.
    anndata = pytest.importorskip("anndata")
    a = anndata.read_h5ad(workdir / "predictions.h5ad")
    held = (a.obs["fold"] == f0["held_out"]).to_numpy()
    np.testing.assert_allclose(a.X[held], preds[f"pred_{f0['held_out']}"], rtol=1e-6)
    np.testing.assert_allclose(a.layers["truth"], expr[a.obs["store_row"].to_numpy()], rtol=1e-6)
    assert set(a.uns["spatial"]) == set(a.obs["section"]) and a.obsm["spatial"].shape == (a.n_obs, 2)


@pytest.mark.subprocess
def test_unknown_config_key_is_rejected(tmp_path):
    proc = run_main(tmp_path / "w", tmp_path / "demo", "--config.train.epochz=3")
    assert proc.returncode != 0
    assert "epochz" in proc.stderr
