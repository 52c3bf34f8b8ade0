"""The configs of the other CE backbones: the ImageNet classifiers of
CE-ResNet-18 and CE-MobileNetV2 hold the paper's recipe, train two steps, and
their backbone goes into a detector through ``cls2backbone.py`` (built from
the config MMEngine saves in the checkpoint); the channel-analysis tools
refuse the backbones they do not cover in one line."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.runner import save_checkpoint
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

import cenet_mmdet  # noqa: F401
from cenet_mmdet import analysis
from cenet_mmdet.classification import ClsDataSample
from cenet_mmdet.classification.checkpoints import cls2backbone_main
from cenet_mmdet.models.layers import is_ce_layer

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CFG = osp.join(REPO, 'configs', 'cenet')


def test_mobilenetv2_config_holds_the_paper_recipe():
    cfg = Config.fromfile(osp.join(CFG, 'imagenet', 'ce-mobilenetv2_8xb32_in1k.py'))
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', lr=0.05, momentum=0.9,
                                               weight_decay=4e-5)
    assert cfg.param_scheduler == dict(type='CosineAnnealingLR', by_epoch=True,
                                       T_max=150, eta_min=0)
    assert cfg.train_cfg.max_epochs == 150 and cfg.train_dataloader.batch_size == 32
    assert cfg.model.backbone.type == 'CEMobileNetV2'
    assert cfg.model.backbone.norm_eval is False
    r18 = Config.fromfile(osp.join(CFG, 'imagenet', 'ce-resnet18_8xb32_in1k.py'))
    assert (r18.model.backbone.depth, r18.model.head.in_channels) == (18, 512)
    assert r18.optim_wrapper == Config.fromfile(
        osp.join(CFG, 'imagenet', 'ce-resnet50_8xb32_in1k.py')).optim_wrapper


def _train_two_steps(cfg: Config, num_classes: int = 5):
    """The classifier of ``cfg``, after two SGD steps on random images."""
    register_all_modules()
    cfg.model.head.num_classes = num_classes
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    for step in range(2):
        images = list(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
        samples = [ClsDataSample().set_gt_label(step), ClsDataSample().set_gt_label(3)]
        losses = model.train_step(dict(inputs=images, data_samples=samples),
                                  optim_wrapper)
        assert torch.isfinite(losses['loss'])
    return model


@pytest.mark.parametrize('classifier,detector,backbone_update,num_ce', [
    ('ce-resnet18_8xb32_in1k.py', 'mask-rcnn_ce-r50_fpn_2x_coco.py',
     dict(depth=18), 9),
    ('ce-mobilenetv2_8xb32_in1k.py', 'ssdlite_ce-mobilenetv2-scratch_8xb24-600e_coco.py',
     None, 17),
])
def test_classifier_trains_and_its_backbone_loads_into_the_detector(
        classifier, detector, backbone_update, num_ce, tmp_path, capsys):
    cfg = Config.fromfile(osp.join(CFG, 'imagenet', classifier))
    model = _train_two_steps(cfg)
    assert sum(is_ce_layer(m) for m in model.backbone.modules()) == num_ce
    src = str(tmp_path / 'epoch_1.pth')
    # as MMEngine's CheckpointHook saves it: the config's text in meta['cfg']
    save_checkpoint(dict(state_dict=model.state_dict(),
                         meta=dict(epoch=1, cfg=cfg.pretty_text)), src)
    dst = str(tmp_path / 'backbone.pth')
    assert cls2backbone_main([src, dst]) == 0
    out = capsys.readouterr().out
    assert f'({num_ce} CE layers), from the config saved' in out, out
    written = torch.load(dst, map_location='cpu', weights_only=True)['state_dict']

    det_cfg = Config.fromfile(osp.join(CFG, detector))
    backbone = det_cfg.model.backbone
    if backbone_update:
        backbone.update(backbone_update)
        det_cfg.model.neck.in_channels = [64, 128, 256, 512]
    backbone.init_cfg = dict(type='Pretrained', checkpoint=dst)
    det = MODELS.build(det_cfg.model)
    assert set(written) == set(det.backbone.state_dict())
    det.init_weights()  # the CE weights check passes: every CE block loaded
    loaded = det.backbone.state_dict()
    for key, value in written.items():
        assert torch.equal(loaded[key], value), key
    # a classifier saved without its config is not guessed at
    save_checkpoint(dict(state_dict=model.state_dict(), meta=dict(epoch=1)), src)
    assert cls2backbone_main([src, dst]) == 1
    assert 'cannot infer the depth' in capsys.readouterr().err or backbone_update is None


def test_analysis_tools_cover_resnet_kinds_and_refuse_mobilenet():
    register_all_modules()
    resnext = MODELS.build(dict(type='CEResNeXt', depth=50, groups=4, base_width=4,
                                base_channels=16))
    assert analysis.get_resnet_backbone(resnext) is resnext
    layers = analysis.default_ablation_layers(resnext)
    assert layers[0] == 'bn1' and all(is_ce_layer(dict(resnext.named_modules())[n])
                                      for n in layers[:4])
    mobilenet = MODELS.build(dict(type='CEMobileNetV2'))
    with pytest.raises(analysis.AnalysisError, match='need a ResNet or CEResNet '
                       r'backbone; this model\'s backbone is CEMobileNetV2') as info:
        analysis.get_resnet_backbone(mobilenet)
    assert '\n' not in str(info.value)
