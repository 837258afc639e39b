"""One intra-op thread in every test and in every process a test starts, as run_distributed gives each rank.

Results must not depend on the machine: a reduction split over threads sums in an order set by the thread count,
so a one-process reference computed with one thread per core would differ from run to run of CI on machines of
different sizes. One thread is also the fast choice here: with one per core a tiny model's step is dominated by
thread hand-offs (~30× slower on a busy machine).
"""
import os

import pytest
import torch

os.environ["OMP_NUM_THREADS"] = "1"  # `collie train` and other commands the tests start


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
