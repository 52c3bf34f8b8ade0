"""The ImageNet configs, the classifier, and the checkpoint paths:

* the configs hold the paper's recipe, and 101 differs from 50 only in depth;
* the classifier builds from both configs and runs loss / predict;
* the released CE-ResNet-50 (an independent reference network, saved in the
  released format) converted with ``cenet2cls`` loads strictly into the
  classifier and gives the reference's logits;
* a classifier checkpoint goes through ``cls2backbone`` into the R-50 Mask
  R-CNN config: every backbone tensor equals the classifier's;
* converter error paths.
(The R-101 path, from a real distributed run, is in
``tests/test_tools/test_imagenet_dist_train.py``.)
"""
import copy
import math
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('mmdet')
import cenet_mmdet  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint, save_checkpoint  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from cenet_mmdet.classification import ClsDataSample, ImageClassifier  # noqa: E402
from cenet_mmdet.classification.checkpoints import (  # noqa: E402
    cenet2cls_main, cls2backbone_main)
from cenet_mmdet.models.layers import CE  # noqa: E402
from cenet_mmdet.testing.released_resnet import (  # noqa: E402
    ReleasedCEResNet, perturb_released_resnet_, released_checkpoint,
    train_released_resnet_)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CFG = osp.join(REPO, 'configs', 'cenet')
IN1K = {depth: osp.join(CFG, 'imagenet', f'ce-resnet{depth}_8xb32_in1k.py')
        for depth in (50, 101)}


def build_classifier(depth: int, num_classes: int = 1000) -> ImageClassifier:
    register_all_modules()
    cfg = Config.fromfile(IN1K[depth])
    cfg.model.head.num_classes = num_classes
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def test_configs_hold_the_paper_recipe():
    cfg = Config.fromfile(IN1K[50])
    assert cfg.default_scope == 'mmdet'
    assert cfg.optim_wrapper.optimizer == dict(
        type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert cfg.param_scheduler == dict(type='MultiStepLR', by_epoch=True,
                                       milestones=[30, 60, 90], gamma=0.1)
    assert cfg.train_cfg.max_epochs == 100
    assert cfg.train_dataloader.batch_size == 32  # x 8 GPUs = 256
    # tools/train.py --auto-scale-lr needs both keys
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=256)
    backbone = cfg.model.backbone
    assert backbone.ce_cfg == dict(type='CE')  # per-GPU covariance
    assert backbone.norm_cfg == dict(type='BN', requires_grad=True)
    # mmdet's ResNet default is norm_eval=True: BN/CE statistics would never
    # be trained
    assert backbone.norm_eval is False and backbone.frozen_stages == -1
    assert 'stage_with_ce' not in backbone  # CEResNet's default by depth
    train = [t['type'] for t in cfg.train_dataloader.dataset.pipeline]
    assert train == ['LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip',
                     'PackInputs']
    assert cfg.train_dataloader.dataset.pipeline[1].scale == 224
    test = cfg.test_dataloader.dataset.pipeline
    assert [t['type'] for t in test] == ['LoadImageFromFile', 'ResizeEdge',
                                         'CenterCrop', 'PackInputs']
    assert test[1].scale == 256 and test[1].edge == 'short'
    assert test[2].crop_size == 224
    assert cfg.val_evaluator == dict(type='Accuracy', topk=(1, 5))
    assert cfg.custom_hooks == [dict(type='SyncBuffersHook'),
                                dict(type='RandomStateHook')]
    with open(IN1K[50]) as f:
        assert [line for line in f if not line.startswith('#')][0].startswith(
            'custom_imports = ')
    # 101: the same config apart from the depth
    cfg101 = Config.fromfile(IN1K[101])
    assert cfg101.model.backbone.depth == 101
    cfg101.model.backbone.depth = 50
    assert cfg101.to_dict() == cfg.to_dict()


@pytest.mark.parametrize('depth,num_ce', [(50, 14), (101, 8)])
def test_classifier_builds_and_runs(depth, num_ce):
    model = build_classifier(depth, num_classes=7)
    assert model.backbone.num_ce_layers == num_ce
    assert not any(type(m).__name__ == 'SyncCE' for m in model.modules())
    assert isinstance(model.backbone.bn1, CE)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    samples = [ClsDataSample().set_gt_label(3), ClsDataSample().set_gt_label(5)]
    model.train()
    data = model.data_preprocessor(dict(inputs=list(images), data_samples=samples),
                                   True)
    # normalization: (RGB - mean) / std of the config
    rgb = images.flip(1).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert torch.allclose(data['inputs'], (rgb - mean) / std, atol=1e-5)
    # the loss is the cross-entropy of the training-mode logits (the same
    # batch statistics: a copy of the model, before the step)
    twin = copy.deepcopy(model)
    losses = model(**data, mode='loss')
    assert set(losses) == {'loss'}
    with torch.no_grad():
        train_logits = twin(data['inputs'], mode='tensor')
    assert train_logits.shape == (2, 7)
    expected = F.cross_entropy(train_logits, torch.tensor([3, 5]))
    torch.testing.assert_close(losses['loss'].detach(), expected, rtol=1e-5,
                               atol=0)
    # non-trivial: not the loss of uniform logits (log 7), nor of other labels
    assert abs(expected.item() - math.log(7)) > 1e-3
    assert abs(F.cross_entropy(train_logits, torch.tensor([5, 3])).item()
               - expected.item()) > 1e-3
    # every BN and CE layer trained its statistics in that forward
    norms = [m for m in model.backbone.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > num_ce
    assert all(int(m.num_batches_tracked) == 1 for m in norms)
    whitening = model.backbone.bn1.ce.running_whitening
    assert not torch.allclose(whitening, torch.eye(64).expand_as(whitening))
    # cross-entropy of the logits (independent)
    model.eval()
    with torch.no_grad():
        logits = model(data['inputs'], mode='tensor')
        assert logits.shape == (2, 7)
        predictions = model(data['inputs'], copy.deepcopy(samples), mode='predict')
    scores = torch.stack([p.pred_score for p in predictions])
    assert torch.allclose(scores, logits.softmax(1))
    assert [p.pred_label.item() for p in predictions] == logits.argmax(1).tolist()
    assert [p.gt_label.item() for p in predictions] == [3, 5]


def released50(num_classes: int) -> ReleasedCEResNet:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = ReleasedCEResNet(50, num_classes=num_classes)
    perturb_released_resnet_(model, generator)
    train_released_resnet_(model, generator, steps=2, size=64)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.1, generator=generator)
        model.fc.bias.normal_(0, 0.1, generator=generator)
    return model.eval()


