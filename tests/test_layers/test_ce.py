"""CE against an independent transcription of the released function."""
import copy

import pytest
import torch
from mmcv.cnn import build_norm_layer

from cenet_mmdet.models.layers import CE
from cenet_mmdet.testing import ReleasedBNCE, released_to_plugin_keys


def _randomize(ref: ReleasedBNCE, seed: int) -> None:
    """Non-trivial BN affine/statistics, lambda and gate (released names)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in ref.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
        ref.bn.weight.add_(1.5)
        ref.ce.AR.fc[1].weight.add_(1.0)
        ref.bn.running_mean.copy_(torch.randn(ref.bn.running_mean.shape, generator=gen))
        ref.bn.running_var.uniform_(0.5, 2.0, generator=gen)


def _pair(channels, dtype, seed=0, **kwargs):
    ref = ReleasedBNCE(channels, **kwargs)
    _randomize(ref, seed)
    ref = ref.to(dtype)
    ce_kwargs = {k: v for k, v in kwargs.items() if k != 'momentum'}
    layer = CE(channels, **ce_kwargs).to(dtype)
    layer.load_state_dict(released_to_plugin_keys(ref.state_dict()))
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
    (32, (2, 8, 8), dict(pool_stats=True)),
]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('channels,shape,options', CASES)
def test_training_steps_and_eval_match_released(channels, shape, options, dtype):
    ref, layer = _pair(channels, dtype, **options)
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
    assert not torch.allclose(layer.ce.running_whitening,
                              torch.eye(layer.ce.group_size, dtype=dtype))
    ref.eval(), layer.eval()
    x = torch.randn(n + 1, channels, h, w + 1, generator=gen, dtype=torch.float64).to(dtype)
    _assert_close(layer(x), ref(x), dtype, 'eval output')


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


def test_gradcheck_float64_training():
    torch.manual_seed(0)
    layer = CE(8, group_size=4, reduction=2).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.ce.lambda_logit.fill_(0.4)
    x = (torch.randn(3, 8, 3, 3, dtype=torch.float64) + 0.3).requires_grad_()
    params = [layer.weight, layer.bias, layer.ce.lambda_logit,
              layer.ce.aii.gate[0].weight, layer.ce.aii.gate[3].weight]

    def fn(inp, *_):
        return layer(inp)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_eval_mode_gradcheck_float64():
    torch.manual_seed(0)
    layer = CE(8, group_size=4, reduction=2).double()
    layer(torch.randn(4, 8, 3, 3, dtype=torch.float64))  # move the running stats
    layer.eval()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('path', ['input', 'shifted'])
@pytest.mark.parametrize('channels,shape,options', CASES)
def test_eval_mode_gradients_match_released(channels, shape, options, path,
                                            monkeypatch):
    """Running statistics with gradients (MMDetection's ``norm_eval=True``
    training): output, input and parameter gradients against the released
    function in float64, on both eval paths: moments of the input itself
    (the CPU's choice for this input) and moments about a per-(image,
    channel) shift (forced here; what CUDA and traced graphs always run, and
    the CPU at large mean/std)."""
    dtype = torch.float64
    ref, layer = _pair(channels, dtype, **options)
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
    assert decisions == [path == 'input']
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
    link.grad = torch.zeros(2, 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match='two different inputs'):
        link.take(torch.zeros(3, 2))
