"""The hand-written backward of a CE training step (``ops.small_graph``:
``CE._train_backward`` and ``GroupNormCE._train_backward``,
``CEBlock.maps_backward``, the Newton steps' and the gate's backward) against
autograd differentiating the same forward op by op (the path compiled and
traced runs take), float64: outputs, input and parameter gradients and
buffers."""
import copy

import pytest
import torch

from cenet_mmdet.models.layers import CE, GroupNormCE

CASES = {
    'default': dict(),
    'no_affine': dict(affine=False),
    'frozen_gate': dict(frozen_gate=True),
    'one_newton_step': dict(num_iters=1),
    'stem_group': dict(group_size=32),
}


GROUP_NORM_CASES = {
    'GN': dict(num_groups=4),
    'GN_no_affine': dict(num_groups=4, affine=False),
    'GN_frozen_gate': dict(num_groups=4, frozen_gate=True),
    'IN': dict(num_groups=32, norm='IN'),
    'LN': dict(num_groups=1, norm='LN'),
}


def _layer(options: dict, zero_gamma: bool = False, cls=CE):
    torch.manual_seed(0)
    layer = cls(32, group_size=options.pop('group_size', 8), **options).double()
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(torch.randn_like(param) * 0.3)
        if zero_gamma:  # zero_init_residual: a = 0 for every channel
            layer.weight.zero_()
        if cls is CE:
            layer.running_var.uniform_(0.5, 2)
    return layer


def _step(layer, x: torch.Tensor, weights: torch.Tensor, fused: bool):
    layer = copy.deepcopy(layer).train()
    if not fused:  # autograd over the same forward
        layer._fused_backward_supported = lambda dtype: False
    x = x.clone().requires_grad_()
    out = layer(x)
    uses_fused = 'SmallGraph' in str(out.grad_fn.next_functions)
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return uses_fused, out, x.grad, grads, layer.state_dict()


def _close(actual, expected, what):
    scale = expected.abs().max().clamp_min(1e-30)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= 1e-12, f'{what}: relative difference {error:.2e}'


@pytest.mark.parametrize('case', sorted(CASES) + sorted(GROUP_NORM_CASES))
@pytest.mark.parametrize('mean', [0.0, 1e3])
def test_hand_written_backward_is_autograds(case, mean):
    if case in CASES:
        layer = _layer(dict(CASES[case]))
    else:
        layer = _layer(dict(GROUP_NORM_CASES[case]), cls=GroupNormCE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 5, 6, generator=gen, dtype=torch.float64) * 2 + mean
    weights = torch.randn(4, 32, 5, 6, generator=gen, dtype=torch.float64)
    fused = _step(layer, x, weights, True)
    plain = _step(layer, x, weights, False)
    assert fused[0] and not plain[0]
    _close(fused[1], plain[1], 'output')
    _close(fused[2], plain[2], 'input gradient')
    assert fused[3].keys() == plain[3].keys()
    for name, grad in plain[3].items():
        _close(fused[3][name], grad, f'gradient of {name}')
    for name, value in plain[4].items():
        if value.is_floating_point():
            _close(fused[4][name], value, name)
        else:
            assert torch.equal(fused[4][name], value), name


@pytest.mark.parametrize('cls', [CE, GroupNormCE])
def test_zero_gamma_and_a_constant_channel(cls):
    """gamma = 0 (zero_init_residual) and a channel constant over the batch
    (BN variance clamped at 0, instance variances 0): no division by a or by
    the variance, gradients equal autograd's and finite."""
    layer = _layer({} if cls is CE else dict(num_groups=4), zero_gamma=True, cls=cls)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 32, 4, 4, generator=gen, dtype=torch.float64)
    x[:, 5] = 0.25
    weights = torch.randn(3, 32, 4, 4, generator=gen, dtype=torch.float64)
    fused, plain = _step(layer, x, weights, True), _step(layer, x, weights, False)
    assert fused[0]
    for name, grad in plain[3].items():
        assert torch.isfinite(fused[3][name]).all(), name
        _close(fused[3][name], grad, f'gradient of {name}')
    _close(fused[2], plain[2], 'input gradient')


def test_other_options_take_autograd():
    """Options without a hand-written backward are differentiated op by op."""
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64, requires_grad=True)
    for options in (dict(variant='bd'), dict(variant='aii'), dict(whitening='paper'),
                    dict(pool_stats=True), dict(num_iters=0)):
        out = _layer(options).train()(x)
        assert 'SmallGraph' not in str(out.grad_fn.next_functions), options


def test_double_backward_recomputes():
    """Under create_graph=True the small graph is recomputed under autograd:
    second derivatives equal those of the autograd path."""
    layer = _layer({})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 3, 4, generator=gen, dtype=torch.float64)
    results = []
    for fused in (True, False):
        copy_ = copy.deepcopy(layer).train()
        if not fused:
            copy_._fused_backward_supported = lambda dtype: False
        xx = x.clone().requires_grad_()
        grad, = torch.autograd.grad(copy_(xx).square().sum(), xx, create_graph=True)
        second, = torch.autograd.grad(grad.square().sum(), copy_.weight)
        results.append((grad.detach(), second))
    _close(results[0][0], results[1][0], 'first derivative')
    _close(results[0][1], results[1][1], 'second derivative')
