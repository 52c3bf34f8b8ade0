"""Every detector config added for issue 19 trains and tests on the synthetic
shapes set: one parametrized case per config (not a copy of it).

Each case loads the COCO config itself, keeps its backbone setting (norm, CE
type, ``norm_eval``, frozen stages), its detector, its losses and its
evaluator, and shrinks only what makes it slow on a CPU
(:func:`smoke_config`):

* data: ``tools/misc/make_synthetic_coco.py`` (3 classes, 64 px), resized to
  64 px, 2 images per training batch, testing on 2 images;
* widths: ResNet ``base_channels=8`` (stage widths 32-256), every 256-wide
  neck/head layer 16 wide, FC layers 32 wide, GN with 8 groups (the widths are
  multiples of 8, not of 32); every channel key is checked to be shrunk, so a
  new head width fails here instead of slowing the suite down;
* schedule: 2 iterations (``IterBasedTrainLoop``), lr 0.002 with gradient
  clipping, no scheduler; fewer proposals and RoIs; test score threshold 0
  (a 2-iteration model must still give detections for the metric).

The case trains in this process with MMEngine's ``Runner`` (as
``tools/train.py`` builds it), checks that every logged loss is finite and
that trainable weights moved while frozen ones did not, then runs the test
loop: the COCO metric (bbox, and segm for mask heads) must have been computed.
A few seconds per case on 2 cores.
"""
import math
import os.path as osp

import pytest
import torch

pytest.importorskip('mmdet')
import cenet_mmdet  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

from cenet_mmdet.models.layers import CELayer  # noqa: E402
from cenet_mmdet.testing.scripts import load_script  # noqa: E402
from test_configs import (CFG_DIR, COCO_CONFIGS, NEW_DETECTORS,  # noqa: E402
                          OTHER_BACKBONE_CONFIGS)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CLASSES = ('circle', 'square', 'triangle')
SIZE = 64
#: channel keys of necks and heads: MMDetection's width -> the smoke width
CHANNEL_KEYS = ('in_channels', 'out_channels', 'feat_channels',
                'conv_out_channels')
WIDTHS = {256: 16}
FPN_INPUTS = ([256, 512, 1024, 2048], [32, 64, 128, 256])  # base_channels 8
FC_WIDTH = 32
GN_GROUPS = 8


def _shrink(node):
    """Shrink a model config in place (see the module docstring)."""
    if isinstance(node, (list, tuple)):
        for item in node:
            _shrink(item)
        return
    if not isinstance(node, dict):
        return
    if node.get('type') == 'GN':
        node['num_groups'] = GN_GROUPS
    for key, value in list(node.items()):
        if key in CHANNEL_KEYS and isinstance(value, int) and value in WIDTHS:
            node[key] = WIDTHS[value]
        elif key in CHANNEL_KEYS and isinstance(value, (list, tuple)):
            if list(value) == FPN_INPUTS[0]:  # (SSD's own lists stay)
                node[key] = list(FPN_INPUTS[1])
        elif key == 'fc_out_channels':
            node[key] = FC_WIDTH
        elif key == 'num_classes':
            node[key] = len(CLASSES)
        elif key == 'sampler' and isinstance(value, dict) and 'num' in value:
            value['num'] = min(value['num'], 32)
        elif key == 'nms_pre':
            node[key] = min(value, 200)
        elif key == 'max_per_img':
            node[key] = min(value, 50)
        elif key == 'score_thr':
            node[key] = 0.0
        else:
            _shrink(value)


def _unshrunk(node, path='model'):
    """Paths of channel widths that :func:`_shrink` left above 64."""
    found = []
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            found += _unshrunk(item, f'{path}[{i}]')
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in CHANNEL_KEYS + ('fc_out_channels', ):
                if isinstance(value, (list, tuple)):  # the FPN's inputs
                    shrunk = list(value) == FPN_INPUTS[1]
                else:
                    shrunk = value <= 64
                if not shrunk:
                    found.append(f'{path}.{key}={value}')
            else:
                found += _unshrunk(value, f'{path}.{key}')
    return found


