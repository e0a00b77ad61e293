import atexit
import os
import shutil
import sys
import tempfile

import pytest

# One cache folder for the test session, shared by the pytest-xdist workers (they inherit this process's
# environment) and every subprocess they start, and never the user's own: the persistent XLA compilation cache
# of in-process tests is the one `main` picks by default (compilation_cache_dir=auto, under XDG_CACHE_HOME). The
# tests compile the same tiny programs again and again, and on a 2-core CI machine compiling is most of the
# suite's time. Set before JAX is imported.
if "HISTOSPACE_TEST_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="histospace_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(HISTOSPACE_TEST_CACHE=_cache, XDG_CACHE_HOME=_cache,
                      JAX_COMPILATION_CACHE_DIR=os.path.join(_cache, "histospace_jax", "xla"),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    # The tests' programs are tiny and run a few steps: XLA's optimisation passes cost more than they save
    # (in-process tests 40% faster without them). Every comparison a test makes is between runs compiled alike,
    # or against a reference within a float tolerance.
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# Grain's worker processes and some absl-based code read absl flags; parse them once for the test process.
from absl import flags

if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


@pytest.fixture
def optimised_xla():
    """XLA's full optimisation, for a test that compares two formulations of one computation to float rounding
    (the suite compiles without it, above): the optimised programs are what users run. Caches are cleared on the
    way in and out, so no program compiled the other way is reused."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()
    yield
    jax.config.update("jax_disable_most_optimizations", before)
    jax.clear_caches()


@pytest.fixture
def shared_data():
    """Path of ../shared/data; skips the test with a reason when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repository root)")
    return SHARED_DATA
