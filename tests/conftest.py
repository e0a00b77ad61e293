import os
import sys

import pytest

# Grain's worker processes and some absl-based code read absl flags; parse them once for the test process.
from absl import flags

if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


@pytest.fixture
def shared_data():
    """Path of ../shared/data; skips the test with a reason when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repository root)")
    return SHARED_DATA
