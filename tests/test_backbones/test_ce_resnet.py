"""CEResNet: placement, ResNet options, freezing, norm_eval, init, errors.

Modelled on MMDetection's tests/test_models/test_backbones/test_resnet.py.
Inputs are tiny (2x3x64x64) to keep the file fast on CPU.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import cenet_mmdet  # noqa: F401  (registers CE, SyncCE, CEResNet)
from cenet_mmdet.models.backbones import CEBottleneck, CEResNet
from cenet_mmdet.models.layers import (CE, CELayer, GroupNormCE, SyncCE,
                                       SyncGroupNormCE)
from mmdet.models.backbones import ResNet
from mmdet.models.backbones.resnet import Bottleneck
from mmdet.registry import MODELS

SIZE = 64


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def check_norm_state(modules, train_state: bool) -> bool:
    """True if every BN-like layer (CE included) and its CE block is in
    ``train_state`` (mmdet's helper, extended to the CE child)."""
    for mod in modules:
        if isinstance(mod, (_BatchNorm, CELayer)):
            if mod.training != train_state:
                return False
            if isinstance(mod, CELayer) and any(m.training != train_state
                                                for m in mod.ce.modules()):
                return False
    return True


def ce_names(model: nn.Module):
    return [name for name, m in model.named_modules() if isinstance(m, CELayer)]


#: the backbone's norm_cfg for the tests that run over BN and GN, and the
#: name of the CE layers' normalizer in the state dict
NORMS = {
    'BN': (dict(type='BN', requires_grad=True), 'bn'),
    'GN': (dict(type='GN', num_groups=8, requires_grad=True), 'gn'),
}


def sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    """One training-mode forward, backward and SGD step (with weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    outs = model(x)
    loss = sum((out * torch.randn_like(out)).sum() for out in outs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------- structure
def test_registered_in_mmdet_scope_and_is_a_resnet():
    model = MODELS.build(dict(type='CEResNet', depth=50))
    assert type(model) is CEResNet and isinstance(model, ResNet)
    assert MODELS.get('CEResNet') is CEResNet


def test_depth50_released_placement():
    model = CEResNet(depth=50)
    # stem: CE replaces norm1, name kept, one group of 64 channels
    assert model.norm1_name == 'bn1' and isinstance(model.bn1, CE)
    assert model.bn1.ce.num_groups == 1 and model.bn1.ce.group_size == 64
    for stage, num_blocks in enumerate((3, 4, 6, 3), start=1):
        layer = getattr(model, f'layer{stage}')
        assert len(layer) == num_blocks
        for block in layer:
            with_ce = stage <= 3
            assert isinstance(block.bn3, CE) == with_ce
            assert block.norm3 is block.bn3
            assert type(block) is (CEBottleneck if with_ce else Bottleneck)
            if with_ce:
                assert block.bn3.ce.group_size == 16
            for norm in (block.bn1, block.bn2):
                assert type(norm) is nn.BatchNorm2d
        # never in the downsample branch
        assert type(layer[0].downsample[1]) is nn.BatchNorm2d
    assert model.num_ce_layers == 1 + 3 + 4 + 6 == 14
    assert ce_names(model)[:2] == ['bn1', 'layer1.0.bn3']
    keys = set(model.state_dict())
    assert {'bn1.ce.lambda_logit', 'bn1.ce.running_whitening',
            'layer3.5.bn3.ce.aii.gate.3.weight',
            'layer1.0.downsample.1.running_var'} <= keys
    assert not [k for k in keys if k.startswith('layer4') and '.ce.' in k]


def test_depth101_default_placement_first_seven_blocks():
    model = CEResNet(depth=101)
    assert model.stage_with_ce == (True, True, False, False)
    assert ce_names(model) == (['bn1'] + [f'layer1.{i}.bn3' for i in range(3)]
                               + [f'layer2.{i}.bn3' for i in range(4)])
    assert model.num_ce_layers == 8
    assert len(model.layer3) == 23


def test_placement_options_and_plain_equivalent():
    model = CEResNet(depth=50, stage_with_ce=(False, True, False, True),
                     stem_ce=False)
    assert ce_names(model) == ([f'layer2.{i}.bn3' for i in range(4)]
                               + [f'layer4.{i}.bn3' for i in range(3)])
    # layer4 has 2048 channels: 128 groups of 16
    assert model.layer4[0].bn3.ce.num_groups == 128
    # no CE at all: exactly mmdet's ResNet-50 (same keys and shapes)
    plain = CEResNet(depth=50, ce_cfg=None)
    ref = ResNet(depth=50)
    assert plain.num_ce_layers == 0
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    # stem_ce only
    stem_only = CEResNet(depth=50, stage_with_ce=(False,) * 4)
    assert ce_names(stem_only) == ['bn1']


def test_ce_cfg_options_sync_and_frozen_gate():
    model = CEResNet(depth=50, ce_cfg=dict(type='SyncCE', frozen_gate=True,
                                           momentum=0.05))
    assert all(isinstance(m, SyncCE) for m in model.modules() if isinstance(m, CE))
    assert model.num_ce_layers == 14
    assert model.bn1.ce.group_size == 64 and model.layer1[0].bn3.ce.group_size == 16
    assert model.layer2[1].bn3.momentum == 0.05 and model.layer2[1].bn3.frozen_gate
    assert not any(True for _ in model.bn1.ce.parameters())
    # not distributed: SyncCE falls back to CE and trains
    model.train()
    outs = model(images())
    assert outs[-1].shape == (2, 2048, 2, 2)


def test_sync_bn_conversion_keeps_ce_and_names():
    """MMEngine's ``sync_bn`` (patched by the plugin) on a CEResNet: CE ->
    SyncCE, BN -> SyncBN, same state-dict keys (checkpoints still load)."""
    from cenet_mmdet.engine import convert_sync_batchnorm
    model = convert_sync_batchnorm(CEResNet(depth=50))
    assert type(model.bn1) is SyncCE and type(model.layer3[5].bn3) is SyncCE
    assert isinstance(model.layer1[0].bn1, nn.SyncBatchNorm)
    assert isinstance(model.layer1[0].downsample[1], nn.SyncBatchNorm)
    assert model.num_ce_layers == 14
    assert set(model.state_dict()) == set(CEResNet(depth=50).state_dict())


def test_requires_grad_follows_norm_cfg_unless_ce_cfg_sets_it():
    frozen = CEResNet(depth=50, norm_cfg=dict(type='BN', requires_grad=False))
    assert not frozen.layer1[0].bn3.ce.lambda_logit.requires_grad
    assert not frozen.bn1.ce.aii.gate[0].weight.requires_grad
    assert not frozen.bn1.weight.requires_grad
    assert frozen.conv1.weight.requires_grad
    mixed = CEResNet(depth=50, norm_cfg=dict(type='BN', requires_grad=False),
                     ce_cfg=dict(type='CE', requires_grad=True))
    assert mixed.layer1[0].bn3.ce.lambda_logit.requires_grad
    assert mixed.bn1.weight.requires_grad
    assert not mixed.layer1[0].bn1.weight.requires_grad


@pytest.mark.parametrize('norm,layer_cls,abbr,sync', [
    (dict(type='GN', num_groups=8), GroupNormCE, 'gn', False),
    (dict(type='GN', num_groups=8), SyncGroupNormCE, 'gn', True),
    (dict(type='SyncBN'), SyncCE, 'bn', False),
])
def test_ce_positions_follow_norm_cfg(norm, layer_cls, abbr, sync):
    """The CE positions use the user's normalizer (GN + CE named gn1/gn3, not a
    BN + CE among GN layers); SyncBN gives SyncCE."""
    model = CEResNet(depth=50, norm_cfg=dict(norm, requires_grad=True),
                     ce_cfg=dict(type='SyncCE' if sync else 'CE'),
                     base_channels=8, stem_channels=32)
    layers = dict(model.ce_layers())
    assert len(layers) == 14
    assert all(type(layer) is layer_cls for layer in layers.values())
    assert f'{abbr}1' in layers and f'layer1.0.{abbr}3' in layers
    block = model.layer1[0]
    assert block.norm3_name == f'{abbr}3' and block.norm3 is layers[f'layer1.0.{abbr}3']
    if abbr == 'gn':
        assert block.norm3.num_groups == 8 and not hasattr(block, 'bn3')
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    model.eval()
    outs = model(images())
    assert [tuple(o.shape) for o in outs] == [
        (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]


def test_group_norm_ce_deep_stem():
    model = CEResNet(depth=50, norm_cfg=dict(type='GN', num_groups=32,
                                             requires_grad=True),
                     deep_stem=True)
    assert isinstance(model.stem[7], GroupNormCE) and model.stem[7].ce.group_size == 64
    assert isinstance(model.layer4[0].gn3, nn.GroupNorm)
    assert not isinstance(model.layer4[0].gn3, CELayer)


@pytest.mark.parametrize('norm_type', ['BN1d', 'BN3d', 'IN3d', 'MyNorm'])
def test_norm_that_cannot_carry_ce_is_refused_by_name(norm_type):
    with pytest.raises(ValueError) as info:  # before anything is built
        CEResNet(depth=50, norm_cfg=dict(type=norm_type), base_channels=8)
    assert str(info.value).startswith(
        f"CEResNet: norm_cfg type '{norm_type}' cannot carry CE")
    assert "'GN'" in str(info.value)


def test_out_indices_shapes():
    model = CEResNet(depth=50).eval()
    x = images()
    for out_indices in [(0, 1, 2, 3), (1, 3), (2,)]:
        model.out_indices = out_indices
        with torch.no_grad():
            outs = model(x)
        expected = [(2, 256 * 2**i, 16 // 2**i, 16 // 2**i) for i in out_indices]
        assert [tuple(o.shape) for o in outs] == expected
    built = CEResNet(depth=50, out_indices=(1, 3)).eval()
    with torch.no_grad():
        assert [o.shape[1] for o in built(x)] == [512, 2048]


def test_num_stages_three_slices_default_placement():
    model = CEResNet(depth=50, num_stages=3, out_indices=(0, 1, 2),
                     strides=(1, 2, 2), dilations=(1, 1, 1))
    assert model.stage_with_ce == (True, True, True)
    assert not hasattr(model, 'layer4')
    model.eval()
    assert model(images())[-1].shape == (2, 1024, 4, 4)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize('depth', [51, 0, '50'])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=r'invalid depth .* supported depths are '
                       r'\[18, 34, 50, 101, 152\]'):
        CEResNet(depth=depth)


@pytest.mark.parametrize('flags', [(True, True, True), (True,) * 5, 'TTTF', True])
def test_bad_stage_with_ce(flags):
    with pytest.raises(ValueError, match='stage_with_ce must be a sequence of 4 flags'):
        CEResNet(depth=50, stage_with_ce=flags)


def test_bad_stage_with_ce_for_num_stages():
    with pytest.raises(ValueError, match='sequence of 3 flags'):
        CEResNet(depth=50, num_stages=3, out_indices=(0, 1, 2),
                 stage_with_ce=(True, True, True, False))


@pytest.mark.parametrize('ce_cfg, error, match', [
    (dict(type='BN'), ValueError, "CEResNet: ce_cfg type must be one of "
     r"\('CE', 'SyncCE'\), got 'BN' \(the normalizer before CE comes from norm_cfg\)$"),
    ('CE', TypeError, 'ce_cfg must be a dict with a "type" key'),
    (dict(group_size=16), TypeError, 'ce_cfg must be a dict with a "type" key'),
    (dict(type='NoSuchCE'), ValueError, "got 'NoSuchCE'"),
])
def test_bad_ce_cfg(ce_cfg, error, match):
    """Refused before anything is built, without the width advice of a
    layer that cannot be built."""
    with pytest.raises(error, match=match):
        CEResNet(depth=50, ce_cfg=ce_cfg)


@pytest.mark.parametrize('base_channels', [1, 2])
def test_narrow_backbones_name_the_layer_and_the_fix(base_channels):
    """MMDetection's own backbone tests use base_channels 1-8."""
    with pytest.raises(ValueError) as err:
        CEResNet(depth=50, base_channels=base_channels)
    message = str(err.value)
    assert f'the stem ({base_channels} channels)' in message
    assert 'reduction=4 leaves no hidden unit' in message
    assert 'stem_ce=False' in message
    # without the stem CE, stage 1 (4 or 8 channels) builds; a wider
    # reduction fails there, and the message names the stage
    CEResNet(depth=50, base_channels=base_channels, stem_ce=False)
    with pytest.raises(ValueError) as err:
        CEResNet(depth=50, base_channels=base_channels, stem_ce=False,
                 ce_cfg=dict(type='CE', reduction=16))
    message = str(err.value)
    assert (f'stage 1 (layer1, {4 * base_channels} channels after bn3)'
            in message)
    assert 'stage_with_ce=(False, True, True, False)' in message
    # the advice works
    backbone = CEResNet(depth=50, base_channels=base_channels,
                        ce_cfg=dict(type='CE', reduction=1),
                        stem_group_size=base_channels)
    assert backbone.num_ce_layers == 14


