"""Timing helpers shared by the benchmark scripts (not a test utility)."""
import os.path as osp
import statistics
import sys
import time
from typing import Callable, List

import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], None], device: str, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], None], device: str) -> float:
    """Peak memory of one call: CUDA allocator peak, or CPU max RSS growth (MB)."""
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return float('nan')


def machine_line(device: str) -> str:
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name()
    else:
        import platform
        name = f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'
    return f'torch {torch.__version__}, device {device} ({name})'


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)
