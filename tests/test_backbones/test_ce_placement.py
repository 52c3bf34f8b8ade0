"""CE in other backbones: the general route (``CEBackbone``, ``CEPlacement``)
and its named instances (CE-ResNet-18/34/152, CE-ResNeXt, CE-RegNet,
CE-MobileNetV2).

* The route on ResNet-50 is CEResNet depth 50: same keys, and with the same
  tensors the same outputs and gradients in float64, train and eval.
* Each named instance against an independent reference in float64: the plain
  MMDetection backbone with, at positions written out here by hand, torch's
  BN followed by the released block's transcription
  (:class:`~cenet_mmdet.testing.released_ce.ReleasedBNCE`). Outputs, input
  and parameter gradients, running buffers; train and eval.
"""
import copy
import re

import pytest
import torch
from mmdet.models.backbones import MobileNetV2, RegNet, ResNet, ResNeXt
from mmdet.registry import MODELS
from torch import nn

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.layers import RELEASED_CE_KEYS
from cenet_mmdet.models.backbones import (RESNET_POSITIONS, CEMobileNetV2,
                                          CERegNet, CEResNet, CEResNeXt)
from cenet_mmdet.models.layers import CE, SyncCE, is_ce_layer
from cenet_mmdet.testing.released_ce import ReleasedBNCE, released_to_plugin_keys

DTYPE = torch.float64


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial parameters and running statistics everywhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if name.endswith('running_var'):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif 'running_wm' in name or 'running_whitening' in name:
                continue  # identity: a valid whitening
            elif name.endswith('running_scale'):
                tensor.fill_(1.3)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2
                             + (1.0 if name.endswith(('bn1.weight', 'bn2.weight',
                                                      'bn3.weight', 'bn.weight'))
                                else 0.0))


def _run(model: nn.Module, x: torch.Tensor, training: bool):
    """(outputs, input grad, parameter grads by name, buffers by name)."""
    model.train(training)
    x = x.clone().requires_grad_()
    outs = model(x)
    outs = outs if isinstance(outs, (tuple, list)) else (outs, )
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i),
                           dtype=o.dtype) for i, o in enumerate(outs)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    params = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    saved = model.state_dict()  # the persistent buffers (not ce.identity)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()
               if b.is_floating_point() and n in saved}
    return [o.detach() for o in outs], x.grad, params, buffers


