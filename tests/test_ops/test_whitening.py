"""The pure functions: Newton-Schulz inverse square root, group sizes, moments."""
import pytest
import torch

from cenet_mmdet.ops import (apply_maps, batch_moments, batch_moments_backward,
                             fold_channel_equilibrium, gate_backward,
                             gate_forward, inverse_sqrt_newton,
                             inverse_sqrt_newton_backward, resolve_group_size,
                             sample_moments)


def _well_conditioned(groups, size, condition, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(groups, size, size, generator=gen,
                                       dtype=torch.float64))
    eig = torch.linspace(1.0, condition, size, dtype=torch.float64)
    return q @ torch.diag_embed(eig.expand(groups, size)) @ q.transpose(1, 2)


def _eig_inverse_sqrt(cov):
    values, vectors = torch.linalg.eigh(cov)
    return vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(1, 2)


def test_rescaled_newton_converges_to_eigendecomposition():
    cov = _well_conditioned(3, 16, condition=4.0)
    expected = _eig_inverse_sqrt(cov)
    errors = []
    for iters in (1, 2, 3, 4, 5, 6, 8):
        result = inverse_sqrt_newton(cov, iters, rescale=True)
        errors.append((result - expected).norm() / expected.norm())
    # strictly decreasing with T (until machine precision), then converged
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    final = inverse_sqrt_newton(cov, 20, rescale=True)
    assert (final - expected).norm() / expected.norm() < 1e-12


def test_released_newton_is_unrescaled():
    cov = _well_conditioned(2, 8, condition=2.0, seed=1)
    trace = cov.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    released = inverse_sqrt_newton(cov, 20)
    # P_T -> (Sigma / tr Sigma)^(-1/2) = sqrt(tr) Sigma^(-1/2)
    torch.testing.assert_close(released, _eig_inverse_sqrt(cov) * trace.sqrt(),
                               rtol=1e-9, atol=1e-9)


def test_newton_matches_explicit_iteration():
    cov = _well_conditioned(2, 4, condition=3.0, seed=2)
    normalized = cov / cov.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    p = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    for iters in range(5):
        torch.testing.assert_close(inverse_sqrt_newton(cov, iters), p)
        p = 1.5 * p - 0.5 * p @ p @ p @ normalized


@pytest.mark.parametrize('channels,asked,expected', [
    (64, 64, 64), (256, 16, 16), (24, 16, 8), (48, 16, 16), (12, 16, 4), (8, 16, 8),
    (1, 16, 1)])
def test_group_size_halving(channels, asked, expected):
    assert resolve_group_size(channels, asked) == expected


def test_group_size_errors_say_what_is_possible():
    with pytest.raises(ValueError, match=r'group_size=16 cannot split 15 channels.*\[3, 5, 15\]'):
        resolve_group_size(15, 16)
    with pytest.raises(ValueError, match='positive int'):
        resolve_group_size(16, 0)


def test_sample_moments():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    sums, gram = sample_moments(x)
    torch.testing.assert_close(sums, x.sum(-1))
    torch.testing.assert_close(gram, torch.einsum('ngdl,ngel->ngde', x, x))
    sums2, squares = sample_moments(x, with_gram=False)
    torch.testing.assert_close(squares, (x * x).sum(-1))


def test_fold_equals_unfolded_map():
    gen = torch.Generator().manual_seed(0)
    n, groups, size, positions = 3, 2, 4, 7
    x = torch.randn(n, groups, size, positions, generator=gen, dtype=torch.float64)
    lam = torch.tensor(0.3, dtype=torch.float64)
    whitening = torch.randn(groups, size, size, generator=gen, dtype=torch.float64)
    k = torch.rand(n, groups, size, generator=gen, dtype=torch.float64)
    a = torch.rand(groups, size, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(groups, size, generator=gen, dtype=torch.float64)
    mu = torch.randn(groups, size, generator=gen, dtype=torch.float64)
    y = a[..., None] * x + b[..., None]
    for center in (None, mu):
        shift = 0 if center is None else center[..., None]
        expected = lam * whitening @ (y - shift) + k[..., None] * y
        matrix, bias = fold_channel_equilibrium(lam, whitening, k, a, b, center)
        torch.testing.assert_close(matrix @ x + bias, expected)


def test_moments_backward_matches_autograd():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sample_moments(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: sample_moments(t), (x,))
    # only one of the outputs used
    assert torch.autograd.gradcheck(lambda t: sample_moments(t)[1], (x,))
    assert torch.autograd.gradcheck(lambda t: sample_moments(t)[0], (x,))


def test_instance_moments_backward_matches_autograd():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)

    def moments(t):
        return sample_moments(t, with_gram=False)
    assert torch.autograd.gradcheck(moments, (x,))
    assert torch.autograd.gradgradcheck(moments, (x,))
    assert torch.autograd.gradcheck(lambda t: moments(t)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: moments(t)[1], (x,))


