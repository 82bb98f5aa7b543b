"""The device the GPU suite runs on: CUDA when there is one; CPU only on request, as a dry run.

A dry run (MEDISEE_GPU_TESTS_ON=cpu) checks the tests' own logic on a machine without a GPU: every
"device" result is then compared with a CPU result, so it proves nothing about CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

DRY_RUN_VARIABLE = "MEDISEE_GPU_TESTS_ON"
SKIP_REASON = f"needs a CUDA device (set {DRY_RUN_VARIABLE}=cpu to dry-run the logic on CPU)"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(DRY_RUN_VARIABLE) == "cpu":
        return torch.device("cpu")
    pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def reference() -> torch.device:
    """Where the expected results are computed."""
    return torch.device("cpu")


@pytest.fixture(autouse=True, scope="package")
def exact_fp32(device):
    """fp32 really fp32 on the GPU: TF32 matmuls and convolutions round to 10 bits of mantissa, which
    the CPU comparisons' tolerances are not meant to absorb."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
