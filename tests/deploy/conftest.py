"""The compiled kernel as a fixture for the deploy tests (test_kernel.py, test_bound.py)."""
import os

import pytest

from bimacosr import kernels

FLAGS_ENV = "BIMACOSR_TEST_KERNEL_FLAGS"  # extra compiler flags of a test build (the other-path test)


@pytest.fixture(scope="session")
def fused() -> None:
    """The compiled kernel (built once per session, cached on disk); skips where it cannot build."""
    kernels.FLAGS.extend(os.environ.get(FLAGS_ENV, "").split())
    if not kernels.available():
        pytest.skip(kernels.status())
