"""How many ATen ops a CE layer dispatches: the CPU-measurable proxy of its GPU
launch cost (on a GPU nearly every op is one kernel launch of a few
microseconds, whatever the tensor size).

Counts every op that reaches the dispatcher (a ``TorchDispatchMode``) in one
layer call, per mode:

* ``train``: a training step, forward and backward, parameters trainable;
* ``frozen``: the paper's setting (1), eval mode with the layer's parameters
  frozen (``requires_grad=False``), forward and the input's backward;
* ``eval``: eval mode under ``torch.no_grad()``.

"total" is every op, "ops" leaves out views, reshapes and ``detach`` (no
kernel). SyncCE runs in two gloo processes (rank 0's count, its collectives
included). ``--resnet`` adds a CE-ResNet-50 against a ResNet-50 (the whole
backbone, ``base_channels=16``, 64 px).

    python tools/benchmarks/dispatch_count.py
    python tools/benchmarks/dispatch_count.py --resnet
    python tools/benchmarks/dispatch_count.py --kernels --device cuda   # on a GPU

``--kernels`` (CUDA only) counts instead the CUDA kernels ``torch.profiler``
records per iteration of a CE-ResNet-50 and a ResNet-50 (batch 2, 224 px),
eager and compiled (``torch.compile``, after a warm-up call), in each mode.
"""
import argparse
import os.path as osp
import sys
import tempfile
from typing import Callable, Dict, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

