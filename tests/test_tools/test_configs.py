"""configs/cenet: the paper's Mask R-CNN settings, the other detectors
(Faster R-CNN, Cascade Mask R-CNN, RetinaNet, GN Mask R-CNN), the GN+CE
ImageNet config, the smoke and benchmark configs, and the missing-checkpoint
check of tools/train.py.

Each COCO config is compared with the MMDetection config it inherits: apart
from ``model.backbone`` and ``custom_imports`` the two must be identical (so
the data pipeline and the schedule are MMDetection's), and every model is
built on CPU (``init_cfg=None``) and run forward. A few training iterations of
the new detectors on the synthetic set: ``test_config_smoke.py``.
"""
import ast
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet')
import mmdet  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from torch import nn  # noqa: E402

import cenet_mmdet  # noqa: E402,F401
from cenet_mmdet.models.layers import (CE, CELayer, GroupNormCE,  # noqa: E402
                                       SyncCE, SyncGroupNormCE)
from cenet_mmdet.testing.scripts import load_script  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CFG_DIR = osp.join(REPO, 'configs', 'cenet')
MMDET_CFG = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
CUSTOM_IMPORTS = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
CONVERTER = 'tools/model_converters/cenet2mmdet.py'

#: name -> (mmdet base under mmdet's configs/, depth, setting)
COCO_CONFIGS = {
    'mask-rcnn_ce-r50_fpn_2x_coco.py': ('mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py',
                                        50, 'CE'),
    'mask-rcnn_syncce-r50_fpn_2x_coco.py': (
        'mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py', 50, 'SyncCE'),
    'mask-rcnn_ce-r101_fpn_2x_coco.py': (
        'mask_rcnn/mask-rcnn_r101_fpn_2x_coco.py', 101, 'CE'),
    'mask-rcnn_syncce-r101_fpn_2x_coco.py': (
        'mask_rcnn/mask-rcnn_r101_fpn_2x_coco.py', 101, 'SyncCE'),
    # issue 19: CE-ResNet-50 in other detectors, and GN+CE
    'faster-rcnn_ce-r50_fpn_2x_coco.py': (
        'faster_rcnn/faster-rcnn_r50_fpn_2x_coco.py', 50, 'CE'),
    'cascade-mask-rcnn_ce-r50_fpn_20e_coco.py': (
        'cascade_rcnn/cascade-mask-rcnn_r50_fpn_20e_coco.py', 50, 'CE'),
    'retinanet_ce-r50_fpn_2x_coco.py': (
        'retinanet/retinanet_r50_fpn_2x_coco.py', 50, 'CE'),
    'mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py': (
        'gn/mask-rcnn_r50-contrib_fpn_gn-all_2x_coco.py', 50, 'GN+SyncCE'),
}
#: CE in other backbones: name -> (mmdet base, backbone type, checkpoint or None)
OTHER_BACKBONE_CONFIGS = {
    'mask-rcnn_ce-x101-32x4d_fpn_2x_coco.py': (
        'mask_rcnn/mask-rcnn_x101-32x4d_fpn_2x_coco.py', 'CEResNeXt',
        'checkpoints/cenet_x101-32x4d_imagenet_mmdet.pth'),
    'mask-rcnn_ce-regnetx-3.2GF_fpn_1x_coco.py': (
        'regnet/mask-rcnn_regnetx-3.2GF_fpn_1x_coco.py', 'CERegNet',
        'checkpoints/cenet_regnetx-3.2gf_imagenet_mmdet.pth'),
    'ssdlite_ce-mobilenetv2-scratch_8xb24-600e_coco.py': (
        'ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py', 'CEMobileNetV2', None),
}
#: the detectors added for issue 19 (each one trains in test_config_smoke.py)
NEW_DETECTORS = ('faster-rcnn_ce-r50_fpn_2x_coco.py',
                 'cascade-mask-rcnn_ce-r50_fpn_20e_coco.py',
                 'retinanet_ce-r50_fpn_2x_coco.py',
                 'mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py')
