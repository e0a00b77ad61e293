"""Guards against preemption, divergence and bad setup: exit codes, SIGTERM handling, non-finite loss checks,
workdir checks, checkpoint/config compatibility, and test-only fault injection.

Exit codes of `python -m histospace_jax.main` (see `EXIT_CODES`):
  0   finished
  1   unexpected error (traceback printed)
  64  bad command line: unknown or mistyped config key, unparsable value
  65  bad input data (tile store / raw dataset): the message names the file, the item and the fix
  70  training diverged: non-finite loss or parameters (step and batch rows named; last good checkpoint kept)
  73  workdir not writable, or the disk is full
  75  preempted (SIGTERM): a checkpoint was saved at the last step boundary; rerun the same command to resume
  78  the workdir holds checkpoints from an incompatible configuration
Exit code 75 is EX_TEMPFAIL of sysexits.h ("try again later"); schedulers should rerun the job on it.

Preemption: `install_sigterm_handler()` (single process) makes SIGTERM set a flag; the training loops call
`stop_requested(step, checkpointer)` at every step boundary, save a checkpoint and raise `Preempted`. On
multi-process jobs the flag is not used: JAX's preemption sync service (started by jax.distributed) turns
the scheduler's notice into one agreed step on every process, read through Orbax's
`CheckpointManager.reached_preemption(step)`.

Fault injection (tests only): HISTOSPACE_FAULT="point[:value][,point[:value]...]" makes `fault(point, value)`
SIGKILL the process, or SIGTERM it for points ending in "_sigterm", and `inject_nan` turn the loss into NaN.
Unset, every hook is a dictionary lookup on an empty dict.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, Iterable

import numpy as np

from histospace_jax.checkpointing import CheckpointError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 64
EXIT_BAD_INPUT = 65
EXIT_DIVERGED = 70
EXIT_WORKDIR = 73
EXIT_PREEMPTED = 75
EXIT_INCOMPATIBLE = 78
EXIT_CODES = {
    EXIT_OK: "finished",
    EXIT_ERROR: "unexpected error",
    EXIT_USAGE: "bad command line or unknown config key",
    EXIT_BAD_INPUT: "bad input data",
    EXIT_DIVERGED: "training diverged (non-finite loss or parameters)",
    EXIT_WORKDIR: "workdir not writable or disk full",
    EXIT_PREEMPTED: "preempted: checkpoint saved, rerun the same command to resume",
    EXIT_INCOMPATIBLE: "workdir checkpoints come from an incompatible configuration",
}

ENV_FAULT = "HISTOSPACE_FAULT"
ENV_MIN_FREE_MB = "HISTOSPACE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 50


# ------------------------------------------------------------------------------------------------ errors


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; main.py exits with EXIT_PREEMPTED."""

    def __init__(self, phase: str, step: int, directory: str):
        self.phase, self.step, self.directory = phase, step, directory
        super().__init__(f"preempted (SIGTERM) during {phase}: checkpoint saved at step {step} in {directory}. "
                         "Rerun the same command to resume from it.")


class NonFiniteError(FloatingPointError):
    """Non-finite loss or parameters; the message names step, batch rows and the last good checkpoint."""


class WorkdirError(OSError):
    """The workdir cannot be created or written, or its disk is (nearly) full."""


class ConfigMismatchError(CheckpointError):
    """A checkpoint in the workdir was written under settings that differ from the current config."""


# ------------------------------------------------------------------------------------------------ preemption

_STOP = threading.Event()
_installed = False


def install_sigterm_handler() -> None:
    """First SIGTERM: request a checkpoint-and-exit at the next step boundary. Second: die at once.

    Only for single-process jobs; on multi-process jobs JAX's preemption notifier owns SIGTERM."""
    global _installed
    if _installed:
        return

    def handler(signum, frame):
        if _STOP.is_set():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _STOP.set()
        print("SIGTERM received: saving a checkpoint at the next step boundary, then exiting "
              f"with code {EXIT_PREEMPTED}", flush=True)

    signal.signal(signal.SIGTERM, handler)
    _installed = True


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_requested(step: int, checkpointer=None) -> bool:
    """True when the job must checkpoint and exit at this step boundary (all processes agree)."""
    import jax

    if jax.process_count() > 1:
        manager = getattr(checkpointer, "_manager", None)
        return bool(manager is not None and manager.reached_preemption(step))
    return _STOP.is_set()


