"""Where CE's time goes: per-op profile of CE-ResNet-50 against ResNet-50.

    python tools/benchmarks/profile_ce.py [--mode train|eval] [--batch 4]
        [--size 224] [--steps 3] [--threads 2] [--top 15]

Profiles ``--steps`` calls of each model with ``torch.profiler`` (CPU) after a
warm-up, alternating the models, and prints a markdown table of the ops whose
self time grows the most from ResNet-50 to CE-ResNet-50 (milliseconds per
step), with their share of the whole difference. ``train`` is a forward +
backward step as in ``bench_backbones.py`` (MMDetection's defaults:
``norm_eval=True``, so the CE layers use running statistics); ``eval`` is a
forward under ``torch.no_grad``.

It splits CE's extra time by op (``bmm``, ``baddbmm``, ``copy_``, ...) summed
over all layers, in train or eval; which CE position costs what, timed in
place without a profiler (eval only), is ``bench_backbones.py --per-layer``.
"""
import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from common import machine_line, markdown_table, pin_threads

import cenet_mmdet  # noqa: F401
from mmdet.registry import MODELS


def step_fn(model, x, mode: str):
    def run():
        if mode == 'eval':
            with torch.no_grad():
                model(x)
        else:
            outs = model(x)
            sum(o.float().mean() for o in outs).backward()
    return run


def self_times(fn, steps: int) -> Counter:
    """Self CPU time (ms per step) of every op name over ``steps`` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    times = Counter()
    for event in prof.key_averages():
        times[event.key] += event.self_cpu_time_total / 1e3 / steps
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--mode', choices=['train', 'eval'], default='train')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--top', type=int, default=15)
    args = parser.parse_args()
    pin_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    models = {name: MODELS.build(dict(type=name, depth=50, out_indices=(0, 1, 2, 3)))
              for name in ('ResNet', 'CEResNet')}
    fns = {}
    for name, model in models.items():
        model.train(args.mode == 'train')
        fns[name] = step_fn(model, x, args.mode)
        fns[name]()  # warm-up
    totals = {name: Counter() for name in fns}
    for _ in range(2):  # alternate the models
        for name, fn in fns.items():
            totals[name].update(self_times(fn, args.steps))
    base = {k: v / 2 for k, v in totals['ResNet'].items()}
    ce = {k: v / 2 for k, v in totals['CEResNet'].items()}
    base_total, ce_total = sum(base.values()), sum(ce.values())
    extra = ce_total - base_total
    growth = sorted(((ce.get(k, 0) - base.get(k, 0), k) for k in set(ce) | set(base)),
                    reverse=True)
    rows = [[op, f'{base.get(op, 0):.1f}', f'{ce.get(op, 0):.1f}', f'{delta:+.1f}',
             f'{100 * delta / extra:.0f}%' if extra > 0 else '-']
            for delta, op in growth[:args.top]]
    print(f'Per-op self CPU time, {args.mode} step, batch {args.batch}, '
          f'{args.size}x{args.size}, {2 * args.steps} profiled steps per model; '
          f'{machine_line("cpu")}\n')
    print(f'ResNet-50 {base_total:.0f} ms/step, CE-ResNet-50 {ce_total:.0f} ms/step '
          f'(profiled, with profiler overhead): CE adds {extra:.0f} ms '
          f'({ce_total / base_total:.2f}x)\n')
    print(markdown_table(['op', 'ResNet-50 ms', 'CE-ResNet-50 ms', 'difference ms',
                          'share of CE cost'], rows))


if __name__ == '__main__':
    main()
