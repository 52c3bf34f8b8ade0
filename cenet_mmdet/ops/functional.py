"""Pure tensor math of Channel Equilibrium: no modules, no autograd Functions,
no execution-mode checks.

Notation: an input ``x`` of shape ``(N, C, H, W)`` is viewed as
``(N, G, d, L)`` with ``G`` groups of ``d`` contiguous channels and ``L = H * W``
positions; ``S`` are sums over positions (or samples), ``Q`` sums of squares
and ``G_n`` Gram matrices :math:`\\sum_l x_l x_l^T`.
"""
from typing import NamedTuple, Optional, Tuple

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
    if mean is None:
        mean = sums / count
    if second.dim() == sums.dim():
        return second - sums * mean
    return second - sums.unsqueeze(-1) * mean.unsqueeze(-2)


def mean_and_covariance(sums: Tensor, second: Tensor, count) -> Tuple[Tensor, Tensor]:
    """``(mean, covariance)`` from sums over ``count`` values:
    :math:`m = S / n`, :math:`Q / n - m m^T` (``sums`` ``(..., d)``,
    ``second`` ``(..., d, d)``). The sums should be taken about a reference
    close to the data (see :func:`shifted_moments`)."""
    mean = sums / count
    return mean, second / count - mean.unsqueeze(-1) * mean.unsqueeze(-2)


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
                        rescale: bool = False) -> Tensor:
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

    Returns:
        ``(G, d, d)`` whitening matrices.
    """
    trace = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)  # (G,)
    normalized = covariance / trace[:, None, None]
    eye = torch.eye(
        covariance.size(-1), dtype=covariance.dtype, device=covariance.device)
    if num_iters == 0:
        whitening = eye.repeat(covariance.size(0), 1, 1)
    else:
        # P_1 = 1.5 I - 0.5 Sigma_N, without multiplying by the identity.
        whitening = 1.5 * eye - 0.5 * normalized
        for _ in range(num_iters - 1):
            cube = torch.matmul(torch.matmul(whitening, whitening), whitening)
            whitening = torch.baddbmm(
                whitening, cube, normalized, beta=1.5, alpha=-0.5)
    if rescale:
        whitening = whitening * trace.rsqrt()[:, None, None]
    return whitening


def shifted_moments(sums: Tensor, gram: Tensor, offset: Tensor,
                    positions: int) -> Tuple[Tensor, Tensor]:
    """Move per-sample moments to a common shift, exactly.

    With moments of :math:`x - s_n` (one shift per sample) and
    :math:`\\delta_n = s_n - t`, the moments of :math:`x - t` are

    .. math::
        \\sum_l (x_l - t) = S_n + L \\delta_n,\\quad
        \\sum_l (x_l - t)(x_l - t)^T = G_n + S_n \\delta_n^T
            + \\delta_n S_n^T + L \\delta_n \\delta_n^T

    Both shifts are close to the data, so no term is large unless the data
    really spread that far (then the statistics are large as well).

    Args:
        sums: ``(N, G, d)``, :math:`S_n`.
        gram: ``(N, G, d, d)``, :math:`G_n`.
        offset: ``(N, G, d)``, :math:`\\delta_n` (no gradient needed).
        positions: ``L``.

    Returns:
        ``sums`` ``(N, G, d)`` and ``gram`` ``(N, G, d, d)`` about ``t``.
    """
    cross = sums.unsqueeze(-1) * offset.unsqueeze(-2)  # (N, G, d, d): S_n delta_n^T
    outer = offset.unsqueeze(-1) * offset.unsqueeze(-2)  # (N, G, d, d)
    gram = gram + cross + cross.transpose(-1, -2) + positions * outer
    return sums + positions * offset, gram


def fold_channel_equilibrium(
        lam: Tensor,
        whitening: Tensor,
        instance_scale: Tensor,
        bn_scale: Tensor,
        bn_shift: Tensor,
        center: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
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

    Returns:
        ``matrix`` ``(N, G, d, d)`` and ``bias`` ``(N, G, d, 1)``.
    """
    scaled_whitening = lam * whitening  # (G, d, d)
    eye = torch.eye(whitening.size(-1), dtype=whitening.dtype,
                    device=whitening.device)
    # (G, d, d) + (N, G, d, 1) * (d, d) -> (N, G, d, d), columns scaled by a
    matrix = torch.addcmul(scaled_whitening, instance_scale.unsqueeze(-1), eye)
    matrix = matrix * bn_scale[..., None, :]
    centred_shift = bn_shift if center is None else bn_shift - center
    # (G, d, d) @ (..., G, d, 1) + (N, G, d, 1) -> (N, G, d, 1)
    bias = torch.addcmul(torch.matmul(scaled_whitening, centred_shift.unsqueeze(-1)),
                         instance_scale.unsqueeze(-1), bn_shift.unsqueeze(-1))
    return matrix, bias


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
