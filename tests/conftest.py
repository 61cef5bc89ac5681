import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # reference.py, helpers.py

import fedagg  # noqa: E402
from fedagg import _core  # noqa: E402


@pytest.fixture(params=list(_core.available_isas()))
def isa(request):
    """Run the test with the kernels of each compiled-in instruction set."""
    _core._force_isa(request.param)
    try:
        assert _core.isa() == request.param
        yield request.param
    finally:
        _core._force_isa("")


@pytest.fixture
def threads_restored():
    """Restore the default thread count after the test."""
    try:
        yield
    finally:
        fedagg.set_num_threads(0)


@pytest.fixture
def running():
    """running(**ServerConfig fields) -> helpers.Running; every server made is stopped after the test."""
    from helpers import Running

    made = []

    def make(**kw):
        r = Running(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        if r.thread.is_alive():
            r.stop()
