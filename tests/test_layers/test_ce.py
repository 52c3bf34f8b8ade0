"""CE against an independent transcription of the released function.

Every normalizer CE can follow (BN, GN, IN, LN; ``build_ce_layer``), as CE
and SyncCE (which falls back to CE in one process; the gloo tests compare the
synchronized statistics), and the BD-only and AII-only variants: the layer
against the normalizer's torch module followed by the released block
(``cenet_mmdet.testing``), in training and eval.
"""
import copy

import pytest
import torch
from mmcv.cnn import build_norm_layer

from cenet_mmdet.models.layers import CE, GroupNormCE, build_ce_layer
from cenet_mmdet.testing import (ReleasedBNCE, ReleasedNormCE,
                                 released_to_plugin_keys)

#: norm_cfg of each normalizer under test (4 GN groups divide every width used)
NORM_CFGS = {
    'BN': dict(type='BN'),
    'GN': dict(type='GN', num_groups=4),
    'IN': dict(type='IN', affine=True),
    'LN': dict(type='LN'),
}


def _randomize(ref, seed: int) -> None:
    """Non-trivial normalizer affine/statistics, lambda and gate (released
    names)."""
    gen = torch.Generator().manual_seed(seed)
    norm = ref.bn if isinstance(ref, ReleasedBNCE) else ref.norm
    with torch.no_grad():
        for tensor in ref.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
        norm.weight.add_(1.5)
        ref.ce.AR.fc[1].weight.add_(1.0)
        if isinstance(ref, ReleasedBNCE):
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape,
                                                generator=gen))
            norm.running_var.uniform_(0.5, 2.0, generator=gen)


def _pair(channels, dtype, seed=0, norm='BN', layer_type='CE', **kwargs):
    """(reference, layer) with the same tensors: the torch normalizer then
    the released block, and the plugin layer built from configs."""
    if norm == 'BN':
        ref = ReleasedBNCE(channels, **kwargs)
    else:
        ref = ReleasedNormCE(norm, channels, num_groups=4, **kwargs)
    _randomize(ref, seed)
    ref = ref.to(dtype)
    ce_kwargs = {k: v for k, v in kwargs.items() if k != 'momentum'}
    _, layer = build_ce_layer(dict(type=layer_type, **ce_kwargs),
                              NORM_CFGS[norm], channels)
    layer = layer.to(dtype)
    own = layer.state_dict()
    # a variant lacks one branch's tensors
    layer.load_state_dict({key: value for key, value in
                           released_to_plugin_keys(ref.state_dict()).items()
                           if key in own})
    return ref, layer