def test_build_error_through_registry_is_clear():
    with pytest.raises(ValueError, match='invalid depth'):
        MODELS.build(dict(type='CEResNet', depth=19))


# ------------------------------------------------------ freezing, norm_eval
def randomize_norm_affine(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN/CE affine parameters (after zero-init, BN outputs would
    have mean 0 and the CE running mean could not move)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (_BatchNorm, nn.GroupNorm)):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.2, generator=generator)


@pytest.mark.parametrize('frozen_stages', [0, 1, 2, 3, 4])
def test_frozen_stages_state(frozen_stages):
    """requires_grad and eval state per stage, stem CE included."""
    model = CEResNet(depth=50, frozen_stages=frozen_stages, norm_eval=False)
    model.train()
    frozen = [model.conv1, model.bn1] + [getattr(model, f'layer{i}')
                                         for i in range(1, frozen_stages + 1)]
    trainable = [getattr(model, f'layer{i}') for i in range(frozen_stages + 1, 5)]
    for module in frozen:
        assert check_norm_state(module.modules(), False)
        assert all(not p.requires_grad for p in module.parameters())
    for module in trainable:
        assert check_norm_state(module.modules(), True)
        assert all(p.requires_grad for p in module.parameters())
    assert not model.bn1.training and not model.bn1.ce.training
    assert not model.bn1.ce.lambda_logit.requires_grad
    assert not model.bn1.ce.aii.gate[0].weight.requires_grad


