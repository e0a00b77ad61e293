"""Entry point: python -m histospace_jax.main --config=configs/loo.py --workdir=DIR [--config.KEY=VALUE ...]

Exit codes (histospace_jax/errors.py): 0 finished, 1 unexpected error, 64 unknown config key / bad flag /
out-of-range value, 65 bad input data, 70 non-finite loss, 73 workdir not writable or disk full, 75 preempted
(SIGTERM; checkpoint saved, rerun to resume), 78 workdir checkpoints from an incompatible configuration.
"""

import logging
import os
import re
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from histospace_jax import config as config_lib, distributed, errors, preemption, train, workdir as workdir_lib

config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, caches and results (resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every checkpoint operation at INFO, and JAX logs on every CPU run that it found no TPU; keep
    # the job's own progress readable.
    for name in ("orbax", "absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = flags.FLAGS.config
    try:
        config_lib.validate(config)  # before anything is created: a bad value leaves no workdir behind
    except errors.ConfigError as e:
        _usage_exit(str(e))
    # Multi-process jobs: join the other processes before anything touches JAX devices (importing JAX and
    # the training modules does not; their first device use does).
    distributed.initialize(config.get("distributed"))
    enable_compilation_cache(config.get("compilation_cache_dir", ""))
    try:
        workdir = workdir_lib.check_workdir(flags.FLAGS.workdir)
        if jax.process_count() == 1:
            # Multi-process jobs leave SIGTERM to JAX's preemption service (see preemption.stop_requested).
            preemption.install_sigterm_handler()
            for path in workdir_lib.clean_stale_temporaries(workdir):
                print(f"removed a temporary left by an interrupted run: {path}", flush=True)
        train.train_and_evaluate(config, workdir)
    except BaseException as e:  # noqa: BLE001 - mapped to documented exit codes, re-raised otherwise
        code = errors.exit_code(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        print(f"exit code {code}: {errors.EXIT_CODES[code]}", file=sys.stderr, flush=True)
        sys.exit(code)


def enable_compilation_cache(setting: str) -> str:
    """Points XLA's persistent compilation cache at a directory ("auto": the user's cache folder; "": off)."""
    if not setting:
        return ""
    path = setting
    if setting == "auto":
        path = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "histospace_jax", "xla")
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    # The head and feature programs compile in well under JAX's default 1 s threshold on a CPU, yet together
    # take most of a cold start: cache every program.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def _usage_exit(message: str):
    print(f"error: {message}\nPass --helpshort or --helpfull to see help on flags; every config key is listed "
          "in histospace_jax/config.py.", file=sys.stderr, flush=True)
    print(f"exit code {errors.EXIT_USAGE}: {errors.EXIT_CODES[errors.EXIT_USAGE]}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USAGE)


def parse_flags(argv):
    """absl flag parsing, with unknown or mistyped --config.KEY overrides reported by their full name."""
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
