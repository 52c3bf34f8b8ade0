"""Backbone-level benchmark: mmdet ResNet (BN) vs CEResNet (CE / SyncCE at
world size 1) vs CE-ResNet built from the released transcription.

    python tools/benchmarks/bench_backbones.py [--depths 50 101] [--batch 4]
        [--size 224] [--repeat 15] [--threads 2] [--device cpu|cuda]
        [--kinds BN CE SyncCE released floor floor+gate floor+moments]
        [--memory-repeat 3] [--per-layer]
        [--norm GN]
    python tools/benchmarks/bench_backbones.py --compile [--kinds BN CE floor]
        [--compile-backend inductor] [--compile-option NAME=VALUE]
        [--warm-cache] ...

All models of one depth are built once; every repeat times each of them once
(interleaved, rotating order: see common.py), first in eval, then for a train
step (forward + backward). Prints a markdown table: median times, images/s,
the median per-repeat ratio to the plain ResNet with its min-max spread, and
the peak memory of one train step with its ratio to the plain ResNet (CUDA:
the allocator's peak; CPU: the resident set's peak over the step, in a fresh
process per backbone).

The kinds ``floor``, ``floor+gate`` and ``floor+moments`` are the lower
bounds (``floors.py`` defines them and says what each leaves out): every CE
layer replaced by less work. ``build`` checks that every CE layer was
replaced.

``--per-layer`` adds a second table: the eval forward time of each CE
position (``bn1``, ``layer1.0.bn3``, ...) inside the network, for every kind
(BN: the BN layer at that position), timed by forward hooks in rounds of
their own after the whole-network ones (the hooks do not touch the first
table). It shows where a ratio's milliseconds go, in place: with the caches,
the allocator and the neighbouring layers of the real network, which
``bench_layers.py`` (one layer alone) cannot show. A train step's backward is
not split by layer; which ops CE adds to a train or eval step, summed over
all layers, is ``profile_ce.py``'s table.

``--norm GN`` builds every backbone with GN (32 groups) instead of BN: the
plain ResNet with GN, and CE after GN at the CE positions
(:class:`~cenet_mmdet.models.layers.GroupNormCE`); the ratios are then to
the ResNet with GN (kinds BN, CE, SyncCE, floor).

``--compile`` times the backbones compiled with ``torch.compile`` instead
(default kinds: BN, CE, floor), in the same interleaved way, each ratio to
the compiled ResNet. It adds the compile time of each backbone in eval and
for a train step: the wall time of its first call (which compiles) minus the
median call, with a fresh, empty inductor cache (a temporary
``TORCHINDUCTOR_CACHE_DIR``; ``--warm-cache`` keeps the user's cache, whose
hits make a second compilation much shorter). The backbones are compiled
one after the other in the table's order, so a kernel that a later backbone
shares with an earlier one comes from the cache. Peak memory is not measured
for compiled backbones (a fresh process per backbone would compile again).
``--compile-option NAME=VALUE`` passes an Inductor option to every
``torch.compile`` (``options=``), e.g. ``layout_optimization=False``.
"""
import argparse
import ast
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from common import (interleaved_times, machine_line, markdown_table, median_ms,
                    peak_memory_mb, pin_threads, ratio, synchronize)
from floors import FLOORS, LABELS, MapsOnly, swap_in_floor

import cenet_mmdet  # noqa: F401
from cenet_mmdet.testing.released_ce import swap_in_released_ce
from mmdet.registry import MODELS

#: ``--kinds``: the backbones, then the lower bounds (``floors.py``)
KINDS = {
    'BN': 'ResNet (BN)',
    'CE': 'CEResNet (CE)',
    'SyncCE': 'CEResNet (SyncCE, ws=1)',
    'released': 'CEResNet (released autograd)',
    **LABELS,
}


