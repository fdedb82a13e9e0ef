"""The compression tests run single-threaded: small BLAS calls on a shared, oversubscribed
machine are faster on one thread, and timings stay stable."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # effective when NumPy is not imported yet

import pytest  # noqa: E402


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