def _assert_close(actual, expected, dtype, what):
    """float64: 1e-9; float32: 1e-4 relative to the tensor's largest entry."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    tol = dict(rtol=1e-4, atol=1e-4 * scale) if dtype == torch.float32 else dict(
        rtol=1e-9, atol=1e-11 * max(scale, 1.0))
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f'{what}: {m}')


CASES = [
    # channels, input shape (N, H, W), CE options
    (64, (4, 8, 8), dict(group_size=64)),   # stem: one group of 64
    (256, (2, 6, 5), dict()),               # d = 16, G = 16
    (24, (3, 4, 4), dict()),                # 16 does not divide 24: d = 8
    (32, (2, 8, 8), dict(pool_stats=True)),  # BN only
    (32, (3, 5, 5), dict(variant='bd')),    # BD only (paper Table 4)
    (32, (3, 5, 5), dict(variant='aii')),   # AII only
]
NORM_CASES = [
    pytest.param(norm, layer_type, id=f'{norm}-{layer_type}')
    for norm in NORM_CFGS for layer_type in ('CE', 'SyncCE')
]


def _skip_unsupported(norm, options):
    if options.get('pool_stats') and norm != 'BN':
        pytest.skip('pool_stats is an option of CE over BN only')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('channels,shape,options', CASES)
@pytest.mark.parametrize('norm,layer_type', NORM_CASES)
def test_training_steps_and_eval_match_released(channels, shape, options, dtype,
                                                 norm, layer_type):
    _skip_unsupported(norm, options)
    if layer_type == 'SyncCE' and options.get('pool_stats'):
        pytest.skip('SyncCE does not support pool_stats')
    ref, layer = _pair(channels, dtype, norm=norm, layer_type=layer_type,
                       **options)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_layer = torch.optim.SGD(layer.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    n, h, w = shape
    for step in range(3):
        x = torch.randn(n, channels, h, w, generator=gen, dtype=torch.float64) * 2 + 0.5
        x = x.to(dtype)
        x_ref = x.clone().requires_grad_()
        x_layer = x.clone().requires_grad_()
        weight = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        out_ref, out_layer = ref(x_ref), layer(x_layer)
        _assert_close(out_layer, out_ref, dtype, f'step {step} output')
        (out_ref * weight).sum().backward()
        (out_layer * weight).sum().backward()
        _assert_close(x_layer.grad, x_ref.grad, dtype, f'step {step} input grad')
        ref_grads = released_to_plugin_keys(
            {k: p.grad for k, p in ref.named_parameters()})
        for name, param in layer.named_parameters():
            _assert_close(param.grad, ref_grads[name], dtype, f'grad of {name}')
        opt_ref.step(), opt_layer.step()
        opt_ref.zero_grad(), opt_layer.zero_grad()
    expected_state = released_to_plugin_keys(ref.state_dict())
    for name, value in layer.state_dict().items():
        if name == 'num_batches_tracked':
            assert value.item() == 3
            continue
        _assert_close(value, expected_state[name], dtype, f'state {name}')
    # the buffers did move away from their initial values
    moved = (layer.ce.running_whitening if layer.ce.has_bd
             else layer.ce.aii.running_scale)
    assert not torch.allclose(moved, torch.eye(moved.size(-1), dtype=dtype))
    ref.eval(), layer.eval()
    x = torch.randn(n + 1, channels, h, w + 1, generator=gen, dtype=torch.float64).to(dtype)
    _assert_close(layer(x), ref(x), dtype, 'eval output')


def test_variants_hold_one_branch_and_released_keys_load_the_default():
    """BD only has no lambda and no gate; AII only no whitening buffers; the
    released key set is exactly the default block's."""
    from cenet_mmdet.models.layers import RELEASED_CE_KEYS
    keys = {variant: set(CE(32, variant=variant).ce.state_dict())
            for variant in ('ce', 'bd', 'aii')}
    assert keys['ce'] == set(RELEASED_CE_KEYS.values())
    assert keys['bd'] == {'running_mean', 'running_whitening'}
    assert keys['aii'] == {'aii.running_scale', 'aii.gate.0.weight',
                           'aii.gate.1.weight', 'aii.gate.1.bias',
                           'aii.gate.3.weight'}
    with pytest.raises(ValueError, match="variant must be one of"):
        CE(32, variant='both')
    # a default checkpoint does not load silently into a variant
    with pytest.raises(RuntimeError, match='Unexpected key'):
        CE(32, variant='bd').load_state_dict(CE(32).state_dict())


def test_paper_whitening_centres_and_rescales():
    """whitening='paper': BD(y) = Sigma^-1/2-ish (y - mu) with P_T / sqrt(tr)."""
    torch.manual_seed(0)
    layer = CE(16, group_size=8, whitening='paper', num_iters=3).double()
    with torch.no_grad():
        layer.ce.lambda_logit.fill_(30.0)  # lambda = 1: BD only
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64) * 3 + 1
    out = layer(x)
    # independent computation on the BN output
    y = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    y = y.transpose(0, 1).reshape(2, 8, -1)
    mu = y.mean(-1, keepdim=True)
    sigma = (y - mu) @ (y - mu).transpose(1, 2) / y.size(-1) + 1e-5 * torch.eye(8)
    trace = sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    p = torch.eye(8, dtype=torch.float64).repeat(2, 1, 1)
    for _ in range(3):
        p = 1.5 * p - 0.5 * p @ p @ p @ (sigma / trace)
    expected = (p / trace.sqrt()) @ (y - mu)
    expected = expected.view(16, 4, 5, 5).transpose(0, 1)
    # lambda = sigmoid(30): the AII share (1 - lambda) is below 1e-13
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def _small_layer(norm):
    """An 8-channel float64 layer over ``norm`` with non-trivial parameters."""
    torch.manual_seed(0)
    cfg = dict(NORM_CFGS[norm], num_groups=2) if norm == 'GN' else NORM_CFGS[norm]
    _, layer = build_ce_layer(dict(type='CE', group_size=4, reduction=2), cfg, 8)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.ce.lambda_logit.fill_(0.4)
    return layer


@pytest.mark.parametrize('norm', list(NORM_CFGS))
def test_gradcheck_float64_training(norm):
    layer = _small_layer(norm)
    x = (torch.randn(3, 8, 3, 3, dtype=torch.float64) + 0.3).requires_grad_()
    params = list(layer.parameters())

    def fn(inp, *_):
        return layer(inp)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('norm', list(NORM_CFGS))
