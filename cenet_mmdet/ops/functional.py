"""Pure tensor math of Channel Equilibrium: no modules, no autograd Functions,
no execution-mode checks.

Notation: an input ``x`` of shape ``(N, C, H, W)`` is viewed as
``(N, G, d, L)`` with ``G`` groups of ``d`` contiguous channels and ``L = H * W``
positions; ``S`` are sums over positions (or samples), ``Q`` sums of squares
and ``G_n`` Gram matrices :math:`\\sum_l x_l x_l^T`.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor


def centred_sums(sums: Tensor, second: Tensor, count,
                 mean: Optional[Tensor] = None) -> Tensor:
    """Sums of centred products from raw sums over ``count`` values.

    .. math::
        \\sum_l (u_l - m)(u_l - m)^T = Q - S\\, m^T,\\quad m = S / \\mathrm{count}

    Args:
        sums: ``(..., d)``, :math:`S`.
        second: ``(..., d, d)`` (Gram matrices) or ``(..., d)`` (their
            diagonals, the sums of squares).
        count: a number or a tensor that broadcasts against ``sums``.
        mean: ``sums / count`` when the caller has it already. Default: None.

    Returns:
        the centred sums, shaped like ``second``.
    """
    if second.dim() == sums.dim():
        if mean is None and not torch.is_tensor(count):  # Q - S^2 / count
            return torch.addcmul(second, sums, sums, value=-1.0 / count)
        if mean is None:
            mean = sums / count
        return second - sums * mean
    if mean is None:
        mean = sums / count
    return second - sums.unsqueeze(-1) * mean.unsqueeze(-2)


def mean_and_covariance(sums: Tensor, second: Tensor, count) -> Tuple[Tensor, Tensor]:
    """``(mean, covariance)`` from sums over ``count`` values:
    :math:`m = S / n`, :math:`Q / n - m m^T` (``sums`` ``(..., d)``,
    ``second`` ``(G, d, d)``). The sums should be taken about a reference
    close to the data (see :func:`batch_moments`)."""
    mean = sums / count
    # (G, d, d) / count - (G, d, 1) @ (G, 1, d)
    if torch.is_tensor(count):
        return mean, torch.baddbmm(second / count, mean.unsqueeze(-1),
                                   mean.unsqueeze(-2), alpha=-1)
    return mean, torch.baddbmm(second, mean.unsqueeze(-1), mean.unsqueeze(-2),
                               beta=1.0 / count, alpha=-1)


def instance_variance(deviations: Tensor, positions: int) -> Tensor:
    """Unbiased per-instance variance ``(N, C)`` from the sums of squared
    deviations ``(N, G, d)`` over ``positions`` values, clamped at 0."""
    return (deviations / (positions - 1)).clamp_min(0).flatten(1)


def resolve_group_size(num_channels: int, group_size: int) -> int:
    """Return the whitening group size used for ``num_channels`` channels.

    As in the released code, ``group_size`` is halved until it divides
    ``num_channels``. Ending at a group size of 1 (no decorrelation at all)
    while more was asked is refused with the sizes that would work.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f'group_size must be a positive int, got {group_size!r}')
    if not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(
            f'num_channels must be a positive int, got {num_channels!r}')
    size = group_size
    while num_channels % size:
        size //= 2
    if size == 1 and group_size > 1 and num_channels > 1:
        possible = [
            k for k in range(2, min(group_size, num_channels) + 1)
            if num_channels % k == 0
        ]
        raise ValueError(
            f'group_size={group_size} cannot split {num_channels} channels into '
            f'groups (halving it ends at 1); possible group sizes for '
            f'{num_channels} channels: {possible or "none above 1"}')
    return size


