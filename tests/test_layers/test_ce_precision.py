"""CE in float32 against a float64 reference at large mean/std.

The reference is written here, step by step as the released code computes it
(BN, then the CE block on the BN output: centred covariance, trace
normalization, Newton iteration, two-pass per-instance variance), in float64
on the same float32 input. The bound is relative to torch's own float32 BN on
the same input: CE's error (max abs error / max abs reference value) must stay
within 10x of BN's, for mean/std up to 1e4.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from cenet_mmdet.models.layers import CE

SHAPE = (4, 64, 28, 28)
RATIOS = [1e2, 1e3, 1e4]
GROUP_SIZES = [64, 16]  # the stem (one group of 64) and a block's group size


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


def reference_ce(x: torch.Tensor, layer: CE, training: bool) -> torch.Tensor:
    """Float64 BN + released CE block, with ``layer``'s parameters/buffers."""
    y = reference_bn(x, layer, training)
    n, c, h, w = y.shape
    groups, size = layer.ce.num_groups, layer.ce.group_size
    eye = torch.eye(size, dtype=torch.float64)
    y_groups = y.transpose(0, 1).reshape(groups, size, -1)  # (G, d, N*H*W)
    if training:
        centred = y_groups - y_groups.mean(-1, keepdim=True)
        sigma = centred @ centred.transpose(1, 2) / y_groups.size(-1)
        sigma = sigma + layer.ce.eps * eye
        sigma_n = sigma / sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
        whitening = eye.repeat(groups, 1, 1)
        for _ in range(layer.ce.num_iters):
            whitening = 1.5 * whitening - 0.5 * (
                whitening @ whitening @ whitening @ sigma_n)
    else:
        whitening = layer.ce.running_whitening.double()
    bd = (whitening @ y_groups).reshape(c, n, h, w).transpose(0, 1)
    variance = y.reshape(n, c, -1).var(-1)  # two-pass, unbiased, (N, C)
    gate = torch.sigmoid(copy.deepcopy(layer.ce.aii.gate).double()(variance))
    scale = variance.mean().sqrt() if training else (
        layer.ce.aii.running_scale.double())
    lam = torch.sigmoid(layer.ce.lambda_logit.double())
    return lam * bd + (1 - lam) * y * gate[:, :, None, None] / scale


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max()
            / expected.abs().max()).item()


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


@pytest.mark.parametrize('ratio', RATIOS)
@pytest.mark.parametrize('group_size', GROUP_SIZES)
@pytest.mark.parametrize('running_mean', ['zero', 'far'])
def test_training_output_and_gradient(ratio, group_size, running_mean):
    layer = make_layer(group_size)
    if running_mean == 'far':  # a stale running mean, 50 std on the other side
        layer.running_mean.fill_(-ratio - 50)
    x = make_input(ratio, per_image=False).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    expected = reference_ce(x64, layer, training=True)
    out = layer.train()(x)
    assert relative_error(out, expected) <= 10 * bn_error(x.detach(), layer, True)
    # input gradients of a random projection, against float64 autograd
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert relative_error(x.grad, x64.grad) < 1e-4
    # the running statistics, too (batch mean and unbiased variance)
    expected_mean = x64.detach().mean((0, 2, 3))
    momentum = layer.momentum
    start = -ratio - 50 if running_mean == 'far' else 0.0
    torch.testing.assert_close(
        layer.running_mean.double(),
        (1 - momentum) * start + momentum * expected_mean, rtol=1e-6, atol=0)


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
    assert relative_error(out, expected) <= 10 * bn_error(x, layer, False)



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
    assert relative_error(out, expected) <= max(10 * bn_error(x, layer, False), 1e-6)


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
        assert relative_error(traced(x), expected) <= 10 * bn_error(x, layer, False)
