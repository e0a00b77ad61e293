"""Entry point: python -m histospace_jax.main --config=configs/loo.py --workdir=DIR [--config.KEY=VALUE ...]

Exit codes (histospace_jax/guards.py): 0 finished, 1 unexpected error, 64 unknown config key / bad flag,
65 bad input data, 70 non-finite loss, 73 workdir not writable or disk full, 75 preempted (SIGTERM; checkpoint
saved, rerun to resume), 78 workdir checkpoints from an incompatible configuration.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, caches and results (resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Config files import `configs.default`; make the repository root importable when run from elsewhere.
    config_file = flags.FLAGS["config"].config_filename
    root = os.path.dirname(os.path.dirname(os.path.abspath(config_file)))
    if root not in sys.path:
        sys.path.insert(0, root)
    # Orbax logs every checkpoint operation at INFO; keep the job's own progress readable.
    import logging

    for name in ("orbax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Multi-process jobs: join the other processes before anything touches JAX devices.
    from histospace_jax import distributed

    distributed.initialize(flags.FLAGS.config.get("distributed"))
    import jax

    from histospace_jax import guards, train

    try:
        workdir = guards.check_workdir(flags.FLAGS.workdir)
        if jax.process_count() == 1:
            # Multi-process jobs leave SIGTERM to JAX's preemption service (see guards.stop_requested).
            guards.install_sigterm_handler()
            for path in guards.clean_stale_temporaries(workdir):
                print(f"removed a temporary left by an interrupted run: {path}", flush=True)
        train.train_and_evaluate(flags.FLAGS.config, workdir)
    except BaseException as e:  # noqa: BLE001 - mapped to documented exit codes, re-raised otherwise
        code = _exit_code(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        print(f"exit code {code}: {guards.EXIT_CODES[code]}", file=sys.stderr, flush=True)
        sys.exit(code)


def _exit_code(e: BaseException):
    """The documented exit code of an expected failure (guards.EXIT_CODES), or None (traceback, exit 1)."""
    import errno

    from histospace_jax import guards
    from histospace_jax.checkpointing import CheckpointError
    from histospace_jax.data.store import StoreError
    from histospace_jax.ingest.common import IngestError

    if isinstance(e, guards.Preempted):
        return guards.EXIT_PREEMPTED
    if isinstance(e, guards.NonFiniteError):
        return guards.EXIT_DIVERGED
    if isinstance(e, CheckpointError):
        return guards.EXIT_INCOMPATIBLE
    if isinstance(e, (StoreError, IngestError)):
        return guards.EXIT_BAD_INPUT
    if isinstance(e, guards.WorkdirError):
        return guards.EXIT_WORKDIR
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return guards.EXIT_WORKDIR
    return None


def _usage_exit(message: str):
    from histospace_jax.guards import EXIT_CODES, EXIT_USAGE

    print(f"error: {message}\nPass --helpshort or --helpfull to see help on flags; every config key is listed "
          "in configs/default.py.", file=sys.stderr, flush=True)
    print(f"exit code {EXIT_USAGE}: {EXIT_CODES[EXIT_USAGE]}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def parse_flags(argv):
    """absl flag parsing, with unknown or mistyped --config.KEY overrides reported by their full name."""
    import re

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _usage_exit(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: the config has no such key
        text = str(e).encode().decode("unicode_escape")
        bad = re.search(r"'([^'\s]+)'", text)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        name = bad.group(1) if bad else text
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        full = next((k for k in overrides if k.split(".")[-1] == name or f".{name}." in f"{k}."), name)
        msg = f"unknown config key {full.partition('.')[2] or full!r} (from --{full})"
        if hint:
            msg += f"; did you mean {hint.group(1)!r}?"
        _usage_exit(msg)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
