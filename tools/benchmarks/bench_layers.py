"""Layer-level benchmark: BN vs CE vs SyncCE (world size 1) vs the released
transcription, at the channel counts and sizes of ResNet-50's CE layers.

    python tools/benchmarks/bench_layers.py [--batch 4] [--device cpu|cuda]

Prints a markdown table: median milliseconds for eval forward and for a train
forward+backward, and each ratio to BN measured in the same run.
"""
import argparse

import torch
from torch import nn

from common import machine_line, markdown_table, time_fn

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


def measure(layer: nn.Module, x: torch.Tensor, device: str, warmup: int,
            repeat: int):
    layer.eval()
    with torch.no_grad():
        eval_time = time_fn(lambda: layer(x), device, warmup, repeat)
    layer.train()
    grad = torch.randn_like(x)
    x_train = x.clone().requires_grad_()

    def step():
        layer(x_train).backward(grad)

    return eval_time, time_fn(step, device, warmup, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    kinds = ['BN', 'CE', 'SyncCE (ws=1)', 'released (autograd)']
    rows = []
    for name, channels, size, group_size in SHAPES:
        x = torch.randn(args.batch, channels, size, size, device=args.device)
        results = {}
        for kind in kinds:
            layer = build(kind, channels, group_size).to(args.device)
            results[kind] = measure(layer, x, args.device, args.warmup, args.repeat)
        base_eval, base_train = results['BN']
        for kind in kinds:
            ev, tr = results[kind]
            rows.append([f'{name} ({channels}x{size}x{size})', kind,
                         f'{ev * 1e3:.2f}', f'{ev / base_eval:.2f}x',
                         f'{tr * 1e3:.2f}', f'{tr / base_train:.2f}x'])
    print(f'Layer benchmark, batch {args.batch}; {machine_line(args.device)}\n')
    print(markdown_table(['layer', 'norm', 'eval ms', 'eval / BN', 'train fwd+bwd ms',
                          'train / BN'], rows))


if __name__ == '__main__':
    main()
