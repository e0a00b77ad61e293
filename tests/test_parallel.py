"""Parallel execution gives the same results as the plain path.

* 4 simulated CPU devices (pmap) vs 1 device: same LOO predictions and autoencoder curve (subprocess).
* 2 processes on localhost (jax.distributed, gloo CPU collectives) vs 1 process, including an interrupted run
  that resumes from the multi-process Orbax checkpoints (subprocess).
* feature cache vs encoder recomputed from tiles; fold-parallel (vmap over folds) vs sequential folds.
* ProcessSliceSampler: N processes' slices concatenate to the single-process batches; distributed.resolve.

All runs use a tiny demo (32x32 tiles, a narrow encoder) so they take seconds, not minutes.
This file is also the worker script the subprocess tests start: `python tests/test_parallel.py run ...`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TILE = 32


def tiny_spec():
    from histospace_jax.data import demo

    return demo.DemoSpec(n_patients=3, sections_per_patient=1, grid=(6, 6), n_genes=8, tile_size=TILE,
                         n_pretrain_patients=1, pretrain_grid=(6, 6), seed=1)


def tiny_config(demo_root: str, **overrides):
    from histospace_jax import config as config_lib
    from histospace_jax.data import demo
    from histospace_jax.modes.ae_study import with_changes

    reg, pre = demo.build_demo(demo_root, tiny_spec())
    c = config_lib.get_config()
    c.data.store, c.ae.store, c.data.tile_size = reg, pre, TILE
    c.model.encoder_features = (4, 8, 8)
    c.model.head_conv_features = (8,)
    c.model.head_fc_features = (16,)
    c.ae.epochs, c.ae.batch_size = 1, 8
    c.train.epochs, c.train.batch_size = 1, 8
    c.eval_batch_size = 16
    c.log_every_steps = 1000
    c.checkpoint.every_steps = 5
    # What these tests compare is the parallel execution of one training of the heads; the random-encoder
    # control and the refit would only train them again the same way (test_resume covers the refit's loop).
    c.loo.random_encoder_control, c.train.refit = "off", "off"
    return with_changes(c, **overrides)


# ------------------------------------------------------------------------------------------------ worker


def _worker(argv):
    """run DEMO_ROOT WORKDIR [--proc I N PORT] [--stop-after-saves K] [key=value ...]"""
    demo_root, workdir, rest = argv[0], argv[1], argv[2:]
    overrides, proc, stop_after = {}, None, 0
    i = 0
    while i < len(rest):
        if rest[i] == "--proc":
            proc = tuple(int(x) for x in rest[i + 1:i + 4])
            i += 4
        elif rest[i] == "--stop-after-saves":
            stop_after = int(rest[i + 1])
            i += 2
        else:
            k, v = rest[i].split("=", 1)
            overrides[k] = json.loads(v)
            i += 1
    from histospace_jax import distributed

    if proc is not None:
        pid, n, port = proc
        info = distributed.initialize({"coordinator_address": f"localhost:{port}", "num_processes": n,
                                       "process_id": pid, "initialization_timeout": 120})
        assert info["process_count"] == n, info
    import jax

    from histospace_jax import checkpointing, train

    if stop_after:  # simulate a job killed right after its K-th checkpoint (every process stops there)
        real_save, count = checkpointing.Checkpointer.save, [0]

        def save(self, *a, **kw):
            real_save(self, *a, **kw)
            count[0] += 1
            if count[0] >= stop_after:
                raise SystemExit(17)

        checkpointing.Checkpointer.save = save
    config = tiny_config(demo_root, **overrides)
    _probe_step(config, workdir)
    train.train_and_evaluate(config, workdir)
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count()}), flush=True)


def _probe_step(config, workdir):
    """One pmapped autoencoder step on a fixed global batch of 8 tiles, split over processes and devices.

    Saves the loss, Adam's first moment (0.1 x the summed gradient) and the BatchNorm running statistics:
    these must equal the single-device values to float rounding (gradient and BatchNorm sums span every device
    of every process). Written by process 0 only.
    """
    import jax
    import jax.numpy as jnp

    from histospace_jax import builders, steps

    ae = builders.autoencoder(config)
    state = steps.create_train_state(ae, jax.random.PRNGKey(0), jnp.zeros((1, TILE, TILE, 3)),
                                     steps.make_ae_optimizer(1e-3))
    images = np.random.default_rng(0).integers(0, 256, (8, TILE, TILE, 3), dtype=np.uint8)
    per = 8 // jax.process_count()
    local = images[jax.process_index() * per:(jax.process_index() + 1) * per]
    step = steps.pmap_step(steps.ae_train_step, axis_name=builders.AXIS)
    new, m = step(steps.replicate(state), steps.shard_batch({"image": local}, jax.local_device_count()))
    new = steps.unreplicate(new)
    leaves = jax.tree_util.tree_leaves(new.opt_state[0].mu)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        np.savez(os.path.join(workdir, "probe.npz"), loss=np.asarray(m["loss"][0]),
                 mu=np.concatenate([np.ravel(x) for x in leaves]),
                 stats=np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(new.batch_stats)]))


# ------------------------------------------------------------------------------------------------ helpers


def _env(n_devices: int = 1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("HISTOSPACE_COORDINATOR_ADDRESS", "HISTOSPACE_NUM_PROCESSES", "HISTOSPACE_PROCESS_ID"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(demo_root, workdir, *extra, n_devices=1, expect_rc=0, timeout=300):
    out = subprocess.run([sys.executable, __file__, "run", demo_root, workdir, *extra], env=_env(n_devices),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == expect_rc, f"rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _run_procs(demo_root, workdir, n, *extra, expect_rc=0, timeout=300):
    port = _free_port()
    env = _env(1)
    # No shared compilation cache here: a process that finds a program cached would reach the first collective
    # while its peer still compiles, and gloo gives up waiting after 30 s on a loaded 2-core machine.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    procs = [subprocess.Popen([sys.executable, __file__, "run", demo_root, workdir, "--proc", str(i), str(n),
                               str(port), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(n)]
    outs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, o, e))
    for rc, o, e in outs:
        assert rc == expect_rc, f"rc={rc}\n{o[-3000:]}\n{e[-5000:]}"
    return outs


def _load(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    preds = dict(np.load(os.path.join(workdir, "predictions.npz")))
    return res, preds


def _assert_same(a_dir, b_dir):
    """Step-level quantities to float rounding; end-to-end results to the tolerance the README states for a
    different number of devices or processes: 0.02 + 2% on predictions, 0.01 on summary metrics."""
    qa, qb = np.load(os.path.join(a_dir, "probe.npz")), np.load(os.path.join(b_dir, "probe.npz"))
    np.testing.assert_allclose(qb["loss"], qa["loss"], rtol=1e-5)
    np.testing.assert_allclose(qb["stats"], qa["stats"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(qb["mu"], qa["mu"], rtol=1e-3, atol=1e-4 * np.abs(qa["mu"]).max())
    (ra, pa), (rb, pb) = _load(a_dir), _load(b_dir)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        if k.startswith("pred_"):
            np.testing.assert_allclose(pb[k], pa[k], rtol=2e-2, atol=2e-2, err_msg=k)
        elif np.issubdtype(pa[k].dtype, np.floating):  # forward passes only (untrained heads): float rounding
            np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:  # gene names, row indices
            np.testing.assert_array_equal(pb[k], pa[k], err_msg=k)
    for fa, fb in zip(ra["folds"], rb["folds"]):
        assert fa["held_out"] == fb["held_out"]
        for key in ("per_gene_pearson", "per_spot_pearson", "mse"):
            assert abs(fb[key] - fa[key]) <= 1e-2 * max(1.0, abs(fa[key])), (fa["held_out"], key)
    ca, cb = ra["autoencoder"]["shared"], rb["autoencoder"]["shared"]
    np.testing.assert_allclose(cb["final_train_mse"], ca["final_train_mse"], rtol=2e-3)
    np.testing.assert_allclose(cb["final_val_mse"], ca["final_val_mse"], rtol=2e-3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, one device: the run every parallel variant must reproduce."""
    root = tmp_path_factory.mktemp("par")
    demo_root, work = str(root / "demo"), str(root / "ref")
    _run(demo_root, work)
    return demo_root, work, root


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.subprocess
def test_four_devices_match_one(reference):
    demo_root, ref, root = reference
    work = str(root / "dev4")
    _run(demo_root, work, n_devices=4)
    _assert_same(ref, work)