def test_apply_maps_is_a_fresh_tensor_with_exact_gradients():
    gen = torch.Generator().manual_seed(0)
    n, groups, size, h, w = 2, 3, 4, 2, 3
    matrix = torch.randn(n, groups, size, size, generator=gen, dtype=torch.float64)
    bias = torch.randn(n, groups, size, 1, generator=gen, dtype=torch.float64)
    x = torch.randn(n, groups, size, h * w, generator=gen, dtype=torch.float64)
    shape = (n, groups * size, h, w)
    expected = (matrix @ x + bias).reshape(shape)
    with torch.no_grad():
        torch.testing.assert_close(apply_maps(matrix, bias, x, shape), expected)
    inputs = tuple(t.clone().requires_grad_() for t in (matrix, bias, x))
    out = apply_maps(*inputs, shape)
    assert out._base is None and out.shape == shape
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(lambda m, b, t: apply_maps(m, b, t, shape), inputs)
    # gradients only where asked
    frozen = (matrix, bias, x.clone().requires_grad_())
    apply_maps(*frozen, shape).sum().backward()
    assert frozen[2].grad is not None


def test_fold_with_per_sample_shift():
    gen = torch.Generator().manual_seed(1)
    n, groups, size, positions = 3, 2, 4, 5
    x = torch.randn(n, groups, size, positions, generator=gen, dtype=torch.float64)
    lam = torch.tensor(0.6, dtype=torch.float64)
    whitening = torch.randn(groups, size, size, generator=gen, dtype=torch.float64)
    k = torch.rand(n, groups, size, generator=gen, dtype=torch.float64)
    a = torch.rand(groups, size, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(n, groups, size, generator=gen, dtype=torch.float64)
    mu = torch.randn(groups, size, generator=gen, dtype=torch.float64)
    y = a[..., None] * x + b[..., None]
    expected = lam * whitening @ (y - mu[..., None]) + k[..., None] * y
    matrix, bias = fold_channel_equilibrium(lam, whitening, k, a, b, mu)
    torch.testing.assert_close(matrix @ x + bias, expected)


def test_batch_moments_are_the_moments_about_the_reference():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 6, generator=gen, dtype=torch.float64) * 3 + 5
    shift = x[..., :1]
    reference = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    sums, gram = sample_moments(x - shift)
    ref_sums, ref_gram = batch_moments(sums, gram, shift.squeeze(-1) - reference,
                                       x.size(-1))
    about = x - reference[..., None]
    torch.testing.assert_close(ref_sums, about.sum(-1).sum(0))
    torch.testing.assert_close(ref_gram, (about @ about.transpose(-1, -2)).sum(0))


def _autograd_grads(function, inputs, grad_out):
    """The gradients of ``function`` by plain autograd (the reference)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = function(*inputs)
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize('num_iters', [1, 2, 3, 5])
def test_newton_backward_is_autograds(num_iters):
    """The hand-written backward of the Newton steps against autograd of the
    forward, float64 (and the forward's trail does not change its result)."""
    gen = torch.Generator().manual_seed(num_iters)
    a = torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)
    cov = a @ a.mT / 40 + 1e-3 * torch.eye(5, dtype=torch.float64)
    grad = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)
    trail = []
    out = inverse_sqrt_newton(cov, num_iters, trail=trail)
    torch.testing.assert_close(out, inverse_sqrt_newton(cov, num_iters), rtol=0, atol=0)
    expected, = _autograd_grads(lambda c: inverse_sqrt_newton(c, num_iters), [cov], grad)
    torch.testing.assert_close(inverse_sqrt_newton_backward(grad, trail), expected,
                               rtol=1e-12, atol=1e-14)


def test_gate_backward_is_autograds():
    gen = torch.Generator().manual_seed(0)
    variance = torch.rand(4, 12, generator=gen, dtype=torch.float64)
    weights = [torch.randn(3, 12, generator=gen, dtype=torch.float64),
               torch.rand(3, generator=gen, dtype=torch.float64) + 0.5,
               torch.randn(3, generator=gen, dtype=torch.float64),
               torch.randn(12, 3, generator=gen, dtype=torch.float64)]
    grad = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    alpha = 0.3

    def reference(v, w1, lw, lb, w2):  # the gate written plainly
        hidden = torch.nn.functional.layer_norm(alpha * v @ w1.t(), (3, ), lw, lb, 1e-5)
        return torch.sigmoid(hidden.relu() @ w2.t())

    expected = _autograd_grads(reference, [variance] + weights, grad)
    gate, trace = gate_forward(variance, weights, 1e-5, alpha)
    torch.testing.assert_close(gate, reference(variance, *weights))
    grad_variance, grad_weights = gate_backward(grad, trace, weights, alpha,
                                                weight_grads=True)
    for actual, wanted in zip([grad_variance, *grad_weights], expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-14)
    assert gate_backward(grad, trace, weights, alpha)[1] is None


def test_batch_moments_backward_is_autograds():
    gen = torch.Generator().manual_seed(3)
    sums = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 2, 4, 7, generator=gen, dtype=torch.float64)
    gram = a @ a.mT
    offset = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    grad_gram = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    grad_gram = grad_gram + grad_gram.mT  # symmetric, as the function asks
    expected_sums, expected_gram = _autograd_grads(
        lambda s, g: batch_moments(s, g, offset, 7)[1], [sums, gram], grad_gram)
    torch.testing.assert_close(batch_moments_backward(grad_gram, offset), expected_sums,
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(expected_gram, grad_gram.expand(3, 2, 4, 4))
