"""Bad input and bad setup give a clear message (file / item / fix), a documented exit code and nothing
half-written: unknown or mistyped config keys, unparsable values, an unwritable or full workdir, a missing or
broken tile store, checkpoints from an incompatible configuration (incl. a store with other genes), differing
gene lists, non-finite parameters, and the guards' own hooks (SIGTERM flag, fault spec parsing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from histospace_jax import guards
from histospace_jax.checkpointing import Checkpointer, CheckpointError
from tests.conftest import REPO_ROOT


def run_main(*args: str, env_extra: dict | None = None, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k not in ("HISTOSPACE_FAULT", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "histospace_jax.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def errors(r) -> str:
    return "\n".join(l for l in r.stderr.splitlines() if l.startswith(("error:", "exit code")))


# ------------------------------------------------------------------------------------------------ command line


@pytest.mark.subprocess
def test_unknown_config_key_exits_64_naming_the_key(tmp_path):
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", "--config.train.epochz=3")
    assert r.returncode == guards.EXIT_USAGE == 64, r.stderr[-2000:]
    assert "unknown config key 'train.epochz'" in r.stderr and "did you mean 'epochs'?" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "wd")  # rejected before anything is written


@pytest.mark.subprocess
def test_mistyped_section_and_bad_value_exit_64(tmp_path):
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", "--config.trian.epochs=3")
    assert r.returncode == 64 and "unknown config key 'trian.epochs'" in r.stderr, r.stderr[-2000:]
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", "--config.train.epochs=three")
    assert r.returncode == 64 and "--config.train.epochs=three" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "wd")


# ------------------------------------------------------------------------------------------------ workdir


def test_check_workdir_unwritable_and_full(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(guards.WorkdirError, match=r"a_file/wd is not writable .*choose a directory"):
        guards.check_workdir(str(blocker / "wd"))
    with pytest.raises(guards.WorkdirError, match=r"MiB free on its disk .*free space or choose another workdir"):
        guards.check_workdir(str(tmp_path / "ok"), min_free_mb=1e12)
    assert guards.check_workdir(str(tmp_path / "ok")) == str(tmp_path / "ok")
    assert os.listdir(tmp_path / "ok") == []  # the probe file is gone


@pytest.mark.subprocess
def test_unwritable_or_full_workdir_exits_73_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run_main("--config=configs/smoke.py", f"--workdir={blocker}/wd", f"--config.data.demo_root={tmp_path}/demo")
    assert r.returncode == guards.EXIT_WORKDIR == 73, r.stderr[-2000:]
    assert f"--workdir={blocker}/wd is not writable" in errors(r)
    assert not os.path.exists(tmp_path / "demo")  # stopped before any data was built
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", f"--config.data.demo_root={tmp_path}/demo",
                 env_extra={guards.ENV_MIN_FREE_MB: str(10 ** 12)})
    assert r.returncode == 73 and "MiB free" in errors(r), r.stderr[-2000:]
    assert os.listdir(tmp_path / "wd") == []


# ------------------------------------------------------------------------------------------------ stores


@pytest.mark.subprocess
def test_missing_or_broken_store_exits_65_naming_the_file(tmp_path):
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", f"--config.data.store={tmp_path}/nope")
    assert r.returncode == guards.EXIT_BAD_INPUT == 65, r.stderr[-2000:]
    assert f"{tmp_path}/nope: no such tile store" in errors(r) and "prepare" in errors(r)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format": "histospace-tile-store", "genes": [')  # truncated
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", f"--config.data.store={broken}")
    assert r.returncode == 65, r.stderr[-2000:]
    assert f"{broken}/manifest.json: not valid JSON" in errors(r) and "prepare the store again" in errors(r)
    assert not os.path.exists(tmp_path / "wd" / "results.json")


def test_gene_list_mismatch_messages():
    assert guards.gene_list_mismatch(["A", "B"], ["A", "B"], "/s/train", "/s/eval") == ""
    msg = guards.gene_list_mismatch(["A", "B"], ["B", "A"], "/s/train", "/s/eval")
    assert "different order" in msg and "--genes_from=/s/train" in msg
    msg = guards.gene_list_mismatch(["A", "B", "C"], ["A", "D"], "/s/train", "/s/eval")
    assert "2 gene(s) of /s/train missing from /s/eval (e.g. ['B', 'C'])" in msg and "['D']" in msg


# ------------------------------------------------------------------------------------------------ checkpoints


def _tiny_checkpoint(path: str, compat: dict):
    ck = Checkpointer(path)
    ck.save(3, {"w": np.ones(4, np.float32)}, meta={"step": 3, "compat": compat})
    ck.close()


def test_incompatible_checkpoint_names_every_difference_and_the_fix(tmp_path):
    import ml_collections

    from configs import default

    config = default.get_config()
    sig = guards.compat_signature(config, guards.HEAD_KEYS, n_rows=96, n_genes=8, held_out=["P1"], encoder="abc")
    assert "model.head_fc_features" in sig and "train.learning_rate" in sig
    assert "checkpoint.every_steps" not in sig and "log_every_steps" not in sig and "data.store" not in sig
    path = str(tmp_path / "ck")
    _tiny_checkpoint(path, sig)
    assert guards.check_compatible(path, 3, dict(sig))["step"] == 3
    other = ml_collections.ConfigDict(config.to_dict())
    other.train.learning_rate = 0.5
    sig2 = guards.compat_signature(other, guards.HEAD_KEYS, n_rows=96, n_genes=10, held_out=["P1"], encoder="abc")
    with pytest.raises(guards.ConfigMismatchError) as e:
        guards.check_compatible(path, 3, sig2)
    msg = str(e.value)
    assert path in msg and "n_genes: checkpoint 8 vs now 10" in msg and "train.learning_rate: checkpoint 0.001" in msg
    assert "new --workdir" in msg
    assert isinstance(e.value, CheckpointError)  # main.py: exit 78


def test_checkpoint_with_other_shapes_is_refused_by_restore(tmp_path):
    path = str(tmp_path / "ck")
    _tiny_checkpoint(path, {})
    ck = Checkpointer(path)
    template = {"w": np.ones(5, np.float32)}
    restored, _ = ck.restore(None, template)  # Orbax hands back the stored shape (4,) ...
    with pytest.raises(CheckpointError, match=r"ck \(step 3\): array shapes differ.*\['w'\]: checkpoint \(4,\) vs "
                                              r"now \(5,\).*new --workdir"):
        guards.check_restored_like(restored, template, path, 3)  # ... which the training loops refuse
    with pytest.raises(CheckpointError, match="does not match the current configuration.*new --workdir"):
        ck.restore(None, {"w": np.ones(4, np.float32), "extra": np.ones(2, np.float32)})
    ck.close()


# ------------------------------------------------------------------------------------------------ training guard


class _FakeCkpt:
    directory = "/wd/checkpoints/ae"

    def latest_step(self):
        return 4


def test_nonfinite_loss_and_state_messages():
    guards.check_finite_loss(0.5, phase="ae", step=5, batch_rows=[1, 2], store="/s", checkpointer=_FakeCkpt())
    with pytest.raises(guards.NonFiniteError) as e:
        guards.check_finite_loss(np.array([0.1, np.inf]), phase="loo main", step=5, batch_rows=np.array([7, 3]),
                                 store="/s", checkpointer=_FakeCkpt(), labels=["P1", "P2"], fix="train.learning_rate=1")
    msg = str(e.value)
    assert "at step 5" in msg and "rows [7, 3] of /s" in msg and "holding out ['P2']" in msg
    assert "/wd/checkpoints/ae step 4" in msg and "train.learning_rate=1" in msg
    tree = {"params": {"a": np.ones(3), "b": np.array([1.0, np.nan])}, "step": np.int32(2)}
    assert guards.nonfinite_leaves(tree) == ["['params']['b']"]
    with pytest.raises(guards.NonFiniteError, match=r"by step 9 .*NOT saved.*step 4"):
        guards.check_finite_state(tree, phase="ae", step=9, checkpointer=_FakeCkpt())


def test_sigterm_handler_sets_the_stop_flag():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        guards._installed = False
        guards.install_sigterm_handler()
        assert not guards.stop_requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guards.stop_requested(1)
    finally:
        guards.clear_stop()
        guards._installed = False
        signal.signal(signal.SIGTERM, previous)


def test_fault_spec_parsing_and_noop_when_unset():
    assert guards._parse_faults("ae_step:3, after_ae,loo_step:main_1/9") == {
        "ae_step": {"3"}, "after_ae": {""}, "loo_step": {"main_1/9"}}
    assert guards._FAULTS == {}  # the test process has no HISTOSPACE_FAULT: the hooks do nothing
    guards.fault("ae_step", 3)
    assert guards.inject_nan("ae_nan", 1.5, 3) == 1.5


def test_clean_stale_temporaries(tmp_path):
    (tmp_path / "checkpoints" / "ae" / "4.orbax-checkpoint-tmp-99" / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ae" / "2").mkdir()
    (tmp_path / ".results.json.x1y2.tmp").write_text("{")
    (tmp_path / "cache" / "features-abc.tmp-1234").mkdir(parents=True)
    (tmp_path / "results.json").write_text("{}")
    removed = guards.clean_stale_temporaries(str(tmp_path))
    assert len(removed) == 3
    assert sorted(os.listdir(tmp_path / "checkpoints" / "ae")) == ["2"]
    assert sorted(os.listdir(tmp_path)) == ["cache", "checkpoints", "results.json"]


# ------------------------------------------------------------------------------------------------ raw images


@pytest.mark.subprocess
def test_prepare_rejects_truncated_and_grayscale_images_leaving_no_store(tmp_path):
    """Reader-level cases belong to histospace_jax.ingest; checked here end to end through its CLI."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = (rng.uniform(0, 1, (160, 160, 3)) * 80 + 120).astype(np.uint8)
    for case in ("truncated", "grayscale"):
        d = tmp_path / case
        d.mkdir()
        Image.fromarray(rgb).save(d / "good.png")
        if case == "truncated":
            Image.fromarray(rgb).save(d / "bad.png")
            data = (d / "bad.png").read_bytes()
            (d / "bad.png").write_bytes(data[: len(data) // 2])
        else:
            Image.fromarray(rgb[..., 0]).save(d / "bad.png")
        out = tmp_path / f"store_{case}"
        env = {k: v for k, v in os.environ.items() if k != "HISTOSPACE_FAULT"}
        r = subprocess.run([sys.executable, "-m", "histospace_jax.prepare", "--format=images", f"--input={d}",
                            f"--output={out}", "--source_mpp=0.5", "--tile_size=32"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert f"{d}/bad.png" in last and ("truncated" if case == "truncated" else "grayscale") in last, last
        assert not out.exists()
        assert [p for p in os.listdir(tmp_path) if p.startswith(f"store_{case}")] == []  # no temp sibling