def _close(actual, expected, what):
    """float64 round-off, accumulated over up to 48 CE layers (a CE layer
    skipped or misplaced differs by O(1))."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9 * scale,
                               msg=lambda m: f'{what}: {m}')


# ------------------------------------------------ the route is one implementation
def test_route_on_resnet50_is_ceresnet50():
    torch.manual_seed(0)
    ours = CEResNet(depth=50, base_channels=16).to(DTYPE)
    route = MODELS.build(dict(type='CEBackbone',
                              backbone=dict(type='ResNet', depth=50, base_channels=16),
                              ce_positions=list(RESNET_POSITIONS))).to(DTYPE)
    assert isinstance(route, ResNet) and type(route).__name__ == 'ResNetWithCE'
    assert sorted(route.state_dict()) == sorted(ours.state_dict())
    _randomize(ours)
    route.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=DTYPE)
    for training in (True, False):
        expected = _run(ours, x, training)
        actual = _run(route, x, training)
        for a, e in zip(actual[0], expected[0]):
            _close(a, e, f'output (training={training})')
        _close(actual[1], expected[1], 'input grad')
        assert actual[2].keys() == expected[2].keys()
        for name in expected[2]:
            _close(actual[2][name], expected[2][name], f'grad of {name}')
        for name in expected[3]:
            _close(actual[3][name], expected[3][name], f'buffer {name}')


# ------------------------------------------------ named instances vs a reference
def _resnet_positions(blocks, norm, stages):
    return ['bn1'] + [f'layer{s}.{b}.{norm}' for s in stages
                      for b in range(blocks[s - 1])]


CASES = {
    # name: (plugin config, plain backbone, input size, positions by hand);
    # norm_eval=False: the released block in the reference is no _BatchNorm
    'ce-resnet18': (dict(type='CEResNet', depth=18, base_channels=16, norm_eval=False),
                    lambda: ResNet(depth=18, base_channels=16, norm_eval=False), 64,
                    _resnet_positions((2, 2, 2, 2), 'bn2', (1, 2, 3, 4))),
    'ce-resnet34': (dict(type='CEResNet', depth=34, base_channels=16, norm_eval=False),
                    lambda: ResNet(depth=34, base_channels=16, norm_eval=False), 64,
                    _resnet_positions((3, 4, 6, 3), 'bn2', (1, 2, 3, 4))),
    'ce-resnet152': (dict(type='CEResNet', depth=152, base_channels=8,
                          norm_eval=False),
                     lambda: ResNet(depth=152, base_channels=8, norm_eval=False), 64,
                     _resnet_positions((3, 8, 36, 3), 'bn3', (1, 2, 3))),
    'ce-resnext50': (dict(type='CEResNeXt', depth=50, groups=4, base_width=4,
                          base_channels=16, norm_eval=False),
                     lambda: ResNeXt(depth=50, groups=4, base_width=4,
                                     base_channels=16, norm_eval=False), 64,
                     _resnet_positions((3, 4, 6, 3), 'bn3', (1, 2, 3))),
    'ce-regnetx-400mf': (dict(type='CERegNet', arch='regnetx_400mf', norm_eval=False),
                         lambda: RegNet(arch='regnetx_400mf', norm_eval=False), 64,
                         _resnet_positions((1, 2, 7, 12), 'bn3', (1, 2, 3))),
    'ce-mobilenetv2': (dict(type='CEMobileNetV2', out_indices=(2, 4, 7)),
                       lambda: MobileNetV2(out_indices=(2, 4, 7)), 64,
                       [f'layer{s}.{b}.depthwise_conv.bn' for s, n in
                        zip(range(1, 8), (1, 2, 3, 4, 3, 3, 1)) for b in range(n)]),
}


def _reference(plain: nn.Module, positions, plugin: nn.Module) -> nn.Module:
    """``plain`` with torch's BN + the released block at ``positions``."""
    modules = dict(plain.named_modules())
    ce_layers = dict(plugin.named_modules())
    for name in positions:
        norm, layer = modules[name], ce_layers[name]
        assert type(norm) is nn.BatchNorm2d, name
        released = ReleasedBNCE(norm.num_features, group_size=layer.ce.group_size)
        parent, _, child = name.rpartition('.')
        setattr(modules[parent] if parent else plain, child, released)
    return plain


def _to_reference_keys(state: dict, positions) -> dict:
    """The plugin state dict with its CE layers' keys in the reference's names."""
    inverse = {v: k for k, v in RELEASED_CE_KEYS.items()}
    out = {}
    for key, value in state.items():
        prefix = next((p for p in positions if key.startswith(p + '.')), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) + 1:]
        if rest.startswith('ce.'):
            out[f'{prefix}.ce.{inverse[rest[3:]]}'] = value
        else:
            out[f'{prefix}.bn.{rest}'] = value
    return out


