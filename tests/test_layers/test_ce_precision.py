"""CE in float32 against a float64 reference at large mean/std.

The reference is written here, step by step as the released code computes it
(BN, then the CE block on the BN output: centred covariance, trace
normalization, Newton iteration, two-pass per-instance variance), in float64
on the same float32 input. CE's error (max abs error / max abs reference
value) must stay within 10x of torch's own float32 BN on the same input, and
below an absolute ceiling (``CEILING``: BN's error grows with mean/std, to
~2e-4 at 1e4, CE's stays at float32 round-off, ~1e-6), for mean/std up to
1e4: outputs, input gradients, every running buffer a training step updates,
and the eval path with gradients (``norm_eval=True`` training; CUDA always
takes its shifted moments).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from cenet_mmdet.models.layers import CE

SHAPE = (4, 64, 28, 28)
RATIOS = [1e2, 1e3, 1e4]
GROUP_SIZES = [64, 16]  # the stem (one group of 64) and a block's group size
CEILING = 5e-6  # outputs: CE reaches <= 8e-7 on these inputs
GRAD_CEILING = 1e-5  # input and parameter gradients: <= 8e-7 here
STAT_CEILING = 1e-5  # a training step's batch statistics: <= 1.5e-6 here


def reference_bn(x: torch.Tensor, layer: CE, training: bool) -> torch.Tensor:
    """Float64 BN of ``x`` (N, C, H, W) with two-pass batch statistics."""
    x = x.double()
    if training:
        mean = x.mean((0, 2, 3))
        var = (x - mean[:, None, None]).square().mean((0, 2, 3))
    else:
        mean, var = layer.running_mean.double(), layer.running_var.double()
    scale = layer.weight.double() / torch.sqrt(var + layer.eps)
    return ((x - mean[:, None, None]) * scale[:, None, None]
            + layer.bias.double()[:, None, None])


def reference_whitening(y: torch.Tensor, layer: CE) -> tuple:
    """Float64 group mean ``(G, d, 1)`` and whitening matrix ``(G, d, d)`` of
    the BN output ``y`` (the released training computation)."""
    groups, size = layer.ce.num_groups, layer.ce.group_size
    eye = torch.eye(size, dtype=torch.float64)
    y_groups = y.transpose(0, 1).reshape(groups, size, -1)  # (G, d, N*H*W)
    mean = y_groups.mean(-1, keepdim=True)
    centred = y_groups - mean
    sigma = centred @ centred.transpose(1, 2) / y_groups.size(-1)
    sigma = sigma + layer.ce.eps * eye
    sigma_n = sigma / sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    whitening = eye.repeat(groups, 1, 1)
    for _ in range(layer.ce.num_iters):
        whitening = 1.5 * whitening - 0.5 * (
            whitening @ whitening @ whitening @ sigma_n)
    return mean, whitening


def reference_gate(variance: torch.Tensor, layer: CE) -> torch.Tensor:
    """The AII gate ``sigmoid(W2 relu(LN(W1 v)))`` in float64, differentiable
    in ``layer``'s gate parameters (the released ``AR.fc`` layout)."""
    reduce, norm, _, expand = layer.ce.aii.gate
    hidden = F.linear(variance, reduce.weight.double())
    hidden = F.layer_norm(hidden, norm.normalized_shape, norm.weight.double(),
                          norm.bias.double(), norm.eps)
    return torch.sigmoid(F.linear(hidden.relu(), expand.weight.double()))


def reference_ce(x: torch.Tensor, layer: CE, training: bool) -> torch.Tensor:
    """Float64 BN + released CE block, with ``layer``'s parameters/buffers."""
    y = reference_bn(x, layer, training)
    n, c, h, w = y.shape
    groups, size = layer.ce.num_groups, layer.ce.group_size
    y_groups = y.transpose(0, 1).reshape(groups, size, -1)  # (G, d, N*H*W)
    if training:
        whitening = reference_whitening(y, layer)[1]
    else:
        whitening = layer.ce.running_whitening.double()
    bd = (whitening @ y_groups).reshape(c, n, h, w).transpose(0, 1)
    variance = y.reshape(n, c, -1).var(-1)  # two-pass, unbiased, (N, C)
    gate = reference_gate(variance, layer)
    scale = variance.mean().sqrt() if training else (
        layer.ce.aii.running_scale.double())
    lam = torch.sigmoid(layer.ce.lambda_logit.double())
    return lam * bd + (1 - lam) * y * gate[:, :, None, None] / scale