@pytest.mark.parametrize('norm', list(NORMS))
def test_frozen_stages_get_no_update_and_the_rest_trains(norm):
    """frozen_stages=1, norm_eval=False: after a train-mode forward, backward
    and SGD step, the stem and layer1 are bit-identical; every CE statistic
    and CE parameter of layer2-3 moved."""
    norm_cfg, abbr = NORMS[norm]
    torch.manual_seed(0)
    model = CEResNet(depth=50, frozen_stages=1, norm_eval=False, norm_cfg=norm_cfg)
    model.init_weights()
    randomize_norm_affine(model)
    model.train()
    before = snapshot(model)
    sgd_step(model, images())
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(('conv1.', f'{abbr}1.', 'layer1.'))]
    assert f'{abbr}1.ce.running_whitening' in frozen
    assert f'layer1.2.{abbr}3.ce.lambda_logit' in frozen
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
    trained = [n for n in ce_names(model) if n.startswith(('layer2', 'layer3'))]
    assert len(trained) == 10
    for name in trained:
        bn_stats = ('running_mean', 'running_var') if norm == 'BN' else ()
        for suffix in bn_stats + ('weight', 'ce.running_whitening',
                                  'ce.running_mean', 'ce.aii.running_scale',
                                  'ce.lambda_logit', 'ce.aii.gate.0.weight',
                                  'ce.aii.gate.1.bias'):
            key = f'{name}.{suffix}'
            assert not torch.equal(after[key], before[key]), key
        if norm == 'BN':
            assert after[f'{name}.num_batches_tracked'] == 1


