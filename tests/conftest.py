"""Shared test setup.

Kernel tests run on CPU tensors under the Triton interpreter (set before any kernel module is
imported). On a GPU machine, `R2EC_TEST_DEVICE=cuda pytest tests/` runs the same tests on CUDA
tensors with real Triton compilation instead.
"""
import os
import sys

DEVICE = os.environ.get("R2EC_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def device():
    return torch.device(DEVICE)
