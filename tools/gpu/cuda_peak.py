"""Run a Python script, then print its peak CUDA memory over the whole run.

    python tools/gpu/cuda_peak.py SCRIPT [ARGS...]

SCRIPT runs in this process as ``__main__`` (its folder first on
``sys.path``, ``sys.argv = [SCRIPT, ARGS...]``), e.g. a benchmark that reports
no memory itself. At the end one line is printed::

    peak CUDA memory allocated: <MiB> MiB (reserved: <MiB> MiB)

the allocator's peak on the current device over the whole run, also when the
script resets the peak statistics itself (each reset first records the peak
so far), or ``... n/a (CUDA not used)``. The exit status is the script's.
"""
import os.path as osp
import runpy
import sys
from typing import List, Optional

import torch

PREFIX = 'peak CUDA memory allocated:'


class PeakTracker:
    """Keeps the largest allocated/reserved peaks across the script's own
    ``torch.cuda.reset_peak_memory_stats`` calls."""

    def __init__(self) -> None:
        self.allocated = 0
        self.reserved = 0
        self._reset = torch.cuda.reset_peak_memory_stats

    def record(self, device: Optional[object] = None) -> None:
        """Fold the allocator's current peaks into the running maxima."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.allocated = max(self.allocated, torch.cuda.max_memory_allocated(device))
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(device))

    def reset(self, device: Optional[object] = None) -> None:
        """Replacement of ``torch.cuda.reset_peak_memory_stats``."""
        self.record(device)
        self._reset(device)

    def line(self) -> str:
        """The report line (n/a when CUDA was never initialized)."""
        self.record()
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return f'{PREFIX} n/a (CUDA not used)'
        return (f'{PREFIX} {self.allocated / 2**20:.0f} MiB '
                f'(reserved: {self.reserved / 2**20:.0f} MiB)')


def run_script(argv: List[str]) -> int:
    """Run ``argv[0]`` with arguments ``argv[1:]``; its exit status."""
    script = osp.abspath(argv[0])
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, osp.dirname(script))
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as exc:
        if exc.code in (None, 0):
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv else 2
    tracker = PeakTracker()
    torch.cuda.reset_peak_memory_stats = tracker.reset
    status = run_script(argv)
    print(tracker.line(), flush=True)
    return status


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