def inverse_sqrt_newton(covariance: Tensor,
                        num_iters: int,
                        rescale: bool = False,
                        trail: Optional[List[Tensor]] = None,
                        eye: Optional[Tensor] = None) -> Tensor:
    """Newton-Schulz iteration for the inverse square root, as released.

    .. math::
        \\Sigma_N = \\Sigma / \\mathrm{tr}(\\Sigma),\\quad P_0 = I,\\quad
        P_{k+1} = \\tfrac{3}{2} P_k - \\tfrac{1}{2} P_k^3 \\Sigma_N

    The released CE returns :math:`P_T` (no trace rescaling). With
    ``rescale=True`` it returns :math:`P_T / \\sqrt{\\mathrm{tr}(\\Sigma)}`,
    which converges to :math:`\\Sigma^{-1/2}` (the paper's whitening).

    Args:
        covariance: ``(G, d, d)`` symmetric positive definite.
        num_iters: ``T >= 0``.
        trail: a list that receives what :func:`inverse_sqrt_newton_backward`
            needs: ``[trace, Sigma_N, P_1, P_1^2, P_1^3, ..., P_{T-1}^3]``.
            Default: None.
        eye: the ``(d, d)`` identity, when the caller has it. Default: None.

    Returns:
        ``(G, d, d)`` whitening matrices.
    """
    trace = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)  # (G,)
    normalized = covariance / trace[:, None, None]
    if eye is None:
        eye = torch.eye(covariance.size(-1), dtype=covariance.dtype,
                        device=covariance.device)
    if trail is not None:
        trail += [trace, normalized]
    if num_iters == 0:
        whitening = eye.repeat(covariance.size(0), 1, 1)
    else:
        # P_1 = 1.5 I - 0.5 Sigma_N, without multiplying by the identity.
        whitening = torch.add(normalized * -0.5, eye, alpha=1.5)
        for _ in range(num_iters - 1):
            square = torch.bmm(whitening, whitening)
            cube = torch.bmm(square, whitening)
            if trail is not None:
                trail += [whitening, square, cube]
            whitening = torch.baddbmm(
                whitening, cube, normalized, beta=1.5, alpha=-0.5)
    if rescale:
        whitening = whitening * trace.rsqrt()[:, None, None]
    return whitening


def inverse_sqrt_newton_backward(grad: Tensor, trail: List[Tensor]) -> Tensor:
    """The gradient ``(G, d, d)`` of :func:`inverse_sqrt_newton` (``rescale``
    False, ``T >= 1``) with respect to its covariance, from the gradient
    ``grad`` of its output and its ``trail``.

    Each step :math:`P' = \\tfrac32 P - \\tfrac12 P^3 \\Sigma_N` gives
    :math:`\\partial P^3 = -\\tfrac12 R \\Sigma_N^T`, :math:`\\partial
    \\Sigma_N \\mathrel{+}= -\\tfrac12 (P^3)^T R`, and through
    :math:`P^3 = (P P) P` the gradient of :math:`P`; the first step adds
    :math:`-\\tfrac12 \\partial P_1` to :math:`\\partial \\Sigma_N`; then
    :math:`\\partial \\Sigma = (\\partial \\Sigma_N - \\langle \\partial
    \\Sigma_N, \\Sigma_N \\rangle I) / \\mathrm{tr}\\,\\Sigma`.
    """
    trace, normalized = trail[0], trail[1]
    steps = trail[2:]
    grad_normalized = None
    for index in range(len(steps) - 3, -1, -3):
        whitening, square, cube = steps[index:index + 3]
        # d cube = -0.5 R N^T, (G, d, d)
        grad_cube = torch.baddbmm(grad, grad, normalized.mT, beta=0, alpha=-0.5)
        if grad_normalized is None:
            grad_normalized = torch.baddbmm(grad, cube.mT, grad, beta=0, alpha=-0.5)
        else:
            grad_normalized.baddbmm_(cube.mT, grad, alpha=-0.5)
        grad_square = torch.bmm(grad_cube, whitening.mT)
        # 1.5 R + (P^2)^T d cube + d square P^T + P^T d square
        grad = torch.baddbmm(grad, square.mT, grad_cube, beta=1.5)
        grad.baddbmm_(grad_square, whitening.mT).baddbmm_(whitening.mT, grad_square)
    if grad_normalized is None:
        grad_normalized = grad * -0.5
    else:
        grad_normalized.add_(grad, alpha=-0.5)
    groups = normalized.size(0)
    # <d Sigma_N, Sigma_N> per group: (G, 1, d*d) @ (G, d*d, 1) -> (G, 1, 1)
    inner = torch.bmm(grad_normalized.view(groups, 1, -1), normalized.view(groups, -1, 1))
    grad_normalized.diagonal(dim1=-2, dim2=-1).sub_(inner.view(groups, 1))
    return grad_normalized.div_(trace[:, None, None])


