"""Preemption and resume: SIGKILL at several points then resume equals an uninterrupted run (bit-identical
results.json without elapsed_s, predictions, curves); SIGTERM checkpoints and exits 75; a NaN loss stops with
exit 70 and the last good checkpoint intact; an incompatible checkpoint exits 78; 1 vs 2 devices agree.

Every run is a subprocess of `python -m histospace_jax.main` on a tiny demo (32-pixel tiles, 96 spots, 3
patients), with JAX's persistent compilation cache shared between runs to keep them short.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.subprocess

AE_STEPS = 8     # 16 pretraining tiles // 4 = 4 steps/epoch, 2 epochs
LOO_STEPS = 12   # 48 inner-training spots per fold // 16 = 3 steps/epoch, 4 epochs; groups main_0 (P1, P2), main_1 (P3)


def tiny_args(reg: str, pre: str) -> list[str]:
    return ["--config=configs/smoke.py", f"--config.data.store={reg}", f"--config.ae.store={pre}",
            "--config.data.tile_size=32", "--config.model.encoder_features=(4,8,8)",
            "--config.model.head_conv_features=(8,)", "--config.model.head_fc_features=(8,)",
            "--config.ae.batch_size=4", "--config.ae.epochs=2", "--config.train.batch_size=16",
            "--config.train.epochs=4", "--config.loo.folds_per_program=2", "--config.checkpoint.every_steps=2",
            "--config.log_every_steps=1", "--config.eval_batch_size=32", "--config.train.ensemble=2",
            # The refit's loop follows the heads' own (a second resumable loop); the random-encoder control
            # would only add a third of the same kind.
            "--config.loo.random_encoder_control=off"]


class Env:
    def __init__(self, root: str):
        from histospace_jax.data import demo

        self.root = root
        spec = demo.DemoSpec(n_patients=3, sections_per_patient=2, grid=(4, 4), n_genes=8, tile_size=32,
                             n_pretrain_patients=1, pretrain_grid=(4, 4))
        self.reg, self.pre = demo.build_demo(os.path.join(root, "demo"), spec)
        self.cache = os.path.join(root, "jax_cache")
        self.args = tiny_args(self.reg, self.pre)

    def env(self, fault: str = "", devices: int = 0) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("HISTOSPACE_TEST_FAULTS", "XLA_FLAGS")}
        env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=self.cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                   PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
        if fault:
            env["HISTOSPACE_TEST_FAULTS"] = fault
        if devices:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        return env

    def cmd(self, workdir: str, *extra: str, fault: str = "") -> list[str]:
        """The tiny run's command line; `extra` flags replace the same keys' defaults (absl would append
        a repeated tuple-valued --config flag rather than replace it). With faults, the same main runs under
        tests/faulty_main.py, which adds a fault hook to the training loop."""
        keys = {e.split("=", 1)[0] for e in extra}
        args = [a for a in self.args if a.split("=", 1)[0] not in keys]
        module = "tests.faulty_main" if fault else "histospace_jax.main"
        return [sys.executable, "-m", module, *args, f"--workdir={workdir}", *extra]

    def run(self, workdir: str, *extra: str, fault: str = "", devices: int = 0, timeout: int = 400):
        return subprocess.run(self.cmd(workdir, *extra, fault=fault), cwd=REPO_ROOT, env=self.env(fault, devices),
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny demo stores, a compile cache and an uninterrupted baseline run, built once per test session
    (shared by pytest-xdist workers through a lock)."""
    base = tmp_path_factory.getbasetemp()
    root = str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) + "/resume_shared"
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = Env(root)
        env.baseline = os.path.join(root, "baseline")
        if not os.path.exists(os.path.join(env.baseline, "results.json")):
            shutil.rmtree(env.baseline, ignore_errors=True)
            r = env.run(env.baseline)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        fcntl.flock(lock, fcntl.LOCK_UN)
    return env


def comparable_results(workdir: str) -> dict:
    """results.json without wall time (elapsed_s) and with the workdir path replaced by a placeholder (the
    only fields that differ between identical runs in different workdirs)."""
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.loads(f.read().replace(os.path.abspath(workdir), "<WORKDIR>"))
    res.pop("elapsed_s")
    return res


def assert_same_outputs(workdir: str, baseline: str) -> None:
    a, b = comparable_results(workdir), comparable_results(baseline)
    # NaN != NaN in Python, so compare the canonical JSON text.
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    with np.load(os.path.join(workdir, "predictions.npz")) as p, np.load(os.path.join(baseline, "predictions.npz")) as q:
        assert sorted(p.files) == sorted(q.files)
        for k in p.files:
            np.testing.assert_array_equal(p[k], q[k], err_msg=k)
    for name in ("curves/loo.csv", "curves/ae.csv", "per_gene.csv"):
        with open(os.path.join(workdir, name)) as f, open(os.path.join(baseline, name)) as g:
            assert f.read() == g.read(), name
    # metrics.jsonl: a resumed loop drops its lines after the checkpoint it resumed from, so the log holds each
    # step once, with the uninterrupted run's values.
    assert metric_lines(workdir) == metric_lines(baseline)


