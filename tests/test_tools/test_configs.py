"""configs/cenet: the paper's Mask R-CNN settings, the smoke and benchmark
configs, and the missing-checkpoint check of tools/train.py.

Each COCO config is compared with the MMDetection config it inherits: apart
from ``model.backbone`` and ``custom_imports`` the two must be identical (so
the data pipeline and the 2x schedule are MMDetection's), and every model is
built on CPU (``init_cfg=None``) and run forward.
"""
import ast
import importlib.util
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
from cenet_mmdet.models.layers import CE, SyncCE  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CFG_DIR = osp.join(REPO, 'configs', 'cenet')
MMDET_CFG = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
CUSTOM_IMPORTS = dict(imports=['cenet_mmdet'], allow_failed_imports=False)
CONVERTER = 'tools/model_converters/cenet2mmdet.py'

#: name -> (mmdet base, depth, setting)
COCO_CONFIGS = {
    'mask-rcnn_ce-r50_fpn_2x_coco.py': ('mask-rcnn_r50_fpn_2x_coco.py', 50, 'CE'),
    'mask-rcnn_syncce-r50_fpn_2x_coco.py': ('mask-rcnn_r50_fpn_2x_coco.py', 50,
                                            'SyncCE'),
    'mask-rcnn_ce-r101_fpn_2x_coco.py': ('mask-rcnn_r101_fpn_2x_coco.py', 101,
                                         'CE'),
    'mask-rcnn_syncce-r101_fpn_2x_coco.py': ('mask-rcnn_r101_fpn_2x_coco.py',
                                             101, 'SyncCE'),
}
SMOKE_CONFIGS = {
    'smoke/mask-rcnn_ce-r50_fpn_shapes-smoke.py': 'mask-rcnn_ce-r50_fpn_2x_coco.py',
    'smoke/mask-rcnn_syncce-r50_fpn_shapes-smoke.py':
    'mask-rcnn_syncce-r50_fpn_2x_coco.py',
}
BENCH_CONFIGS = ('synthetic/mask-rcnn_ce-r50_fpn_shapes-bench.py',
                 'synthetic/mask-rcnn_r50_fpn_shapes-bench.py')
