"""Shared test configuration: deterministic seeds and hypothesis profiles sized for 2 CPU cores."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(1)

# bf16 / fp16 inputs run their low-precision paths whatever this machine's matmul rates
# (effattn.precision's probe would pick float32 compute where bf16 is slower); the policy
# itself is tested in test_precision.py
from effattn.precision import set_low_precision_matmul  # noqa: E402

set_low_precision_matmul("on")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