#: the normalizer of every backbone (``--norm``)
NORM_CFGS = {'BN': dict(type='BN', requires_grad=True),
             'GN': dict(type='GN', num_groups=32, requires_grad=True)}
NORM = 'BN'


def label(kind: str) -> str:
    """The table's name of ``kind`` under :data:`NORM`."""
    if NORM == 'BN':
        return KINDS[kind]
    return KINDS[kind].replace('(BN)', f'({NORM})').replace('(CE', f'({NORM}+CE').replace(
        '(SyncCE', f'({NORM}+SyncCE')


def build(kind: str, depth: int) -> nn.Module:
    cfg = dict(type='ResNet', depth=depth, out_indices=(0, 1, 2, 3),
               norm_cfg=dict(NORM_CFGS[NORM]))
    if kind != 'BN':
        cfg.update(type='CEResNet')
    if kind == 'SyncCE':
        cfg.update(ce_cfg=dict(type='SyncCE'))
    model = MODELS.build(cfg)
    if kind == 'released':
        swap_in_released_ce(model)
    if kind in FLOORS:
        expected = model.num_ce_layers
        replaced = swap_in_floor(model, kind)
        if replaced != expected or not replaced:
            raise RuntimeError(f'floor: replaced {replaced} of {expected} CE layers')
    return model


