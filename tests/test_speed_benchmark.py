"""benchmarks/speed.py and its PyTorch reference: the reference mirrors our architecture and recipes (same
shapes, parameter counts and outputs on the same weights; same inner split, standardisation and settings), and
the benchmark stops when PyTorch is missing. Tests needing torch skip without it (CI does not install the
optional `bench` extra)."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histospace_jax import builders, config as config_lib, features, folds, models, steps

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
try:
    import torch  # noqa: F401 - the optional bench extra
    HAS_TORCH = True
except ImportError:
    HAS_TORCH = False
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (the optional bench extra: "
                                                       "pip install -e '.[bench]')")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


speed = _load("speed")


@pytest.fixture(scope="module")
def tr():
    if not HAS_TORCH:
        pytest.skip("PyTorch is not installed (the optional bench extra: pip install -e '.[bench]')")
    import torch

    torch.set_num_threads(1)  # the test suite runs beside other workers
    return _load("torch_reference")


def _tiles(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)


def _obs():
    """Patient A: two sections of 4 x 5 spots; patient B: one section of 6 x 6; patient C: one of 4 x 4."""
    patient, section, ax, ay = [], [], [], []
    for p, s, (w, h) in (("A", "A1", (4, 5)), ("A", "A2", (4, 5)), ("B", "B1", (6, 6)), ("C", "C1", (4, 4))):
        for x in range(w):
            for y in range(h):
                patient.append(p), section.append(s), ax.append(x), ay.append(y)
    return {"patient": np.array(patient), "section": np.array(section), "array_x": np.array(ax),
            "array_y": np.array(ay)}


def _torch_head_from_flax(tr, head_vars, n_genes):
    """Our head's weights in the reference's TorchHead (flatten order HWC -> CHW)."""
    import torch

    p, s = head_vars["params"], head_vars["batch_stats"]
    fc0 = np.asarray(p["fc0"]["kernel"])  # (8 * 8 * 128, 256), rows in (h, w, c) order
    hidden = fc0.shape[1]
    arrays = {
        "block.0.weight": np.asarray(p["conv0"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1),
        "block.0.bias": p["conv0"]["bias"], "block.1.weight": p["conv0"]["BatchNorm_0"]["scale"],
        "block.1.bias": p["conv0"]["BatchNorm_0"]["bias"], "block.1.running_mean": s["conv0"]["BatchNorm_0"]["mean"],
        "block.1.running_var": s["conv0"]["BatchNorm_0"]["var"],
        "fc1.weight": fc0.reshape(8, 8, 128, hidden).transpose(3, 2, 0, 1).reshape(hidden, -1),
        "fc1.bias": p["fc0"]["bias"], "fc2.weight": np.asarray(p["out"]["kernel"]).T, "fc2.bias": p["out"]["bias"]}
    head = tr.TorchHead(n_genes)
    state = head.state_dict()
    head.load_state_dict({k: torch.tensor(np.array(arrays[k], np.float32)) if k in arrays else v
                          for k, v in state.items()})
    return head.eval()


@needs_torch
def test_reference_encoder_and_head_match_ours(tr):
    import torch

    n_genes = 7
    config = config_lib.get_config()
    config.model.output_init = "lecun"  # a zero output layer would make the heads' comparison trivial
    enc = builders.random_encoder_variables(config, 0)
    head = builders.histospace(config, n_genes, axis_name=None)
    hs = head.init(jax.random.PRNGKey(3), jnp.zeros((1, 128, 128, 3)))
    t_enc = tr.load_encoder_arrays(tr.TorchEncoder(), speed.encoder_arrays_for_torch(enc)).eval()
    assert sum(p.numel() for p in t_enc.parameters()) == builders.count_params(enc["params"])
    head_vars = {"params": hs["params"]["head"], "batch_stats": hs["batch_stats"]["head"]}
    t_head = _torch_head_from_flax(tr, head_vars, n_genes)
    assert sum(p.numel() for p in t_head.parameters()) == builders.count_params(head_vars["params"])

    tiles = _tiles(2)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    encode = jax.jit(lambda v, im: steps.encode_step(models.Encoder(), v, im))
    with torch.no_grad():
        for view in (0, 3, 6):  # the dihedral views are the same images on both sides
            ours = np.asarray(encode(enc, features.dihedral(tiles, view)))
            theirs = t_enc(tr.dihedral_view(x, view))
            assert theirs.shape == (2, 128, 16, 16)
            np.testing.assert_allclose(theirs.permute(0, 2, 3, 1).numpy(), ours, rtol=1e-4, atol=1e-4)
        feats = np.array(encode(enc, tiles))  # a writable copy, as torch.from_numpy wants
        ours = np.asarray(jax.jit(lambda v, f: head.apply(v, f, False, method="from_features"))(hs, feats))
        theirs = t_head(torch.from_numpy(feats).permute(0, 3, 1, 2))
        assert theirs.shape == (2, n_genes)
        np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-5)


@needs_torch
def test_reference_init_is_flax_default_and_zero_output(tr):
    import torch

    torch.manual_seed(0)
    head = tr.TorchHead(5).requires_grad_(False)
    tr.init_like_flax(head, zero_output=head.fc2)
    assert float(head.fc2.weight.abs().sum() + head.fc2.bias.abs().sum()) == 0.0
    assert float(head.fc1.bias.abs().sum()) == 0.0
    hs = builders.histospace(config_lib.get_config(), 5).init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)))
    ours_sd = float(np.std(hs["params"]["head"]["fc0"]["kernel"]))
    assert abs(float(head.fc1.weight.std()) / ours_sd - 1) < 0.02
    assert float(head.fc1.weight.abs().max()) <= 2 * np.sqrt(1 / 8192) / 0.8796 + 1e-6  # truncated at 2 sd


@needs_torch
def test_reference_standardisation_matches_ours(tr):
    import torch

    rng = np.random.default_rng(0)
    expression = rng.gamma(2.0, 1.0, (30, 4)).astype(np.float32)
    expression[:, 2] = 1.5  # constant: sd 1, never a division by zero
    rows = np.arange(3, 25)
    for on in (True, False):
        mu, sd = folds.standardisation(expression, rows, on)
        t_mu, t_sd = tr.standardisation(torch.from_numpy(expression), rows, on)
        np.testing.assert_allclose(t_mu.numpy(), mu, rtol=1e-6)
        np.testing.assert_allclose(t_sd.numpy(), sd, rtol=1e-6)


@needs_torch
@pytest.mark.parametrize("recipe", ["standard", "paper"])
def test_protocol_carries_our_folds_recipe_and_encoder(tr, tmp_path, recipe):
    obs = _obs()
    n = len(obs["patient"])
    config = speed.loo_config("unused-store", recipe, on_demo=False, log=lambda *_: None)
    plan = folds.FoldPlan(["A", "B", "C"], np.searchsorted(["A", "B", "C"], obs["patient"]), [0, 1, 2])
    rows = speed.fold_rows(config, obs, plan)
    enc = builders.random_encoder_variables(config, speed.ENCODER_SEED)
    path = str(tmp_path / "protocol.npz")
    speed.write_protocol(path, config, rows, enc)
    t_folds, t_recipe, arrays = tr.read_protocol(path)
    assert len(t_folds) == 3
    for f, fold in enumerate(t_folds):
        train, val, _ = folds.training_split(config, obs, plan.training_rows(f))
        np.testing.assert_array_equal(fold.held_out, plan.held_out_rows(f))
        np.testing.assert_array_equal(fold.train, train)
        np.testing.assert_array_equal(fold.val, val)
        assert set(fold.train) | set(fold.val) | set(fold.held_out) == set(range(n))
        assert (len(fold.val) > 0) == (recipe == "standard")
    t = config.train
    assert (t_recipe.epochs, t_recipe.batch_size, t_recipe.ensemble) == (t.epochs, t.batch_size, t.ensemble)
    assert (t_recipe.learning_rate, t_recipe.weight_decay, t_recipe.huber_delta) == (
        t.learning_rate, t.weight_decay, t.huber_delta)
    expected = {"standard": (8, True, True, True, 0.0), "paper": (1, False, False, False, 0.0)}[recipe]
    assert (t_recipe.views, t_recipe.standardise, t_recipe.zero_output, t_recipe.select_epoch,
            t_recipe.dropout_rate) == expected
    assert t_recipe.refit == (config.train.refit == "on" and recipe == "standard")
    assert set(arrays) == {k for k in tr.TorchEncoder().state_dict() if not k.endswith("num_batches_tracked")}


def test_default_recipes_resolve_as_a_run_does():
    quiet = {"log": lambda *_: None}
    demo = speed.loo_config("s", "standard", on_demo=True, **quiet)
    assert (demo.train.epochs, demo.train.ensemble, demo.train.augment, demo.train.select_epoch) == (
        config_lib.DEMO_HEAD_EPOCHS, 1, "none", "on")
    real = speed.loo_config("s", "standard", on_demo=False, **quiet)
    assert (real.train.epochs, real.train.ensemble, real.train.augment, real.model.output_init) == (
        config_lib.RECIPES["standard"].epochs, config_lib.RECIPES["standard"].ensemble, "dihedral", "zeros")
    assert (real.train.epochs, real.train.learning_rate) == (20, 3e-4)
    assert real.model.dropout_rate == demo.model.dropout_rate == 0.0
    assert real.train.huber_delta == demo.train.huber_delta == 3.0
    assert (real.train.refit, demo.train.refit) == ("on", "off")  # the demo's 10-minute budget
    paper = speed.loo_config("s", "paper", on_demo=False, **quiet)
    assert (paper.train.ensemble, paper.train.augment, paper.train.select_epoch, paper.train.standardise_targets,
            paper.model.output_init, paper.model.dropout_rate) == (1, "none", "off", "off", "lecun", 0.0)
    assert (paper.train.epochs, paper.train.learning_rate) == (10, 1e-3)
    assert paper.train.huber_delta == 1.0 and paper.train.refit == "off"
    assert speed.loo_config("s", "paper", on_demo=True, epochs=1, **quiet).train.epochs == 1


@needs_torch
def test_reference_protocol_runs_the_standard_recipe_on_a_tiny_input(tr):
    rng = np.random.default_rng(0)
    tiles = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)  # small tiles: fast
    expression = rng.standard_normal((10, 3)).astype(np.float32)
    fold_list = [tr.Fold(np.arange(0, 2), np.arange(2, 8), np.arange(8, 10)),
                 tr.Fold(np.arange(8, 10), np.arange(0, 6), np.arange(6, 8))]
    recipe = tr.Recipe(epochs=2, batch_size=3, ensemble=2, views=8, standardise=True, zero_output=True,
                       select_epoch=True, eval_batch_size=8)
    out = tr.torch_loo_protocol(tiles, expression, fold_list, recipe, num_threads=1)
    assert out["predictions"].shape == (10, 3) and np.isfinite(out["predictions"]).all()
    assert not out["predictions"][2:8].any()  # rows no fold holds out stay unpredicted
    assert out["best_epoch"].shape == (2, 2) and set(out["best_epoch"].ravel()) <= {1, 2}
    assert len(out["fold_wall_s"]) == 2


@needs_torch
def test_reference_refit_is_the_head_trained_again_on_every_training_row(tr):
    """With refit, the reference's head is the one a run without inner validation gets from the training and
    inner-validation rows together, trained up to the epoch the first pass chose (same seeds, same batches)."""
    import dataclasses

    rng = np.random.default_rng(0)
    tiles = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    expression = rng.standard_normal((10, 3)).astype(np.float32)
    fold = tr.Fold(np.arange(0, 2), np.arange(2, 8), np.arange(8, 10))
    recipe = tr.Recipe(epochs=3, batch_size=3, ensemble=1, views=1, standardise=True, zero_output=True,
                       select_epoch=True, refit=True, eval_batch_size=8)
    out = tr.torch_loo_protocol(tiles, expression, [fold], recipe, num_threads=1)
    best = int(out["best_epoch"][0, 0])
    again = tr.torch_loo_protocol(tiles, expression, [tr.Fold(fold.held_out, np.arange(2, 10), np.arange(0))],
                                  dataclasses.replace(recipe, epochs=best, select_epoch=False, refit=False),
                                  num_threads=1)
    np.testing.assert_allclose(out["predictions"], again["predictions"], rtol=1e-6, atol=1e-7)
    plain = tr.torch_loo_protocol(tiles, expression, [fold], dataclasses.replace(recipe, refit=False), num_threads=1)
    assert not np.allclose(out["predictions"][:2], plain["predictions"][:2])


def test_benchmark_stops_when_pytorch_is_missing(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SystemExit, match="PyTorch is not importable"):
        speed.check_torch(str(fake))
