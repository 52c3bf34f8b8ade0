# Copyright (c) OpenMMLab. All rights reserved.
# MMDetection 3.3's tools/train.py, plus: the cenet_mmdet plugin is imported
# from this repository (no PYTHONPATH needed), a missing converted backbone
# checkpoint stops the run with the conversion command, so does a checkpoint
# that leaves CE layers untrained (cenet_mmdet/engine/checkpoint_check.py),
# --cfg-options data_root=DIR moves every derived data path, and launchers
# work on CPU-only machines (gloo; see cenet_mmdet/engine/cpu_dist.py).
import argparse
import os
import os.path as osp
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import cenet_mmdet  # noqa: E402,F401  (registers CE, SyncCE, CEResNet)
from cenet_mmdet.engine import (CEWeightsError,  # noqa: E402
                                 EvaluationSubsetError,
                                 finish_distributed_run, move_data_root,
                                 setup_cpu_distributed)
from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdet.utils import setup_cache_size_limit_of_dynamo  # noqa: E402

CONVERTER = 'tools/model_converters/cenet2mmdet.py'
CLS_CONVERTER = 'tools/model_converters/cls2backbone.py'
#: checkpoint prefixes that MMEngine downloads or resolves itself
_REMOTE_PREFIXES = ('http://', 'https://', 'torchvision://', 'open-mmlab://',
                    'openmmlab://', 'mmcls://', 'pavi://', 's3://', 'modelzoo://')


def parse_args():
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory.')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # When using PyTorch version >= 2.0.0, the `torch.distributed.launch`
    # will pass the `--local-rank` parameter to `tools/train.py` instead
    # of `--local_rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)

    return args


def _pretrained_checkpoints(cfg_node, prefix='cfg'):
    """Yield ``(key, checkpoint)`` of every ``init_cfg`` of type 'Pretrained'
    in a (nested) config."""
    if isinstance(cfg_node, (dict, ConfigDict)):
        for key, value in cfg_node.items():
            if key == 'init_cfg':
                init_cfgs = value if isinstance(value, list) else [value]
                for init_cfg in init_cfgs:
                    if (isinstance(init_cfg, (dict, ConfigDict))
                            and init_cfg.get('type') == 'Pretrained'
                            and init_cfg.get('checkpoint')):
                        yield f'{prefix}.{key}', init_cfg['checkpoint']
            else:
                yield from _pretrained_checkpoints(value, f'{prefix}.{key}')
    elif isinstance(cfg_node, (list, tuple)):
        for index, value in enumerate(cfg_node):
            yield from _pretrained_checkpoints(value, f'{prefix}[{index}]')


def check_pretrained_checkpoints(cfg) -> None:
    """Fail early, with the conversion command, if a local 'Pretrained'
    checkpoint of the model (e.g. the converted ImageNet CE-ResNet) is missing.
    """
    for key, checkpoint in _pretrained_checkpoints(cfg.get('model', {}),
                                                   'model'):
        if checkpoint.startswith(_REMOTE_PREFIXES) or osp.isfile(checkpoint):
            continue
        backbone = cfg.model.get('backbone', {})
        message = (
            f'The pretrained checkpoint {checkpoint!r} ({key}) does not '
            f'exist (relative paths are resolved from {os.getcwd()}). ')
        depth = backbone.get('depth')
        norm = (backbone.get('norm_cfg') or {}).get('type', 'BN')
        if backbone.get('type') == 'CEResNet' and (depth != 50 or norm not in (
                'BN', 'SyncBN')):
            with_bn = norm in ('BN', 'SyncBN')
            imagenet = (f'ce-resnet{depth}_8xb32_in1k' if with_bn
                        else f'ce-resnet{depth}-{norm.lower()}_8xb32_in1k')
            imagenet_cfg = f'configs/cenet/imagenet/{imagenet}.py'
            message += (
                'Only a CE-ResNet-50 with BN was released; for depth '
                f'{depth}{"" if with_bn else " with " + norm} pretrain one on '
                'ImageNet with this project and extract its backbone '
                '(docs/imagenet.md):\n')
            if not osp.isfile(osp.join(REPO_ROOT, imagenet_cfg)):
                message += (f'  (write {imagenet_cfg}, following '
                            'configs/cenet/imagenet/ce-resnet50-gn_8xb32_in1k.py)\n')
            message += (
                f'  bash tools/dist_train.sh {imagenet_cfg} 8\n'
                f'  python {CLS_CONVERTER} work_dirs/{imagenet}/epoch_100.pth '
                f'{checkpoint}')
            if with_bn:
                message += (f'\nAn ImageNet CE-ResNet in the released layout '
                            f'converts with:\n  python {CONVERTER} <released.pth> '
                            f'{checkpoint}')
        else:
            message += (
                'Convert the ImageNet CE-ResNet checkpoint released by the '
                f'authors to MMDetection names with:\n  python {CONVERTER} '
                f'<released.pth> {checkpoint}')
        message += ('\nTo train from scratch instead, pass --cfg-options '
                    'model.backbone.init_cfg=None')
        raise FileNotFoundError(message)


