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

``floor`` is a lower bound for any exact implementation of the released CE:
every CE layer only applies fixed per-sample ``(N, G, d, d)`` maps and biases
(the dense product that each CE output needs, since the released function
mixes the d channels of a group with a matrix that has a per-image diagonal),
with no statistics, no gate and no Newton step. The maps are leaves that
require grad, so that the floor's train step also computes the map gradient
(``dM = g x^T``, ``dc``) that a real CE layer needs: its maps depend on the
input and the parameters, also under ``norm_eval=True``. ``build`` checks that
every CE layer was replaced.

``floor+gate`` is a tighter lower bound: the floor plus the least that an
exact CE layer must also run, one pass over its input for per-sample
statistics (a sum over ``H*W``) and the AII gate's two GEMMs on them, whose
output enters the maps (so a train step also computes the gate's weight
gradients and the statistics' input gradient). It assumes that the
statistics cannot be taken inside the convolution that produces the input
(no PyTorch op on the CPU does that).

``floor+moments`` is the least with PyTorch's CPU ops as they are: the
``floor+gate`` with both per-sample moments that the AII variance needs,
taken by CE's own ``sample_moments`` (``sum`` and ``vector_norm``: two
passes; ``torch.var_mean`` and ``layer_norm`` are slower), the gate on the
sums of squared deviations. A single fused pass for both moments would
undercut it, so it bounds implementations made of ATen ops, not every exact
implementation. CE's time beyond it is its own glue (BN scale, fold, check).

``--per-layer`` adds a second table: the eval forward time of each CE
position (``bn1``, ``layer1.0.bn3``, ...) inside the network, for every kind
(BN: the BN layer at that position), timed by forward hooks in rounds of
their own after the whole-network ones (the hooks do not touch the first
table). It shows where a ratio's milliseconds go, in place: with the caches,
the allocator and the neighbouring layers of the real network, which
``bench_layers.py`` (one layer alone) cannot show. A train step's backward is
not split by layer.

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
import torch.nn.functional as F
from torch import nn

from common import (interleaved_times, machine_line, markdown_table, median_ms,
                    peak_memory_mb, pin_threads, ratio, synchronize)

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.layers import CELayer
from cenet_mmdet.ops import GradientLink, apply_maps, sample_moments
from cenet_mmdet.testing.released_ce import swap_in_released_ce
from mmdet.registry import MODELS

KINDS = {
    'BN': 'ResNet (BN)',
    'CE': 'CEResNet (CE)',
    'SyncCE': 'CEResNet (SyncCE, ws=1)',
    'released': 'CEResNet (released autograd)',
    'floor': 'CE maps only (lower bound)',
    'floor+gate': 'CE maps + gate + one pass (lower bound)',
    'floor+moments': 'CE maps + gate + both moments (ATen bound)',
}


class MapsOnly(nn.Module):
    """Stands in for a CE layer: applies maps ``M x + c`` per sample and group
    (the product every CE output needs) and nothing else. The maps are leaves
    that require grad (a train step computes ``dM`` and ``dc``)."""

    def __init__(self, layer: CELayer) -> None:
        super().__init__()
        self.groups, self.size = layer.ce.num_groups, layer.ce.group_size
        self.maps = {}

    def leaves(self, x: torch.Tensor):
        """The maps ``(N, G, d, d)`` and biases ``(N, G, d, 1)`` for ``x``'s
        batch size, dtype and device (created once, requiring grad)."""
        n = x.size(0)
        key = (n, x.dtype, x.device)
        if key not in self.maps:
            eye = torch.eye(self.size, dtype=x.dtype, device=x.device)
            self.maps[key] = (
                (0.5 * eye.repeat(n, self.groups, 1, 1)).requires_grad_(),
                x.new_zeros(n, self.groups, self.size, 1).requires_grad_())
        return self.maps[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        matrix, bias = self.leaves(x)
        # (N, C, H, W) -> (N, G, d, H*W): a free view
        x_grouped = x.reshape(n, self.groups, self.size, h * w)
        return apply_maps(matrix, bias, x_grouped, x.shape)


class _LinkedSums(torch.autograd.Function):
    """``x -> sum_l x_l`` over the last dim; the backward adds its broadcast
    gradient in place into the maps' input gradient when handed over (as a
    CE layer's moments do, :class:`~cenet_mmdet.ops.GradientLink`)."""

    @staticmethod
    def forward(ctx, x_grouped: torch.Tensor, link: GradientLink) -> torch.Tensor:
        ctx.save_for_backward(x_grouped)
        ctx.link = link
        return x_grouped.sum(-1)

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor):
        x_grouped, = ctx.saved_tensors
        handed = ctx.link.take(x_grouped) if ctx.link is not None else None
        term = grad_sums.unsqueeze(-1)  # (N, G, d, 1)
        if handed is None:
            return term.expand_as(x_grouped).clone(), None
        return handed.add_(term), None


