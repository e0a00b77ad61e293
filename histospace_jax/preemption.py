"""Preemption: a first SIGTERM asks the training loop to checkpoint at the next step boundary and exit 75; a
second one kills at once.

Single-process jobs use the signal handler below. On multi-process jobs the flag is not used: JAX's
preemption sync service (started by jax.distributed) turns the scheduler's notice into one agreed step on
every process, read through the checkpointer (`Checkpointer.reached_preemption`).
"""

from __future__ import annotations

import os
import signal
import threading

import jax

from histospace_jax.errors import EXIT_PREEMPTED

_STOP = threading.Event()
_installed = False


def install_sigterm_handler() -> None:
    """Only for single-process jobs; on multi-process jobs JAX's preemption notifier owns SIGTERM."""
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


def clear_stop() -> None:
    _STOP.clear()


def stop_requested(step: int, checkpointer=None) -> bool:
    """True when the job must checkpoint and exit at this step boundary (all processes agree)."""
    if jax.process_count() > 1:
        return checkpointer is not None and checkpointer.reached_preemption(step)
    return _STOP.is_set()
