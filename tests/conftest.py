"""Test session setup: Triton's CPU interpreter when there is no GPU, and hypothesis profiles.

TRITON_INTERPRET must be set before anything imports triton, so this runs before any test module
imports ``kernels``. On a CUDA machine the same kernel tests run against the compiled kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per pytest-xdist worker: the workers fill the cores
    torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, derandomize=True, **_common)  # the suite on 2 cores in CI
settings.register_profile("quick", max_examples=25, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where Triton kernels launch: the GPU when there is one, else the CPU through the interpreter."""
    return KERNEL_DEVICE