def metric_lines(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r.pop("time")
    return rows


def no_temporaries(workdir: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(workdir, "**", "*"), recursive=True) + 
            glob.glob(os.path.join(workdir, "**", ".*"), recursive=True)
            if ".orbax-checkpoint-tmp" in p or p.endswith(".tmp") or ".tmp-" in os.path.basename(p)]


def latest_step(ckpt_dir: str):
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    return max(steps) if steps else None


def killed(r) -> bool:
    return r.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tiny, tmp_path):
    wd = str(tmp_path / "wd")
    # 1. inside autoencoder pretraining, mid-epoch (last checkpoint: step 6, two steps into epoch 2)
    r = tiny.run(wd, fault="kill@ae:7")
    assert killed(r), r.stderr[-2000:]
    assert latest_step(f"{wd}/checkpoints/ae") == 6
    assert not os.path.exists(f"{wd}/results.json")
    # 2. between fold groups (group main_0 finished, main_1 not started)
    r = tiny.run(wd, fault="finish_kill@loo main_0")
    assert killed(r), r.stderr[-2000:]
    assert "[ae] resumed from step 6/8" in r.stdout
    assert latest_step(f"{wd}/checkpoints/loo_main_0") == LOO_STEPS
    assert latest_step(f"{wd}/checkpoints/loo_main_1") is None
    # 3. inside a fold group, mid-epoch, one step after a checkpoint
    r = tiny.run(wd, fault="kill@loo main_1:9")
    assert killed(r), r.stderr[-2000:]
    assert "[loo main_0] resumed from step 12/12" in r.stdout
    assert latest_step(f"{wd}/checkpoints/loo_main_1") == 8
    # Leftovers of a write killed half-way (as Orbax and the atomic writers leave them): ignored and removed.
    os.makedirs(f"{wd}/checkpoints/loo_main_1/10.orbax-checkpoint-tmp-1234567/state")
    with open(f"{wd}/checkpoints/loo_main_1/10.orbax-checkpoint-tmp-1234567/state/garbage", "wb") as f:
        f.write(b"\0" * 100)
    with open(f"{wd}/.results.json.abc123.tmp", "w") as f:
        f.write('{"half": ')
    r = tiny.run(wd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[loo main_1] resumed from step 8/12" in r.stdout
    assert_same_outputs(wd, tiny.baseline)
    assert no_temporaries(wd) == []


@pytest.mark.slow
def test_sigkill_at_a_random_time_then_resume_equals_uninterrupted(tiny, tmp_path):
    wd = str(tmp_path / "wd")
    rng = random.Random(os.getpid() ^ int(time.time()))
    for attempt in range(2):  # kill twice at random moments after training has started
        proc = subprocess.Popen(tiny.cmd(wd), cwd=REPO_ROOT, env=tiny.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if "] step " in line:
                break
        time.sleep(rng.uniform(0.0, 3.0))
        proc.kill()
        proc.communicate()
    r = tiny.run(wd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_outputs(wd, tiny.baseline)
    assert no_temporaries(wd) == []


@pytest.mark.slow
def test_sigterm_saves_checkpoint_exits_75_and_resumes(tiny, tmp_path):
    wd = str(tmp_path / "wd")
    # A real SIGTERM from outside while the autoencoder trains.
    proc = subprocess.Popen(tiny.cmd(wd), cwd=REPO_ROOT, env=tiny.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "[ae] step 1/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out.append(proc.communicate(timeout=300)[0])
    text = "".join(out)
    assert proc.returncode == 75, text[-3000:]
    assert "checkpoint saved at step" in text and "Rerun the same command" in text
    ae_step = latest_step(f"{wd}/checkpoints/ae")
    assert ae_step is not None and 1 <= ae_step < AE_STEPS
    # SIGTERM at an odd LOO step, where no regular checkpoint is due: the preemption checkpoint is step 5.
    r = tiny.run(wd, fault="sigterm@loo main_0:5")
    assert r.returncode == 75, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"[ae] resumed from step {ae_step}/{AE_STEPS}" in r.stdout
    assert latest_step(f"{wd}/checkpoints/loo_main_0") == 5
    assert "exit code 75" in r.stderr
    r = tiny.run(wd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[loo main_0] resumed from step 5/12" in r.stdout
    assert_same_outputs(wd, tiny.baseline)


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_batch_and_keeps_last_good_checkpoint(tiny, tmp_path):
    wd = str(tmp_path / "wd")
    r = tiny.run(wd, fault="nan@ae:3")
    assert r.returncode == 70, r.stdout[-2000:] + r.stderr[-2000:]
    assert "non-finite training loss" in r.stderr and "at step 3" in r.stderr
    assert f"of {tiny.pre}" in r.stderr and "rows [" in r.stderr
    assert f"{wd}/checkpoints/ae step 2" in r.stderr
    assert latest_step(f"{wd}/checkpoints/ae") == 2
    r = tiny.run(wd, fault="nan@loo main_0:7")
    assert r.returncode == 70, r.stdout[-2000:] + r.stderr[-2000:]
    assert "at step 7" in r.stderr and "heads ['P1#0', 'P1#1', 'P2#0', 'P2#1']" in r.stderr
    assert f"{wd}/checkpoints/loo_main_0 step 6" in r.stderr
    assert latest_step(f"{wd}/checkpoints/loo_main_0") == 6
    assert not os.path.exists(f"{wd}/results.json")
    # The last good checkpoint is intact: the next run resumes from it and matches the uninterrupted run.
    r = tiny.run(wd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[loo main_0] resumed from step 6/12" in r.stdout
    assert_same_outputs(wd, tiny.baseline)


def test_checkpoint_from_incompatible_config_is_refused(tiny, tmp_path):
    wd = str(tmp_path / "wd")
    shutil.copytree(tiny.baseline, wd)
    r = tiny.run(wd, "--config.model.head_fc_features=(16,)")
    assert r.returncode == 78, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"{wd}/checkpoints/loo_main_0" in r.stderr
    assert "model.head_fc_features: checkpoint [8] vs now [16]" in r.stderr
    assert "new --workdir" in r.stderr
    with open(os.path.join(wd, "results.json")) as f, open(os.path.join(tiny.baseline, "results.json")) as g:
        assert f.read() == g.read()


def test_a_workdir_is_not_resumed_on_another_store_of_the_same_shape(tiny, tmp_path):
    """Checkpoints name their data, not only its size: rerunning a finished workdir on another store with the
    same spots, genes and patients (the same tiny demo drawn from another seed, as a store prepared again with
    other settings would be) is refused for the heads (data.store) and for the autoencoder (ae.store), where
    restoring them would have reported the old store's training as the new one's."""
    from histospace_jax.data import demo

    spec = demo.DemoSpec(n_patients=3, sections_per_patient=2, grid=(4, 4), n_genes=8, tile_size=32,
                         n_pretrain_patients=1, pretrain_grid=(4, 4), seed=7)
    reg, pre = demo.build_demo(str(tmp_path / "other"), spec)
    for flag, store, ckpt in ((f"--config.data.store={reg}", reg, "loo_main_0"),
                              (f"--config.ae.store={pre}", pre, "ae")):
        wd = str(tmp_path / f"wd_{ckpt}")
        shutil.copytree(tiny.baseline, wd)
        os.remove(os.path.join(wd, "results.json"))
        r = tiny.run(wd, flag)
        assert r.returncode == 78, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"{wd}/checkpoints/{ckpt}" in r.stderr
        assert "store: checkpoint '" in r.stderr and "it learnt from another store" in r.stderr
        assert "new --workdir" in r.stderr
        assert not os.path.exists(os.path.join(wd, "results.json"))


@pytest.mark.slow
def test_two_devices_match_one_device_within_tolerance(tiny, tmp_path):
    wd = str(tmp_path / "wd")
    r = tiny.run(wd, devices=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "devices=2" in r.stdout
    a, b = comparable_results(wd), comparable_results(tiny.baseline)
    # Same batches, same per-step global means; only float summation order differs between 1 and 2 devices.
    # Adam normalises near-zero gradients, so rounding differences grow to ~1% of the predictions over a
    # run: the stated tolerance (README) is 0.01 on summary metrics and 0.02 + 2% on predictions.
    # Per fold: twelve steps leave these heads near the training mean, which marks the folds failed and leaves
    # the summary's per-gene r undefined by design; the folds' own metrics are still defined.
    assert a["summary"]["failed_folds"] == b["summary"]["failed_folds"]
    for fa, fb in zip(a["folds"], b["folds"], strict=True):
        for k in ("per_gene_pearson", "per_spot_pearson", "mse"):
            assert abs(fa[k] - fb[k]) <= 1e-2 * max(1.0, abs(fb[k])), (fa["held_out"], k)
    with np.load(os.path.join(wd, "predictions.npz")) as p, np.load(os.path.join(tiny.baseline, "predictions.npz")) as q:
        for key in p.files:
            if key.startswith("pred_"):
                np.testing.assert_allclose(p[key], q[key], rtol=2e-2, atol=2e-2, err_msg=key)
                assert np.corrcoef(p[key].ravel(), q[key].ravel())[0, 1] > 0.999, key


def test_async_save_keeps_the_values_of_the_save_call_and_commits_on_close(tmp_path):
    """save() returns before the arrays are written; what lands on disk is the state as it was at the call, even
    when the caller overwrites its arrays at once (as a donating train step overwrites device buffers)."""
    from histospace_jax import checkpointing

    ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), async_save=True)
    w = np.arange(4_000_000, dtype=np.float32)
    ckpt.save(1, {"w": w}, meta={"step": 1})
    w[:] = -1.0
    ckpt.close()
    reader = checkpointing.Checkpointer(str(tmp_path / "ck"), read_only=True)
    assert reader.latest_step() == 1
    restored, meta = reader.restore(None, {"w": np.zeros_like(w)})
    np.testing.assert_array_equal(restored["w"], np.arange(4_000_000, dtype=np.float32))
    assert meta["step"] == 1
    reader.close()
