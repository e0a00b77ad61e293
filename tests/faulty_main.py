"""`python -m histospace_jax.main` with faults injected through a training-loop hook (tests only).

    HISTOSPACE_TEST_FAULTS="kill@ae:7,finish_kill@loo main_0,sigterm@loo main_0:5,nan@ae:3" \
        python -m tests.faulty_main --config=... --workdir=...

  kill@LOOP:STEP      SIGKILL right after training step STEP of loop LOOP (before any checkpoint of that step,
                      once the earlier ones are committed: a kill during a background write, which loses that
                      write only, is what the random-time kill test meets)
  sigterm@LOOP:STEP   SIGTERM to itself after step STEP (the preemption path: checkpoint at STEP, exit 75)
  nan@LOOP:STEP       the step's loss becomes NaN (the NaN guard's path: exit 70)
  finish_kill@LOOP    SIGKILL when loop LOOP has finished (between fold groups)
The production loop knows nothing of this: the hook is added by replacing loop.standard_hooks.
"""

from __future__ import annotations

import os
import signal

import jax.numpy as jnp
from absl import app

from histospace_jax import loop, main

ENV = "HISTOSPACE_TEST_FAULTS"


def parse(spec: str) -> set[tuple[str, str, int | None]]:
    out = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, _, where = item.partition("@")
        name, _, step = where.partition(":")
        out.add((kind, name, int(step) if step else None))
    return out


class FaultHook(loop.Hook):
    def __init__(self, faults):
        self.faults = faults

    def after_step(self, lp, step, metrics):
        name = lp.spec.name
        if ("nan", name, step) in self.faults:
            return {**metrics, "loss": metrics["loss"] * jnp.nan}
        if ("sigterm", name, step) in self.faults:
            os.kill(os.getpid(), signal.SIGTERM)
        if ("kill", name, step) in self.faults:
            lp.checkpointer.wait()
            print(f"FAULT INJECTED: SIGKILL after step {step} of {name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return metrics

    def on_finish(self, lp):
        if ("finish_kill", lp.spec.name, None) in self.faults:
            print(f"FAULT INJECTED: SIGKILL after {lp.spec.name} finished", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    faults = parse(spec)
    standard = loop.standard_hooks
    loop.standard_hooks = lambda writer: standard(writer) + [FaultHook(faults)]


if __name__ == "__main__":
    install(os.environ.get(ENV, ""))
    app.run(main.main, flags_parser=main.parse_flags)