def eval_fn(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            model(x)
    return run


def train_fn(model: nn.Module, x: torch.Tensor):
    def run():
        outs = model(x)
        sum(o.float().mean() for o in outs).backward()
    return run


def cpu_train_step_mb(kind: str, depth: int, batch: int, size: int,
                      threads: int) -> float:
    """Peak memory of one train step on the CPU, in MB: the resident set's
    high-water mark during the step minus the resident set before it, in a
    fresh process (``ru_maxrss`` would not do: Linux keeps it across
    ``fork`` + ``exec``, so a child reports the benchmark's own peak)."""
    command = [sys.executable, __file__, '--memory-probe', kind, '--depths',
               str(depth), '--batch', str(batch), '--size', str(size),
               '--threads', str(threads), '--norm', NORM]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_mb']


def _status_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process from ``/proc/self/status``."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f'no {field} in /proc/self/status')


def train_step_mb(kind: str, depth: int, x: torch.Tensor, args) -> float:
    """Peak memory (MB) of one train step of a freshly built backbone."""
    if args.device == 'cpu':
        return cpu_train_step_mb(kind, depth, args.batch, args.size,
                                 args.threads)
    model = build(kind, depth).to(args.device)
    model.train()
    return peak_memory_mb(train_fn(model, x), args.device)


def step_memory(kinds, depth: int, x: torch.Tensor, args) -> dict:
    """Median over ``--memory-repeat`` interleaved rounds (each backbone once
    per round) of :func:`train_step_mb`, per backbone."""
    rounds = [{kind: train_step_mb(kind, depth, x, args) for kind in kinds}
              for _ in range(args.memory_repeat)]
    return {kind: float(torch.tensor([r[kind] for r in rounds]).median())
            for kind in kinds}


def memory_probe(kind: str, depth: int, batch: int, size: int) -> None:
    """Child of :func:`cpu_train_step_mb`: prints ``{"peak_mb": ...}``."""
    torch.manual_seed(0)
    model = build(kind, depth)
    model.train()  # (mmdet's ResNet.train returns None)
    x = torch.randn(batch, 3, size, size)
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current resident set
    except OSError:  # (then a build peak above the step's would hide it)
        pass
    before = _status_mb('VmRSS')
    train_fn(model, x)()
    print(json.dumps(dict(peak_mb=_status_mb('VmHWM') - before)))


def prime_floor(model: nn.Module, x: torch.Tensor) -> None:
    """Create the floor's maps with one eager call, before compiling (a
    compiled graph would otherwise create its leaves inside the graph)."""
    if any(isinstance(m, MapsOnly) for m in model.modules()):
        with torch.no_grad():
            model(x)


def first_call_s(fn, device: str) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def graphs_compiled() -> int:
    """Graphs compiled by Dynamo in this process so far."""
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def compiled_times(models: dict, x: torch.Tensor, args) -> dict:
    """``mode -> (times, compile_s, graphs)`` for 'eval' and 'train': the
    interleaved per-repeat times of the compiled backbones (see
    :func:`common.interleaved_times`), the compile time of each (the wall
    time of its first call minus its median call) and the number of graphs
    its first call compiled (1: no graph break; more calls compile none, or
    the timings would include compilation)."""
    for model in models.values():
        model.eval()
        prime_floor(model, x)
    options = dict(args.compile_option) or None
    compiled = {kind: torch.compile(model, backend=args.compile_backend,
                                    options=options)
                for kind, model in models.items()}
    results = {}
    for mode, make_fn in (('eval', eval_fn), ('train', train_fn)):
        for model in models.values():
            model.train(mode == 'train')
        fns = {kind: make_fn(model, x) for kind, model in compiled.items()}
        first, graphs = {}, {}
        for kind, fn in fns.items():
            before = graphs_compiled()
            first[kind] = first_call_s(fn, args.device)
            graphs[kind] = graphs_compiled() - before
        before = graphs_compiled()
        times = interleaved_times(fns, args.device, args.warmup, args.repeat)
        if graphs_compiled() != before:
            raise RuntimeError(f'{mode}: the timed calls compiled '
                               f'{graphs_compiled() - before} more graph(s)')
        results[mode] = (times, {kind: first[kind] - statistics.median(times[kind])
                                 for kind in fns}, graphs)
    return results


def timing_row(depth: int, kind: str, evals: dict, trains: dict, batch: int,
               last: str) -> list:
    """One table row: times, images/s and ratios to BN, then ``last``."""
    return [
        f'R-{depth}', label(kind), f'{median_ms(evals[kind]):.0f}',
        f'{batch * 1e3 / median_ms(evals[kind]):.1f}',
        str(ratio(evals, kind, 'BN')), f'{median_ms(trains[kind]):.0f}',
        f'{batch * 1e3 / median_ms(trains[kind]):.1f}',
        str(ratio(trains, kind, 'BN')), last
    ]


def compiled_rows(depth: int, kinds, x: torch.Tensor, args) -> list:
    models = {kind: build(kind, depth).to(args.device) for kind in kinds}
    results = compiled_times(models, x, args)
    (evals, eval_s, eval_graphs), (trains, train_s, train_graphs) = (
        results['eval'], results['train'])
    return [timing_row(depth, kind, evals, trains, args.batch,
                       f'{eval_s[kind]:.1f} / {train_s[kind]:.1f}')
            + [f'{eval_graphs[kind]} / {train_graphs[kind]}'] for kind in kinds]


def eager_rows(depth: int, kinds, x: torch.Tensor, args, per_layer: list) -> list:
    """The table's rows for ``depth``; with ``args.per_layer``, the rows of
    the per-layer table are appended to ``per_layer``."""
    models = {kind: build(kind, depth).to(args.device) for kind in kinds}
    for model in models.values():
        model.eval()
    evals = interleaved_times(
        {k: eval_fn(m, x) for k, m in models.items()}, args.device,
        args.warmup, args.repeat)
    for model in models.values():
        model.train()
    trains = interleaved_times(
        {k: train_fn(m, x) for k, m in models.items()}, args.device,
        args.warmup, args.repeat)
    if args.per_layer:
        per_layer += per_layer_rows(depth, models, x, args)
    del models  # the CPU probes run in fresh processes
    memory = step_memory(kinds, depth, x, args)
    return [timing_row(depth, kind, evals, trains, args.batch,
                       '-' if memory[kind] != memory[kind] else
                       f'{memory[kind]:.0f} ({memory[kind] / memory["BN"]:.2f}x)')
            for kind in kinds]


class ForwardClock:
    """Wall time of every forward call of the modules at ``positions`` of
    ``model`` (names as in ``named_modules``), kept per position in
    :attr:`times` (s), by forward pre- and post-hooks (on ``device`` 'cuda',
    each hook synchronizes first); :meth:`remove` takes the hooks off.
    :attr:`shapes` holds each position's input shape."""

    def __init__(self, model: nn.Module, positions, device: str = 'cpu') -> None:
        self.times = {name: [] for name in positions}
        self.shapes = {}
        self.device = device
        self._started = {}
        self._handles = []
        for name in positions:
            module = model.get_submodule(name)
            self._handles += [
                module.register_forward_pre_hook(functools.partial(self._start, name)),
                module.register_forward_hook(functools.partial(self._stop, name))]

    def _start(self, name: str, module: nn.Module, inputs) -> None:
        synchronize(self.device)
        self._started[name] = time.perf_counter()

    def _stop(self, name: str, module: nn.Module, inputs, output) -> None:
        synchronize(self.device)
        self.times[name].append(time.perf_counter() - self._started[name])
        self.shapes.setdefault(name, tuple(inputs[0].shape))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def ce_positions(depth: int) -> list:
    """The names of the CE layers of CEResNet-``depth`` (a plain ResNet has a
    BN layer at each)."""
    return [name for name, _ in build('CE', depth).ce_layers()]


def per_layer_rows(depth: int, models: dict, x: torch.Tensor, args) -> list:
    """Rows of the ``--per-layer`` table: for every CE position, its input
    ``(C, H x W)`` and each kind's median eval forward time there (ms), in
    ``args.repeat`` interleaved rounds of their own; then their sums and the
    whole network's median eval time in the same rounds."""
    positions = ce_positions(depth)
    clocks = {kind: ForwardClock(model, positions, args.device)
              for kind, model in models.items()}
    for model in models.values():
        model.eval()
    try:
        whole = interleaved_times({k: eval_fn(m, x) for k, m in models.items()},
                                  args.device, args.warmup, args.repeat)
    finally:
        for clock in clocks.values():
            clock.remove()
    # the warm-up calls come first: keep the timed rounds
    layer_ms = {kind: {name: median_ms(times[-args.repeat:])
                       for name, times in clock.times.items()}
                for kind, clock in clocks.items()}
    shapes = next(iter(clocks.values())).shapes
    rows = [[f'R-{depth}', name, f'{shapes[name][1]}, {shapes[name][2]}x{shapes[name][3]}']
            + [f'{layer_ms[kind][name]:.2f}' for kind in models] for name in positions]
    rows.append([f'R-{depth}', f'sum of the {len(positions)}', '']
                + [f'{sum(layer_ms[kind].values()):.1f}' for kind in models])
    rows.append([f'R-{depth}', 'whole network', '']
                + [f'{median_ms(whole[kind]):.1f}' for kind in models])
    return rows


def compile_option(text: str) -> tuple:
    """``'NAME=VALUE'`` -> ``(NAME, VALUE)``, the value read as a Python
    literal (``False``, ``3``) or else kept as a string."""
    name, sep, value = text.partition('=')
    if not sep or not name:
        raise argparse.ArgumentTypeError(f'expected NAME=VALUE, got {text!r}')
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--depths', type=int, nargs='+', default=[50, 101])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=15)
    parser.add_argument('--threads', type=int, default=0,
                        help='torch intra-op threads (default: all cores)')
    parser.add_argument('--kinds', nargs='+', choices=list(KINDS),
                        help='backbones (default: BN CE SyncCE; with '
                        '--compile: BN CE floor)')
    parser.add_argument('--compile', action='store_true',
                        help='time the backbones compiled with torch.compile')
    parser.add_argument('--compile-backend', default='inductor',
                        help='torch.compile backend (default: inductor)')
    parser.add_argument('--compile-option', action='append', default=[],
                        type=compile_option, metavar='NAME=VALUE',
                        help='an Inductor option passed to torch.compile '
                        '(repeatable), e.g. layout_optimization=False')
    parser.add_argument('--warm-cache', action='store_true',
                        help='compile with the user\'s inductor cache (default: '
                        'a fresh one, so that the compile time is the cold one)')
    parser.add_argument('--memory-repeat', type=int, default=3,
                        help='rounds of the peak-memory measurement (median)')
    parser.add_argument('--per-layer', action='store_true',
                        help='also print the eval forward time of every CE '
                        'position inside the network (eager only)')
    parser.add_argument('--norm', choices=list(NORM_CFGS), default='BN',
                        help='the normalizer of every backbone: BN (default) '
                        'or GN (32 groups; CE after GN at the CE positions)')
    parser.add_argument('--memory-probe', choices=list(KINDS),
                        help=argparse.SUPPRESS)  # internal: one fresh process
    args = parser.parse_args()
    global NORM
    NORM = args.norm
    if NORM != 'BN' and 'released' in (args.kinds or ()):
        parser.error('--kinds released exists for BN only (the released code is BN + CE)')
    if args.memory_probe:
        pin_threads(args.threads)
        memory_probe(args.memory_probe, args.depths[0], args.batch, args.size)
        return
    if args.per_layer and args.compile:
        parser.error('--per-layer times eager forwards (hooks); it does not go with --compile')
    pin_threads(args.threads)
    if args.kinds is None:
        args.kinds = ['BN', 'CE', 'floor'] if args.compile else ['BN', 'CE', 'SyncCE']
    kinds = ['BN'] + [k for k in args.kinds if k != 'BN']
    cache = None
    if args.compile and not args.warm_cache:
        cache = tempfile.TemporaryDirectory(prefix='bench_inductor_')
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache.name
    rows, per_layer = [], []
    for depth in args.depths:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        if args.compile:
            rows += compiled_rows(depth, kinds, x, args)
        else:
            rows += eager_rows(depth, kinds, x, args, per_layer)
    options = ''.join(f', {name}={value}' for name, value in args.compile_option)
    what = (f'compiled (torch.compile, backend {args.compile_backend}{options}, '
            f'{"warm" if args.warm_cache else "fresh"} inductor cache) '
            if args.compile else '')
    print(f'Backbone benchmark, {NORM}, {what}batch {args.batch}, {args.size}x{args.size}, '
          f'{args.repeat} interleaved repeats; {machine_line(args.device)}\n')
    header = ['depth', 'backbone', 'eval ms', 'eval img/s', f'eval / {NORM} (min-max)',
              'train ms', 'train img/s', f'train / {NORM} (min-max)']
    if args.compile:
        print(markdown_table(header + ['compile s (eval / train)',
                                       'graphs (eval / train)'], rows))
        print('\ncompile s: the first call (which compiles) minus the median '
              'call; graphs: compiled by that call (1: no graph break); the '
              f'ratios are to the compiled ResNet ({NORM})')
        if cache is not None:
            cache.cleanup()
        return
    print(markdown_table(header + ['peak MB (/ BN)'], rows))
    print('\npeak MB: ' + ('the CUDA allocator\'s peak over one train step' if
                          args.device != 'cpu' else 'the peak resident set during one '
                          'train step minus the resident set before it (VmHWM '
                          '- VmRSS), in a fresh process per backbone; median of '
                          f'{args.memory_repeat} interleaved rounds'))
    if per_layer:
        print('\nPer CE position, eval forward ms inside the network (median of '
              f'{args.repeat} interleaved rounds of their own, timed by forward '
              'hooks; BN: the BN layer at that position)\n')
        print(markdown_table(['depth', 'position', 'input C, HxW']
                             + [label(kind) for kind in kinds], per_layer))


if __name__ == '__main__':
    main()
