"""Layer-level benchmark: BN vs CE vs SyncCE (world size 1) vs the released
transcription, at the channel counts and sizes of ResNet-50's CE layers.

    python tools/benchmarks/bench_layers.py [--batch 4] [--repeat 15]
        [--threads 2] [--device cpu|cuda]

Prints a markdown table: median milliseconds for eval forward and for a train
forward+backward, and each ratio to BN as the median of per-repeat ratios with
its min-max spread (all layers of one shape interleaved in every repeat).
"""
import argparse

import torch
from torch import nn

from common import (interleaved_times, machine_line, markdown_table, median_ms,
                    pin_threads, ratio)

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.layers import CE, SyncCE
from cenet_mmdet.testing import ReleasedBNCE

# (name, channels, spatial size, group size) for a 224x224 input
SHAPES = [('stem', 64, 112, 64), ('stage1', 256, 56, 16), ('stage2', 512, 28, 16),
          ('stage3', 1024, 14, 16)]


def build(kind: str, channels: int, group_size: int) -> nn.Module:
    if kind == 'BN':
        return nn.BatchNorm2d(channels)
    if kind == 'CE':
        return CE(channels, group_size=group_size)
    if kind == 'SyncCE (ws=1)':
        return SyncCE(channels, group_size=group_size)
    return ReleasedBNCE(channels, group_size=group_size)


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
    args = parser.parse_args()
    pin_threads(args.threads)
    torch.manual_seed(0)
    kinds = ['BN', 'CE', 'SyncCE (ws=1)', 'released (autograd)']
    rows = []
    for name, channels, size, group_size in SHAPES:
        x = torch.randn(args.batch, channels, size, size, device=args.device)
        layers = {kind: build(kind, channels, group_size).to(args.device)
                  for kind in kinds}
        for layer in layers.values():
            layer.eval()
        evals = interleaved_times({k: eval_fn(m, x) for k, m in layers.items()},
                                  args.device, args.warmup, args.repeat)
        for layer in layers.values():
            layer.train()
        trains = interleaved_times({k: train_fn(m, x) for k, m in layers.items()},
                                   args.device, args.warmup, args.repeat)
        for kind in kinds:
            rows.append([f'{name} ({channels}x{size}x{size})', kind,
                         f'{median_ms(evals[kind]):.2f}', str(ratio(evals, kind, 'BN')),
                         f'{median_ms(trains[kind]):.2f}',
                         str(ratio(trains, kind, 'BN'))])
    print(f'Layer benchmark, batch {args.batch}, {args.repeat} interleaved repeats; '
          f'{machine_line(args.device)}\n')
    print(markdown_table(['layer', 'norm', 'eval ms', 'eval / BN (min-max)',
                          'train fwd+bwd ms', 'train / BN (min-max)'], rows))


if __name__ == '__main__':
    main()