def batch_moments(sums: Tensor, gram: Tensor, offset: Tensor,
                  positions: int) -> Tuple[Tensor, Tensor]:
    """The batch's moments about a common shift, from per-sample moments about
    per-sample shifts, exactly.

    With moments of :math:`x - s_n` (one shift per sample) and
    :math:`\\delta_n = s_n - t`, the moments of :math:`x - t` summed over the
    samples are

    .. math::
        \\sum_n (S_n + L \\delta_n),\\quad
        \\sum_n G_n + E + E^T,\\quad
        E = \\sum_n (S_n + \\tfrac{L}{2} \\delta_n)\\, \\delta_n^T

    (the cross terms :math:`S_n \\delta_n^T + \\delta_n S_n^T + L \\delta_n
    \\delta_n^T` of each sample, summed by one batched matmul). Both shifts
    are close to the data, so no term is large unless the data really spread
    that far (then the statistics are large as well).

    Args:
        sums: ``(N, G, d)``, :math:`S_n`.
        gram: ``(N, G, d, d)``, :math:`G_n`.
        offset: ``(N, G, d)``, :math:`\\delta_n` (no gradient needed).
        positions: ``L``.

    Returns:
        ``sums`` ``(G, d)`` and ``gram`` ``(G, d, d)`` of the batch about ``t``.
    """
    half = torch.add(sums, offset, alpha=positions / 2)  # (N, G, d)
    # sum_n G_n + E + E^T: (G, d, N) @ (G, N, d) -> (G, d, d), twice
    total_gram = torch.baddbmm(gram.sum(0), half.permute(1, 2, 0), offset.transpose(0, 1))
    total_gram = total_gram.baddbmm_(offset.permute(1, 2, 0), half.transpose(0, 1))
    return torch.add(sums, offset, alpha=positions).sum(0), total_gram


def batch_moments_backward(grad_gram: Tensor, offset: Tensor) -> Tensor:
    """The gradient ``(N, G, d)`` of :func:`batch_moments` with respect to
    ``sums`` through its cross terms, for a *symmetric* gradient ``grad_gram``
    ``(G, d, d)`` of its ``gram`` (add the gradient of its ``sums``, ``(G,
    d)`` for every sample; ``grad_gram`` is also the gradient of every
    sample's ``gram``)."""
    # d S_n = (dE + dE^T) delta_n = 2 d gram delta_n:
    # (G, d, d) @ (G, d, N) -> (G, d, N) -> (N, G, d)
    return torch.baddbmm(grad_gram[..., :1], grad_gram, offset.permute(1, 2, 0),
                         beta=0, alpha=2).permute(2, 0, 1)