def add_ce_weights_check(cfg) -> None:
    """Add :class:`cenet_mmdet.engine.CEWeightsCheckHook` to the run (once):
    a ``load_from`` that leaves CE layers untrained stops before training."""
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(isinstance(hook, dict) and hook.get('type') == 'CEWeightsCheckHook'
               for hook in hooks):
        hooks.append(dict(type='CEWeightsCheckHook'))
    cfg.custom_hooks = hooks


def add_evaluation_subset_check(cfg) -> None:
    """Add :class:`cenet_mmdet.engine.EvaluationSubsetCheckHook` to the run
    (once): a validation set that is part of the evaluator's annotation file
    stops before training (COCO AP would count the images not run as
    misses)."""
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(isinstance(hook, dict) and
               hook.get('type') == 'EvaluationSubsetCheckHook'
               for hook in hooks):
        hooks.append(dict(type='EvaluationSubsetCheckHook'))
    cfg.custom_hooks = hooks


def main():
    args = parse_args()

    # Reduce the number of repeated compilations and improve
    # training speed.
    setup_cache_size_limit_of_dynamo()

    # load config
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    original_data_root = cfg.get('data_root')
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # data_root=DIR moves every path the config derived from its data_root
    move_data_root(cfg, original_data_root)

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        # update configs according to CLI args if args.work_dir is not None
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        # use config filename as default work_dir if cfg.work_dir is None
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    # enable automatic-mixed-precision training
    if args.amp is True:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'

    # enable automatically scaling LR
    if args.auto_scale_lr:
        if 'auto_scale_lr' in cfg and \
                'enable' in cfg.auto_scale_lr and \
                'base_batch_size' in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise RuntimeError('Can not find "auto_scale_lr" or '
                               '"auto_scale_lr.enable" or '
                               '"auto_scale_lr.base_batch_size" in your'
                               ' configuration file.')

    # resume is determined in this priority: resume from > auto_resume
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    check_pretrained_checkpoints(cfg)
    add_ce_weights_check(cfg)
    add_evaluation_subset_check(cfg)
    # CPU-only machine with a launcher: gloo process group and a CPU DDP
    # wrapper (no-op when CUDA is available or --launcher none)
    setup_cpu_distributed(cfg, args.launcher)

    # build the runner from config
    if 'runner_type' not in cfg:
        # build the default runner
        runner = Runner.from_cfg(cfg)
    else:
        # build customized runner from the registry
        # if 'runner_type' is set in the cfg
        runner = RUNNERS.build(cfg)

    # start training; a checkpoint that leaves CE untrained, or a validation
    # set that is part of the evaluator's annotation file, stops it first
    try:
        runner.train()
    except (CEWeightsError, EvaluationSubsetError) as error:
        print(f'train.py: error: {error}', file=sys.stderr, flush=True)
        sys.exit(1)

    # Destroy the process group and, in a multi-process run, exit without
    # interpreter finalization (where gloo threads can abort a finished run).
    finish_distributed_run()


if __name__ == '__main__':
    main()
