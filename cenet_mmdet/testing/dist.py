"""Run a function in real gloo processes (for tests of distributed layers).

:func:`run_process_group` starts ``world_size`` fresh Python processes, joins
them into one ``torch.distributed`` process group (``file://`` rendezvous in a
directory of the caller, so no port is ever fixed), and runs
``fn(rank, world_size, *args)`` in each. ``fn`` is a module-level generator
function that yields ``(name, result)`` pairs; each result is saved as soon as
it is yielded, so that the scenarios that finished before a failure or a hang
are still reported. The caller gets a :class:`DistributedRun` and looks results
up by name with :meth:`DistributedRun.get`, which fails with the workers'
tracebacks, or the ranks that hung, when a result is missing.

Results must be ``torch.load(weights_only=True)``-loadable: tensors, numbers,
strings, and lists/tuples/dicts of them.
"""
import datetime
import importlib
import importlib.util
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocessing.connection import wait

_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')


def _resolve(ref: Tuple[str, str, str]) -> Callable:
    """Find ``fn`` in a spawned child from (module name, file, qualified name)."""
    module_name, path, qualname = ref
    try:
        if module_name in ('__main__', '__mp_main__'):
            raise ImportError(module_name)
        module = importlib.import_module(module_name)
    except ImportError:
        # e.g. a test module imported by pytest under a rootdir-relative name
        spec = importlib.util.spec_from_file_location('_dist_target', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    target = module
    for part in qualname.split('.'):
        target = getattr(target, part)
    return target


def _worker(rank: int, world_size: int, backend: str, init_file: str,
            ref: Tuple[str, str, str], args: tuple, out_dir: str,
            collective_timeout: float, num_threads: int) -> None:
    out = Path(out_dir)
    try:
        torch.set_num_threads(num_threads)
        dist.init_process_group(
            backend, init_method=f'file://{init_file}', rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout))
        fn = _resolve(ref)
        for name, result in fn(rank, world_size, *args):
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f'result names must match {_NAME.pattern}, '
                                 f'got {name!r}')
            tmp = out / f'.{name}.rank{rank}.tmp'
            torch.save(result, tmp)
            os.replace(tmp, out / f'{name}.rank{rank}.pt')
    except BaseException:  # noqa: B902  (reported to the parent, then re-raised)
        (out / f'error.rank{rank}.txt').write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedRun:
    """What :func:`run_process_group` brought back.

    Attributes:
        world_size: number of ranks.
        results: ``name -> {rank: result}`` for every saved result.
        errors: ``rank -> traceback`` of the ranks that raised.
        hung: ranks still alive at the deadline (then terminated).
        exitcodes: ``rank -> exit code`` (``None`` never happens after join).
        wall_s: seconds from the start to the end of the last process.
    """

    def __init__(self, world_size: int, results: Dict[str, Dict[int, Any]],
                 errors: Dict[int, str], hung: List[int],
                 exitcodes: Dict[int, Optional[int]], wall_s: float) -> None:
        self.world_size = world_size
        self.results = results
        self.errors = errors
        self.hung = hung
        self.exitcodes = exitcodes
        self.wall_s = wall_s

    def diagnostics(self) -> str:
        lines = [f'exit codes: {self.exitcodes}, wall {self.wall_s:.1f} s']
        if self.hung:
            lines.append(f'ranks {self.hung} did not finish before the deadline '
                         '(hang) and were terminated')
        for rank, text in sorted(self.errors.items()):
            lines.append(f'--- rank {rank} raised:\n{text}')
        lines.append(f'results saved: {sorted(self.results)}')
        return '\n'.join(lines)

    def get(self, name: str) -> List[Any]:
        """Per-rank results of ``name``; AssertionError if any rank lacks one."""
        found = self.results.get(name, {})
        missing = [r for r in range(self.world_size) if r not in found]
        if missing:
            raise AssertionError(
                f'result {name!r} missing on ranks {missing}\n' + self.diagnostics())
        return [found[r] for r in range(self.world_size)]

    def check_clean_exit(self) -> None:
        """AssertionError unless every rank exited 0 without hanging."""
        if self.hung or self.errors or any(self.exitcodes.values()):
            raise AssertionError('distributed run failed\n' + self.diagnostics())


def run_process_group(fn: Callable[..., Iterable[Tuple[str, Any]]],
                      workdir: os.PathLike,
                      world_size: int = 2,
                      args: tuple = (),
                      backend: str = 'gloo',
                      timeout: float = 60.0,
                      collective_timeout: float = 30.0,
                      num_threads: int = 1,
                      failure_grace: float = 10.0,
                      start_method: str = 'forkserver') -> DistributedRun:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    Args:
        fn: a module-level generator function yielding ``(name, result)``.
        workdir: an empty, writable directory (e.g. pytest's ``tmp_path``)
            for the rendezvous file and the results.
        world_size: number of processes. Default: 2.
        args: extra picklable arguments for ``fn``.
        backend: ``'gloo'`` (CPU; default) or ``'nccl'``.
        timeout: seconds for the whole run, process start-up included; ranks
            still alive then are terminated and reported in ``hung``.
            Default: 60.
        collective_timeout: the process group's timeout (a collective that
            waits longer raises in the worker). Default: 30.
        num_threads: ``torch.set_num_threads`` in each worker. Default: 1.
        failure_grace: once a rank has failed, seconds left to the others
            (to report their side, e.g. a collective error) before they are
            terminated as hung. Default: 10.
        start_method: ``'forkserver'`` (default: fresh processes forked from
            a server that imported ``cenet_mmdet`` once) or ``'spawn'``.

    Returns:
        A :class:`DistributedRun`; it never raises for worker failures.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = workdir / 'results'
    out_dir.mkdir()
    init_file = workdir / 'rendezvous'
    module = sys.modules.get(fn.__module__)
    path = getattr(module, '__file__', None) or ''
    ref = (fn.__module__, path, fn.__qualname__)

    ctx = mp.get_context(start_method)
    if start_method == 'forkserver':
        # The server imports torch and the plugin once; the workers are forked
        # from it (no threads have run there) instead of importing them each.
        ctx.set_forkserver_preload([__name__, 'cenet_mmdet'])
    start = time.monotonic()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, backend, str(init_file), ref, tuple(args),
                  str(out_dir), collective_timeout, num_threads),
            daemon=True) for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = start + timeout
    while True:
        alive = [proc for proc in procs if proc.is_alive()]
        if not alive:
            break
        if any(proc.exitcode for proc in procs):  # a rank failed
            deadline = min(deadline, time.monotonic() + failure_grace)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        wait([proc.sentinel for proc in alive], timeout=remaining)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        procs[rank].terminate()
    for rank in hung:
        procs[rank].join(5)
        if procs[rank].is_alive():
            procs[rank].kill()
            procs[rank].join(5)
    wall_s = time.monotonic() - start

    results: Dict[str, Dict[int, Any]] = {}
    for file in sorted(out_dir.glob('*.rank*.pt')):
        name, rank = file.name[:-3].rsplit('.rank', 1)
        results.setdefault(name, {})[int(rank)] = torch.load(
            file, weights_only=True)
    errors = {
        int(file.name[len('error.rank'):-len('.txt')]): file.read_text()
        for file in out_dir.glob('error.rank*.txt')
    }
    exitcodes = {rank: proc.exitcode for rank, proc in enumerate(procs)}
    return DistributedRun(world_size, results, errors, hung, exitcodes, wall_s)
