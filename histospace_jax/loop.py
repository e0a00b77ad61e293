"""The one resumable training loop, used by autoencoder pretraining and by fold-parallel head training.

`run(state, step_fn, iterator, spec, checkpointer, compat, hooks)` restores the latest checkpoint (train
state, Grain iterator position, loss curve and running sums together), runs the remaining steps and returns
the trained state. What happens around the steps is done by hooks: the standard ones (`standard_hooks`: the
NaN guard and the metric-log rewind on resume) and the caller's (logging, evaluation at epoch ends).

Host syncs: step metrics stay on the device and reach the host in one transfer at log steps, epoch ends,
checkpoint steps and preemption; the NaN guard then checks every step's loss in order, so a non-finite loss is
reported with its own step and batch rows, and before any checkpoint could store the state it produced.
Tests inject faults by adding a hook (see tests/faulty_main.py), never through calls in this loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np

from histospace_jax import checkpointing, console, preemption, steps
from histospace_jax.errors import NonFiniteError, Preempted


@dataclasses.dataclass
class LoopSpec:
    name: str                   # log prefix, e.g. "ae" or "loo main_0"; also names the loop in metrics.jsonl
    total_steps: int
    steps_per_epoch: int
    items_per_step: int         # global batch size, for throughput
    log_every: int
    checkpoint_every: int
    loss_name: str = "loss"     # how the progress line names the running mean loss
    data_source: str = ""       # where a batch's rows come from (error messages)
    labels: list[str] | None = None  # names of the entries of a vector loss (e.g. heads: held-out patient#seed)
    fix_hint: str = ""          # the setting to change when the loss diverges


class Hook:
    """Override what you need; every method has a do-nothing default."""

    def on_start(self, loop: "Loop") -> None:
        """After restore, before the first step."""

    def after_step(self, loop: "Loop", step: int, metrics: dict) -> dict:
        """Every step, with the step's metrics still on the device (no host sync); may return new metrics."""
        return metrics

    def on_losses(self, loop: "Loop", records: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """(step, host loss, batch rows) of every step since the last transfer, in order."""

    def on_log(self, loop: "Loop", step: int, mean_loss) -> None:
        """At log steps, with the running mean loss since the last epoch end."""

    def on_epoch_end(self, loop: "Loop", epoch: int, step: int, mean_loss) -> list[dict]:
        """At epoch ends; returns rows to append to the loss curve (saved with every checkpoint)."""
        return []

    def on_finish(self, loop: "Loop") -> None:
        """After the last step (also when every step was restored from the checkpoint)."""


@dataclasses.dataclass
class Loop:
    """What hooks see: the spec, the replicated state, the checkpointer and the progress so far."""

    spec: LoopSpec
    checkpointer: checkpointing.Checkpointer
    rstate: Any = None
    start_step: int = 0
    curve: list = dataclasses.field(default_factory=list)
    run_sum: Any = 0.0
    run_n: int = 0


class NonFiniteLossGuard(Hook):
    """Stops training at the first non-finite loss, naming its step, batch rows and the last good checkpoint."""

    def on_losses(self, loop, records):
        for step, loss, rows in records:
            arr = np.atleast_1d(loss)
            bad = ~np.isfinite(arr)
            if not bad.any():
                continue
            s = loop.spec
            which = ""
            if s.labels is not None and arr.size > 1:
                which = f" for heads {[s.labels[i] for i in np.flatnonzero(bad)]} (held-out patient#seed)"
            last = loop.checkpointer.latest_step()
            where = (f"last good checkpoint: {loop.checkpointer.directory} step {last} (kept; the bad state was not "
                     "saved)" if last is not None else "no checkpoint was saved yet")
            raise NonFiniteError(
                f"[{s.name}] non-finite training loss ({arr[bad][0]}){which} at step {step}; training stopped. The "
                f"batch was rows {np.asarray(rows).ravel().tolist()} of {s.data_source}. {where}. Fix: check those "
                f"rows' tiles and expression, or lower the learning rate"
                f"{(' (' + s.fix_hint + ')') if s.fix_hint else ''}; rerunning the same command resumes from the "
                "last good checkpoint.")


class RewindMetricLog(Hook):
    """A resumed loop re-runs the steps after its checkpoint: drop their lines from metrics.jsonl first."""

    def __init__(self, writer):
        self.writer = writer

    def on_start(self, loop):
        self.writer.rewind(loop.spec.name, loop.start_step)


def standard_hooks(writer) -> list[Hook]:
    return [NonFiniteLossGuard(), RewindMetricLog(writer)]


def run(state, step_fn: Callable, iterator: Iterator, *, spec: LoopSpec, checkpointer: checkpointing.Checkpointer,
        compat: dict, writer, hooks: list[Hook] = ()) -> tuple[Any, list[dict]]:
    """Trains `state` (a host pytree, e.g. a TrainState) with `step_fn(replicated_state, host_batch) ->
    (replicated_state, {'loss': ...})` on batches from `iterator` (dicts with an 'index' column of store rows).

    Resumes from the latest checkpoint in `checkpointer` (refused when written under other `compat` settings),
    saves every spec.checkpoint_every steps and at the last step, and on preemption saves and raises Preempted.
    Returns (trained host state, loss curve)."""
    hooks = list(standard_hooks(writer)) + list(hooks)
    loop = Loop(spec, checkpointer)
    template = checkpointing.state_dict(state)
    if checkpointer.latest_step() is not None:
        restored, meta = checkpointer.restore_checked(template, compat, data_iterator=iterator)
        state = checkpointing.load_state_dict(state, restored)
        loop.curve = list(meta.get("curve", []))
        loop.start_step = int(meta.get("step", 0))
        # The running sums since the last epoch end, so the resumed curve equals the uninterrupted one.
        loop.run_sum = _as_float64(meta.get("run_sum", 0.0))
        loop.run_n = int(meta.get("run_n", 0))
        console.log(f"[{spec.name}] resumed from step {loop.start_step}/{spec.total_steps}")
    for h in hooks:
        h.on_start(loop)
    loop.rstate = steps.replicate(state)
    progress = console.Progress(spec.name, spec.total_steps, spec.items_per_step, loop.start_step)
    pending: list[tuple[int, Any, np.ndarray]] = []

    def transfer():
        losses = jax.device_get([m for _, m, _ in pending])
        records = [(step, np.asarray(v[0], np.float64), rows) for (step, _, rows), v in zip(pending, losses)]
        pending.clear()
        for h in hooks:
            h.on_losses(loop, records)
        for _, v, _ in records:
            loop.run_sum = loop.run_sum + _as_float64(v)
            loop.run_n += 1

    def save(step):
        checkpointer.save(step, checkpointing.state_dict(steps.unreplicate(loop.rstate)), data_iterator=iterator,
                          meta={"curve": loop.curve, "step": step, "total_steps": spec.total_steps,
                                "run_sum": np.asarray(loop.run_sum).tolist(), "run_n": loop.run_n,
                                "compat": compat})

    try:
        for step in range(loop.start_step + 1, spec.total_steps + 1):
            batch = next(iterator)
            loop.rstate, metrics = step_fn(loop.rstate, batch)
            for h in hooks:
                metrics = h.after_step(loop, step, metrics)
            pending.append((step, metrics["loss"], np.asarray(batch["index"])))
            log_due = step % spec.log_every == 0 or step == spec.total_steps
            epoch_end = step % spec.steps_per_epoch == 0
            # Not at every epoch end: a checkpoint of many heads is hundreds of MB, and the curve and running sums
            # travel in every checkpoint's meta, so any step resumes exactly.
            save_due = step % spec.checkpoint_every == 0 or step == spec.total_steps
            stop = preemption.stop_requested(step, checkpointer)
            if not (log_due or epoch_end or save_due or stop):
                continue
            transfer()
            mean = loop.run_sum / max(loop.run_n, 1)
            if log_due:
                console.log(progress.line(step, **{spec.loss_name: float(np.mean(mean))}))
                for h in hooks:
                    h.on_log(loop, step, mean)
            if epoch_end:
                for h in hooks:
                    loop.curve.extend(h.on_epoch_end(loop, step // spec.steps_per_epoch, step, mean))
                loop.run_sum, loop.run_n = np.zeros_like(loop.run_sum), 0
            if save_due or stop:
                save(step)
            if stop:
                raise Preempted(spec.name, step, checkpointer.directory)
    except BaseException:
        # A failing loop (a NaN loss, a bad batch, Ctrl-C, preemption) still commits the save in flight: the
        # last good checkpoint is on disk before the error reaches the user.
        checkpointer.close()
        raise
    checkpointer.close()
    for h in hooks:
        h.on_finish(loop)
    return steps.unreplicate(loop.rstate), loop.curve


def _as_float64(v):
    a = np.asarray(v, np.float64)
    return a[()] if a.ndim == 0 else a
