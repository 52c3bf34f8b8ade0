"""Backbone-level benchmark: mmdet ResNet (BN) vs CEResNet (CE / SyncCE at
world size 1) vs CE-ResNet built from the released transcription.

    python tools/benchmarks/bench_backbones.py [--depths 50 101] [--batch 4]
        [--size 224] [--device cpu|cuda]

Prints a markdown table: eval forward and train step (forward + backward)
median times, images/s, ratios to the plain ResNet of the same depth measured
in the same run, and peak memory (CUDA only).
"""
import argparse

import torch
from torch import nn

from common import machine_line, markdown_table, peak_memory_mb, time_fn

import cenet_mmdet  # noqa: F401
from cenet_mmdet.testing.released_ce import swap_in_released_ce
from mmdet.registry import MODELS


def build(kind: str, depth: int) -> nn.Module:
    cfg = dict(type='ResNet', depth=depth, out_indices=(0, 1, 2, 3))
    if kind != 'ResNet (BN)':
        cfg.update(type='CEResNet')
    if kind == 'CEResNet (SyncCE, ws=1)':
        cfg.update(ce_cfg=dict(type='SyncCE'))
    model = MODELS.build(cfg)
    if kind == 'CEResNet (released autograd)':
        swap_in_released_ce(model)
    return model


def measure(model, x, device, warmup, repeat):
    model.eval()
    with torch.no_grad():
        eval_time = time_fn(lambda: model(x), device, warmup, repeat)
    model.train()

    def step():
        outs = model(x)
        sum(o.float().mean() for o in outs).backward()

    train_time = time_fn(step, device, warmup, repeat)
    memory = peak_memory_mb(step, device)
    return eval_time, train_time, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--depths', type=int, nargs='+', default=[50, 101])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--no-released', action='store_true',
                        help='skip the (slow) released-transcription row')
    args = parser.parse_args()
    kinds = ['ResNet (BN)', 'CEResNet (CE)', 'CEResNet (SyncCE, ws=1)']
    if not args.no_released:
        kinds.append('CEResNet (released autograd)')
    rows = []
    for depth in args.depths:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        results = {}
        for kind in kinds:
            model = build(kind, depth).to(args.device)
            results[kind] = measure(model, x, args.device, args.warmup, args.repeat)
            del model
        base_eval, base_train, _ = results['ResNet (BN)']
        for kind in kinds:
            ev, tr, mem = results[kind]
            rows.append([
                f'R-{depth}', kind, f'{ev * 1e3:.0f}', f'{args.batch / ev:.1f}',
                f'{ev / base_eval:.2f}x', f'{tr * 1e3:.0f}', f'{args.batch / tr:.1f}',
                f'{tr / base_train:.2f}x',
                '-' if mem != mem else f'{mem:.0f}'
            ])
    print(f'Backbone benchmark, batch {args.batch}, {args.size}x{args.size}; '
          f'{machine_line(args.device)}\n')
    print(markdown_table([
        'depth', 'backbone', 'eval ms', 'eval img/s', 'eval / BN', 'train ms',
        'train img/s', 'train / BN', 'peak MB'
    ], rows))


if __name__ == '__main__':
    main()
