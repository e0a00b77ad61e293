"""Error types and the exit codes of `python -m histospace_jax.main`, in one place.

  0   finished
  1   unexpected error (traceback printed)
  64  bad command line: unknown or mistyped config key, unparsable or out-of-range value
  65  bad input data (tile store / raw dataset): the message names the file, the item and the fix
  70  training diverged: non-finite loss or parameters (step and batch rows named; last good checkpoint kept)
  73  workdir not writable, or the disk is full
  75  preempted (SIGTERM): a checkpoint was saved at the last step boundary; rerun the same command to resume
  78  the workdir holds checkpoints from an incompatible configuration
Exit code 75 is EX_TEMPFAIL of sysexits.h ("try again later"); schedulers should rerun the job on it.
"""

from __future__ import annotations

import errno

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
    EXIT_USAGE: "bad command line, unknown config key or out-of-range value",
    EXIT_BAD_INPUT: "bad input data",
    EXIT_DIVERGED: "training diverged (non-finite loss or parameters)",
    EXIT_WORKDIR: "workdir not writable or disk full",
    EXIT_PREEMPTED: "preempted: checkpoint saved, rerun the same command to resume",
    EXIT_INCOMPATIBLE: "workdir checkpoints come from an incompatible configuration",
}


class ConfigError(ValueError):
    """A config value is out of its allowed range; the message names the key and the range."""


class BadInputError(ValueError):
    """Bad input data (a store, a raw dataset, a slide); the message names the file, the item and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and what to do."""


class ConfigMismatchError(CheckpointError):
    """A checkpoint in the workdir was written under settings that differ from the current config."""


class NonFiniteError(FloatingPointError):
    """Non-finite loss or parameters; the message names step, batch rows and the last good checkpoint."""


class WorkdirError(OSError):
    """The workdir cannot be created or written, or its disk is (nearly) full."""


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; main exits with EXIT_PREEMPTED."""

    def __init__(self, phase: str, step: int, directory: str):
        self.phase, self.step, self.directory = phase, step, directory
        super().__init__(f"preempted (SIGTERM) during {phase}: checkpoint saved at step {step} in {directory}. "
                         "Rerun the same command to resume from it.")


# The first matching type decides (ConfigMismatchError is a CheckpointError; WorkdirError an OSError).
_EXIT_BY_TYPE = ((Preempted, EXIT_PREEMPTED), (NonFiniteError, EXIT_DIVERGED), (CheckpointError, EXIT_INCOMPATIBLE),
                 (ConfigError, EXIT_USAGE), (BadInputError, EXIT_BAD_INPUT), (WorkdirError, EXIT_WORKDIR))
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def exit_code(e: BaseException) -> int | None:
    """The documented exit code of an expected failure, or None (an unexpected error: traceback, exit 1)."""
    for kind, code in _EXIT_BY_TYPE:
        if isinstance(e, kind):
            return code
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return EXIT_WORKDIR
    return None
