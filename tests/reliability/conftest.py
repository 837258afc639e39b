"""One intra-op thread for the in-process trainers of these tests, as run_distributed gives each rank: with the
default (one per core) a tiny model's step is dominated by thread hand-offs, ~30× slower on a busy machine."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
