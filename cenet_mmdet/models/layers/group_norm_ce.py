"""GroupNormCE: a per-sample normalizer (GN, IN or LN) followed by a CE block.

Design notes
------------
* GN, IN and LN differ only in how many channels share their statistics:
  IN is GN with ``C`` groups, and the LN the paper stacks CE after (LN over
  ``(C, H, W)`` with a per-channel affine, as in LN-ResNets) is GN with one
  group. One class covers the three; ``norm`` records which one it is (for
  names and messages). It subclasses :class:`torch.nn.GroupNorm`, so the
  normalizer's tensors keep their usual names (``weight``, ``bias``; no
  running statistics) and MMEngine's optimizer treats the layer as a norm;
  the CE block lives in the child ``ce``, as in :class:`CE`.
* For every sample ``n`` and channel ``c`` the normalizer is an affine map
  ``y_nc = a_nc x_nc + b_nc``, whose ``a`` and ``b`` follow from the
  per-sample, per-channel moments of ``x``. The CE block's batch statistics of
  ``y`` (group means and covariances over ``(N, H, W)``, per-instance
  variances) follow exactly from the per-sample moments of ``x`` and the
  maps, so the layer is still one per-sample map ``M_n x_n + c_n`` applied by
  one GEMM, with the moments and the application of :class:`CE` (shifted
  one-pass moments, the fused backward). The output is exactly
  ``CE_block(norm(x))``: the released block on the normalizer's output, with
  batch statistics of that output.
* The normalizer has no running statistics: in eval it still normalizes each
  sample by its own statistics, and only the CE block uses its running
  buffers.
* Batch statistics of the block are taken on ``y - beta`` (``beta`` the
  normalizer's shift, zero without affine), a reference every worker shares
  without communication; :class:`~cenet_mmdet.models.layers.SyncGroupNormCE`
  therefore synchronizes them with one collective.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ...ops import GradientLink, apply_maps, sample_moments
from .ce import CELayer

#: normalizers a GroupNormCE can be, and how many groups each one has
PER_SAMPLE_NORMS = ('GN', 'IN', 'LN')


class GroupNormCE(CELayer, nn.GroupNorm):
    """Group (or instance, or layer) normalization followed by Channel
    Equilibrium.

    .. math::
        y_{nc} = \\gamma_c \\frac{x_{nc} - \\mu_{nk}}{\\sqrt{\\sigma^2_{nk} +
        \\epsilon}} + \\beta_c,\\qquad p = \\mathrm{CE}(y)

    with :math:`\\mu_{nk}, \\sigma^2_{nk}` the mean and biased variance of
    sample ``n`` over the channels of its normalizer group ``k`` and all
    positions, and CE the released block (:class:`CEBlock`) with batch
    statistics of ``y``.

    Args:
        num_features: ``C`` of an input ``(N, C, H, W)``.
        num_groups: normalizer groups ``K`` (``C`` for IN, 1 for LN); must
            divide ``C``. Default: 32.
        eps: normalizer epsilon. Default: 1e-5.
        affine: per-channel :math:`\\gamma, \\beta`. Default: True.
        momentum: momentum of the CE block's running buffers. Default: 0.1.
        group_size, num_iters, ce_eps, reduction, whitening, variant,
            frozen_gate: the CE block's options, as for :class:`CE`.
        norm: which normalizer this is, ``'GN'``, ``'IN'`` or ``'LN'`` (names
            and messages only; ``num_groups`` decides the computation).
            Default: ``'GN'``.

    Shape:
        input and output ``(N, C, H, W)`` with ``H * W > 1``.
    """

    _abbr_ = 'gn'

    def __init__(self,
                 num_features: int,
                 num_groups: int = 32,
                 eps: float = 1e-5,
                 affine: bool = True,
                 momentum: float = 0.1,
                 group_size: int = 16,
                 num_iters: int = 3,
                 ce_eps: float = 1e-5,
                 reduction: int = 4,
                 whitening: str = 'released',
                 variant: str = 'ce',
                 frozen_gate: bool = False,
                 norm: str = 'GN') -> None:
        if norm not in PER_SAMPLE_NORMS:
            raise ValueError(f'norm must be one of {PER_SAMPLE_NORMS}, got {norm!r}')
        if (not isinstance(num_groups, int) or num_groups < 1
                or num_features % num_groups):
            raise ValueError(
                f'{norm}: num_groups={num_groups!r} must be a positive int that '
                f'divides the {num_features} channels')
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f'momentum must be a float in [0, 1], got {momentum!r}')
        super().__init__(num_groups, num_features, eps, affine)
        self.num_features = num_features
        self.momentum = momentum
        self.norm = norm
        self._init_ce_block(num_features, group_size, num_iters, ce_eps, reduction,
                            whitening, variant, frozen_gate)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, norm={self.norm!r}, momentum={self.momentum}'

    def _forward(self, x: Tensor) -> Tensor:
        """The layer, with autocast off and full-fp32 matmuls."""
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        n, c, h, w = x.shape
        ce = self.ce
        positions = h * w
        # (N, C, H, W) -> (N, G, d, L): free for contiguous NCHW input.
        x_grouped = x.to(compute_dtype).reshape(n, ce.num_groups, ce.group_size,
                                                positions)
        training = self._use_batch_stats()
        if training:
            self._check_batch(x_grouped)
        # the moments' backward adds into the application's input gradient
        link = GradientLink() if torch.is_grad_enabled() else None
        # Moments about one value of each (image, channel): accurate however
        # large |mean| / std is; the shift holds no gradient (the layer does
        # not depend on it).
        shift = x_grouped[..., :1].detach().contiguous()  # (N, G, d, 1)
        source = x_grouped - shift
        sums, second = sample_moments(source, training, link)
        squares = second.diagonal(dim1=-2, dim2=-1) if training else second
        scale, offset, deviations, mean_z = self._normalizer_maps(
            sums, squares, shift.squeeze(-1), positions)
        # unbiased per-instance variance of y = a x + b, (N, C)
        instance_var_y = (self._instance_variance(deviations, positions)
                          * scale.square().flatten(1))
        if training:
            whitening, aii_scale, mean_y = self._batch_block(
                sums, second, scale, mean_z, instance_var_y, positions)
        else:
            whitening, aii_scale, mean_y = self._running_block(compute_dtype)
        matrix, bias = self._maps(whitening, aii_scale, instance_var_y, scale,
                                  offset, mean_y)
        # (N, G, d, d) @ (N, G, d, L) + (N, G, d, 1) -> (N, C, H, W)
        out = apply_maps(matrix, bias, source, (n, c, h, w), link)
        return out.to(x.dtype)

    def _normalizer_maps(self, sums: Tensor, squares: Tensor, shift: Tensor,
                         positions: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The normalizer as ``y = a * source + b`` per (image, channel).

        From the moments ``sums``, ``squares`` ``(N, G, d)`` of ``source = x -
        shift`` (``shift`` ``(N, G, d)``), returns ``a``, ``b``, the sums of
        squared deviations of each (image, channel) and the per-sample mean of
        ``y - beta``, all ``(N, G, d)``.

        The group statistics are combined from per-channel ones (within plus
        between channels), with the channels' means taken relative to the
        shift of the group's first channel: no large number is subtracted
        from another unless the channel means themselves are that far apart.
        """
        n, groups, size = sums.shape
        norm_groups = self.num_groups
        per_group = self.num_features // norm_groups
        mean_c = sums / positions  # mean of source per (n, c)
        deviations = squares - sums * mean_c  # sum_l (x - mean_c)^2
        # (N, G, d) -> (N, K, C/K): the normalizer's groups of channels
        shift_k = shift.reshape(n, norm_groups, per_group)
        mean_k = mean_c.reshape(n, norm_groups, per_group)
        relative = (shift_k - shift_k[..., :1]) + mean_k  # channel mean - ref
        centre = relative - relative.mean(-1, keepdim=True)  # mean_c - mu_nk
        var = (deviations.reshape(n, norm_groups, per_group).sum(-1) / positions
               + centre.square().sum(-1)) / per_group  # (N, K), biased
        rstd = torch.rsqrt(var.clamp_min(0) + self.eps).unsqueeze(-1)  # (N, K, 1)
        scale = rstd.expand(n, norm_groups, per_group)
        if self.affine:
            scale = scale * self.weight.to(rstd.dtype).view(norm_groups, per_group)
        # y = a (source + shift - mu) + beta, shift - mu = centre - mean_c
        mean_z = scale * centre  # per-sample mean of y - beta
        offset = mean_z - scale * mean_k
        if self.affine:
            offset = offset + self.bias.to(rstd.dtype).view(norm_groups, per_group)
        return (scale.reshape(n, groups, size), offset.reshape(n, groups, size),
                deviations, mean_z.reshape(n, groups, size))

    def _beta(self, like: Tensor) -> Tensor:
        """The normalizer's shift ``beta`` ``(C,)`` (zeros without affine)."""
        if self.affine:
            return self.bias.to(like.dtype)
        return like.new_zeros(self.num_features)

    def _batch_block(self, sums: Tensor, gram: Tensor, scale: Tensor,
                     mean_z: Tensor, instance_var_y: Tensor, positions: int
                     ) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
        """The block's batch statistics of ``y``: ``(whitening, aii_scale,
        mean_y)``, after one :meth:`_reduce` of the packed sums, and the
        running-buffer update.

        With ``z = y - beta``, per sample: the centred scatter of ``z_n`` is
        ``diag(a_n) (G_n - S_n S_n^T / L) diag(a_n)`` and its mean is
        ``mean_z``; the batch sums follow by adding the samples.
        """
        n, groups, size = sums.shape
        channels = groups * size
        # per-sample centred scatter of the source (= of x), (N, G, d, d)
        scatter = gram - sums.unsqueeze(-1) * (sums / positions).unsqueeze(-2)
        scatter_z = (scatter * scale.unsqueeze(-1) * scale.unsqueeze(-2)
                     + positions * mean_z.unsqueeze(-1) * mean_z.unsqueeze(-2))
        # sum z (C), sum z z^T (G, d, d), sum_n var_nc (C); without data the
        # running buffers are not updated
        total_sum, total_scatter, total_var, has_data, count, num_instances = (
            self._reduce_batch_sums(positions * mean_z.sum(0), scatter_z.sum(0),
                                    instance_var_y.sum(0), n, positions))
        mean_zb = (total_sum / count).view(groups, size)
        cov_y = (total_scatter / count
                 - mean_zb.unsqueeze(-1) * mean_zb.unsqueeze(-2))
        mean_y = mean_zb + self._beta(mean_zb).view(groups, size)
        whitening, aii_scale = self._block_statistics(
            cov_y, total_var.sum() / (num_instances * channels))
        self._commit_running(self._block_updates(mean_y, whitening, aii_scale),
                             has_data, mean_y)
        return whitening, aii_scale, mean_y