ALL_CONFIGS = list(COCO_CONFIGS) + list(SMOKE_CONFIGS) + list(BENCH_CONFIGS)


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
    base = Config.fromfile(osp.join(MMDET_CFG, 'mask_rcnn', base_name)).to_dict()
    assert cfg['default_scope'] == base['default_scope'] == 'mmdet'
    with open(osp.join(CFG_DIR, name)) as f:
        source = f.read()
    assert f"_base_ = 'mmdet::mask_rcnn/{base_name}'" in source
    backbone = cfg['model'].pop('backbone')
    base_backbone = base['model'].pop('backbone')
    cfg.pop('custom_imports')
    base.pop('custom_imports', None)
    # exact resume: the one runtime addition (tests/test_tools/test_exact_resume.py)
    assert cfg.pop('custom_hooks') == [dict(type='RandomStateHook')]
    assert base.pop('custom_hooks', []) == []
    assert cfg == base  # neck, heads, data, pipelines, schedule, runtime
    # the backbone: CEResNet with everything else of MMDetection's ResNet
    checkpoint = f'checkpoints/cenet_r{depth}_imagenet_mmdet.pth'
    expected = dict(base_backbone, type='CEResNet', depth=depth,
                    init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    if setting == 'CE':
        expected.update(norm_cfg=dict(type='BN', requires_grad=False),
                        norm_eval=True, ce_cfg=dict(type='CE'))
    else:
        expected.update(norm_cfg=dict(type='SyncBN', requires_grad=True),
                        norm_eval=False,
                        ce_cfg=dict(type='SyncCE', frozen_gate=True))
    assert backbone == expected
    assert backbone['frozen_stages'] == 1 and backbone['style'] == 'pytorch'


@pytest.mark.parametrize('name', list(COCO_CONFIGS))
def test_paper_schedule_is_mmdet_2x(name):
    cfg = load(name)
    # 8 GPUs x 2 images, 24 epochs, lr 0.02, steps at epochs 16 and 22
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == 24
    assert cfg.optim_wrapper.optimizer.type == 'SGD'
    assert cfg.optim_wrapper.optimizer.lr == 0.02
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert len(steps) == 1 and steps[0].milestones == [16, 22]
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
    assert cfg.val_evaluator.metric == ['bbox', 'segm']


def _ce_layers(model):
    return {n: m for n, m in model.backbone.named_modules() if isinstance(m, CE)}


@pytest.mark.parametrize('name', list(COCO_CONFIGS))
def test_coco_model_builds_and_runs(name):
    _, depth, setting = COCO_CONFIGS[name]
    cfg = load(name)
    model = build_model(cfg)
    model.init_weights()
    ce_layers = _ce_layers(model)
    blocks_with_ce = 3 + 4 + 6 if depth == 50 else 3 + 4  # paper: first 7 for R101
    assert len(ce_layers) == 1 + blocks_with_ce
    assert 'bn1' in ce_layers and 'layer1.0.bn3' in ce_layers
    assert all(name_.endswith('bn3') or name_ == 'bn1' for name_ in ce_layers)
    bns = [m for m in model.backbone.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and not isinstance(m, CE)]
    model.train()
    if setting == 'CE':
        assert all(type(m) is CE for m in ce_layers.values())
        assert all(type(m) is nn.BatchNorm2d for m in bns) and bns
        # BN and CE frozen: no trainable parameter, eval mode under train()
        for n, p in model.backbone.named_parameters():
            if 'bn' in n or '.ce.' in n or 'downsample.1' in n:
                assert not p.requires_grad, n
        assert not any(m.training for m in ce_layers.values())
        assert not any(m.training for m in bns)
    else:
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
        for key in ('loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'):
            value = losses[key]
            value = sum(value) if isinstance(value, list) else value
            assert torch.isfinite(value), key
    # eval-mode inference, SyncBN reverted as MMEngine does without dist
    model = revert_sync_batchnorm(model).eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(
            dict(inputs=data['inputs'], data_samples=data['data_samples']),
            training=False), mode='predict')
    assert len(results) == 1 and 'masks' in results[0].pred_instances


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
    assert cfg.model.train_cfg.rcnn.sampler.num == 64
    assert cfg.train_cfg.val_interval * 2 == cfg.train_cfg.max_iters
    assert cfg.model.roi_head.bbox_head.num_classes == 6
    assert cfg.train_dataloader.batch_size == 4
    model = build_model(cfg)
    model.train()
    ce_layers = _ce_layers(model)
    if backbone.type == 'CEResNet':
        assert len(ce_layers) == 14
        assert all(type(m) is CE and m.training for m in ce_layers.values())
        assert all(p.requires_grad for m in ce_layers.values()
                   for p in m.parameters())
    else:
        assert not ce_layers


# ---------------------------------------------------------------- tools/train.py


def _train_module():
    spec = importlib.util.spec_from_file_location(
        'cenet_tools_train', osp.join(REPO, 'tools', 'train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    with pytest.raises(FileNotFoundError, match='Only a CE-ResNet-50 was released') as err:
        train.check_pretrained_checkpoints(load('mask-rcnn_ce-r101_fpn_2x_coco.py'))
    # ... and names the ImageNet config of this project and the extraction
    r101 = 'checkpoints/cenet_r101_imagenet_mmdet.pth'
    assert ('bash tools/dist_train.sh configs/cenet/imagenet/'
            'ce-resnet101_8xb32_in1k.py 8') in str(err.value)
    assert (f'python tools/model_converters/cls2backbone.py work_dirs/'
            f'ce-resnet101_8xb32_in1k/epoch_100.pth {r101}') in str(err.value)
    assert osp.isfile(osp.join(REPO, 'configs', 'cenet', 'imagenet',
                               'ce-resnet101_8xb32_in1k.py'))
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
                                    'benchmarks/synthetic_ap.sh'])
def test_shell_scripts_parse(script):
    path = osp.join(REPO, 'tools', script)
    assert subprocess.run(['bash', '-n', path]).returncode == 0
    with open(path) as f:
        text = f.read()
    if script.startswith('dist_'):
        assert '-m torch.distributed.run' in text
        assert 'PYTHONPATH="$(dirname $0)/..":$PYTHONPATH' in text