@pytest.mark.parametrize('norm', list(NORMS))
def test_norm_eval_freezes_every_ce_statistic(norm):
    norm_cfg, abbr = NORMS[norm]
    torch.manual_seed(0)
    model = CEResNet(depth=50, norm_eval=True, norm_cfg=norm_cfg)
    model.init_weights()
    randomize_norm_affine(model)
    model.train()
    assert check_norm_state(model.modules(), False)
    assert model.layer1[0].conv1.training  # only norms go to eval
    before = snapshot(model)
    sgd_step(model, images())
    after = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    assert sum('.ce.running_whitening' in b for b in buffers) == 14
    # every buffer but the (unsaved) non-finite skip counters and identities
    # is in the state
    assert {b for b in buffers if b not in after} == {
        name for name in buffers if name.endswith(('.nonfinite_skips', '.ce.identity'))}
    for key in buffers & set(after):
        assert torch.equal(after[key], before[key]), key
    # parameters (CE ones included) still train
    for key in (f'layer2.0.{abbr}3.ce.lambda_logit', f'{abbr}1.ce.aii.gate.3.weight',
                f'layer3.5.{abbr}3.weight', f'{abbr}1.weight'):
        assert not torch.equal(after[key], before[key]), key
    # eval() then train() keeps the norm_eval setting; norm_eval=False trains
    model.eval()
    assert check_norm_state(model.modules(), False)
    model.norm_eval = False
    model.train()
    assert check_norm_state(model.modules(), True)


