"""Bad input and bad setup give a clear message (file / item / fix), a documented exit code and nothing
half-written: unknown or mistyped config keys, unparsable values, an unwritable or full workdir, a missing or
broken tile store, checkpoints from an incompatible configuration (incl. a store with other genes), differing
out-of-range config values, non-finite losses and parameters, and the SIGTERM flag."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from histospace_jax import checkpointing, config as config_lib, errors, loop, preemption, workdir as workdir_lib
from histospace_jax.checkpointing import Checkpointer
from histospace_jax.errors import CheckpointError
from tests.conftest import REPO_ROOT


def run_main(*args: str, env_extra: dict | None = None, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "histospace_jax.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(r) -> str:
    return "\n".join(l for l in r.stderr.splitlines() if l.startswith(("error:", "exit code")))


# ------------------------------------------------------------------------------------------------ command line


@pytest.mark.subprocess
def test_unknown_config_key_exits_64_naming_the_key(tmp_path):
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", "--config.train.epochz=3")
    assert r.returncode == errors.EXIT_USAGE == 64, r.stderr[-2000:]
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
    with pytest.raises(errors.WorkdirError, match=r"a_file/wd is not writable .*choose a directory"):
        workdir_lib.check_workdir(str(blocker / "wd"))
    with pytest.raises(errors.WorkdirError, match=r"MiB free on its disk .*free space or choose another workdir"):
        workdir_lib.check_workdir(str(tmp_path / "ok"), min_free_mb=1e12)
    assert workdir_lib.check_workdir(str(tmp_path / "ok")) == str(tmp_path / "ok")
    assert os.listdir(tmp_path / "ok") == []  # the probe file is gone


@pytest.mark.subprocess
def test_unwritable_or_full_workdir_exits_73_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run_main("--config=configs/smoke.py", f"--workdir={blocker}/wd", f"--config.data.demo_root={tmp_path}/demo")
    assert r.returncode == errors.EXIT_WORKDIR == 73, r.stderr[-2000:]
    assert f"--workdir={blocker}/wd is not writable" in error_lines(r)
    assert not os.path.exists(tmp_path / "demo")  # stopped before any data was built
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", f"--config.data.demo_root={tmp_path}/demo",
                 env_extra={workdir_lib.ENV_MIN_FREE_MB: str(10 ** 12)})
    assert r.returncode == 73 and "MiB free" in error_lines(r), r.stderr[-2000:]
    assert os.listdir(tmp_path / "wd") == []


# ------------------------------------------------------------------------------------------------ stores


@pytest.mark.subprocess
def test_missing_or_broken_store_exits_65_naming_the_file(tmp_path):
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", f"--config.data.store={tmp_path}/nope")
    assert r.returncode == errors.EXIT_BAD_INPUT == 65, r.stderr[-2000:]
    assert f"{tmp_path}/nope: no such tile store" in error_lines(r) and "prepare" in error_lines(r)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format": "histospace-tile-store", "genes": [')  # truncated
    r = run_main("--config=configs/smoke.py", f"--workdir={tmp_path}/wd", f"--config.data.store={broken}")
    assert r.returncode == 65, r.stderr[-2000:]
    assert f"{broken}/manifest.json: not valid JSON" in error_lines(r) and "prepare the store again" in error_lines(r)
    assert not os.path.exists(tmp_path / "wd" / "results.json")


def _scaled_store(path, mpp, seed=0, patients=("P1", "P2")):
    from histospace_jax.data import write_store
    rng = np.random.default_rng(seed)
    n = 8
    obs = {"section": np.repeat(["S1", "S2"], n // 2), "patient": np.repeat(list(patients), n // 2),
           "array_x": np.arange(n), "array_y": np.zeros(n, np.int64), "pixel_x": np.arange(n) * 16.0,
           "pixel_y": np.zeros(n)}
    write_store(str(path), rng.integers(0, 255, (n, 16, 16, 3), np.uint8), rng.random((n, 3), np.float32),
                ["G0", "G1", "G2"], obs, manifest={"microns_per_pixel": mpp})
    return str(path)


@pytest.mark.parametrize("mode", ["loo", "train", "external"])
def test_a_pretraining_or_external_store_of_another_tile_scale_is_refused_naming_it_and_the_fix(tmp_path, mode):
    """An encoder pretrained at one magnification reads another store's tiles at the wrong size, silently; each
    mode that pairs stores refuses recorded um/px that differ by more than 1%, before any training."""
    from histospace_jax import train
    from histospace_jax.data import store as store_lib
    spots = _scaled_store(tmp_path / "spots", 2.34375)
    other = _scaled_store(tmp_path / "old", 0.78125)
    config = config_lib.get_config()
    config.mode, config.data.store, config.ae.store = mode, spots, other
    config.external.train_patients, config.external.test_patients = "P1", "P2"
    with pytest.raises(store_lib.StoreError) as e:
        train.train_and_evaluate(config, str(tmp_path / f"run_{mode}"))
    msg = str(e.value)
    assert msg.startswith(f"{other} (config.ae.store): tiles at 0.78125 um/px (12.5 um wide)")
    assert f"{spots} has 2.34375 um/px (37.5 um)" in msg and "--target_mpp=2.34375" in msg
    assert not os.path.exists(tmp_path / f"run_{mode}" / "checkpoints")


def test_a_run_whose_feature_caches_cannot_fit_on_the_disk_is_refused_before_any_pretraining(tmp_path, monkeypatch):
    """Leave-one-patient-out caches every view of every spot once per encoder (one autoencoder per fold, plus the
    untrained control): at STNet scale hundreds of GB. A disk that cannot hold them all is refused before the
    first autoencoder trains, with the sizes and the settings that shrink them, not at the first cache that does
    not fit, hours later."""
    from histospace_jax import errors, features, train, workdir
    spots = _scaled_store(tmp_path / "spots", 2.34375)
    config = config_lib.get_config()
    config.data.store = spots
    # 2 patients: 2 per-fold autoencoders + 1 untrained encoder; 8 dihedral views (the real-store recipe) of 8
    # spots, maps of 16/8 x 16/8 x 128 float32: 8 * 8 * 2 * 2 * 128 * 4 = 131,072 bytes each.
    need = 3 * 8 * 8 * 2 * 2 * 128 * 4
    monkeypatch.setattr(workdir, "free_bytes", lambda path: need - 1)
    with pytest.raises(errors.WorkdirError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    msg = str(e.value)
    assert f"{tmp_path / 'run' / 'cache'}: this run caches the frozen features of 3 encoders" in msg
    assert "(autoencoders, one per fold 2, untrained (random-encoder control) 1)" in msg
    assert f"({need:,} bytes) in all" in msg and "--config.ae.store=IMAGE_STORE" in msg
    assert errors.exit_code(e.value) == 73
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    # One shared encoder (ae.store) and no control need a third of it; earlier caches count as room.
    store = store_lib_open(spots)
    config.train.augment = "dihedral"
    features.require_cache_space(config, str(tmp_path / "run"), [store], {"shared": 1})
    os.makedirs(tmp_path / "run" / "cache" / "features-abc")
    with open(tmp_path / "run" / "cache" / "features-abc" / "c0", "wb") as f:
        f.write(b"\0" * 2)
    features.require_cache_space(config, str(tmp_path / "run"), [store], {"per fold": 2, "untrained": 1})


def test_an_external_test_whose_feature_caches_cannot_fit_is_refused_before_pretraining(tmp_path, monkeypatch):
    """The external test caches every spot of its training and its test store once per encoder (its autoencoder
    and each untrained draw): the same up-front check as leave-one-patient-out's, over both stores."""
    from histospace_jax import errors, train, workdir
    a, b = _scaled_store(tmp_path / "a", 2.34375), _scaled_store(tmp_path / "b", 2.34375, 1, ("Q1", "Q2"))
    config = config_lib.get_config()
    config.mode, config.data.store, config.external.store = "external", a, b
    config.loo.random_encoder_draws = 2
    # 1 autoencoder + 2 untrained encoders, 8 dihedral views of 8 + 8 spots, 2 x 2 x 128 float32 maps.
    need = 3 * 8 * (8 + 8) * 2 * 2 * 128 * 4
    monkeypatch.setattr(workdir, "free_bytes", lambda path: need - 1)
    with pytest.raises(errors.WorkdirError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    msg = str(e.value)
    assert f"{tmp_path / 'run' / 'cache'}: this run caches the frozen features of 3 encoders" in msg
    assert "(autoencoder 1, untrained (random-encoder control) 2)" in msg and "16 spots of 2 stores" in msg
    assert f"({need:,} bytes) in all" in msg and "fewer loo.random_encoder_draws" in msg
    assert "--config.ae.store=IMAGE_STORE" not in msg  # there is one autoencoder already
    assert errors.exit_code(e.value) == 73
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def store_lib_open(path):
    from histospace_jax.data import open_store
    return open_store(path)


def test_tile_scales_within_one_percent_count_as_one_and_the_external_store_is_checked_too(tmp_path):
    from histospace_jax.data import store as store_lib
    spots = store_lib.open_store(_scaled_store(tmp_path / "spots", 2.34375))
    store_lib.require_same_tile_scale(spots, store_lib.open_store(_scaled_store(tmp_path / "same", 2.34375 * 1.005)),
                                      "config.ae.store")
    other = _scaled_store(tmp_path / "old", 0.78125)
    config = config_lib.get_config()
    config.mode, config.data.store, config.external.store = "external", spots.path, other
    config.external.train_patients, config.external.test_patients = "P1", "P2"
    from histospace_jax import train
    with pytest.raises(store_lib.StoreError, match=f"^{re.escape(other)} \\(config.external.store\\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------ checkpoints


def _tiny_checkpoint(path: str, compat: dict):
    ck = Checkpointer(path)
    ck.save(3, {"w": np.ones(4, np.float32)}, meta={"step": 3, "compat": compat})
    ck.close()


def test_incompatible_checkpoint_names_every_difference_and_the_fix(tmp_path):
    import ml_collections

    config = config_lib.get_config()
    config.train.learning_rate = 1e-3
    sig = checkpointing.compat_signature(config, checkpointing.HEAD_KEYS, n_rows=96, n_genes=8, held_out=["P1"], encoder="abc")
    assert "model.head_fc_features" in sig and "train.learning_rate" in sig
    assert "checkpoint.every_steps" not in sig and "log_every_steps" not in sig and "data.store" not in sig
    path = str(tmp_path / "ck")
    _tiny_checkpoint(path, sig)
    ck = Checkpointer(path)
    restored, meta = ck.restore_checked({"w": np.ones(4, np.float32)}, dict(sig))
    assert meta["step"] == 3
    other = ml_collections.ConfigDict(config.to_dict())
    other.train.learning_rate = 0.5
    sig2 = checkpointing.compat_signature(other, checkpointing.HEAD_KEYS, n_rows=96, n_genes=10, held_out=["P1"], encoder="abc")
    with pytest.raises(errors.ConfigMismatchError) as e:
        ck.restore_checked({"w": np.ones(4, np.float32)}, sig2)
    ck.close()
    msg = str(e.value)
    assert path in msg and "n_genes: checkpoint 8 vs now 10" in msg and "train.learning_rate: checkpoint 0.001" in msg
    assert "new --workdir" in msg
    assert errors.exit_code(e.value) == 78


def test_a_checkpoint_is_refused_for_other_rows_of_the_same_count_and_accepted_from_before_rows_were_named(
        tmp_path):
    """The autoencoder of a fold records which rows it learnt from (rows_digest) and the store's fingerprint:
    the same number of other rows is refused; a checkpoint written before these were recorded is judged on its
    settings alone."""
    config = config_lib.get_config()
    rows = np.arange(0, 40)
    sig = checkpointing.compat_signature(config, checkpointing.AE_KEYS, n_train_rows=40, store="s1",
                                         rows_digest=checkpointing.rows_digest(rows[:36], rows[36:]))
    path = str(tmp_path / "ck")
    _tiny_checkpoint(path, sig)
    ck = Checkpointer(path)
    template = {"w": np.ones(4, np.float32)}
    ck.restore_checked(template, dict(sig))
    shifted = dict(sig, rows_digest=checkpointing.rows_digest(rows[:36] + 1, rows[36:] + 1))
    with pytest.raises(errors.ConfigMismatchError, match="rows_digest: checkpoint '[0-9a-f]{16}' vs now"):
        ck.restore_checked(template, shifted)
    with pytest.raises(errors.ConfigMismatchError, match="store: checkpoint 's1' vs now 's2'") as e:
        ck.restore_checked(template, dict(sig, store="s2"))
    assert "(store: it learnt from another store, or a store prepared again" in str(e.value)
    # The digest is of the rows in order, and of where one set ends and the next begins.
    assert checkpointing.rows_digest([1, 2], [3]) != checkpointing.rows_digest([1], [2, 3])
    assert checkpointing.rows_digest([1, 2]) == checkpointing.rows_digest(np.array([1, 2], np.int32))
    ck.close()
    old_path = str(tmp_path / "old")
    _tiny_checkpoint(old_path, {k: v for k, v in sig.items() if k not in checkpointing.DATA_FACTS})
    old = Checkpointer(old_path)
    old.restore_checked(template, shifted)
    with pytest.raises(errors.ConfigMismatchError, match="n_train_rows: checkpoint 40 vs now 41"):
        old.restore_checked(template, dict(shifted, n_train_rows=41))
    old.close()


def test_checkpoint_from_before_a_setting_existed_resumes_only_under_its_old_behaviour(tmp_path):
    """A head checkpoint written before model.context existed records no such key: it resumes with context off
    (what it was trained with) and is refused with context on."""
    import ml_collections

    config = config_lib.get_config()
    config_lib.resolve_auto(config, log=lambda m: None)  # as a run signs its checkpoints (the demo: no refit)
    sig = checkpointing.compat_signature(config, checkpointing.HEAD_KEYS, n_rows=96)
    old = {k: v for k, v in sig.items() if k not in checkpointing.ADDED_LATER}
    assert len(old) == len(sig) - len(checkpointing.ADDED_LATER)
    path = str(tmp_path / "ck")
    _tiny_checkpoint(path, old)
    ck = Checkpointer(path)
    # Inner validation by whole patients came with a new default: an old checkpoint resumes only under the old
    # units (--config.train.inner_split=sections), and the refusal says which setting to restore.
    with pytest.raises(errors.ConfigMismatchError, match="train.inner_split: checkpoint 'sections' vs now 'patients'"):
        ck.restore_checked({"w": np.ones(4, np.float32)}, dict(sig))
    config.train.inner_split = "sections"
    sig = checkpointing.compat_signature(config, checkpointing.HEAD_KEYS, n_rows=96)
    ck.restore_checked({"w": np.ones(4, np.float32)}, dict(sig))
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.context = "neighbours"
    with pytest.raises(errors.ConfigMismatchError, match="model.context: checkpoint 'none' vs now 'neighbours'"):
        ck.restore_checked({"w": np.ones(4, np.float32)},
                           checkpointing.compat_signature(other, checkpointing.HEAD_KEYS, n_rows=96))
    ck.close()


def test_a_checkpoint_that_would_not_fit_on_the_disk_is_refused_before_writing(tmp_path, monkeypatch):
    """Free space is checked before each save (a full disk met inside Orbax's writer thread killed a run with
    SIGSEGV and no message): the error names the directory and the sizes, the last checkpoint stays."""
    import shutil

    path = str(tmp_path / "ck")
    ck = Checkpointer(path)
    big = {"w": np.ones(1 << 20, np.float32)}  # 4 MiB
    ck.save(1, big, meta={"step": 1})
    usage = shutil.disk_usage(path)
    monkeypatch.setattr(workdir_lib.shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))
    with pytest.raises(errors.WorkdirError) as e:
        ck.save(2, big, meta={"step": 2})
    assert path in str(e.value) and "needs about 12 MiB but its disk has 10 MiB free" in str(e.value)
    assert "step 2" in str(e.value) and errors.exit_code(e.value) == errors.EXIT_WORKDIR
    assert ck.latest_step() == 1
    ck.close()


def test_checkpoint_with_other_shapes_is_refused_by_restore(tmp_path):
    path = str(tmp_path / "ck")
    _tiny_checkpoint(path, {})
    ck = Checkpointer(path)
    template = {"w": np.ones(5, np.float32)}
    restored, _ = ck.restore(None, template)  # Orbax alone hands back the stored shape (4,) ...
    assert restored["w"].shape == (4,)
    with pytest.raises(CheckpointError, match=r"ck \(step 3\): array shapes differ.*\['w'\]: checkpoint \(4,\) vs "
                                              r"now \(5,\).*new --workdir"):
        ck.restore_checked(template, {})  # ... which the checked restore (used by the training loop) refuses
    with pytest.raises(CheckpointError, match="does not match the current configuration.*new --workdir"):
        ck.restore(None, {"w": np.ones(4, np.float32), "extra": np.ones(2, np.float32)})
    ck.close()


# ------------------------------------------------------------------------------------------------ training guard


class _FakeCkpt:
    directory = "/wd/checkpoints/ae"

    def latest_step(self):
        return 4


def test_nonfinite_loss_guard_names_step_rows_fold_and_checkpoint():
    lp = loop.Loop(loop.LoopSpec(name="loo main", total_steps=9, steps_per_epoch=3, items_per_step=2, log_every=1,
                                 checkpoint_every=3, data_source="/s", labels=["P1#0", "P2#0"],
                                 fix_hint="train.learning_rate=1"), _FakeCkpt())
    guard = loop.NonFiniteLossGuard()
    guard.on_losses(lp, [(4, np.array([0.1, 0.2]), np.array([1, 2]))])  # finite: nothing happens
    with pytest.raises(errors.NonFiniteError) as e:
        guard.on_losses(lp, [(4, np.array([0.1, 0.2]), np.array([1, 2])), (5, np.array([0.1, np.inf]),
                                                                            np.array([7, 3]))])
    msg = str(e.value)
    assert "at step 5" in msg and "rows [7, 3] of /s" in msg and "heads ['P2#0']" in msg
    assert "/wd/checkpoints/ae step 4" in msg and "train.learning_rate=1" in msg
    assert errors.exit_code(e.value) == 70


def test_nonfinite_state_is_never_saved(tmp_path):
    tree = {"params": {"a": np.ones(3), "b": np.array([1.0, np.nan])}, "step": np.int32(2)}
    assert checkpointing.nonfinite_leaves(tree) == ["['params']['b']"]
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(4, {"params": {"a": np.ones(3), "b": np.ones(2)}, "step": np.int32(1)})
    with pytest.raises(errors.NonFiniteError, match=r"by step 9 .*NOT saved.*step 4"):
        ck.save(9, tree)
    assert ck.latest_step() == 4
    ck.close()


def test_sigterm_handler_sets_the_stop_flag():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        preemption._installed = False
        preemption.install_sigterm_handler()
        assert not preemption.stop_requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.stop_requested(1)
    finally:
        preemption.clear_stop()
        preemption._installed = False
        signal.signal(signal.SIGTERM, previous)


def test_clean_stale_temporaries(tmp_path):
    (tmp_path / "checkpoints" / "ae" / "4.orbax-checkpoint-tmp-99" / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ae" / "2").mkdir()
    (tmp_path / ".results.json.x1y2.tmp").write_text("{")
    (tmp_path / "cache" / "features-abc.tmp-1234").mkdir(parents=True)
    (tmp_path / "results.json").write_text("{}")
    removed = workdir_lib.clean_stale_temporaries(str(tmp_path))
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
        r = subprocess.run([sys.executable, "-m", "histospace_jax.prepare", "--format=images", f"--input={d}",
                            f"--output={out}", "--source_mpp=0.5", "--tile_size=32"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert f"{d}/bad.png" in last and ("truncated" if case == "truncated" else "grayscale") in last, last
        assert not out.exists()
        assert [p for p in os.listdir(tmp_path) if p.startswith(f"store_{case}")] == []  # no temp sibling