MODES = ('train', 'frozen', 'eval')
LAYERS = ('BN', 'CE', 'GN', 'GN+CE', 'SyncCE')
SHAPE = (4, 256, 14, 14)


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched inside it: ``total`` and ``ops`` (no views,
    no ``detach``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.ops = 0
        self.names: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        if not func.is_view and func.__name__ != 'detach.default':
            self.ops += 1
            self.names[func.__name__] = self.names.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


def make_layer(kind: str) -> nn.Module:
    """The layer ``kind`` for 256 channels, with running statistics from one
    training batch."""
    import cenet_mmdet  # noqa: F401
    from cenet_mmdet.models.layers import CE, GroupNormCE, SyncCE
    torch.manual_seed(0)
    layer = {'BN': lambda: nn.BatchNorm2d(256),
             'CE': lambda: CE(256),
             'GN': lambda: nn.GroupNorm(32, 256),
             'GN+CE': lambda: GroupNormCE(256, num_groups=32),
             'SyncCE': lambda: SyncCE(256)}[kind]()
    with torch.no_grad():
        layer.train()(torch.randn(SHAPE))
    return layer


def count(run: Callable[[nn.Module, torch.Tensor], torch.Tensor], layer: nn.Module,
          mode: str, x: torch.Tensor) -> OpCounter:
    """The ops of one call of ``run`` in ``mode`` (its backward too, except in
    eval)."""
    layer.train(mode == 'train')
    for param in layer.parameters():
        param.requires_grad_(mode == 'train')
    x = x.detach().requires_grad_(mode != 'eval')
    with torch.no_grad():
        grad = torch.randn_like(run(layer, x.detach()))
    counter = OpCounter()
    with torch.set_grad_enabled(mode != 'eval'), counter:
        out = run(layer, x)
        if mode != 'eval':
            out.backward(grad)
    return counter


def _layer_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def count_layer(kind: str, mode: str) -> Tuple[int, int]:
    """``(total, ops)`` of one layer ``kind`` in ``mode``, in this process."""
    counter = _count_layer(kind, mode)
    return counter.total, counter.ops


def _count_layer(kind: str, mode: str) -> OpCounter:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    return count(_layer_call, make_layer(kind), mode, x)


def _sync_counts(rank: int, world_size: int):
    for mode in MODES:
        yield f'syncce-{mode}', count_layer('SyncCE', mode)


def count_sync_ce() -> Dict[str, Tuple[int, int]]:
    """SyncCE's counts on rank 0 of two gloo processes, by mode."""
    from cenet_mmdet.testing.dist import run_process_group
    with tempfile.TemporaryDirectory() as workdir:
        run = run_process_group(_sync_counts, workdir, timeout=120)
        run.check_clean_exit()
        return {mode: tuple(run.get(f'syncce-{mode}')[0]) for mode in MODES}


def _backbone_call(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return backbone(x)[-1]


def count_resnet(mode: str) -> Dict[str, Tuple[int, int]]:
    """``(total, ops)`` of a ResNet-50 and a CE-ResNet-50 (base_channels 16,
    64 px input, batch 2)."""
    import cenet_mmdet  # noqa: F401
    from mmdet.models.backbones import ResNet
    from cenet_mmdet.models.backbones import CEResNet
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    counts = {}
    for name, build in (('ResNet-50', lambda: ResNet(50, base_channels=16,
                                                     norm_eval=False)),
                        ('CE-ResNet-50', lambda: CEResNet(50, base_channels=16,
                                                          norm_eval=False))):
        torch.manual_seed(0)
        backbone = build()
        with torch.no_grad():
            backbone.train()
            backbone(x)
        counter = count(_backbone_call, backbone, mode, x)
        counts[name] = (counter.total, counter.ops)
    return counts


def layer_table(sync: bool = True) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """``{layer: {mode: (total, ops)}}``."""
    table = {kind: {mode: count_layer(kind, mode) for mode in MODES}
             for kind in LAYERS if kind != 'SyncCE'}
    if sync:
        table['SyncCE'] = count_sync_ce()
    return table


def markdown(table: Dict[str, Dict[str, Tuple[int, int]]], first: str) -> str:
    lines = [f'| {first} | train step | frozen (setting 1) | eval, no grad |',
             '|---|---|---|---|']
    for name, row in table.items():
        cells = [f'{row[mode][1]} ({row[mode][0]})' for mode in MODES]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def count_cuda_kernels(run: Callable[[], object]) -> int:
    """CUDA kernels ``torch.profiler`` records during one call of ``run``."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events()
               if event.device_type == torch.autograd.DeviceType.CUDA)


def kernel_table(device: str) -> Dict[str, Dict[str, int]]:
    """``{'CE-ResNet-50 eager': {mode: kernels}, ...}`` on ``device``."""
    import cenet_mmdet  # noqa: F401
    from mmdet.models.backbones import ResNet
    from cenet_mmdet.models.backbones import CEResNet
    x = torch.randn(2, 3, 224, 224, device=device)
    table: Dict[str, Dict[str, int]] = {}
    for name, build in (('ResNet-50', lambda: ResNet(50, norm_eval=False)),
                        ('CE-ResNet-50', lambda: CEResNet(50, norm_eval=False))):
        for compiled in (False, True):
            row = table.setdefault(f'{name} {"compiled" if compiled else "eager"}', {})
            for mode in MODES:
                torch.manual_seed(0)
                backbone = build().to(device)
                backbone.train(mode == 'train')
                for param in backbone.parameters():
                    param.requires_grad_(mode == 'train')
                model = torch.compile(backbone) if compiled else backbone
                inputs = x.clone().requires_grad_(mode != 'eval')

                def step():
                    with torch.set_grad_enabled(mode != 'eval'):
                        out = model(inputs)[-1]
                        if mode != 'eval':
                            out.sum().backward()
                step()  # warm-up (and compile)
                row[mode] = count_cuda_kernels(step)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--resnet', action='store_true',
                        help='also count a CE-ResNet-50 and a ResNet-50')
    parser.add_argument('--no-sync', action='store_true',
                        help='leave out SyncCE (no gloo processes)')
    parser.add_argument('--names', metavar='LAYER',
                        help='print the op names of LAYER (e.g. CE) by mode')
    parser.add_argument('--kernels', action='store_true',
                        help='count CUDA kernels per iteration of a CE-ResNet-50 '
                        'and a ResNet-50, eager and compiled (needs --device cuda)')
    parser.add_argument('--device', default='cpu',
                        help='device of --kernels (cuda). Default: cpu')
    args = parser.parse_args(argv)
    if args.kernels:
        if not args.device.startswith('cuda') or not torch.cuda.is_available():
            parser.error('--kernels counts CUDA kernels: it needs --device cuda '
                         'on a machine with a GPU')
        table = kernel_table(args.device)
        print(f'CUDA kernels per iteration, batch 2, 224 px, '
              f'{torch.cuda.get_device_name(args.device)}')
        print('| backbone | train step | frozen (setting 1) | eval, no grad |')
        print('|---|---|---|---|')
        for name, row in table.items():
            print(f'| {name} | ' + ' | '.join(str(row[m]) for m in MODES) + ' |')
        return 0
    if args.device != 'cpu':
        parser.error('the op counts run on the CPU (they do not depend on the '
                     'device); --device is for --kernels')
    torch.set_num_threads(1)
    print(f'ops per layer call, input {SHAPE}: ops without views (all ops)')
    print(markdown(layer_table(sync=not args.no_sync), 'layer'))
    if args.resnet:
        table = {}
        for mode in MODES:
            for name, value in count_resnet(mode).items():
                table.setdefault(name, {})[mode] = value
        print()
        print(markdown(table, 'backbone (base_channels 16, 64 px)'))
    if args.names:
        for mode in MODES:
            counter_names = _count_layer(args.names, mode).names
            print(f'\n{args.names} {mode}: ' + ', '.join(
                f'{name} x{n}' for name, n in sorted(counter_names.items())))
    return 0


if __name__ == '__main__':
    sys.exit(main())
