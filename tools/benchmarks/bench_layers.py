"""Layer-level benchmark: BN vs CE vs SyncCE (world size 1) vs the released
transcription vs the lower bounds, at the channel counts and sizes of
ResNet-50's CE layers.

    python tools/benchmarks/bench_layers.py [--batch 4] [--repeat 15]
        [--threads 2] [--device cpu|cuda]
        [--kinds BN CE SyncCE released floor floor+gate floor+moments]
        [--train-stats batch|running] [--spatial 4]

Prints a markdown table: median milliseconds for eval forward and for a train
forward+backward, and each ratio to BN as the median of per-repeat ratios with
its min-max spread (all layers of one shape interleaved in every repeat), then
the totals over the 14 CE positions of CE-ResNet-50.

The train column uses batch statistics (the layers in training mode) by
default; ``--train-stats running`` times forward+backward with running
statistics instead, which is what ``bench_backbones.py``'s train step runs
(MMDetection's ResNet defaults to ``norm_eval=True``). ``--spatial S`` runs
every shape at ``S x S`` instead of its own size: at ``S = 4`` the times are
the layers' fixed, size-independent cost (at ``S = 2`` some ``(image,
channel)`` of the random input have a mean too large for their 4 values'
spread, and CE's eval takes its moments a second time, about a shift).

``floor``, ``floor+gate`` and ``floor+moments`` are the layers of the lower
bounds (``floors.py``, the same as in ``bench_backbones.py``): CE minus
``floor`` is what the statistics, the gate and the fold cost per layer, CE
minus ``floor+moments`` what CE's own glue costs (BN scale, fold, check), at
``--spatial 4`` its fixed cost.

One layer alone shows a layer's own cost; where the time goes inside the
network is ``bench_backbones.py --per-layer`` (per CE position) and
``profile_ce.py`` (per op).
"""
import argparse

import torch
from torch import nn

from common import (interleaved_times, machine_line, markdown_table, median_ms,
                    pin_threads, ratio)
from floors import FLOORS, LABELS

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.layers import CE, SyncCE
from cenet_mmdet.testing import ReleasedBNCE

#: ``--kinds`` names and their labels in the table, in the table's order
#: (BN first: the baseline; then the lower bounds of ``floors.py``)
KINDS = {'BN': 'BN', 'CE': 'CE', 'SyncCE': 'SyncCE (ws=1)',
         'released': 'released (autograd)', **LABELS}

# (name, channels, spatial size, group size, CE layers of this shape in
# CE-ResNet-50) for a 224x224 input
SHAPES = [('stem', 64, 112, 64, 1), ('stage1', 256, 56, 16, 3),
          ('stage2', 512, 28, 16, 4), ('stage3', 1024, 14, 16, 6)]


def build(kind: str, channels: int, group_size: int) -> nn.Module:
    """The layer of ``kind`` (a key of :data:`KINDS`)."""
    if kind in FLOORS:
        return FLOORS[kind](CE(channels, group_size=group_size))
    builders = {
        'BN': lambda: nn.BatchNorm2d(channels),
        'CE': lambda: CE(channels, group_size=group_size),
        'SyncCE': lambda: SyncCE(channels, group_size=group_size),
        'released': lambda: ReleasedBNCE(channels, group_size=group_size),
    }
    return builders[kind]()


def eval_fn(layer: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def train_fn(layer: nn.Module, x: torch.Tensor):
    grad = torch.randn_like(x)
    x_train = x.clone().requires_grad_()

    def run():
        layer(x_train).backward(grad)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=15)
    parser.add_argument('--threads', type=int, default=0,
                        help='torch intra-op threads (default: all cores)')
    parser.add_argument('--train-stats', choices=['batch', 'running'], default='batch',
                        help='statistics of the train column (running: norm_eval=True)')
    parser.add_argument('--spatial', type=int, default=0,
                        help='run every shape at this height and width (default: its own)')
    parser.add_argument('--kinds', nargs='+', choices=list(KINDS),
                        default=['BN', 'CE', 'SyncCE', 'released'],
                        help='layers to time (default: all but the floors; BN, '
                        'the baseline, is always timed)')
    args = parser.parse_args()
    pin_threads(args.threads)
    torch.manual_seed(0)
    kinds = ['BN'] + [kind for kind in KINDS if kind in args.kinds and kind != 'BN']
    rows = []
    # per kind: sum over the CE layers of CE-ResNet-50 of the median ms
    totals = {kind: [0.0, 0.0] for kind in kinds}
    for name, channels, size, group_size, count in SHAPES:
        size = args.spatial or size
        x = torch.randn(args.batch, channels, size, size, device=args.device)
        layers = {kind: build(kind, channels, group_size).to(args.device)
                  for kind in kinds}
        for layer in layers.values():
            layer.eval()
        evals = interleaved_times({k: eval_fn(m, x) for k, m in layers.items()},
                                  args.device, args.warmup, args.repeat)
        for layer in layers.values():
            layer.train(args.train_stats == 'batch')
        trains = interleaved_times({k: train_fn(m, x) for k, m in layers.items()},
                                   args.device, args.warmup, args.repeat)
        for kind in kinds:
            eval_ms, train_ms = median_ms(evals[kind]), median_ms(trains[kind])
            totals[kind][0] += count * eval_ms
            totals[kind][1] += count * train_ms
            rows.append([f'{name} ({channels}x{size}x{size})', KINDS[kind],
                         f'{eval_ms:.2f}', str(ratio(evals, kind, 'BN')),
                         f'{train_ms:.2f}', str(ratio(trains, kind, 'BN'))])
    print(f'Layer benchmark, batch {args.batch}, {args.repeat} interleaved repeats, '
          f'train with {args.train_stats} statistics; {machine_line(args.device)}\n')
    print(markdown_table(['layer', 'norm', 'eval ms', 'eval / BN (min-max)',
                          'train fwd+bwd ms', 'train / BN (min-max)'], rows))
    total_rows = [[KINDS[kind], f'{evals_ms:.2f}', f'{trains_ms:.2f}']
                  for kind, (evals_ms, trains_ms) in totals.items()]
    counts = [count for *_, count in SHAPES]
    print(f'\nThe {sum(counts)} CE positions of CE-ResNet-50 in total '
          f'({" + ".join(map(str, counts))} layers, '
          "each shape's median ms times its count):\n")
    print(markdown_table(['norm', 'eval ms', 'train fwd+bwd ms'], total_rows))


if __name__ == '__main__':
    main()