def fold_channel_equilibrium(
        lam: Tensor,
        whitening: Tensor,
        instance_scale: Tensor,
        bn_scale: Tensor,
        bn_shift: Tensor,
        center: Optional[Tensor] = None,
        trail: Optional[dict] = None,
        eye: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fold BN affine, BD and AII into one per-sample affine map.

    With :math:`y_n = a \\odot x_n + b_n` (the BN output, for an input that
    may carry a per-sample shift) the CE output is

    .. math::
        p_n = \\lambda W (y_n - \\mu) + \\mathrm{diag}(k_n) y_n
            = M_n x_n + c_n,\\quad
        M_n = (\\lambda W + \\mathrm{diag}(k_n))\\,\\mathrm{diag}(a),\\quad
        c_n = \\lambda W (b_n - \\mu) + k_n \\odot b_n

    where :math:`k_n = (1-\\lambda)\\, g_n / s` is the AII diagonal and
    :math:`\\mu = 0` for the released function (BD on the uncentred input).
    The diagonal is built by broadcasting against an identity (no
    ``diag_embed``, which the TorchScript ONNX exporter lacks).

    Args:
        lam: scalar tensor, :math:`\\lambda`.
        whitening: ``(G, d, d)``, :math:`W`.
        instance_scale: ``(N, G, d)``, :math:`k_n`.
        bn_scale: ``(G, d)``, :math:`a`.
        bn_shift: ``(N, G, d)`` or ``(G, d)``, :math:`b_n`.
        center: ``(G, d)`` or ``None``, :math:`\\mu`.
        trail: a dict that receives ``per_sample`` (:math:`\\lambda W +
            \\mathrm{diag}(k_n)`) and ``scaled_whitening``. Default: None.
        eye: the ``(d, d)`` identity, when the caller has it. Default: None.

    Returns:
        ``matrix`` ``(N, G, d, d)`` and ``bias`` ``(N, G, d, 1)``.
    """
    scaled_whitening = lam * whitening  # (G, d, d)
    if eye is None:
        eye = torch.eye(whitening.size(-1), dtype=whitening.dtype,
                        device=whitening.device)
    # lambda W + diag(k_n): (G, d, d) + (N, G, d, 1) * (d, d) -> (N, G, d, d)
    per_sample = torch.addcmul(scaled_whitening, instance_scale.unsqueeze(-1), eye)
    matrix = per_sample * bn_scale[..., None, :]  # columns scaled by a
    # (N, G, d, d) @ (N, G, d, 1) -> (N, G, d, 1): lambda W b_n + k_n * b_n
    if bn_shift.dim() == per_sample.dim() - 1:  # one shift per sample: one bmm
        n, groups, size, _ = per_sample.shape
        bias = torch.bmm(per_sample.view(n * groups, size, size),
                         bn_shift.reshape(n * groups, size, 1)).view(n, groups, size, 1)
    else:
        bias = torch.matmul(per_sample, bn_shift.unsqueeze(-1))
    if center is not None:  # - lambda W mu, (G, d, d) @ (G, d, 1)
        bias = bias - torch.matmul(scaled_whitening, center.unsqueeze(-1))
    if trail is not None:
        trail.update(per_sample=per_sample, scaled_whitening=scaled_whitening)
    return matrix, bias


class GateTrace(NamedTuple):
    """What :func:`gate_backward` needs of a :func:`gate_forward` call."""

    variance: Tensor
    hidden: Tensor
    mean: Tensor
    rstd: Tensor
    activated: Tensor
    gate: Tensor


def gate_forward(variance: Tensor, weights: Tuple[Tensor, Tensor, Tensor, Tensor],
                 eps: float, alpha: float = 1.0) -> Tuple[Tensor, GateTrace]:
    """The AII gate :math:`F(v) = \\sigma(W_2\\, \\mathrm{ReLU}(\\mathrm{LN}
    (\\alpha W_1 v)))` of ``variance`` ``(N, C)``, and its trace.

    Args:
        weights: ``(W_1 (H, C), LN weight (H,), LN bias (H,), W_2 (C, H))``.
        eps: the layer norm's epsilon.
        alpha: a factor of the variances. Default: 1.
    """
    reduce, norm_weight, norm_bias, expand = weights
    # (N, C) @ (C, H) -> (N, H)
    hidden = torch.addmm(norm_bias, variance, reduce.t(), beta=0, alpha=alpha)
    normed, mean, rstd = torch.native_layer_norm(
        hidden, norm_weight.shape, norm_weight, norm_bias, eps)
    activated = normed.relu()
    gate = torch.sigmoid(torch.mm(activated, expand.t()))  # (N, C)
    return gate, GateTrace(variance, hidden, mean, rstd, activated, gate)


def gate_backward(grad_gate: Tensor, trace: GateTrace,
                  weights: Tuple[Tensor, Tensor, Tensor, Tensor],
                  alpha: float = 1.0, weight_grads: bool = False
                  ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]]:
    """The gradient of :func:`gate_forward` with respect to ``variance``
    ``(N, C)`` and, with ``weight_grads``, to its four weights (else None)."""
    reduce, norm_weight, norm_bias, expand = weights
    grad_logits = torch.ops.aten.sigmoid_backward(grad_gate, trace.gate)
    grad_activated = torch.mm(grad_logits, expand)  # (N, H)
    grad_normed = torch.ops.aten.threshold_backward(grad_activated, trace.activated, 0)
    grad_hidden, grad_norm_weight, grad_norm_bias = (
        torch.ops.aten.native_layer_norm_backward(
            grad_normed, trace.hidden, norm_weight.shape, trace.mean, trace.rstd,
            norm_weight, norm_bias, [True, weight_grads, weight_grads]))
    # (N, H) @ (H, C) -> (N, C)
    grad_variance = torch.addmm(trace.variance, grad_hidden, reduce, beta=0,
                                alpha=alpha)
    if not weight_grads:
        return grad_variance, None
    # (H, N) @ (N, C) -> (H, C) and (C, N) @ (N, H) -> (C, H)
    grad_reduce = torch.addmm(reduce, grad_hidden.t(), trace.variance, beta=0,
                              alpha=alpha)
    grad_expand = torch.mm(grad_logits.t(), trace.activated)
    return grad_variance, (grad_reduce, grad_norm_weight, grad_norm_bias, grad_expand)


class FoldConstants(NamedTuple):
    """What a CE layer's maps take from its parameters and running statistics
    alone (eval), so that per call only the gate depends on the input:

    .. math::
        k_n = K\\, F(v_n),\\quad M_n = P + \\mathrm{diag}(k_n) D,\\quad
        c_n = Q + k_n \\odot b

    with :math:`P = \\lambda W \\mathrm{diag}(a)`, :math:`D = \\mathrm{diag}(a)`,
    :math:`Q = \\lambda W (b - \\mu)`, :math:`K = (1 - \\lambda) / s` and
    :math:`v_n = a^2 \\odot \\mathrm{Var}(x_n)` (the fold of
    :func:`fold_channel_equilibrium` with the terms grouped by what they
    depend on). For an input about a per-sample shift :math:`t_n`, ``b``
    becomes :math:`b + a \\odot t_n` and ``Q`` :math:`Q + P t_n`.
    """

    #: ``(G, d, d)``, :math:`P`
    whitened: Tensor
    #: ``(G, d, d)``, :math:`D`
    diagonal: Tensor
    #: ``(G, d)``, :math:`a`
    scale: Tensor
    #: ``(G, d)``, :math:`b`
    shift: Tensor
    #: ``(G, d)``, :math:`Q`
    bias: Tensor
    #: ``(C,)``, :math:`a^2`
    variance_scale: Tensor
    #: ``()``, :math:`K`
    gate_scale: Tensor
    #: the gate :math:`F`: ``(W_1, LN weight, LN bias, W_2)`` and the LN eps
    gate: Tuple[Tensor, Tensor, Tensor, Tensor]
    gate_eps: float


def fold_constants(lam: Tensor, whitening: Tensor, scale: Tensor, shift: Tensor,
                   center: Optional[Tensor], aii_scale: Tensor,
                   gate: Tuple[Tensor, Tensor, Tensor, Tensor],
                   gate_eps: float) -> FoldConstants:
    """The :class:`FoldConstants` of a layer: ``lam`` ``(1,)``, ``whitening``
    ``(G, d, d)``, ``scale`` and ``shift`` ``(G, d)`` (the normalizer's
    map), ``center`` ``(G, d)`` or None, ``aii_scale`` ``(1,)``."""
    scaled_whitening = lam * whitening  # (G, d, d)
    eye = torch.eye(whitening.size(-1), dtype=whitening.dtype,
                    device=whitening.device)
    centred = shift if center is None else shift - center
    # (G, d, d) @ (G, d, 1) -> (G, d)
    bias = torch.matmul(scaled_whitening, centred.unsqueeze(-1)).squeeze(-1)
    return FoldConstants(
        whitened=scaled_whitening * scale[..., None, :],
        diagonal=eye * scale[..., None, :],
        scale=scale, shift=shift, bias=bias,
        variance_scale=scale.square().flatten(),
        gate_scale=((1 - lam) / aii_scale).reshape(()),
        gate=gate, gate_eps=gate_eps)
