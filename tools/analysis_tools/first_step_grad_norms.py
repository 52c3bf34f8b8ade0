#!/usr/bin/env python
"""Losses and gradient norms of a detector's first training step.

    python tools/analysis_tools/first_step_grad_norms.py CONFIG \\
        [--seed 0] [--cfg-options KEY=VALUE ...]

Builds the model of CONFIG (``init_weights``, train mode, parameters drawn
after ``torch.manual_seed(seed)``), takes the first batch of the config's
train dataloader (shuffled with ``seed``), runs one loss forward and backward
(no optimizer step) and prints the losses and the gradient L2 norm of each
part of the detector. A from-scratch run whose total norm is far above the
config's ``clip_grad`` ``max_norm`` starts with every update scaled down by
``total / max_norm``; the note on ``zero_init_residual`` in docs/evidence.md
comes from this script::

    python tools/analysis_tools/first_step_grad_norms.py \\
        configs/cenet/synthetic/mask-rcnn_r50_fpn_shapes-bench.py \\
        --cfg-options model.backbone.zero_init_residual=False
"""
import argparse
import os.path as osp
import sys
from typing import Dict, Sequence

import torch
from torch import nn

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))
import cenet_mmdet  # noqa: E402,F401

PARTS = ('backbone', 'neck', 'rpn_head', 'roi_head.bbox_head',
         'roi_head.mask_head')


def gradient_norms(model: nn.Module,
                   parts: Sequence[str] = PARTS) -> Dict[str, float]:
    """L2 norm of the gradients of each named submodule that ``model`` has,
    plus ``'all'`` over every parameter of ``model`` (parameters without a
    gradient count as zero). A name ``model`` lacks is skipped; a name that
    is not a submodule path at all (e.g. a typo) is an error."""
    norms = {}
    for name in parts:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            if name in PARTS:
                continue  # e.g. a detector without a mask head
            raise ValueError(f'{type(model).__name__} has no submodule '
                             f'{name!r}') from None
        norms[name] = _norm(module)
    norms['all'] = _norm(model)
    return norms


def _norm(module: nn.Module) -> float:
    squares = [p.grad.detach().double().pow(2).sum()
               for p in module.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, as in tools/train.py')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmdet.registry import MODELS

    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(args.seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=args.seed)
    data = model.data_preprocessor(next(iter(loader)), True)
    losses = model.loss(data['inputs'], data['data_samples'])
    total, log_vars = model.parse_losses(losses)
    total.backward()
    clip = (cfg.get('optim_wrapper', {}).get('clip_grad') or {}).get('max_norm')
    print(f'config: {args.config}')
    if args.cfg_options:
        print('options: ' + ' '.join(f'{k}={v}' for k, v in
                                     args.cfg_options.items()))
    print('losses: ' + '  '.join(f'{k} {float(v):.3f}'
                                 for k, v in log_vars.items() if 'loss' in k))
    norms = gradient_norms(model)
    print('gradient L2 norm: ' + '  '.join(f'{k} {v:.1f}'
                                           for k, v in norms.items()))
    if clip:
        scale = min(1.0, clip / max(norms['all'], 1e-12))
        print(f'clip_grad max_norm {clip}: the first update is scaled by '
              f'{scale:.3g}')


if __name__ == '__main__':
    main()
