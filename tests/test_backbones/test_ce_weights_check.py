"""A checkpoint that leaves CE layers untrained stops the run (issue #18, 1).

``CEResNet`` records which CE blocks came from a state dict
(``CEBlock.loaded``, set in ``_load_from_state_dict``, so torch's and
MMEngine's loaders both count). A ``Pretrained`` ``init_cfg`` is checked by
``CEResNet.init_weights``; a runner's ``load_from`` by ``CEWeightsCheckHook``
(added by ``tools/train.py``; the run through the tool is in
tests/test_tools/test_user_edges.py).
"""
import re
from types import SimpleNamespace

import pytest
import torch
from mmengine.runner.checkpoint import load_state_dict

import cenet_mmdet  # noqa: F401
from cenet_mmdet.engine import CEWeightsCheckHook, CEWeightsError
from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.models.layers import CE

CE_SETTING = dict(norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True)
TRAINABLE = dict(norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
                 frozen_stages=-1)


@pytest.fixture(scope='module')
def ce_state():
    """A CE-ResNet-50 state dict with non-initial CE values."""
    torch.manual_seed(0)
    model = CEResNet(depth=50)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if '.ce.' in name and tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    return model.state_dict()


@pytest.fixture(scope='module')
def bn_state():
    """A BN ResNet-50 state dict (torchvision names: what a BN classifier
    converted with cls2backbone, an mmdet ResNet or torchvision gives)."""
    torch.manual_seed(1)
    return CEResNet(depth=50, ce_cfg=None).state_dict()


def save(tmp_path, state, name='ckpt.pth'):
    path = str(tmp_path / name)
    torch.save(dict(state_dict=state, meta={}), path)
    return path


def pretrained(path, **kwargs):
    model = CEResNet(depth=50, init_cfg=dict(type='Pretrained', checkpoint=path),
                     **kwargs)
    return model


def ce_values(model):
    return {k: v.clone() for k, v in model.state_dict().items() if '.ce.' in k}


def test_bn_checkpoint_in_the_ce_setting_is_refused(tmp_path, bn_state):
    path = save(tmp_path, bn_state, 'resnet50_bn.pth')
    model = pretrained(path, **CE_SETTING)
    with pytest.raises(CEWeightsError) as info:
        model.init_weights()
    message = str(info.value)
    assert message.startswith(
        f"CEResNet: 14 of 14 CE layers (bn1, layer1.0.bn3, layer1.1.bn3, ...) got "
        f"no CE weights from checkpoint '{path}' (Pretrained init_cfg)"), message
    for fragment in ('cenet2mmdet.py', 'cls2backbone.py', 'ce_from_scratch=True'):
        assert fragment in message
    assert '\n' not in message


def test_partly_loaded_checkpoint_counts_the_layers(tmp_path, ce_state):
    dropped = ('layer1.2.bn3.ce.', 'layer3.0.bn3.ce.', 'bn1.ce.aii.gate.3.weight')
    state = {k: v for k, v in ce_state.items() if not k.startswith(dropped)}
    model = pretrained(save(tmp_path, state), **CE_SETTING)
    with pytest.raises(CEWeightsError, match=r'3 of 14 CE layers \(bn1, '
                       r'layer1\.2\.bn3, layer3\.0\.bn3\) got'):
        model.init_weights()
    assert model.unloaded_ce_layers() == ['bn1', 'layer1.2.bn3', 'layer3.0.bn3']


def test_a_wrong_shape_does_not_count_as_loaded(tmp_path, ce_state):
    state = dict(ce_state)
    state['layer2.1.bn3.ce.running_whitening'] = torch.zeros(8, 8, 8)
    model = pretrained(save(tmp_path, state), **CE_SETTING)
    with pytest.raises(CEWeightsError, match='1 of 14'):
        model.init_weights()


def test_ce_checkpoint_loads_every_layer(tmp_path, ce_state):
    model = pretrained(save(tmp_path, ce_state), **CE_SETTING)
    model.init_weights()
    assert model.unloaded_ce_layers() == []
    for key, value in ce_values(model).items():
        assert torch.equal(value, ce_state[key]), key