#: name -> (max_epochs, milestones, lr): the schedule of the mmdet base
#: (8 GPUs x 2 images; Mask R-CNN 2x is the paper's appendix F)
SCHEDULES = {
    'mask-rcnn_ce-r50_fpn_2x_coco.py': (24, [16, 22], 0.02),
    'mask-rcnn_syncce-r50_fpn_2x_coco.py': (24, [16, 22], 0.02),
    'mask-rcnn_ce-r101_fpn_2x_coco.py': (24, [16, 22], 0.02),
    'mask-rcnn_syncce-r101_fpn_2x_coco.py': (24, [16, 22], 0.02),
    'faster-rcnn_ce-r50_fpn_2x_coco.py': (24, [16, 22], 0.02),
    # MMDetection has no 2x Cascade Mask R-CNN: 20e
    'cascade-mask-rcnn_ce-r50_fpn_20e_coco.py': (20, [16, 19], 0.02),
    'retinanet_ce-r50_fpn_2x_coco.py': (24, [16, 22], 0.01),
    'mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py': (24, [16, 22], 0.02),
}
#: setting -> the pretrained backbone file of that setting's configs
CHECKPOINTS = {'CE': 'checkpoints/cenet_r{depth}_imagenet_mmdet.pth',
               'SyncCE': 'checkpoints/cenet_r{depth}_imagenet_mmdet.pth',
               'GN+SyncCE': 'checkpoints/cenet_r{depth}-gn_imagenet_mmdet.pth'}
GN32 = dict(type='GN', num_groups=32, requires_grad=True)
SMOKE_CONFIGS = {
    'smoke/mask-rcnn_ce-r50_fpn_shapes-smoke.py': 'mask-rcnn_ce-r50_fpn_2x_coco.py',
    'smoke/mask-rcnn_syncce-r50_fpn_shapes-smoke.py':
    'mask-rcnn_syncce-r50_fpn_2x_coco.py',
}
BENCH_CONFIGS = ('synthetic/mask-rcnn_ce-r50_fpn_shapes-bench.py',
                 'synthetic/mask-rcnn_r50_fpn_shapes-bench.py')
IN1K_CONFIGS = {'imagenet/ce-resnet50-gn_8xb32_in1k.py':
                'imagenet/ce-resnet50_8xb32_in1k.py'}
OTHER_IN1K_CONFIGS = ('imagenet/ce-resnet18_8xb32_in1k.py',
                      'imagenet/ce-mobilenetv2_8xb32_in1k.py',
                      'imagenet/ce-resnext101-32x4d_8xb32_in1k.py')
ALL_CONFIGS = (list(COCO_CONFIGS) + list(SMOKE_CONFIGS) + list(BENCH_CONFIGS)
               + list(IN1K_CONFIGS) + list(OTHER_BACKBONE_CONFIGS))


def strip_scope(node):
    """A copy of a config dict without the ``_scope_`` keys that MMEngine adds
    to the parts of a config inherited with ``mmdet::``."""
    if isinstance(node, dict):
        return {k: strip_scope(v) for k, v in node.items() if k != '_scope_'}
    if isinstance(node, (list, tuple)):
        return type(node)(strip_scope(v) for v in node)
    return node


def load(name: str) -> Config:
    return Config.fromfile(osp.join(CFG_DIR, name))


def build_model(cfg: Config) -> nn.Module:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    model_cfg = cfg.model.copy()
    model_cfg.backbone.init_cfg = None
    torch.manual_seed(0)
    return MODELS.build(model_cfg)