def reference_batch_statistics(x: torch.Tensor, layer: CE) -> dict:
    """The float64 statistics of the batch ``x`` that a training step folds
    into each running buffer (state-dict names): BN mean and unbiased
    variance (two-pass), CE group mean and whitening matrix of the BN output,
    AII scale."""
    x = x.detach().double()
    with torch.no_grad():
        y = reference_bn(x, layer, training=True)
        mean_y, whitening = reference_whitening(y, layer)
        scale = y.reshape(y.size(0), y.size(1), -1).var(-1).mean().sqrt()
    return {'running_mean': x.mean((0, 2, 3)), 'running_var': x.var((0, 2, 3)),
            'ce.running_mean': mean_y, 'ce.running_whitening': whitening,
            'ce.aii.running_scale': scale.reshape(1)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 on the CPU."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def make_layer(group_size: int, seed: int = 0) -> CE:
    torch.manual_seed(seed)
    layer = CE(SHAPE[1], group_size=group_size)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.ce.lambda_logit.fill_(0.3)
    return layer


def make_input(ratio: float, per_image: bool, seed: int = 1) -> torch.Tensor:
    """``randn + ratio``; with ``per_image``, every (image, channel) is offset
    by a few std more (a nearly constant channel of one image)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen) + ratio
    if per_image:
        x = x + 3 * torch.randn(SHAPE[:2] + (1, 1), generator=gen)
    return x


def bn_error(x: torch.Tensor, layer: CE, training: bool) -> float:
    """torch's float32 BN error on ``x`` against the float64 BN."""
    running = (None, None) if training else (layer.running_mean, layer.running_var)
    out = F.batch_norm(x, *running, layer.weight, layer.bias, training, 0.0,
                       layer.eps)
    return relative_error(out, reference_bn(x, layer, training))


def assert_output_error(out: torch.Tensor, expected: torch.Tensor,
                        x: torch.Tensor, layer: CE, training: bool,
                        ceiling: float = CEILING) -> None:
    """Within 10x torch's float32 BN error on ``x`` (on ``layer``'s device)
    and below ``ceiling``."""
    error = relative_error(out, expected)
    bound = 10 * bn_error(x.detach(), layer, training)
    assert error <= min(bound, ceiling), (
        f'relative error {error:.3g}; BN bound {bound:.3g}, ceiling {ceiling:g}')


def assert_parameter_grads(layer: CE, reference: CE,
                           bound: float = GRAD_CEILING) -> None:
    """Each parameter gradient of ``layer`` against ``reference``'s (the same
    parameters, float64 autograd), relative to the larger of its own largest
    entry and 1e-2 of the largest of all (lambda's gradient is one sum of
    nearly cancelling terms)."""
    expected = dict(reference.named_parameters())
    floor = 1e-2 * max(p.grad.abs().max().item() for p in expected.values())
    for name, param in layer.named_parameters():
        want = expected[name].grad.detach().cpu().double()
        scale = max(want.abs().max().item(), floor)
        error = (param.grad.detach().cpu().double() - want).abs().max().item() / scale
        assert error < bound, f'grad of {name}: {error:.3g}'


@pytest.mark.parametrize('ratio', RATIOS)
@pytest.mark.parametrize('group_size', GROUP_SIZES)
@pytest.mark.parametrize('running_mean', ['zero', 'far'])
def test_training_output_and_gradient(ratio, group_size, running_mean):
    layer = make_layer(group_size)
    if running_mean == 'far':  # a stale running mean, 50 std on the other side
        layer.running_mean.fill_(-ratio - 50)
    start = {k: v.clone().double() for k, v in layer.state_dict().items()}
    x = make_input(ratio, per_image=False).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    statistics = reference_batch_statistics(x, layer)
    expected = reference_ce(x64, layer, training=True)
    out = layer.train()(x)
    assert_output_error(out, expected, x, layer, True)
    # input gradients of a random projection, against float64 autograd
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert relative_error(x.grad, x64.grad) < GRAD_CEILING
    # the running statistics, too (batch mean and unbiased variance)
    expected_mean = x64.detach().mean((0, 2, 3))
    momentum = layer.momentum
    torch.testing.assert_close(
        layer.running_mean.double(),
        (1 - momentum) * start['running_mean'] + momentum * expected_mean,
        rtol=1e-6, atol=0)
    # every buffer the step updates: the batch statistic it folded in,
    # recovered from ``(1 - m) start + m statistic``
    state = layer.state_dict()
    for name, value in statistics.items():
        folded = (state[name].double() - (1 - momentum) * start[name]) / momentum
        error = relative_error(folded, value)
        assert error < STAT_CEILING, f'{name}: relative error {error:.3g}'
    assert int(state['num_batches_tracked']) == 1


@pytest.mark.parametrize('ratio', RATIOS)
@pytest.mark.parametrize('group_size', GROUP_SIZES)
def test_eval_with_per_image_offsets(ratio, group_size):
    layer = make_layer(group_size)
    # trained running statistics: one training forward with momentum 1
    layer.momentum = 1.0
    with torch.no_grad():
        layer.train()(make_input(ratio, per_image=True, seed=3))
    layer.eval()
    x = make_input(ratio, per_image=True)
    out = layer(x)
    expected = reference_ce(x, layer, training=False)
    assert_output_error(out, expected, x, layer, False)


@pytest.mark.parametrize('ratio', RATIOS)
@pytest.mark.parametrize('group_size', GROUP_SIZES)
def test_eval_with_gradients_at_large_means(ratio, group_size, monkeypatch):
    """Eval with autograd (MMDetection's ``norm_eval=True`` training; on CUDA
    every eval forward takes this path): at mean/std >= 1e2 the layer takes
    its moments about a per-(image, channel) shift. Output, input gradients
    and parameter gradients against float64 autograd of the reference."""
    layer = make_layer(group_size)
    layer.momentum = 1.0
    with torch.no_grad():
        layer.train()(make_input(ratio, per_image=True, seed=3))
    layer.eval()
    reference = copy.deepcopy(layer)
    x = make_input(ratio, per_image=True).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    decisions = record_decisions(monkeypatch)
    out = layer(x)
    assert decisions == [False]  # the shifted moments
    expected = reference_ce(x64, reference, training=False)
    assert_output_error(out, expected, x, layer, False)
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert relative_error(x.grad, x64.grad) < GRAD_CEILING
    assert_parameter_grads(layer, reference)
    # eval: no buffer moved
    for name, value in reference.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name


@pytest.mark.parametrize('training', [True, False])
def test_small_spread_around_a_large_offset(training):
    """mean/std = 1e6 on a small input (was only checked to be finite): CE
    stays at float32 round-off, where BN's own error is ~1e-2."""
    torch.manual_seed(0)
    layer = CE(32)
    x = torch.randn(2, 32, 3, 3) * 1e-4 + 100.0
    layer.momentum = 1.0
    with torch.no_grad():
        layer.train()(x)  # running statistics of this batch
    out = layer.train(training)(x)
    error = relative_error(out, reference_ce(x, layer, training))
    assert error < 1e-5
    assert error <= 10 * bn_error(x, layer, training)


def standardized_input(ratio: float, seed: int = 1) -> torch.Tensor:
    """Every (image, channel) at exactly mean / std = ``ratio`` (unbiased std)."""
    x = make_input(0.0, per_image=False, seed=seed).double()
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    return (x + ratio).float()


def trained_eval_layer(ratio: float) -> CE:
    layer = make_layer(16)
    layer.momentum = 1.0
    with torch.no_grad():
        layer.train()(make_input(ratio, per_image=False, seed=3))
    return layer.eval()


def record_decisions(monkeypatch) -> list:
    """Spy on the eval path's choice: True = moments of the input itself."""
    decisions = []
    original = CE._unshifted_is_accurate

    def spy(self, *args):
        decisions.append(original(self, *args))
        return decisions[-1]
    monkeypatch.setattr(CE, '_unshifted_is_accurate', spy)
    return decisions


# (mean/std, whether the input itself is used): mean^2 <= 100 var is the line
@pytest.mark.parametrize('ratio,unshifted', [(0.0, True), (3.0, True),
                                             (9.0, True), (11.0, False),
                                             (1e3, False)])
def test_eval_uses_the_unshifted_input_only_when_accurate(ratio, unshifted,
                                                           monkeypatch):
    layer = trained_eval_layer(ratio)
    x = standardized_input(ratio)
    decisions = record_decisions(monkeypatch)
    out = layer(x)
    assert decisions == [unshifted]
    expected = reference_ce(x, layer, training=False)
    error = relative_error(out, expected)
    assert error <= min(max(10 * bn_error(x, layer, False), 1e-6), CEILING)


def test_one_badly_conditioned_image_shifts_the_batch(monkeypatch):
    layer = trained_eval_layer(0.0)
    x = standardized_input(0.0)
    x[1, 5] += 1e4  # one (image, channel) with mean/std 1e4
    decisions = record_decisions(monkeypatch)
    out = layer(x)
    assert decisions == [False]
    expected = reference_ce(x, layer, training=False)
    assert relative_error(out, expected) < 1e-5


def test_the_unshifted_path_would_be_wrong_at_large_means():
    """The check matters: forcing the input-itself path at mean/std 1e3
    loses the per-instance variance (this is what the shift protects)."""
    layer = trained_eval_layer(1e3)
    x = standardized_input(1e3)
    expected = reference_ce(x, layer, training=False)
    layer.UNSHIFTED_MEAN_RATIO = 1e30
    forced = relative_error(layer(x), expected)
    assert forced > 100 * max(bn_error(x, layer, False), 1e-6)


def test_traced_eval_always_shifts():
    """A traced graph must not bake in the choice made on the tracing input."""
    layer = trained_eval_layer(1e3)
    with torch.no_grad():
        traced = torch.jit.trace(layer, standardized_input(0.0, seed=5),
                                 check_trace=False)
    x = standardized_input(1e3)
    expected = reference_ce(x, layer, training=False)
    with torch.no_grad():
        assert_output_error(traced(x), expected, x, layer, False)


# ------------------------------------------- CE over GN, IN, LN (GroupNormCE)
PER_SAMPLE_CFGS = {'GN': dict(type='GN', num_groups=8),
                   'IN': dict(type='IN', affine=True),
                   'LN': dict(type='LN')}


@pytest.mark.parametrize('norm', list(PER_SAMPLE_CFGS))
@pytest.mark.parametrize('ratio', RATIOS)
@pytest.mark.parametrize('training', [True, False])
def test_per_sample_norms_at_large_means(norm, ratio, training):
    """GN/IN/LN + CE in float32 at mean/std up to 1e4, with channel means
    that differ by several std (so that the GN and LN groups mix channels of
    different means), against the torch normalizer then the released block
    in float64 on the same input: outputs, input gradients, and the block's
    running buffers after a training step. The normalizer removes the mean
    per sample, so the ceiling is the BN case's."""
    from cenet_mmdet.models.layers import build_ce_layer
    from cenet_mmdet.testing import ReleasedNormCE, released_to_plugin_keys
    torch.manual_seed(0)
    ref = ReleasedNormCE(norm, SHAPE[1], num_groups=8).double()
    with torch.no_grad():
        ref.norm.weight.uniform_(0.5, 1.5)
        ref.norm.bias.uniform_(-0.5, 0.5)
        ref.ce.x_weight.fill_(0.3)
    _, layer = build_ce_layer(dict(type='CE'), PER_SAMPLE_CFGS[norm], SHAPE[1])
    layer.load_state_dict(released_to_plugin_keys(ref.state_dict()))
    if not training:  # non-trivial running buffers of the block
        with torch.no_grad():
            warm = make_input(1.0, per_image=True, seed=5)
            ref(warm.double()), layer(warm)
    ref.train(training), layer.train(training)
    x = make_input(ratio, per_image=True).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, expected = layer(x), ref(x64)
    error = relative_error(out, expected)
    assert error < CEILING, f'output: relative error {error:.3g}'
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    error = relative_error(x.grad, x64.grad)
    assert error < GRAD_CEILING, f'input grad: relative error {error:.3g}'
    expected_state = released_to_plugin_keys(ref.state_dict())
    for name, value in layer.named_buffers():  # the parameters are not updated
        if name not in expected_state:  # the plugin's non-finite-step counter
            continue
        error = relative_error(value, expected_state[name])
        assert error < STAT_CEILING, f'{name}: relative error {error:.3g}'