@pytest.mark.parametrize('case', sorted(CASES))
def test_named_instance_against_the_released_block_at_its_positions(case):
    cfg, plain_factory, size, positions = CASES[case]
    torch.manual_seed(0)
    plugin = MODELS.build(cfg).to(DTYPE)
    assert [name for name, m in plugin.named_modules() if is_ce_layer(m)] == positions
    _randomize(plugin)
    reference = _reference(plain_factory(), positions, plugin).to(DTYPE)
    reference.load_state_dict(_to_reference_keys(plugin.state_dict(), positions))
    x = torch.randn(2, 3, size, size, dtype=DTYPE)
    for training in (True, False):
        expected = _run(reference, x, training)
        actual = _run(plugin, x, training)
        for a, e in zip(actual[0], expected[0]):
            _close(a, e, f'{case} output (training={training})')
        _close(actual[1], expected[1], f'{case} input grad')
        expected_grads = _to_reference_keys(actual[2], positions)
        for name, grad in expected[2].items():
            _close(expected_grads[name], grad, f'{case} grad of {name}')
        actual_buffers = _to_reference_keys(actual[3], positions)
        for name, buffer in expected[3].items():
            _close(actual_buffers[name], buffer, f'{case} buffer {name}')


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize('positions,norm_cfg,message', [
    (['layer9'], None, "pattern 'layer9' matches no module"),
    ([r'layer1\.0\.conv1'], None, r"matches 'layer1.0.conv1' \(Conv2d\), which is not "
     'a normalizer'),
    ([r'layer1\.0\.in2'], dict(type='IN', track_running_stats=True),
     r"matches 'layer1.0.in2', which cannot carry CE: CE over IN"),
    ([r'layer1\.0\.bn['], None, 'is not a regular expression'),
])
def test_refusals_are_one_line_naming_the_pattern(positions, norm_cfg, message):
    backbone = dict(type='ResNet', depth=18, base_channels=16)
    if norm_cfg is not None:
        backbone['norm_cfg'] = norm_cfg
    with pytest.raises(ValueError, match=message) as info:
        MODELS.build(dict(type='CEBackbone', backbone=backbone,
                          ce_positions=positions))
    assert '\n' not in str(info.value)


def test_unknown_backbone_and_bad_positions_are_refused():
    with pytest.raises(KeyError, match="'NoSuchNet' is not registered"):
        MODELS.build(dict(type='CEBackbone', backbone=dict(type='NoSuchNet'),
                          ce_positions=['bn1']))
    with pytest.raises(TypeError, match='ce_positions must be a list'):
        MODELS.build(dict(type='CEBackbone', backbone=dict(type='ResNet', depth=18),
                          ce_positions='bn1'))
    with pytest.raises(ValueError, match='ce_positions is empty'):
        CEResNeXt(depth=50, ce_positions=[])
    with pytest.raises(ValueError, match='ce_cfg type must be one of'):
        CEResNeXt(depth=50, ce_cfg=dict(type='BN'))


# ------------------------------------------------------------------ composition
def test_frozen_stages_and_norm_eval_reach_the_ce_layers():
    model = CEResNeXt(depth=50, groups=4, base_width=4, base_channels=16,
                      frozen_stages=1, norm_eval=True)
    model.train()
    for name, layer in model.ce_layers():
        assert not layer.training, name  # norm_eval
        frozen = name == 'bn1' or name.startswith('layer1.')
        assert all(p.requires_grad != frozen for p in layer.parameters()), name
    mobilenet = CEMobileNetV2(frozen_stages=2, norm_eval=False).train()
    for name, layer in mobilenet.ce_layers():
        frozen = re.match(r'layer[12]\.', name) is not None
        assert layer.training != frozen, name
        assert all(p.requires_grad != frozen for p in layer.parameters()), name


def test_zero_init_residual_leaves_the_ce_gate_alone():
    model = CEResNet(depth=18, base_channels=16, zero_init_residual=True)
    model.init_weights()
    layer = model.layer1[0].bn2
    assert torch.all(layer.weight == 0)  # the BN affine: zero-init as usual
    assert layer.ce.aii.gate[1].weight.abs().sum() > 0  # LayerNorm weight: ones
    assert layer.ce.aii.gate[0].weight.abs().sum() > 0


@pytest.mark.parametrize('cfg', [CASES['ce-resnet18'][0], CASES['ce-mobilenetv2'][0],
                                 CASES['ce-regnetx-400mf'][0]])
def test_converters_keep_every_ce_layer(cfg):
    model = MODELS.build(cfg)
    num_ce = len(model.ce_layers())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert sum(type(m) is SyncCE for m in converted.modules()) == num_ce
    from mmengine.model import revert_sync_batchnorm
    reverted = revert_sync_batchnorm(converted)
    assert sum(type(m) is SyncCE for m in reverted.modules()) == num_ce
    assert sum(type(m) is CE for m in model.modules()) == num_ce