#: how each other backbone is narrowed before :func:`_shrink` (the ResNeXt
#: takes ``base_channels``; the RegNet an arch of the ResNet-50 widths / 8;
#: SSDLite's MobileNetV2 is small already, and its neck and head widths stay)
NARROW = {
    'CEResNeXt': dict(base_channels=8),
    'CERegNet': dict(arch=dict(w0=32, wa=48, wm=2.0, group_w=8, depth=5,
                               bot_mul=1.0)),
    'CEMobileNetV2': {},
}


def smoke_config(name: str, data_root: str, work_dir: str) -> Config:
    """The COCO config ``name`` on the synthetic set, shrunk for a CPU."""
    cfg = Config.fromfile(osp.join(CFG_DIR, name))
    backbone_type = cfg.model.backbone.type
    cfg.model.backbone.update(NARROW.get(backbone_type, dict(base_channels=8)),
                              init_cfg=None)
    if backbone_type == 'CERegNet':
        cfg.model.neck.in_channels = FPN_INPUTS[0]
    _shrink(cfg.model)
    leftover = _unshrunk(cfg.model.to_dict())
    if backbone_type != 'CEMobileNetV2':
        assert not leftover, f'widths not shrunk for the smoke run: {leftover}'
    data_root = data_root.rstrip('/') + '/'
    for loader, split, batch in (('train_dataloader', 'train', 2),
                                 ('val_dataloader', 'val', 1),
                                 ('test_dataloader', 'val', 1)):
        cfg[loader].update(batch_size=batch, num_workers=0,
                           persistent_workers=False)
        dataset = cfg[loader].dataset
        if dataset.type == 'RepeatDataset':  # SSDLite's 5 repeats
            cfg[loader].dataset = dataset = dataset.dataset
        dataset.update(data_root=data_root, metainfo=dict(classes=CLASSES),
                       ann_file=f'annotations/instances_{split}.json',
                       data_prefix=dict(img=f'{split}/'))
        resizes = [t for t in dataset.pipeline if t.type == 'Resize']
        assert len(resizes) == 1, dataset.pipeline
        resizes[0].scale = (SIZE, SIZE)
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = data_root + 'annotations/instances_val.json'
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2,
                         val_interval=100)
    cfg.param_scheduler = None
    cfg.optim_wrapper.optimizer.lr = 0.002
    cfg.optim_wrapper.clip_grad = dict(max_norm=35, norm_type=2)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1,
                                    log_metric_by_epoch=False)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                        interval=100, save_last=False)
    cfg.log_processor = dict(by_epoch=False)
    cfg.randomness = dict(seed=0)
    cfg.work_dir = work_dir
    cfg.experiment_name = f'smoke_{osp.splitext(name)[0]}'
    cfg.log_level = 'WARNING'
    cfg.launcher = 'none'
    cfg.env_cfg.cudnn_benchmark = False  # (SSDLite's config turns it on)
    return cfg


class LossRecorder(Hook):
    """The model's state before the first iteration (after the weights were
    initialized) and the logged losses of every training iteration."""

    def __init__(self):
        self.initial = None
        self.records = []

    def before_train(self, runner):
        self.initial = {k: v.clone()
                        for k, v in runner.model.state_dict().items()}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.records.append({k: float(torch.as_tensor(v).detach())
                             for k, v in outputs.items()})


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """4 training and 2 validation images of 64 px."""
    root = str(tmp_path_factory.mktemp('config_smoke') / 'synthetic_shapes')
    module = load_script(osp.join(REPO, 'tools', 'misc', 'make_synthetic_coco.py'),
                         'make_synthetic_coco')
    module.main([root, '--train', '4', '--val', '2', '--size', str(SIZE),
                 '--seed', '0'])
    return root


def _is_mask_config(cfg: Config) -> bool:
    metric = cfg.val_evaluator.metric
    return 'segm' in (metric if isinstance(metric, list) else [metric])