# -------------------------------------------------------------------- init
def test_zero_init_residual_reaches_ce_bn3_but_not_the_ce_block():
    torch.manual_seed(0)
    model = CEResNet(depth=50)
    ce_before = {k: v.clone() for k, v in model.state_dict().items()
                 if '.ce.' in k}
    model.init_weights()
    for stage in range(1, 5):
        for block in getattr(model, f'layer{stage}'):
            assert torch.count_nonzero(block.bn3.weight) == 0
            assert torch.count_nonzero(block.bn3.bias) == 0
            assert torch.all(block.bn1.weight == 1) and torch.all(block.bn2.weight == 1)
    assert isinstance(model.layer3[5].bn3, CE)
    assert torch.all(model.bn1.weight == 1)
    # mmengine's override init would have zeroed the AII gate (Linear and
    # LayerNorm weights) of every bn3 CE block; they keep their values
    after = model.state_dict()
    assert len(ce_before) == 14 * 8
    for key, value in ce_before.items():
        assert torch.equal(after[key], value), key
    gate = model.layer1[0].bn3.ce.aii.gate
    assert torch.count_nonzero(gate[0].weight) == gate[0].weight.numel()
    assert torch.all(gate[1].weight == 1)


def test_no_zero_init_residual():
    torch.manual_seed(0)
    model = CEResNet(depth=50, zero_init_residual=False)
    model.init_weights()
    assert torch.all(model.layer1[0].bn3.weight == 1)
    assert torch.all(model.layer4[0].bn3.weight == 1)