def test_released_r50_loads_into_the_classifier(tmp_path, capsys):
    reference = released50(num_classes=6)
    src, dst = tmp_path / 'resnetv1ce50.pth.tar', tmp_path / 'r50_cls.pth'
    torch.save(released_checkpoint(reference, module_prefix=True), src)
    assert cenet2cls_main([str(src), str(dst)]) == 0
    assert 'head: 6 classes' in capsys.readouterr().out
    classifier = build_classifier(50, num_classes=6)
    # strict: no missing or unexpected key in the whole classifier
    load_checkpoint(classifier, str(dst), map_location='cpu', strict=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(reference).double().eval()(x)
        actual = classifier.double().eval()(x, mode='tensor')
    scale = expected.abs().max()
    assert ((actual - expected).abs().max() / scale).item() < 1e-8
    assert expected.std(0).mean() > 1e-3 * scale  # non-trivial logits


def perturbed_classifier_state(model: ImageClassifier) -> dict:
    """Distinct values for every tensor (so a wrong mapping shows)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.fill_(7)
    return model.state_dict()


def test_classifier_checkpoint_into_r50_mask_rcnn(tmp_path, capsys):
    classifier = build_classifier(50, num_classes=5)
    state = perturbed_classifier_state(classifier)
    src = str(tmp_path / 'epoch_1.pth')
    save_checkpoint(dict(state_dict=state, meta=dict(epoch=1, iter=3)), src)
    dst = str(tmp_path / 'cenet_r50_imagenet_mmdet.pth')
    assert cls2backbone_main([src, dst]) == 0
    assert 'CEResNet depth=50, stem_ce=True, stage_with_ce=(True, True, True, False)' \
        in capsys.readouterr().out
    written = torch.load(dst, map_location='cpu', weights_only=True)
    assert written['meta']['dropped_keys'] == ['head.fc.weight', 'head.fc.bias']

    register_all_modules()
    for name in ('mask-rcnn_ce-r50_fpn_2x_coco.py',
                 'mask-rcnn_syncce-r50_fpn_2x_coco.py'):
        cfg = Config.fromfile(osp.join(CFG, name))
        assert cfg.model.backbone.init_cfg.checkpoint == \
            'checkpoints/cenet_r50_imagenet_mmdet.pth'
        cfg.model.backbone.init_cfg.checkpoint = dst
        detector = MODELS.build(cfg.model)
        detector_keys = set(detector.backbone.state_dict())
        assert set(written['state_dict']) == detector_keys  # none missing/unexpected
        detector.init_weights()
        loaded = detector.backbone.state_dict()
        for key in detector_keys:
            assert torch.equal(loaded[key], state['backbone.' + key]), (name, key)


def test_converter_errors(tmp_path, capsys):
    # a backbone-only file given to cls2backbone
    backbone = build_classifier(50, num_classes=5).backbone
    src = str(tmp_path / 'backbone.pth')
    torch.save(dict(state_dict=backbone.state_dict()), src)
    dst = tmp_path / 'out.pth'
    assert cls2backbone_main([src, str(dst)]) == 1
    err = capsys.readouterr().err
    assert 'no "backbone.*" keys' in err and 'backbone checkpoint already' in err
    assert not dst.exists()
    # a classifier whose backbone lacks a key
    classifier = build_classifier(50, num_classes=5)
    state = classifier.state_dict()
    del state['backbone.layer2.1.bn3.ce.running_whitening']
    torch.save(dict(state_dict=state), src)
    assert cls2backbone_main([src, str(dst)]) == 1
    assert '1 missing keys (layer2.1.bn3.ce.running_whitening)' in capsys.readouterr().err
    assert not dst.exists()
    # a released checkpoint without its fc cannot become a classifier
    reference = ReleasedCEResNet(50, num_classes=4)
    checkpoint = released_checkpoint(reference)
    del checkpoint['state_dict']['fc.weight']
    torch.save(checkpoint, src)
    assert cenet2cls_main([src, str(dst)]) == 1
    assert 'no classifier (fc.weight / fc.bias)' in capsys.readouterr().err
    assert not dst.exists()
    # missing source
    assert cls2backbone_main([str(tmp_path / 'none.pth'), str(dst)]) == 1
    assert 'source checkpoint not found' in capsys.readouterr().err