def test_opt_in_trains_ce_from_its_initial_values(tmp_path, bn_state):
    torch.manual_seed(2)
    model = pretrained(save(tmp_path, bn_state), ce_from_scratch=True, **TRAINABLE)
    initial = ce_values(model)
    model.init_weights()  # no error
    assert len(model.unloaded_ce_layers()) == 14
    for key, value in ce_values(model).items():  # CE untouched
        assert torch.equal(value, initial[key]), key
    for key, value in model.state_dict().items():  # the rest loaded
        if key in bn_state:
            assert torch.equal(value, bn_state[key]), key
    # and it trains: every CE parameter gets a gradient
    model.train()
    model(torch.randn(2, 3, 64, 64))[-1].square().mean().backward()
    for name, layer in model.ce_layers():
        assert all(p.grad is not None for p in layer.ce.parameters()), name


@pytest.mark.parametrize('frozen, reason', [
    (dict(norm_eval=True), 'norm_eval=True'),
    (dict(norm_cfg=dict(type='BN', requires_grad=False)), 'requires_grad=False'),
    (dict(ce_cfg=dict(type='CE', frozen_gate=True)), 'frozen_gate=True'),
    (dict(frozen_stages=1), 'a frozen stage'),
])
def test_opt_in_still_refuses_frozen_untrained_ce(tmp_path, bn_state, frozen, reason):
    options = dict(TRAINABLE, **frozen)
    model = pretrained(save(tmp_path, bn_state), ce_from_scratch=True, **options)
    with pytest.raises(CEWeightsError) as info:
        model.init_weights()
    message = str(info.value)
    assert 'ce_from_scratch=True, but' in message and reason in message
    if frozen == dict(frozen_stages=1):  # stem + layer1: 4 frozen of 14
        assert re.search(r'but 4 of them cannot train \(bn1: requires_grad=False '
                         r'or a frozen stage\)', message), message


def test_zero_init_residual_is_not_a_load():
    model = CEResNet(depth=50, zero_init_residual=True)
    model.init_weights()  # no checkpoint: nothing to check
    assert len(model.unloaded_ce_layers()) == 14


def test_mmengine_and_torch_loaders_are_both_recorded(ce_state):
    for load in (lambda m, s: load_state_dict(m, s, strict=False),
                 lambda m, s: m.load_state_dict(s)):
        model = CEResNet(depth=50)
        load(model, dict(ce_state))
        assert model.unloaded_ce_layers() == []


def hook_runner(model, load_from='det.pth', has_loaded=True):
    return SimpleNamespace(model=model, _load_from=load_from,
                           _has_loaded=has_loaded)


def test_hook_refuses_a_load_from_without_ce(bn_state):
    detector = torch.nn.Module()
    detector.backbone = CEResNet(depth=50, **CE_SETTING)
    load_state_dict(detector, {f'backbone.{k}': v for k, v in bn_state.items()})
    with pytest.raises(CEWeightsError,
                       match=r"14 of 14 .* got no CE weights from checkpoint "
                       r"'det\.pth' \(load_from\)"):
        CEWeightsCheckHook().before_train(hook_runner(detector))
    # nothing loaded by the runner (a run from scratch): no check
    CEWeightsCheckHook().before_train(hook_runner(detector, None, False))


def test_hook_accepts_ce_weights_from_init_or_load_from(ce_state, bn_state):
    detector = torch.nn.Module()
    detector.backbone = CEResNet(depth=50, **CE_SETTING)
    load_state_dict(detector.backbone, dict(ce_state))  # the Pretrained init
    # then a BN detector's load_from: CE keeps the pretrained values
    load_state_dict(detector, {f'backbone.{k}': v for k, v in bn_state.items()})
    CEWeightsCheckHook().before_train(hook_runner(detector))


def test_plain_ce_layer_records_its_load():
    layer, other = CE(32), CE(32)
    assert not layer.ce.loaded
    layer.load_state_dict(other.state_dict())
    assert layer.ce.loaded
