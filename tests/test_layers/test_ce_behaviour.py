"""CE: registry, frozen settings, errors, numerics."""
import pytest
import torch
from mmcv.cnn import build_norm_layer
from mmengine.registry import DefaultScope

from cenet_mmdet.models.layers import CE, SyncCE


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_steps(layer, steps=3, shape=(4, 32, 6, 6), seed=0):
    """A few SGD steps (lr 0.5, momentum) in train mode; returns the last input."""
    params = [p for p in layer.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9) if params else None
    gen = torch.Generator().manual_seed(seed)
    x = None
    for _ in range(steps):
        x = (torch.randn(shape, generator=gen) * 2 + 1).requires_grad_()
        loss = (layer(x) * torch.randn(shape, generator=gen)).sum()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    return x


# ----------------------------------------------------------------- registry
@pytest.mark.parametrize('scope', [None, 'mmdet'])
@pytest.mark.parametrize('layer_type,cls', [('CE', CE), ('SyncCE', SyncCE)])
def test_build_norm_layer(scope, layer_type, cls):
    def build():
        return build_norm_layer(dict(type=layer_type, group_size=8), 64, postfix=3)
    if scope is None:
        name, layer = build()
    else:
        with DefaultScope.overwrite_default_scope(scope):
            name, layer = build()
    assert name == 'bn3'
    assert type(layer) is cls
    assert layer.ce.group_size == 8 and layer.ce.num_groups == 8
    out = layer(torch.randn(2, 64, 4, 4))
    assert out.shape == (2, 64, 4, 4) and torch.isfinite(out).all()


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match='groupsize'):
        build_norm_layer(dict(type='CE', groupsize=8), 64)
    with pytest.raises(ValueError, match="whitening must be one of"):
        build_norm_layer(dict(type='CE', whitening='zca'), 64)


def test_released_defaults():
    layer = CE(256)
    assert (layer.ce.group_size, layer.ce.num_iters, layer.ce.eps, layer.momentum,
            layer.eps, layer.pool_stats, layer.ce.whitening) == (
                16, 3, 1e-5, 0.1, 1e-5, False, 'released')
    assert layer.ce.aii.gate[0].weight.shape == (64, 256)
    assert torch.sigmoid(layer.ce.lambda_logit).item() == 0.5
    assert layer.ce.aii.running_scale.item() == 1.0  # released: 0 (division by 0)
    # real tensors, not expanded identities: in-place updates and loading work
    for name, buf in layer.named_buffers():
        assert 0 not in buf.stride() or buf.numel() <= 1, name
    layer.load_state_dict(CE(256).state_dict())


# ------------------------------------------------------------ frozen settings
def test_frozen_setting_1_requires_grad_false_and_eval():
    """Paper setting (1): everything fixed, input still receives gradient."""
    _, layer = build_norm_layer(dict(type='CE', requires_grad=False), 32)
    _train_steps(layer.train(), steps=1)  # move the statistics first
    layer.eval()
    assert not any(p.requires_grad for p in layer.parameters())
    before = _snapshot(layer)
    x = _train_steps(layer, steps=3)
    after = _snapshot(layer)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_frozen_setting_2_frozen_gate_survives_train_and_requires_grad():
    """Paper setting (2): batch statistics and gamma/beta train; F and lambda fixed."""
    _, layer = build_norm_layer(
        dict(type='CE', frozen_gate=True, requires_grad=True), 32)
    with torch.no_grad():
        layer.ce.lambda_logit.fill_(0.7)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {'weight', 'bias'}
    assert layer.frozen_gate
    gate_keys = [k for k in layer.state_dict() if 'gate' in k or 'lambda' in k]
    assert len(gate_keys) == 5
    before = _snapshot(layer)
    layer.train()
    x = _train_steps(layer, steps=3)
    layer.train()
    after = _snapshot(layer)
    for key in gate_keys:
        assert torch.equal(before[key], after[key]), key
    for key in ('weight', 'bias', 'running_mean', 'running_var', 'ce.running_whitening',
                'ce.running_mean', 'ce.aii.running_scale'):
        assert not torch.equal(before[key], after[key]), key
    assert x.grad.abs().sum() > 0
    # a frozen-gate checkpoint loads into a normal layer and back
    CE(32).load_state_dict(layer.state_dict())
    layer.load_state_dict(CE(32).state_dict())


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize('shape,match', [
    ((2, 32, 4), '4-D input'),
    ((2, 16, 4, 4), 'built for 32 channels, got an input with 16'),
    ((2, 32, 1, 1), 'at least 2 spatial positions'),
])
def test_bad_inputs(shape, match):
    layer = CE(32)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape))


def test_empty_batch_in_training_is_refused_but_fine_in_eval():
    layer = CE(32)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        layer(torch.randn(0, 32, 4, 4))
    assert layer.eval()(torch.randn(0, 32, 4, 4)).shape == (0, 32, 4, 4)


def test_bad_options():
    with pytest.raises(ValueError, match='cannot split 15 channels'):
        CE(15)
    with pytest.raises(ValueError, match='num_iters'):
        CE(16, num_iters=-1)
    with pytest.raises(ValueError, match='track_running_stats'):
        CE(16, track_running_stats=False)
    with pytest.raises(ValueError, match='momentum'):
        CE(16, momentum=None)
    with pytest.raises(ValueError, match='reduction'):
        CE(4, group_size=4, reduction=8)


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize('make_input', [
    lambda: torch.zeros(2, 32, 4, 4),                       # all channels collapsed
    lambda: torch.full((2, 32, 4, 4), 3.0),                 # constant input
    lambda: torch.cat([torch.zeros(2, 16, 4, 4), torch.randn(2, 16, 4, 4)], 1),
    lambda: torch.randn(1, 32, 2, 1),                       # tiny batch: 2 positions
])  # large offset, small spread: against a float64 reference in test_ce_precision.py
def test_degenerate_inputs_stay_finite(make_input):
    layer = CE(32)
    with torch.no_grad():
        layer.bias.fill_(0.5)
    for mode in (True, False):
        layer.train(mode)
        x = make_input().requires_grad_()
        out = layer(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        for name, buf in layer.named_buffers():
            assert torch.isfinite(buf.float()).all(), name
        for name, p in layer.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_untrained_eval_is_finite():
    out = CE(64, group_size=64).eval()(torch.randn(2, 64, 8, 8))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    torch.manual_seed(0)
    layer = CE(32)
    x = torch.randn(2, 32, 5, 5).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    reference = CE(32)
    reference.load_state_dict(layer.state_dict())
    expected = reference(x.float())  # same rounded input, float32 compute
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), rtol=0, atol=0)


def test_autocast_does_not_lower_the_statistics():
    torch.manual_seed(0)
    layer = CE(32)
    twin = CE(32)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 32, 5, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    expected = twin(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.ce.running_whitening, twin.ce.running_whitening,
                               rtol=0, atol=0)


def test_output_is_not_a_view_so_checkpointed_blocks_can_relu_in_place():
    import torch.utils.checkpoint as cp
    layer = CE(32)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    assert layer(x)._base is None
    out = cp.checkpoint(layer, x, use_reentrant=True)
    torch.relu_(out).sum().backward()
    assert torch.isfinite(x.grad).all()