@pytest.mark.parametrize('name', NEW_DETECTORS)
def test_new_config_trains_and_tests(name, shapes, tmp_path):
    from mmengine.runner import Runner
    setting = COCO_CONFIGS[name][2]
    cfg = smoke_config(name, shapes, str(tmp_path / 'work'))
    with_mask = _is_mask_config(cfg)
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder, priority='LOWEST')
    model = runner.model
    # the config's backbone, narrowed: 14 CE layers of its kind
    layers = {n: m for n, m in model.backbone.named_modules()
              if isinstance(m, CELayer)}
    assert len(layers) == 14, sorted(layers)
    if setting.startswith('GN'):
        assert sorted(layers)[0] == 'gn1'
        assert all(type(m).__name__ == 'SyncGroupNormCE'
                   for m in layers.values())
    else:
        assert all(type(m).__name__ == 'CE' for m in layers.values())
    params = sum(p.numel() for p in model.parameters())
    assert params < 2_000_000, f'smoke model too large: {params} parameters'

    runner.train()
    before = recorder.initial

    assert len(recorder.records) == 2
    for record in recorder.records:
        losses = {k: v for k, v in record.items() if 'loss' in k}
        assert 'loss' in losses and losses['loss'] > 0, record
        assert all(math.isfinite(v) for v in losses.values()), record
        assert any(k.endswith('loss_mask') for k in losses) == with_mask
    after = model.state_dict()
    neck_key = next(k for k in after if k.startswith('neck.')
                    and k.endswith('conv.weight'))
    assert not torch.equal(after[neck_key], before[neck_key]), neck_key
    assert not torch.equal(after['backbone.layer2.0.conv2.weight'],
                           before['backbone.layer2.0.conv2.weight'])
    # the stem and stage 1 are frozen in every config (frozen_stages=1)
    stem_ce = 'backbone.gn1.ce' if setting.startswith('GN') else 'backbone.bn1.ce'
    for key in (f'{stem_ce}.running_whitening', 'backbone.conv1.weight',
                'backbone.layer1.0.conv2.weight'):
        assert torch.equal(after[key], before[key]), key
    if setting == 'CE':  # BN and CE frozen: statistics unchanged
        key = 'backbone.layer2.0.bn3.ce.running_whitening'
        assert torch.equal(after[key], before[key]), key
    else:  # CE statistics of the trained stages updated
        key = 'backbone.layer2.0.gn3.ce.running_whitening'
        assert not torch.equal(after[key], before[key]), key

    metrics = runner.test()
    keys = ['coco/bbox_mAP'] + (['coco/segm_mAP'] if with_mask else [])
    for key in keys:
        assert key in metrics, f'{key} not computed: {metrics}'
        assert math.isfinite(metrics[key]) and 0 <= metrics[key] <= 1, metrics


@pytest.mark.parametrize('name', list(OTHER_BACKBONE_CONFIGS))
def test_other_backbone_config_trains_and_tests(name, shapes, tmp_path):
    """CE in ResNeXt, RegNet and MobileNetV2: every CE layer of the config's
    backbone is built, two iterations train with finite losses, the frozen
    parts stay, the trained CE statistics move, and the test loop computes
    the COCO metric."""
    from mmengine.runner import Runner
    backbone_type = OTHER_BACKBONE_CONFIGS[name][1]
    cfg = smoke_config(name, shapes, str(tmp_path / 'work'))
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder, priority='LOWEST')
    model = runner.model
    assert type(model.backbone).__name__ == backbone_type
    layers = {n: m for n, m in model.backbone.named_modules()
              if isinstance(m, CELayer)}
    expected = {'CEResNeXt': 1 + 3 + 4 + 23, 'CERegNet': 1 + 1 + 1 + 2,
                'CEMobileNetV2': 17}[backbone_type]
    assert len(layers) == expected, sorted(layers)
    runner.train()
    before, after = recorder.initial, model.state_dict()
    assert len(recorder.records) == 2
    for record in recorder.records:
        losses = {k: v for k, v in record.items() if 'loss' in k}
        assert losses['loss'] > 0 and all(math.isfinite(v) for v in losses.values())
    ce_stats = [k for k in after if k.startswith('backbone.')
                and k.endswith('ce.running_whitening')]
    moved = [k for k in ce_stats if not torch.equal(after[k], before[k])]
    if backbone_type == 'CEMobileNetV2':  # trained from scratch: CE trains
        assert moved == ce_stats
    else:  # the paper's setting (1): BN and CE frozen
        assert moved == []
        assert torch.equal(after['backbone.conv1.weight'], before['backbone.conv1.weight'])
    metrics = runner.test()
    assert math.isfinite(metrics['coco/bbox_mAP'])