def dummy_inputs(model: nn.Module, size: int = 64, with_masks: bool = True):
    """A preprocessed batch of one ``size`` x ``size`` image with one box."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    sample = DetDataSample(metainfo=dict(
        img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
        scale_factor=(1.0, 1.0), batch_input_shape=(size, size)))
    gt = InstanceData()
    gt.bboxes = torch.tensor([[8.0, 10.0, 40.0, 44.0]])
    gt.labels = torch.tensor([0])
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[0, 10:44, 8:40] = 1
    gt.masks = BitmapMasks(mask.numpy(), size, size)
    sample.gt_instances = gt
    data = dict(inputs=[torch.randint(0, 255, (3, size, size)).float()],
                data_samples=[sample])
    return model.data_preprocessor(data, training=True)


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_first_statement_is_custom_imports(name):
    with open(osp.join(CFG_DIR, name)) as f:
        tree = ast.parse(f.read())
    first = tree.body[0]
    assert isinstance(first, ast.Assign)
    assert first.targets[0].id == 'custom_imports'
    assert load(name).custom_imports == CUSTOM_IMPORTS


@pytest.mark.parametrize('name', list(COCO_CONFIGS))
def test_coco_config_changes_only_the_backbone(name):
    base_name, depth, setting = COCO_CONFIGS[name]
    cfg = strip_scope(load(name).to_dict())
    base = Config.fromfile(osp.join(MMDET_CFG, base_name)).to_dict()
    assert cfg['default_scope'] == base['default_scope'] == 'mmdet'
    with open(osp.join(CFG_DIR, name)) as f:
        source = f.read()
    assert f"_base_ = 'mmdet::{base_name}'" in source
    backbone = cfg['model'].pop('backbone')
    base_backbone = base['model'].pop('backbone')
    cfg.pop('custom_imports')
    base.pop('custom_imports', None)
    # exact resume: the one runtime addition (tests/test_tools/test_exact_resume.py)
    assert cfg.pop('custom_hooks') == [dict(type='RandomStateHook')]
    assert base.pop('custom_hooks', []) == []
    assert cfg == base  # neck, heads, data, pipelines, schedule, runtime
    # the backbone: CEResNet with everything else of MMDetection's ResNet
    checkpoint = CHECKPOINTS[setting].format(depth=depth)
    expected = dict(base_backbone, type='CEResNet', depth=depth,
                    init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    if setting == 'CE':
        expected.update(norm_cfg=dict(type='BN', requires_grad=False),
                        norm_eval=True, ce_cfg=dict(type='CE'))
    elif setting == 'SyncCE':
        expected.update(norm_cfg=dict(type='SyncBN', requires_grad=True),
                        norm_eval=False,
                        ce_cfg=dict(type='SyncCE', frozen_gate=True))
    else:  # GN+SyncCE: MMDetection's GN (trained), CE statistics trained
        assert base_backbone['norm_cfg'] == GN32
        expected.update(norm_eval=False,
                        ce_cfg=dict(type='SyncCE', frozen_gate=True))
    assert backbone == expected
    assert backbone['frozen_stages'] == 1 and backbone['style'] == 'pytorch'


@pytest.mark.parametrize('name', list(OTHER_BACKBONE_CONFIGS))
def test_other_backbone_config_changes_only_the_backbone(name):
    """The MMDetection config with its backbone's CE instance: the same
    backbone options, frozen BN and CE where a pretrained backbone is loaded
    (the paper's setting (1)), the base's own norm where it trains from
    scratch; neck, heads, data and schedule untouched."""
    base_name, backbone_type, checkpoint = OTHER_BACKBONE_CONFIGS[name]
    cfg = strip_scope(load(name).to_dict())
    base = strip_scope(Config.fromfile(osp.join(MMDET_CFG, base_name)).to_dict())
    with open(osp.join(CFG_DIR, name)) as f:
        assert f"_base_ = 'mmdet::{base_name}'" in f.read()
    backbone = cfg['model'].pop('backbone')
    base_backbone = base['model'].pop('backbone')
    cfg.pop('custom_imports')
    base.pop('custom_imports', None)
    hooks = cfg.pop('custom_hooks')
    assert hooks == base.pop('custom_hooks', []) + [dict(type='RandomStateHook')]
    assert cfg == base
    expected = dict(base_backbone, type=backbone_type, ce_cfg=dict(type='CE'))
    if checkpoint is not None:
        expected.update(norm_cfg=dict(type='BN', requires_grad=False),
                        init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
        assert base_backbone['norm_eval'] is True
    assert backbone == expected


def test_gn_config_is_mmdet_gn_all_with_imagenet_normalization():
    """GN everywhere (MMDetection's gn-all), and the input normalization of
    the ImageNet configs whose backbone it loads (the 'contrib' GN base, not
    the Detectron one with BGR input and std 1)."""
    name = 'mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py'
    cfg = load(name)
    assert cfg.model.neck.norm_cfg == GN32
    assert cfg.model.roi_head.bbox_head.type == 'Shared4Conv1FCBBoxHead'
    assert cfg.model.roi_head.bbox_head.norm_cfg == GN32
    assert cfg.model.roi_head.mask_head.norm_cfg == GN32
    in1k = Config.fromfile(osp.join(CFG_DIR, 'imagenet',
                                    'ce-resnet50-gn_8xb32_in1k.py'))
    det, cls = cfg.model.data_preprocessor, in1k.model.data_preprocessor
    assert det.mean == cls.mean and det.std == cls.std
    assert det.bgr_to_rgb is True and cls.to_rgb is True
    # the detector loads what the ImageNet config's header says it writes
    with open(osp.join(CFG_DIR, 'imagenet', 'ce-resnet50-gn_8xb32_in1k.py')) as f:
        assert cfg.model.backbone.init_cfg.checkpoint in f.read()
    assert in1k.model.backbone.norm_cfg == cfg.model.backbone.norm_cfg


@pytest.mark.parametrize('name', list(COCO_CONFIGS))
def test_schedule_is_the_mmdet_base_schedule(name):
    max_epochs, milestones, lr = SCHEDULES[name]
    cfg = load(name)
    # 8 GPUs x 2 images; Mask R-CNN 2x: 24 epochs, lr 0.02, steps at 16 and 22
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == max_epochs
    assert cfg.optim_wrapper.optimizer.type == 'SGD'
    assert cfg.optim_wrapper.optimizer.lr == lr
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert len(steps) == 1 and steps[0].milestones == milestones
    assert steps[0].by_epoch and steps[0].gamma == 0.1
    # ... inherited, not restated
    with open(osp.join(CFG_DIR, name)) as f:
        source = f.read()
    for word in ('max_epochs', 'milestones', 'lr=', 'batch_size'):
        assert word not in source
    # the COCO pipeline
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.type == 'CocoDataset'
        assert cfg[loader].dataset.data_root == 'data/coco/'
    assert cfg.val_evaluator.type == 'CocoMetric'
    metric = ['bbox', 'segm'] if 'mask-rcnn' in name else 'bbox'
    assert cfg.val_evaluator.metric == metric


def _ce_layers(model):
    return {n: m for n, m in model.backbone.named_modules() if isinstance(m, CE)}


def _ce_positions(backbone):
    """name -> module of every module of ``backbone`` with a CE block (child
    ``ce``), whatever its normalizer."""
    return {n: m for n, m in backbone.named_modules()
            if isinstance(getattr(m, 'ce', None), nn.Module)}


def check_gn_ce_backbone(backbone, ce_type=None):
    """GN+CE at the 14 CE positions of CEResNet-50 (``gn1``, ``layerX.Y.gn3``
    of stages 1-3), plain GN (32 groups) at every other norm, no BN running
    statistics anywhere; each CE position normalizes like GN (in eval, a
    sample scaled by 3 gives the same output: BN with running statistics
    would not)."""
    positions = _ce_positions(backbone)
    expected = ['gn1'] + [f'layer{s}.{b}.gn3'
                          for s, blocks in ((1, 3), (2, 4), (3, 6))
                          for b in range(blocks)]
    assert sorted(positions) == sorted(expected)
    assert all(isinstance(m, GroupNormCE) and isinstance(m, CELayer)
               for m in positions.values())
    assert all(m.num_groups == 32 for m in positions.values())
    if ce_type is not None:
        assert all(type(m) is ce_type for m in positions.values())
    inside = tuple(f'{n}.' for n in positions)
    plain = {n: m for n, m in backbone.named_modules()
             if n not in positions and not n.startswith(inside)
             and (isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._NormBase)))}
    # per bottleneck gn1, gn2 (+ gn3 outside the CE stages), downsample GN
    assert len(plain) == 16 * 2 + 3 + 4 and all(
        type(m) is nn.GroupNorm and m.num_groups == 32 for m in plain.values())
    for key in backbone.state_dict():
        if '.ce.' not in key:
            assert not key.endswith(('running_mean', 'running_var',
                                     'num_batches_tracked')), key
    torch.manual_seed(0)
    for name in ('gn1', 'layer2.0.gn3'):
        layer = positions[name]
        was_training = layer.training
        layer.eval()
        x = torch.randn(2, layer.num_channels, 4, 4) + 0.5
        with torch.no_grad():
            torch.testing.assert_close(layer(3 * x), layer(x), rtol=1e-4,
                                       atol=1e-4)
        layer.train(was_training)


def _finite_losses(losses):
    for key, value in losses.items():
        if 'loss' not in key:
            continue
        value = sum(value) if isinstance(value, list) else value
        assert torch.isfinite(value), key


@pytest.mark.parametrize('name', list(COCO_CONFIGS))
def test_coco_model_builds_and_runs(name):
    _, depth, setting = COCO_CONFIGS[name]
    with_mask = 'mask-rcnn' in name
    cfg = load(name)
    model = build_model(cfg)
    model.init_weights()
    model.train()
    if setting == 'GN+SyncCE':
        check_gn_ce_backbone(model.backbone, SyncGroupNormCE)
        # GN in the neck and heads (MMDetection's gn-all), no BN anywhere
        for part in (model.neck, model.roi_head.bbox_head,
                     model.roi_head.mask_head):
            assert any(type(m) is nn.GroupNorm for m in part.modules())
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                       for m in model.modules())
        positions = _ce_positions(model.backbone)
        layer2_ce = positions['layer2.0.gn3']
        # GN gamma/beta trained; lambda and the gate F fixed (buffers); the
        # CE statistics updated (norm_eval=False) ...
        assert layer2_ce.weight.requires_grad and layer2_ce.bias.requires_grad
        assert [n for n, _ in layer2_ce.ce.named_parameters()] == []
        assert 'lambda_logit' in dict(layer2_ce.ce.named_buffers())
        assert layer2_ce.training
        # ... apart from the frozen stem and stage 1 (frozen_stages=1)
        assert not positions['layer1.0.gn3'].training
        assert not positions['gn1'].weight.requires_grad
    else:
        ce_layers = _ce_layers(model)
        blocks_with_ce = 3 + 4 + 6 if depth == 50 else 3 + 4  # paper: first 7 for R101
        assert len(ce_layers) == 1 + blocks_with_ce
        assert ce_layers.keys() == _ce_positions(model.backbone).keys()
        assert 'bn1' in ce_layers and 'layer1.0.bn3' in ce_layers
        assert all(name_.endswith('bn3') or name_ == 'bn1' for name_ in ce_layers)
        bns = [m for m in model.backbone.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and not isinstance(m, CE)]
    if setting == 'CE':
        assert all(type(m) is CE for m in ce_layers.values())
        assert all(type(m) is nn.BatchNorm2d for m in bns) and bns
        # BN and CE frozen: no trainable parameter, eval mode under train()
        for n, p in model.backbone.named_parameters():
            if 'bn' in n or '.ce.' in n or 'downsample.1' in n:
                assert not p.requires_grad, n
        assert not any(m.training for m in ce_layers.values())
        assert not any(m.training for m in bns)
    elif setting == 'SyncCE':
        assert all(type(m) is SyncCE for m in ce_layers.values())
        # SyncBN: MMEngine's subclass of torch's SyncBatchNorm
        assert all(isinstance(m, nn.SyncBatchNorm) for m in bns) and bns
        layer2_ce = ce_layers['layer2.0.bn3']
        # gamma/beta trained; lambda and the gate F fixed (buffers)
        assert layer2_ce.weight.requires_grad and layer2_ce.bias.requires_grad
        ce_params = [n for n, _ in layer2_ce.ce.named_parameters()]
        assert ce_params == []
        assert 'lambda_logit' in dict(layer2_ce.ce.named_buffers())
        assert layer2_ce.training  # statistics updated
        assert not ce_layers['layer1.0.bn3'].training  # frozen_stages=1
    torch.manual_seed(0)
    data = dummy_inputs(model)
    if depth == 50:  # one training forward (R101 differs only in depth)
        # no process group: SyncBN and SyncCE compute local statistics
        losses = model(**data, mode='loss')
        keys = [k for k in losses if 'loss' in k]
        if 'retinanet' in name:
            assert sorted(keys) == ['loss_bbox', 'loss_cls']
        else:
            assert {'loss_rpn_cls', 'loss_rpn_bbox'} <= set(keys)
            stage_keys = {k.split('.')[-1] for k in keys}
            assert {'loss_cls', 'loss_bbox'} <= stage_keys
            assert ('loss_mask' in stage_keys) == ('mask' in name)
        if 'cascade' in name:
            assert {'s0.loss_cls', 's2.loss_mask'} <= set(keys)
        _finite_losses(losses)
    # eval-mode inference, SyncBN reverted as MMEngine does without dist
    model = revert_sync_batchnorm(model).eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(
            dict(inputs=data['inputs'], data_samples=data['data_samples']),
            training=False), mode='predict')
    assert len(results) == 1 and 'bboxes' in results[0].pred_instances
    assert ('masks' in results[0].pred_instances) == ('mask' in name)


@pytest.mark.parametrize('name', list(SMOKE_CONFIGS))
def test_smoke_config(name):
    cfg = load(name)
    full = load(SMOKE_CONFIGS[name])
    smoke_backbone = dict(cfg.model.backbone.to_dict(), init_cfg=None)
    assert smoke_backbone == dict(full.model.backbone.to_dict(), init_cfg=None)
    assert cfg.model.backbone.init_cfg is None
    assert cfg.model.roi_head.bbox_head.num_classes == 3
    assert cfg.model.roi_head.mask_head.num_classes == 3
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.train_cfg.max_iters <= 10
    assert cfg.optim_wrapper.optimizer.lr < 0.02
    assert cfg.optim_wrapper.clip_grad.max_norm > 0
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].num_workers == 0
        assert cfg[loader].batch_size <= 2
        assert cfg[loader].dataset.type == 'CocoDataset'
        assert cfg[loader].dataset.metainfo.classes == ('circle', 'square',
                                                        'triangle')
    resize = [t for t in cfg.train_dataloader.dataset.pipeline
              if t.type == 'Resize']
    assert resize[0].scale == (128, 128)
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        assert evaluator.type == 'CocoMetric'
        assert evaluator.metric == ['bbox', 'segm']
        assert evaluator.ann_file == \
            'data/synthetic_shapes/annotations/instances_val.json'
    model = build_model(cfg)
    assert model.roi_head.bbox_head.num_classes == 3


@pytest.mark.parametrize('name', BENCH_CONFIGS)
def test_bench_configs_differ_only_in_backbone(name):
    cfg = load(name)
    other = load(BENCH_CONFIGS[1 - BENCH_CONFIGS.index(name)])
    a, b = cfg.to_dict(), other.to_dict()
    a['model'].pop('backbone')
    b['model'].pop('backbone')
    assert a == b
    backbone = cfg.model.backbone
    assert backbone.type == ('CEResNet' if 'ce-r50' in name else 'ResNet')
    assert backbone.frozen_stages == -1 and backbone.norm_eval is False
    assert backbone.norm_cfg == dict(type='BN', requires_grad=True)
    assert backbone.init_cfg is None
    # MMDetection's default; without it the first from-scratch gradients are
    # ~50x larger and clipping stalls the RoI head (see the config)
    assert backbone.zero_init_residual is True
    # the cheap RoI heads of the benchmark: 32 sampled RoIs per image, 7x7
    # mask RoI features upsampled to 14x14 masks with 14x14 targets
    assert cfg.model.train_cfg.rcnn.sampler.num == 32
    assert cfg.model.train_cfg.rcnn.mask_size == 14
    assert cfg.train_cfg.val_interval == cfg.train_cfg.max_iters
    assert cfg.model.roi_head.bbox_head.num_classes == 6
    assert cfg.train_dataloader.batch_size == 4
    model = build_model(cfg)
    model.train()
    assert model.roi_head.mask_roi_extractor.roi_layers[0].output_size == (7, 7)
    with torch.no_grad():
        masks = model.roi_head.mask_head(torch.zeros(2, 256, 7, 7))
    assert masks.shape == (2, 6, 14, 14)
    ce_layers = _ce_layers(model)
    if backbone.type == 'CEResNet':
        assert len(ce_layers) == 14
        assert all(type(m) is CE and m.training for m in ce_layers.values())
        assert all(p.requires_grad for m in ce_layers.values()
                   for p in m.parameters())
    else:
        assert not ce_layers


def test_every_coco_config_is_tested_and_in_the_model_zoo():
    """Each top-level config of configs/cenet is checked here and listed once
    in the model-zoo table of configs/cenet/README.md, with the paper's
    numbers or '-' (no paper result), and empty "ours" columns, as the
    metafile's Results are (tests/test_docs/test_metafile.py)."""
    import glob
    import re
    found = {osp.basename(p) for p in glob.glob(osp.join(CFG_DIR, '*.py'))}
    assert found == set(COCO_CONFIGS) | set(OTHER_BACKBONE_CONFIGS)
    with open(osp.join(CFG_DIR, 'README.md')) as f:
        page = f.read()
    section = page[page.index('\n## Results and Models\n'):]
    section = section[:section.index('\n## ', 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        link = re.fullmatch(r'\[config\]\(([\w.-]+\.py)\)', cells[-1])
        if line.startswith('|') and link:
            assert link.group(1) not in rows, link.group(1)
            rows[link.group(1)] = cells
    assert set(rows) == set(COCO_CONFIGS) | set(OTHER_BACKBONE_CONFIGS)
    for name, cells in rows.items():
        paper = cells[4:6]   # box AP (paper), mask AP (paper)
        for value in paper:
            assert value in ('-', 'n/a') or float(value) > 0, cells
        assert (paper[1] == 'n/a') == ('mask' not in name), cells
        if name in NEW_DETECTORS or name in OTHER_BACKBONE_CONFIGS:
            assert paper[0] == '-', cells  # the paper has no such result
        ours = cells[6:8]   # box AP (ours), mask AP (ours)
        assert all(cell in ('-', 'n/a') for cell in ours), cells


# ------------------------------------------------------------ ImageNet (GN+CE)


@pytest.mark.parametrize('name', list(IN1K_CONFIGS))
def test_in1k_gn_config_differs_only_in_the_norm(name):
    """The paper's Table 3 GN column: the BN recipe with GN (32 groups) as the
    backbone's normalizer; the CE placement and everything else unchanged."""
    cfg = load(name).to_dict()
    bn = load(IN1K_CONFIGS[name]).to_dict()
    assert cfg['model']['backbone'].pop('norm_cfg') == GN32
    assert bn['model']['backbone'].pop('norm_cfg') == dict(type='BN',
                                                            requires_grad=True)
    assert cfg == bn
    # CE statistics trained (CEResNet puts CE layers in eval under norm_eval)
    assert cfg['model']['backbone']['norm_eval'] is False
    assert cfg['model']['backbone']['ce_cfg'] == dict(type='CE')


def test_in1k_gn_classifier_trains_into_the_gn_detector(tmp_path, monkeypatch):
    """Two SGD steps of the GN+CE classifier (as ``tools/train.py`` takes
    them: ``train_step`` with an optimizer wrapper): finite losses, GN+CE at
    the CE positions, the CE statistics and the weights updated. Its
    checkpoint, extracted with ``cls2backbone`` to the file the GN Mask R-CNN
    config names, loads into that config's backbone: every tensor equal."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.optim import OptimWrapper
    from mmengine.runner import save_checkpoint

    from cenet_mmdet.classification import ClsDataSample
    from cenet_mmdet.classification.checkpoints import cls2backbone_main
    register_all_modules()
    cfg = load('imagenet/ce-resnet50-gn_8xb32_in1k.py')
    cfg.model.head.num_classes = 7
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    check_gn_ce_backbone(model.backbone, GroupNormCE)
    assert all(m.training for m in _ce_positions(model.backbone).values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01,
                                             momentum=0.9))
    losses = []
    for step in range(2):
        images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        samples = [ClsDataSample().set_gt_label(3),
                   ClsDataSample().set_gt_label(5)]
        log_vars = model.train_step(dict(inputs=list(images),
                                         data_samples=samples), optimizer)
        losses.append(float(log_vars['loss'].detach()))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    after = model.state_dict()
    for key in ('backbone.gn1.ce.running_whitening',
                'backbone.layer3.5.gn3.ce.aii.running_scale',
                'backbone.layer2.0.conv2.weight', 'backbone.layer4.2.gn3.weight',
                'head.fc.weight'):
        assert not torch.equal(after[key], before[key]), key

    # the pretraining path of the GN detector (docs/checkpoints.md): cls2backbone, then the
    # config's own init_cfg, run from the work directory
    monkeypatch.chdir(tmp_path)
    save_checkpoint(dict(state_dict=model.state_dict(), meta=dict()),
                    'epoch_100.pth')
    detector = load('mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py')
    target = detector.model.backbone.init_cfg.checkpoint
    assert cls2backbone_main(['epoch_100.pth', target]) == 0
    torch.manual_seed(1)
    backbone = MODELS.build(detector.model.backbone)
    backbone.init_weights()  # Pretrained; refuses a checkpoint without CE
    loaded = backbone.state_dict()
    trained = {k[len('backbone.'):]: v for k, v in after.items()
               if k.startswith('backbone.')}
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key
    assert not backbone.unloaded_ce_layers()


# ---------------------------------------------------------------- tools/train.py


def _train_module():
    return load_script(osp.join(REPO, 'tools', 'train.py'), 'cenet_tools_train')


def test_missing_backbone_checkpoint_names_the_converter(tmp_path, monkeypatch):
    train = _train_module()
    monkeypatch.chdir(tmp_path)
    cfg = load('mask-rcnn_syncce-r50_fpn_2x_coco.py')
    path = 'checkpoints/cenet_r50_imagenet_mmdet.pth'
    with pytest.raises(FileNotFoundError) as err:
        train.check_pretrained_checkpoints(cfg)
    assert f'python {CONVERTER} <released.pth> {path}' in str(err.value)
    os.makedirs(tmp_path / 'checkpoints')
    (tmp_path / path).write_bytes(b'')
    train.check_pretrained_checkpoints(cfg)  # present: no error
    # R101: no released checkpoint, the message says so
    with pytest.raises(FileNotFoundError,
                       match='Only a CE-ResNet-50 with BN was released') as err:
        train.check_pretrained_checkpoints(load('mask-rcnn_ce-r101_fpn_2x_coco.py'))
    # ... and names the ImageNet config of this project and the extraction
    r101 = 'checkpoints/cenet_r101_imagenet_mmdet.pth'
    assert ('bash tools/dist_train.sh configs/cenet/imagenet/'
            'ce-resnet101_8xb32_in1k.py 8') in str(err.value)
    assert (f'python tools/model_converters/cls2backbone.py work_dirs/'
            f'ce-resnet101_8xb32_in1k/epoch_100.pth {r101}') in str(err.value)
    assert osp.isfile(osp.join(REPO, 'configs', 'cenet', 'imagenet',
                               'ce-resnet101_8xb32_in1k.py'))
    assert 'write configs' not in str(err.value)  # the config exists
    # GN+CE-R50: no released checkpoint either; the GN ImageNet config, and
    # not the released-layout converter (the released code is BN + CE)
    with pytest.raises(FileNotFoundError, match='for depth 50 with GN') as err:
        train.check_pretrained_checkpoints(
            load('mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py'))
    gn = 'checkpoints/cenet_r50-gn_imagenet_mmdet.pth'
    assert ('bash tools/dist_train.sh configs/cenet/imagenet/'
            'ce-resnet50-gn_8xb32_in1k.py 8') in str(err.value)
    assert (f'python tools/model_converters/cls2backbone.py work_dirs/'
            f'ce-resnet50-gn_8xb32_in1k/epoch_100.pth {gn}') in str(err.value)
    assert CONVERTER not in str(err.value) and 'write configs' not in str(err.value)
    # GN+CE-R101: no ImageNet config yet, the message says to write one
    gn101 = load('mask-rcnn_syncce-r50_fpn_gn-all_2x_coco.py')
    gn101.model.backbone.depth = 101
    with pytest.raises(FileNotFoundError, match='write configs/cenet/imagenet/'
                       'ce-resnet101-gn_8xb32_in1k.py'):
        train.check_pretrained_checkpoints(gn101)
    # downloadable or absent init_cfg: nothing to check
    cfg.model.backbone.init_cfg = dict(type='Pretrained',
                                       checkpoint='torchvision://resnet50')
    os.remove(tmp_path / path)
    train.check_pretrained_checkpoints(cfg)
    cfg.model.backbone.init_cfg = None
    train.check_pretrained_checkpoints(cfg)


def test_train_script_stops_with_conversion_command(tmp_path):
    """What a user sees without the converted checkpoint (any directory,
    no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'train.py'),
         osp.join(CFG_DIR, 'mask-rcnn_ce-r50_fpn_2x_coco.py')],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'FileNotFoundError' in proc.stderr
    assert (f'python {CONVERTER} <released.pth> '
            'checkpoints/cenet_r50_imagenet_mmdet.pth') in proc.stderr
    assert not (tmp_path / 'work_dirs').exists()


@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh',
                                    'slurm_train.sh',
                                    'analysis_tools/readme_plot.sh'])
def test_shell_scripts_parse(script):
    path = osp.join(REPO, 'tools', script)
    assert subprocess.run(['bash', '-n', path]).returncode == 0
    with open(path) as f:
        text = f.read()
    if script.startswith('dist_'):
        assert '-m torch.distributed.run' in text
        assert 'PYTHONPATH="$(dirname $0)/..":$PYTHONPATH' in text