def test_eval_mode_gradcheck_float64(norm):
    layer = _small_layer(norm)
    layer(torch.randn(4, 8, 3, 3, dtype=torch.float64))  # move the running stats
    layer.eval()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('path', ['input', 'shifted'])
@pytest.mark.parametrize('channels,shape,options', CASES)
@pytest.mark.parametrize('norm', list(NORM_CFGS))
def test_eval_mode_gradients_match_released(channels, shape, options, path,
                                            norm, monkeypatch):
    """Running statistics with gradients (MMDetection's ``norm_eval=True``
    training): output, input and parameter gradients against the released
    function in float64, on both eval paths: moments of the input itself
    (the CPU's choice for this input) and moments about a per-(image,
    channel) shift (forced here; what CUDA and traced graphs always run, and
    the CPU at large mean/std). A CE layer over GN, IN or LN always shifts."""
    _skip_unsupported(norm, options)
    if norm != 'BN' and path == 'input':
        pytest.skip('only CE over BN has the unshifted eval path')
    dtype = torch.float64
    ref, layer = _pair(channels, dtype, norm=norm, **options)
    gen = torch.Generator().manual_seed(3)
    n, h, w = shape
    with torch.no_grad():  # move the running statistics
        x = torch.randn(n, channels, h, w, generator=gen, dtype=dtype) + 0.5
        ref(x), layer(x)
    ref.eval(), layer.eval()
    if path == 'shifted':
        layer.UNSHIFTED_MEAN_RATIO = -1.0  # no input passes the check
    decisions = []
    check = CE._unshifted_is_accurate
    monkeypatch.setattr(CE, '_unshifted_is_accurate', lambda self, *args: (
        decisions.append(check(self, *args)) or decisions[-1]))
    x = torch.randn(n, channels, h, w, generator=gen, dtype=dtype) * 2 - 0.3
    x_ref, x_layer = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(x.shape, generator=gen, dtype=dtype)
    out_ref, out_layer = ref(x_ref), layer(x_layer)
    assert decisions == ([path == 'input'] if norm == 'BN' else [])
    _assert_close(out_layer, out_ref, dtype, 'output')
    (out_ref * weight).sum().backward()
    (out_layer * weight).sum().backward()
    _assert_close(x_layer.grad, x_ref.grad, dtype, 'input grad')
    ref_grads = released_to_plugin_keys({k: p.grad for k, p in ref.named_parameters()})
    for name, param in layer.named_parameters():
        _assert_close(param.grad, ref_grads[name], dtype, f'grad of {name}')


@pytest.mark.parametrize('training', [True, False])
def test_partial_repeated_and_higher_order_backward(training):
    """The moments' backward adds into the application's input gradient
    (ops.GradientLink): asking for some gradients only, asking twice, asking
    with create_graph=True and recomputing under checkpoint all give the
    gradients of one plain backward."""
    import torch.utils.checkpoint as cp
    torch.manual_seed(0)
    layer = CE(32, group_size=8).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer(torch.randn(4, 32, 5, 5, dtype=torch.float64))
    layer.train(training)
    params = list(layer.parameters())
    x = torch.randn(3, 32, 5, 5, dtype=torch.float64).requires_grad_()
    weight = torch.randn(3, 32, 5, 5, dtype=torch.float64)

    def grads(out, inputs, **kwargs):
        return torch.autograd.grad(out, inputs, weight, **kwargs)

    def close(actual, expected):
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)

    state = copy.deepcopy(layer.state_dict())
    out = layer(x)
    full = grads(out, [x] + params, retain_graph=True)
    close(grads(out, params, retain_graph=True), full[1:])  # no x: nothing handed over
    close(grads(out, [x], retain_graph=True), full[:1])
    close(grads(out, [x] + params, retain_graph=True), full)  # asked twice
    close(grads(out, [x] + params, create_graph=True), full)
    layer.load_state_dict(state)
    close(grads(cp.checkpoint(layer, x, use_reentrant=False), [x] + params), full)
    layer.load_state_dict(state)
    cp.checkpoint(layer, x, use_reentrant=True).backward(weight)  # no .grad()
    close([x.grad] + [p.grad for p in params], full)
    # the link refuses to join different inputs
    from cenet_mmdet.ops import GradientLink
    link = GradientLink()
    link.operands = (torch.zeros(2, 3, 3), torch.zeros(2, 3, 4))  # M^T g: (2, 3, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match='two different inputs'):
        link.take(torch.zeros(2, 3, 5))
