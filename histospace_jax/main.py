"""Entry point: python -m histospace_jax.main --config=configs/loo.py --workdir=DIR [--config.KEY=VALUE ...]"""

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
    from histospace_jax import train

    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