class GatedMapsOnly(MapsOnly):
    """:class:`MapsOnly` plus the least that any exact CE layer also runs
    besides its maps: one pass over the input for per-sample statistics (a
    sum over ``H*W``; a CE layer needs sums and squares, at least one pass)
    and the AII gate's two GEMMs on them, whose ``(N, C)`` output enters the
    maps' bias, so that a train step also computes the gate's weight
    gradients and the statistics' input gradient (added in place, as CE
    does). No Newton step, no fold, no second moment."""

    def __init__(self, layer: CELayer) -> None:
        super().__init__(layer)
        self.gate = layer.ce.aii.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        matrix, bias = self.leaves(x)
        x_grouped = x.reshape(n, self.groups, self.size, h * w)  # a free view
        link = None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            link = GradientLink()
        sums = (_LinkedSums.apply(x_grouped, link) if torch.is_grad_enabled()
                else x_grouped.sum(-1))  # (N, G, d)
        bias = bias + self.gated(sums).view(n, self.groups, self.size, 1)
        return apply_maps(matrix, bias, x_grouped, x.shape, link)

    def gated(self, statistics: torch.Tensor) -> torch.Tensor:
        """The AII gate ``(N, C)`` on per-sample statistics ``(N, G, d)``."""
        reduce, norm, _, expand = self.gate
        hidden = F.layer_norm(F.linear(statistics.flatten(1), reduce.weight),
                              norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return torch.sigmoid(F.linear(hidden.relu(), expand.weight))


class MomentsMapsOnly(GatedMapsOnly):
    """:class:`GatedMapsOnly` with both per-sample moments that the AII
    branch needs, taken by CE's own ``sample_moments`` (a sum and a
    ``vector_norm``: two passes, since no PyTorch CPU op returns both in
    one fast pass; a one-pass backward ``g_s + 2 g_q x`` added in place into
    the maps' input gradient, as in CE), and the gate on the sums of squared
    deviations ``Q - S^2 / L``. What CE runs beyond it is its own glue: the
    BN scale, the fold of BN, whitening and AII into the maps, and the
    accuracy check of the unshifted eval moments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        matrix, bias = self.leaves(x)
        x_grouped = x.reshape(n, self.groups, self.size, h * w)  # a free view
        link = GradientLink() if torch.is_grad_enabled() else None
        sums, squares = sample_moments(x_grouped, False, link)  # (N, G, d) each
        deviations = torch.addcmul(squares, sums, sums, value=-1 / (h * w))
        bias = bias + self.gated(deviations).view(n, self.groups, self.size, 1)
        return apply_maps(matrix, bias, x_grouped, x.shape, link)


#: the lower-bound kinds and the module each puts in place of a CE layer
FLOORS = {'floor': MapsOnly, 'floor+gate': GatedMapsOnly,
          'floor+moments': MomentsMapsOnly}


def swap_in_maps_only(model: nn.Module, floor: type = MapsOnly) -> int:
    """Replace every CE layer by ``floor`` (:class:`MapsOnly` or
    :class:`GatedMapsOnly`); how many were replaced (an error if any CE layer
    is left)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, CELayer):
            parent_name, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child, floor(module))
            replaced += 1
    left = [name for name, module in model.named_modules()
            if isinstance(module, CELayer)]
    if left:
        raise RuntimeError(f'floor: CE layers not replaced: {left}')
    return replaced


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
        replaced = swap_in_maps_only(model, FLOORS[kind])
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
