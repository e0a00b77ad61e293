"""launch/*.sh --dry-run: the printed commands (nothing is created, no network)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


@pytest.fixture(autouse=True)
def fake_tools(tmp_path, monkeypatch):
    """gcloud/git/ssh/scp stand-ins that record being called: a dry run must call none of them."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.txt"
    for tool in ("gcloud", "git", "ssh", "scp", "gcsfuse"):
        f = bindir / tool
        f.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\nexit 99\n")
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    yield
    assert not calls.exists(), calls.read_text()


def dry(script, *args, rc=0):
    args = ("--dry-run",) + args
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == rc, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()], out


def _find(lines, *words):
    hits = [ln for ln in lines if all(w in ln for w in words)]
    assert hits, f"no command containing {words} in:\n" + "\n".join(" ".join(ln) for ln in lines)
    return hits


def test_tpu_vm_single_host_lifecycle():
    lines, _ = dry("tpu_vm.sh", "--name", "hs1", "--zone", "us-central2-b", "--accelerator", "v4-8",
                   "--data", "gs://bkt/her2st_store", "--project", "proj", "--", "--config.train.epochs=7")
    assert lines[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert lines[0][5] == "hs1" and "v4-8" in lines[0] and "proj" in lines[0]
    install = _find(lines, "ssh", "--worker=all")
    assert any("pip install" in ln[-1] and "jax[tpu]" in ln[-1] for ln in install)
    assert not any("gcloud storage cp" in ln[-1] for ln in install)  # the store is read from the bucket
    main = [ln for ln in install if "histospace_jax.main" in ln[-1]]
    assert len(main) == 1
    cmd = main[0][-1]
    assert "--config.data.store=gs://bkt/her2st_store" in cmd and "--config.train.epochs=7" in cmd
    assert "--config.distributed.mode=auto" in cmd
    # order: create < install < run < fetch < delete
    idx = {name: next(i for i, ln in enumerate(lines) if pred(ln)) for name, pred in [
        ("create", lambda ln: "create" in ln), ("run", lambda ln: "histospace_jax.main" in ln[-1]),
        ("fetch", lambda ln: "scp" in ln and any("results.json" in a for a in ln)),
        ("delete", lambda ln: "delete" in ln)]}
    assert idx["create"] < idx["run"] < idx["fetch"] < idx["delete"] == len(lines) - 1
    fetch = lines[idx["fetch"]]
    assert "--worker=0" in fetch and "./results/hs1/" in fetch


def test_tpu_vm_stage_data_copies_the_bucket_store_to_local_disk():
    lines, _ = dry("tpu_vm.sh", "--name", "hs1", "--zone", "z", "--data", "gs://bkt/her2st_store/",
                   "--ae-store", "gs://bkt/bach", "--stage-data")
    _find(lines, "ssh", "--worker=all", "mkdir -p /tmp/data && gcloud storage cp -r 'gs://bkt/her2st_store/' /tmp/data/")
    main = _find(lines, "ssh", "--worker=all")[-1][-1]
    assert "--config.data.store=/tmp/data/her2st_store" in main and "--config.ae.store=/tmp/data/bach" in main


def test_tpu_vm_keep_and_local_data():
    lines, _ = dry("tpu_vm.sh", "--name", "hs1", "--zone", "z", "--data", "/data/store", "--keep")
    assert not any("delete" in ln for ln in lines)
    _find(lines, "scp", "--recurse", "/data/store", "hs1:/tmp/data/")


def test_tpu_pod_runs_on_all_workers_with_shared_workdir():
    lines, _ = dry("tpu_pod.sh", "--name", "pod", "--zone", "z", "--bucket", "gs://bkt", "--data", "gs://bkt/s")
    assert "v4-32" in lines[0]
    assert any("gcsfuse" in ln[-1] for ln in lines)
    run = [ln for ln in lines if "histospace_jax.main" in ln[-1]]
    assert len(run) == 1 and "--worker=all" in run[0]
    assert "--workdir=/mnt/gcs/pod" in run[0][-1] and "--config.distributed.mode=on" in run[0][-1]


def test_tpu_pod_needs_bucket():
    _, out = dry("tpu_pod.sh", "--name", "pod", "--zone", "z", rc=2)
    assert "--bucket" in out.stderr


def test_tpu_vm_rejects_missing_name():
    _, out = dry("tpu_vm.sh", "--zone", "z", rc=2)
    assert "--name" in out.stderr


def test_gpu_box_single_and_multi_host():
    lines, _ = dry("gpu_box.sh", "--hosts", "g1", "--data", "/data/s")
    runs = [ln for ln in lines if ln[0] == "ssh" and "histospace_jax.main" in ln[-1]]
    assert len(runs) == 1 and "HISTOSPACE_COORDINATOR_ADDRESS" not in runs[0][-1]
    lines, _ = dry("gpu_box.sh", "--hosts", "g1,g2,g3", "--data", "gs://b/s", "--port", "4000")
    runs = [ln for ln in lines if ln[0] == "ssh" and "histospace_jax.main" in ln[-1]]
    assert len(runs) == 3
    for i, ln in enumerate(runs):
        cmd = ln[-1]
        assert f"HISTOSPACE_PROCESS_ID={i}" in cmd and "HISTOSPACE_NUM_PROCESSES=3" in cmd
        assert "HISTOSPACE_COORDINATOR_ADDRESS=g1:4000" in cmd and "--config.data.store=gs://b/s" in cmd
    assert "-f" in runs[0] and "-f" not in runs[-1]  # all but the last start in the background
    _find(lines, "scp", "-r", "g1:/tmp/histospace_run/results.json")
    lines, _ = dry("gpu_box.sh", "--hosts", "g1,g2", "--data", "gs://b/s", "--stage-data")
    copies = [ln for ln in lines if ln[0] == "ssh" and "gcloud storage cp -r 'gs://b/s' /tmp/data/" in ln[-1]]
    runs = [ln for ln in lines if ln[0] == "ssh" and "histospace_jax.main" in ln[-1]]
    assert len(copies) == 2 and all("--config.data.store=/tmp/data/s" in ln[-1] for ln in runs)


@pytest.mark.parametrize("script", ["tpu_vm.sh", "tpu_pod.sh", "gpu_box.sh"])
def test_help(script):
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--dry-run" in out.stdout


def test_dry_run_after_double_dash_is_still_dry():
    out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--name", "x", "--zone", "z", "--",
                          "--config.seed=1", "--dry-run"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gcloud compute tpus tpu-vm create x")
    assert "--dry-run" not in out.stdout
