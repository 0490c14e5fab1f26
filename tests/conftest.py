import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: tiny tensors gain nothing from threads, and on a busy machine
    idle OpenMP threads spin-wait for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
