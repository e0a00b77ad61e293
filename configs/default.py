"""Default configuration: leave-one-patient-out on the built-in synthetic demo data.

The defaults live in the package (histospace_jax/config.py), so every config file here loads from any working
directory. Every other config imports them and changes what it needs. Override any key on the command line,
e.g. `--config.train.epochs=3 --config.data.store=/data/her2st_store`; unknown keys and out-of-range values
are rejected (exit 64).
"""

from histospace_jax.config import get_config  # noqa: F401
