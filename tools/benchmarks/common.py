"""Timing helpers shared by the benchmark scripts (not a test utility).

Ratios are measured *interleaved*: every repeat times the baseline and each
candidate once, in an order that rotates from repeat to repeat, and a ratio is
the median of the per-repeat ratios with its min-max spread. Frequency and
cache drift on a shared machine then moves baseline and candidate together
instead of landing in the ratio (timing one model's block after the other's
moved the CE-ResNet-50 eval ratio from 0.90x to 1.19x between runs).
"""
import datetime
import os
import os.path as osp
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


@dataclass
class Ratio:
    """Median of per-repeat ratios candidate / baseline, with its spread."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f'{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})'


def interleaved_times(fns: Dict[str, Callable[[], None]], device: str,
                      warmup: int, repeat: int) -> Dict[str, List[float]]:
    """Per-repeat wall times (s) of every function, interleaved.

    Each function is first called ``warmup`` times; then each of the
    ``repeat`` rounds calls every function once, starting with a different
    one each round (rotation), so that no function always runs first.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeat):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: Dict[str, List[float]], candidate: str, baseline: str) -> Ratio:
    """:class:`Ratio` of ``candidate`` to ``baseline`` from the same rounds."""
    per_round = [c / b for c, b in zip(times[candidate], times[baseline])]
    return Ratio(statistics.median(per_round), min(per_round), max(per_round))


def median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e3


def peak_memory_mb(fn: Callable[[], None], device: str) -> float:
    """Peak memory of one call: the CUDA allocator's peak (MB); NaN on CPU."""
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return float('nan')


def pin_threads(threads: int) -> int:
    """Fix torch's intra-op threads (default: every core); returns the count."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str) -> str:
    """One line naming date, torch, device, CPU model and threads."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name()
    else:
        name = f'{_cpu_model()}, {os.cpu_count()} cores'
    today = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    return (f'{today}; torch {torch.__version__}, device {device} ({name}), '
            f'{torch.get_num_threads()} threads')


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)