@pytest.mark.subprocess
def test_two_processes_match_one_with_resume(reference):
    """2 processes x 1 device (gloo) == 1 process; the 2-process job is interrupted after its 3rd
    checkpoint save (inside LOO training) and resumed from the multi-process Orbax checkpoints."""
    demo_root, ref, root = reference
    work = str(root / "proc2")
    _run_procs(demo_root, work, 2, "--stop-after-saves", "3", expect_rc=17)
    assert not os.path.exists(os.path.join(work, "results.json"))
    loo_ckpt = os.path.join(work, "checkpoints", "loo_main")
    steps_saved = sorted(int(d) for d in os.listdir(loo_ckpt) if d.isdigit())
    assert steps_saved, os.listdir(loo_ckpt)
    data_files = sorted(f for f in os.listdir(os.path.join(loo_ckpt, str(steps_saved[-1]), "data"))
                        if f.startswith("process_"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], data_files
    outs = _run_procs(demo_root, work, 2)
    assert "resumed from step" in outs[0][1], outs[0][1][-2000:]
    assert "resumed from step" not in outs[1][1]  # only process 0 logs
    _assert_same(ref, work)


def _in_process_loo(demo_root, workdir, **overrides):
    """Runs only the heads of every fold (fixed random encoder) in this process; returns the result, the
    encoder and the store."""
    from histospace_jax import builders, config as config_lib, folds, metric_log
    from histospace_jax.data import open_store
    from histospace_jax.modes import loo

    config = tiny_config(demo_root, **overrides)
    config_lib.resolve_auto(config, log=lambda m: None)
    store = open_store(config.data.store)
    enc = builders.random_encoder_variables(config, seed=3)
    plan = folds.plan_leave_one_patient_out(store)
    writer = metric_log.MetricWriter(os.path.join(workdir, "metrics.jsonl"))
    out = loo.train_all_folds(config, workdir, store, plan, [enc], [0] * len(plan.folds), writer)
    return out, enc, store


def test_feature_cache_holds_the_encoder_output_of_every_dihedral_view(tmp_path):
    import jax

    from histospace_jax import builders, features, steps

    demo_root = str(tmp_path / "demo")
    config = tiny_config(demo_root)
    from histospace_jax.data import open_store

    store = open_store(config.data.store)
    enc = builders.random_encoder_variables(config, seed=3)
    a, pa = features.cached_features(str(tmp_path / "cache"), store, enc, variant="relu_bn",
                                     encoder_features=(4, 8, 8), views=8)
    assert a.shape == (8, store.n_spots, TILE // 8, TILE // 8, 8)
    tiles = np.asarray(store.tiles[:5])
    for v in (0, 3, 5):
        direct = np.asarray(jax.jit(lambda t: steps.encode_step(builders.encoder(config), enc, t))(
            features.dihedral(tiles, v)))
        np.testing.assert_allclose(a[v, :5], direct, rtol=1e-5, atol=1e-5)
    assert np.array_equal(features.dihedral(tiles, 4)[:, :, ::-1], tiles)  # view 4: the mirror image
    again, pb = features.cached_features(str(tmp_path / "cache"), store, enc, variant="relu_bn",
                                         encoder_features=(4, 8, 8), views=8)
    assert pb == pa and np.array_equal(again, a)  # a cache hit returns the stored features
    other = {"params": dict(enc["params"]), "batch_stats": enc["batch_stats"]}
    other["params"]["block0"] = {**enc["params"]["block0"],
                                 "Conv_0": {"kernel": enc["params"]["block0"]["Conv_0"]["kernel"] + 1.0}}
    assert features.cache_key(store, other, "relu_bn", 8) != os.path.basename(pa).split("-", 1)[1]
    assert features.cache_key(store, enc, "relu_bn", 1) != os.path.basename(pa).split("-", 1)[1]


def test_fold_parallel_matches_sequential(tmp_path):
    """All folds' heads in one program (vmap over members) equal one fold per program, within the README's
    tolerance for a different execution layout (0.02 + 2% on predictions)."""
    demo_root = str(tmp_path / "demo")
    together, _, _ = _in_process_loo(demo_root, str(tmp_path / "a"), **{"loo.folds_per_program": 0})
    one_by_one, _, _ = _in_process_loo(demo_root, str(tmp_path / "b"), **{"loo.folds_per_program": 1})
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["loo_main_0", "loo_main_1", "loo_main_2"]
    for f in together["preds"]:
        np.testing.assert_allclose(together["preds"][f], one_by_one["preds"][f], rtol=2e-2, atol=2e-2)
    a = {(r["fold"], r["epoch"]): r["train_huber"] for r in together["curve"]}
    b = {(r["fold"], r["epoch"]): r["train_huber"] for r in one_by_one["curve"]}
    assert a.keys() == b.keys() and len(a) == 3
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-2)


def test_member_step_matches_each_member_alone(tmp_path):
    """One step of 3 members (3 folds) in one program equals each member's step run alone: loss, Adam's first
    moment (0.1 x gradient) and BatchNorm statistics at float tolerance; each member reads only its own rows."""
    import jax
    import jax.numpy as jnp

    from histospace_jax import builders, folds, steps

    config = tiny_config(str(tmp_path / "demo"))
    enc = builders.random_encoder_variables(config, seed=3)
    states = builders.head_states(config, 8, [enc] * 3, [1, 2, 3])
    rng = np.random.default_rng(0)
    n = 24
    feats = rng.standard_normal((1, 1, n, TILE // 8, TILE // 8, 8)).astype(np.float32)
    expr = rng.standard_normal((n, 8)).astype(np.float32)
    mu = rng.standard_normal((3, 8)).astype(np.float32)
    sd = rng.uniform(0.5, 2, (3, 8)).astype(np.float32)
    idx = np.stack([np.arange(8) + 8 * k for k in range(3)]).astype(np.int32)  # member k reads rows 8k..8k+7
    step = folds.make_member_train_step(1.0)
    rep = lambda x: np.asarray(x)[None]  # noqa: E731

    def run(members):
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[states[i] for i in members])
        fold_of = np.array(members, np.int32)
        new, m = step(steps.replicate(stacked), rep(feats), None, rep(expr), rep(mu), rep(sd),
                      rep(np.zeros(len(members), np.int32)), rep(fold_of), idx[members][None],
                      np.zeros((1, len(members), 8), np.int32))
        return jax.tree_util.tree_map(lambda x: np.asarray(x)[0], new), np.asarray(m["loss"])[0]

    def flat(tree, k):
        return np.concatenate([np.ravel(x[k]) for x in jax.tree_util.tree_leaves(tree)])

    together, loss3 = run([0, 1, 2])
    for k in range(3):
        alone, loss1 = run([k])
        np.testing.assert_allclose(loss3[k], loss1[0], rtol=1e-5)
        mu3, mu1 = flat(together.opt_state, k), flat(alone.opt_state, 0)
        np.testing.assert_allclose(mu3, mu1, rtol=1e-4, atol=1e-5 * np.abs(mu1).max())
        np.testing.assert_allclose(flat(together.batch_stats, k), flat(alone.batch_stats, 0), rtol=1e-5, atol=1e-6)
    # Member 1 trained on its own rows (8..15) with its fold's standardisation: the plain single-state step on
    # that batch, standardised here, gives the same loss.
    z = (expr[8:16] - mu[1]) / sd[1]
    single = steps.pmap_step(steps.regression_train_step, axis_name=builders.AXIS)
    _, m = single(steps.replicate(states[1]), steps.shard_batch({"features": feats[0, 0, 8:16], "expression": z}, 1))
    np.testing.assert_allclose(float(loss3[1]), float(np.asarray(m["loss"])[0]), rtol=1e-5)


def test_process_slice_sampler_reassembles_global_batches():
    import grain

    from histospace_jax import distributed
    from histospace_jax.data import pipeline

    src = pipeline.ArraySource({"x": np.arange(53)})

    def batches(p, n, gb):
        base = grain.samplers.IndexSampler(num_records=len(src), shard_options=grain.sharding.NoSharding(),
                                           shuffle=True, num_epochs=2, seed=5)
        s = distributed.ProcessSliceSampler(base, gb, p, n) if n > 1 else base
        return [b["x"] for b in grain.DataLoader(data_source=src, sampler=s, shard_options=grain.sharding.NoSharding(),
                                                 operations=[grain.transforms.Batch(gb // n, drop_remainder=True)])]

    one = batches(0, 1, 12)
    parts = [batches(p, 3, 12) for p in range(3)]
    assert len(one) == (2 * 53) // 12 and all(len(p) == len(one) for p in parts)
    for i, b in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), b)
    with pytest.raises(ValueError, match="does not split"):
        distributed.ProcessSliceSampler(None, 10, 0, 3)


def test_resolve_distributed_settings():
    from histospace_jax import distributed as d

    assert d.resolve({"mode": "auto"}, {}) is None
    assert d.resolve({"mode": "off"}, {"HISTOSPACE_COORDINATOR_ADDRESS": "h:1"}) is None
    kw = d.resolve({}, {"HISTOSPACE_COORDINATOR_ADDRESS": "h:1", "HISTOSPACE_NUM_PROCESSES": "4",
                        "HISTOSPACE_PROCESS_ID": "2"})
    assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == ("h:1", 4, 2)
    assert d.resolve({"mode": "on"}, {}) == {"initialization_timeout": 300}  # auto-detect (Cloud TPU)
    assert d.resolve({}, {"TPU_WORKER_HOSTNAMES": "a,b"}) is not None
    assert d.resolve({}, {"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert d.resolve({}, {"SLURM_NTASKS": "1"}) is None
    with pytest.raises(ValueError, match="num_processes"):
        d.resolve({"coordinator_address": "h:1"}, {})
    with pytest.raises(ValueError, match="outside"):
        d.resolve({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {})
    with pytest.raises(ValueError, match="mode"):
        d.resolve({"mode": "yes"}, {})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        _worker(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} run DEMO_ROOT WORKDIR [--proc I N PORT] [key=json ...]")