# ------------------------------------------------------------------------------------------------ faults


def _parse_faults(spec: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if item:
            name, _, value = item.partition(":")
            out.setdefault(name, set()).add(value)
    return out


_FAULTS = _parse_faults(os.environ.get(ENV_FAULT, ""))


def _matches(point: str, values: Iterable[Any]) -> bool:
    wanted = _FAULTS.get(point)
    if wanted is None:
        return False
    return "" in wanted or any(str(v) in wanted for v in values)


def fault(point: str, *values: Any) -> None:
    """Test hook: SIGKILL (or SIGTERM, for points named *_sigterm) this process when HISTOSPACE_FAULT names
    `point` (with no value, or with one of `values`, e.g. the step or 'tag/step')."""
    if not _FAULTS or not _matches(point, values):
        return
    if point.endswith("_sigterm"):
        os.kill(os.getpid(), signal.SIGTERM)
        return
    print(f"FAULT INJECTED: SIGKILL at {point} {values}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def inject_nan(point: str, loss, *values: Any):
    """Test hook: NaN instead of `loss` where HISTOSPACE_FAULT names `point` (e.g. 'ae_nan:3')."""
    if _FAULTS and _matches(point, values):
        return loss * np.nan
    return loss


# ------------------------------------------------------------------------------------------------ NaN guard


def check_finite_loss(loss, *, phase: str, step: int, batch_rows, store: str, checkpointer,
                      labels: list[str] | None = None, fix: str = "") -> None:
    """Raises NonFiniteError when `loss` (a float or per-fold array) is NaN or Inf."""
    arr = np.atleast_1d(np.asarray(loss, np.float64))
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    which = ""
    if labels is not None and arr.size > 1:
        which = f" for fold(s) holding out {[labels[i] for i in np.flatnonzero(bad)]}"
    rows = np.asarray(batch_rows).ravel().tolist()
    last = checkpointer.latest_step() if checkpointer is not None else None
    where = (f"last good checkpoint: {checkpointer.directory} step {last} (kept; the bad state was not saved)"
             if last is not None else "no checkpoint was saved yet")
    raise NonFiniteError(
        f"[{phase}] non-finite training loss ({arr[bad][0]}){which} at step {step}; training stopped. "
        f"The batch was rows {rows} of {store}. {where}. Fix: check those rows' tiles and expression, or lower "
        f"the learning rate{(' (' + fix + ')') if fix else ''}; rerunning the same command resumes from the last "
        "good checkpoint.")


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the array leaves of `tree` holding NaN or Inf."""
    import jax

    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


def check_finite_state(tree, *, phase: str, step: int, checkpointer) -> None:
    """Refuses to checkpoint a state with non-finite parameters (so the last checkpoint stays good)."""
    bad = nonfinite_leaves(tree)
    if bad:
        last = checkpointer.latest_step()
        raise NonFiniteError(
            f"[{phase}] parameters became NaN/Inf by step {step} ({len(bad)} arrays, e.g. {bad[:3]}); training "
            f"stopped and this state was NOT saved. Last good checkpoint: {checkpointer.directory} step {last}. "
            "Fix: lower the learning rate or check the input data, then rerun (resumes from that checkpoint).")


# ------------------------------------------------------------------------------------------------ workdir


def check_workdir(workdir: str, min_free_mb: float | None = None) -> str:
    """Creates `workdir` if needed and proves it writable (a probe file is written, synced and removed);
    raises WorkdirError naming the path and the fix. Returns the absolute path."""
    workdir = os.path.abspath(workdir)
    if min_free_mb is None:
        min_free_mb = float(os.environ.get(ENV_MIN_FREE_MB, DEFAULT_MIN_FREE_MB))
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=workdir)
        try:
            os.write(fd, b"histospace_jax write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise WorkdirError(e.errno or errno.EIO,
                           f"--workdir={workdir} is not writable ({e.strerror or e}); choose a directory you can "
                           "write to, or fix its permissions / free space") from e
    free_mb = shutil.disk_usage(workdir).free / 2 ** 20
    if free_mb < min_free_mb:
        raise WorkdirError(errno.ENOSPC,
                           f"--workdir={workdir}: only {free_mb:.0f} MiB free on its disk (need at least "
                           f"{min_free_mb:.0f} MiB, ${ENV_MIN_FREE_MB}); free space or choose another workdir")
    return workdir


def clean_stale_temporaries(workdir: str) -> list[str]:
    """Removes temporaries a killed run left behind (Orbax *.orbax-checkpoint-tmp-* step directories,
    atomic-write .NAME.XXXX.tmp files, feature-cache *.tmp-* directories). Single-process jobs only: call
    before training starts. Returns the removed paths."""
    removed = []
    for root, dirs, files in os.walk(workdir):
        for d in list(dirs):
            if ".orbax-checkpoint-tmp" in d or (root.endswith("cache") and ".tmp-" in d):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                removed.append(os.path.join(root, d))
                dirs.remove(d)
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                os.unlink(os.path.join(root, f))
                removed.append(os.path.join(root, f))
    return removed


# ------------------------------------------------------------------------------------------------ compatibility


def _plain(v):
    return json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Config keys that decide what a checkpoint holds (prefix match on dotted keys). Everything else (logging,
# checkpoint cadence, eval batch size, paths, workers, distribution, reporting) may change between runs.
AE_KEYS = ("seed", "data.tile_size", "model.variant", "model.encoder_features", "model.upconv_impl",
           "ae.epochs", "ae.batch_size", "ae.learning_rate", "ae.weight_decay",
           "ae.val_fraction")
HEAD_KEYS = ("seed", "data.tile_size", "model.", "train.", "loo.feature_cache")
_NEVER = ("ae.store", "ae.checkpoint")  # paths


def compat_signature(config, keys: tuple[str, ...], **extra) -> dict:
    """The settings (dotted key -> JSON value) a checkpoint depends on, plus `extra` facts (e.g. row counts)."""
    flat = _flat(config.to_dict())
    sig = {k: v for k, v in flat.items()
           if any(k == p or (p.endswith(".") and k.startswith(p)) for p in keys) and k not in _NEVER}
    sig.update(extra)
    return _plain(sig)


def tree_digest(tree) -> str:
    """SHA-1 of a pytree's array bytes (e.g. the frozen encoder a head checkpoint was trained on)."""
    import hashlib

    import jax

    h = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def read_checkpoint_meta(directory: str, step: int) -> dict:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
    finally:
        manager.close()


def check_compatible(directory: str, step: int, current: dict) -> dict:
    """Reads the checkpoint's meta and raises ConfigMismatchError naming every setting that differs.
    Checkpoints without a recorded signature are accepted (the shape check in restore still applies)."""
    try:
        meta = read_checkpoint_meta(directory, step)
    except Exception as e:  # unreadable meta: let restore report it
        raise CheckpointError(f"{directory} (step {step}): cannot read the checkpoint ({e}); use a new --workdir "
                              "or delete that directory.") from e
    saved = meta.get("compat")
    if saved is None:
        return meta
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ConfigMismatchError(
            f"{directory} (step {step}) was written with different settings: " + "; ".join(diff) +
            ". Resuming would mix two configurations. Fix: rerun with the original settings, or use a new "
            "--workdir, or delete that checkpoint directory to start this part again.")
    return meta


def check_restored_like(restored, template, directory: str, step) -> None:
    """Orbax restores a stored array with its stored shape even when the template's differs; refuse that."""
    import jax

    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    want = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(template)[0]}
    diff = [f"{k}: checkpoint {got.get(k)} vs now {want.get(k)}" for k in sorted(set(got) | set(want))
            if got.get(k) != want.get(k)]
    if diff:
        raise CheckpointError(
            f"{directory} (step {step}): array shapes differ from the current model ({len(diff)}, e.g. "
            f"{'; '.join(diff[:3])}); it was written by a run with a different model or data. Use a new "
            "--workdir or delete that directory.")


def gene_list_mismatch(train_genes: list[str], eval_genes: list[str], train_path: str, eval_path: str) -> str:
    """'' when both stores list the same genes in the same order, else a message naming the difference."""
    if list(train_genes) == list(eval_genes):
        return ""
    a, b = set(train_genes), set(eval_genes)
    if a == b:
        return (f"{eval_path} lists the same genes as {train_path} in a different order; select columns by name "
                f"(store.gene_index) or prepare it with --genes_from={train_path}")
    return (f"gene lists differ: {len(a - b)} gene(s) of {train_path} missing from {eval_path} "
            f"(e.g. {sorted(a - b)[:5]}), {len(b - a)} extra (e.g. {sorted(b - a)[:5]}); prepare {eval_path} "
            f"with --genes_from={train_path} or evaluate on the shared genes")