def test_default_init_is_kaiming_for_convs():
    torch.manual_seed(0)
    model = CEResNet(depth=50)
    conv = model.layer2[0].conv2.weight
    model.init_weights()
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    # mmengine Kaiming: normal, fan_out, relu gain -> std sqrt(2 / fan_out)
    assert abs(conv.std().item() - (2 / fan_out) ** 0.5) < 0.1 * (2 / fan_out) ** 0.5


# ------------------------------------------------------ with_cp, dcn, plugins
def test_with_cp_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    ref = CEResNet(depth=50, norm_eval=False, frozen_stages=-1)
    ref.init_weights()
    for module in ref.modules():  # non-trivial residual branches
        if isinstance(module, _BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    cp_model = CEResNet(depth=50, norm_eval=False, with_cp=True)
    cp_model.load_state_dict(ref.state_dict())
    assert all(block.with_cp for block in cp_model.layer1)
    x = images()  # the same shape everywhere: new shapes pay oneDNN warm-up
    grads = []
    outputs = []
    for model in (ref, cp_model):
        model.train()
        inp = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch's use_reentrant notice
            outs = model(inp)
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i))
                   for i, o in enumerate(outs)]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        outputs.append([o.detach() for o in outs])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()}
                     | {'input': inp.grad.clone()})
    def relative_error(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    for a, b in zip(*outputs):
        assert relative_error(a, b) < 1e-5
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert relative_error(grads[1][name], grads[0][name]) < 1e-4, name
    assert torch.count_nonzero(grads[1]['layer1.0.bn3.ce.lambda_logit']) == 1


def test_dcn_option_is_accepted():
    from mmcv.ops import DeformConv2dPack
    dcn = dict(type='DCN', deform_groups=1, fallback_on_stride=False)
    # (mmcv's CPU kernel refuses inputs smaller than the kernel: layer4 is 2x2)
    model = CEResNet(depth=50, dcn=dcn, stage_with_dcn=(False, True, True, False))
    assert isinstance(model.layer2[0].conv2, DeformConv2dPack)
    assert isinstance(model.layer2[0].bn3, CE)
    assert not isinstance(model.layer1[0].conv2, DeformConv2dPack)
    model.eval()
    try:
        with torch.no_grad():
            outs = model(images())
    except (NotImplementedError, RuntimeError) as error:
        if 'cuda' in str(error).lower() or 'not implemented' in str(error).lower():
            pytest.skip(f'mmcv deformable conv has no CPU kernel here: {error}')
        raise
    assert outs[-1].shape == (2, 2048, 2, 2)


def test_plugins_are_accepted_in_ce_blocks():
    plugins = [
        dict(cfg=dict(type='ContextBlock', ratio=1. / 4),
             stages=(False, True, True, False), position='after_conv3'),
        dict(cfg=dict(type='GeneralizedAttention', spatial_range=-1,
                      num_heads=4, attention_type='0010', kv_stride=2),
             stages=(False, False, True, False), position='after_conv2'),
    ]
    model = CEResNet(depth=50, plugins=plugins, norm_eval=False)
    block = model.layer3[0]
    assert isinstance(block, CEBottleneck) and isinstance(block.bn3, CE)
    assert block.after_conv3_plugin_names and block.after_conv2_plugin_names
    model.init_weights()
    model.train()
    outs = model(images())
    assert outs[2].shape == (2, 1024, 4, 4)
    sum(o.sum() for o in outs).backward()
    assert model.layer3[0].bn3.ce.lambda_logit.grad is not None
    assert model.layer3[0].context_block.channel_add_conv[0].weight.grad is not None


def test_config_dict_copy_is_not_mutated():
    ce_cfg = dict(type='CE')
    cfg = dict(type='CEResNet', depth=50, ce_cfg=ce_cfg)
    frozen = copy.deepcopy(cfg)
    MODELS.build(cfg)
    assert cfg == frozen
