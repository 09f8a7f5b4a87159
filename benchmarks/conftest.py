"""Shared by the engine benchmarks: torch's threads from LEAKBENCH_BENCH_THREADS (default: all cores)."""
import os

import pytest
import torch


@pytest.fixture(scope="module")
def bench_threads():
    torch.set_num_threads(int(os.environ.get("LEAKBENCH_BENCH_THREADS", os.cpu_count() or 1)))
