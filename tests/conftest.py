import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=int(os.environ.get("BNORM_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _compiled_entry():
    """Start building bnorm's compiled evaluation entry (kernels/cxx_eval.py) at once, in the
    background, as the first evaluation of any process does: the tests then run with it as
    soon as it is ready (its results are the Python path's, bit for bit; test_cxx_eval.py checks
    that), and the ones about it wait for it."""
    from bnorm.kernels import cxx_eval

    cxx_eval.start()
    yield
