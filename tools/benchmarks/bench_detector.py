"""Detector-level benchmark: one Mask R-CNN R-50 FPN training iteration
(forward, losses, backward, SGD step) and one inference, BN vs CE backbone.

    python tools/benchmarks/bench_detector.py [--batch 2] [--size 320]
        [--repeat 5] [--threads 2] [--device cpu|cuda]

Inputs are mmdet's synthetic `demo_mm_inputs` (random images with random boxes
and masks), identical for every model. Two pairs, each CE row compared with the
BN row of the same setting:

* frozen: mmdet's default BN backbone (requires_grad=False, norm_eval=True,
  frozen_stages=1) vs the same with CE (paper setting 1, the CE configs);
* trained: norm_eval=False, BN statistics and affine trained, vs CE with the AII
  gate and lambda frozen (paper setting 2 on one process, the SyncCE configs).

All four models are built once and timed interleaved (every repeat runs each
once, rotating the order); ratios are medians of per-repeat ratios with their
min-max spread.
"""
import argparse

import torch
from mmengine.hub import get_config

from common import (interleaved_times, machine_line, markdown_table, median_ms,
                    pin_threads, ratio)

import cenet_mmdet  # noqa: F401
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules

BASE = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'


# name -> (baseline name, backbone overrides)
KINDS = {
    'BN frozen': (None, dict()),
    'CE frozen': ('BN frozen', dict(type='CEResNet', ce_cfg=dict(type='CE'))),
    'BN trained': (None, dict(norm_cfg=dict(type='BN', requires_grad=True),
                              norm_eval=False)),
    'CE trained': ('BN trained', dict(type='CEResNet', norm_cfg=dict(type='BN', requires_grad=True),
                                      norm_eval=False,
                                      ce_cfg=dict(type='CE', frozen_gate=True))),
}


def build(kind: str, device: str):
    cfg = get_config(BASE)
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.update(KINDS[kind][1])
    return MODELS.build(cfg.model).to(device)


def make_fns(model, packed):
    """``(train_iter, infer)`` closures for one model and one input batch."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_iter():
        model.train()
        data = model.data_preprocessor(packed, training=True)
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.no_grad():
            data = model.data_preprocessor(packed, training=False)
            model(**data, mode='predict')

    return train_iter, infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, default=320)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--threads', type=int, default=0,
                        help='torch intra-op threads (default: all cores)')
    args = parser.parse_args()
    pin_threads(args.threads)
    register_all_modules()
    packed = demo_mm_inputs(args.batch, [[3, args.size, args.size]] * args.batch,
                            num_items=[4] * args.batch, with_mask=True)
    trains, infers = {}, {}
    for kind in KINDS:
        torch.manual_seed(0)
        trains[kind], infers[kind] = make_fns(build(kind, args.device), packed)
    train_times = interleaved_times(trains, args.device, args.warmup, args.repeat)
    infer_times = interleaved_times(infers, args.device, args.warmup, args.repeat)
    rows = []
    for kind in KINDS:
        base = KINDS[kind][0] or kind
        rows.append([kind, f'{median_ms(train_times[kind]) / 1e3:.2f}',
                     str(ratio(train_times, kind, base)),
                     f'{median_ms(infer_times[kind]) / 1e3:.2f}',
                     str(ratio(infer_times, kind, base))])
    print(f'Mask R-CNN R-50 FPN, batch {args.batch}, {args.size}x{args.size}, '
          f'{args.repeat} interleaved repeats; {machine_line(args.device)}\n')
    print(markdown_table(['backbone norm', 'train iter s', 'train / BN (min-max)',
                          'inference s', 'inference / BN (min-max)'], rows))


if __name__ == '__main__':
    main()
