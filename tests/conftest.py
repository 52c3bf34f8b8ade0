"""Test-session settings: the tests use tiny tensors, for which one intra-op
thread is faster than several (and CI machines have 2 cores). Registers the
``cuda`` marker (tests/test_cuda: skipped without a CUDA device)."""
import torch

torch.set_num_threads(1)


def pytest_configure(config) -> None:
    """Register this suite's markers."""
    config.addinivalue_line(
        'markers', 'cuda: needs a CUDA device (run by tools/benchmarks/gpu_check.sh)')
