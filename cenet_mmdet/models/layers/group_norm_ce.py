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

from ...ops import centred_sums, instance_variance, mean_and_covariance
from .block import PerSampleAffine
from .ce_layer import CELayer, Moments, TrainAffine

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
        super().__init__(num_groups, num_features, eps, affine)
        self.num_features = num_features
        self.norm = norm
        self._init_ce_block(num_features, momentum, group_size, num_iters, ce_eps,
                            reduction, whitening, variant, frozen_gate)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, norm={self.norm!r}, momentum={self.momentum}'

    def _train_affine(self, moments: Moments, spatial: Tuple[int, int],
                      trail: Optional[dict] = None) -> TrainAffine:
        """The normalizer's per-sample map and the block's batch statistics of
        its output ``y``; the block's running buffers are updated.

        With ``z = y - beta``, per sample: the centred scatter of ``z_n`` is
        ``diag(a_n) (G_n - S_n S_n^T / L) diag(a_n)`` and its mean is
        ``mean_z``; the batch sums follow by adding the samples.
        """
        affine, mean_z = self._normalizer_affine(moments)
        n, groups, size = moments.sums.shape
        positions, scale = moments.positions, affine.scale
        # per-sample centred scatter of u (= of x), (N, G, d, d)
        scatter = centred_sums(moments.sums, moments.second, positions)
        scatter_z = (scatter * scale.unsqueeze(-1) * scale.unsqueeze(-2)
                     + positions * mean_z.unsqueeze(-1) * mean_z.unsqueeze(-2))
        # sum z (C), sum z z^T (G, d, d), sum_n var_nc (C); without data the
        # running buffers are not updated
        total_sum, total_scatter, total_var, has_data, count, num_instances = (
            self._reduce_batch_sums(positions * mean_z.sum(0), scatter_z.sum(0),
                                    affine.instance_var.sum(0), n, positions))
        mean_z_batch, cov_y = mean_and_covariance(total_sum.view(groups, size),
                                                  total_scatter, count)
        mean_y = mean_z_batch + self._normalizer_beta(mean_z_batch).view(groups, size)
        stats = self.ce.batch_statistics(
            mean_y, cov_y, total_var.sum() / (num_instances * groups * size), trail)
        return TrainAffine(affine, stats,
                           (self.ce.running_updates(stats), has_data, mean_y))

    def _eval_affine(self, moments: Moments) -> PerSampleAffine:
        """The normalizer's per-sample map (it has no running statistics)."""
        return self._normalizer_affine(moments)[0]

    def _normalizer_affine(self, moments: Moments) -> Tuple[PerSampleAffine, Tensor]:
        """The normalizer as ``y = a * u + b`` per (image, channel), and the
        per-sample mean of ``y - beta`` ``(N, G, d)``.

        The group statistics are combined from per-channel ones (within plus
        between channels), with the channels' means taken relative to the
        shift of the group's first channel: no large number is subtracted
        from another unless the channel means themselves are that far apart.
        """
        n, groups, size = moments.sums.shape
        positions = moments.positions
        norm_groups = self.num_groups
        per_group = self.num_features // norm_groups
        mean_c = moments.sums / positions  # mean of u per (n, c), (N, G, d)
        # sum_l (u - mean_c)^2, (N, G, d)
        deviations = centred_sums(moments.sums, moments.squares, positions, mean_c)
        # (N, G, d) -> (N, K, C/K): the normalizer's groups of channels
        shift_k = moments.shift.reshape(n, norm_groups, per_group)
        mean_k = mean_c.reshape(n, norm_groups, per_group)
        relative = (shift_k - shift_k[..., :1]) + mean_k  # channel mean - ref
        centre = relative - relative.mean(-1, keepdim=True)  # mean_c - mu_nk
        var = (deviations.reshape(n, norm_groups, per_group).sum(-1) / positions
               + centre.square().sum(-1)) / per_group  # (N, K), biased
        rstd = torch.rsqrt(var.clamp_min(0) + self.eps).unsqueeze(-1)  # (N, K, 1)
        scale = rstd.expand(n, norm_groups, per_group)
        if self.affine:
            scale = scale * self.weight.to(rstd.dtype).view(norm_groups, per_group)
        # y = a (u + shift - mu) + beta, shift - mu = centre - mean_c
        mean_z = scale * centre  # per-sample mean of y - beta
        offset = (mean_z - scale * mean_k
                  + self._normalizer_beta(rstd).view(norm_groups, per_group))
        # unbiased per-instance variance of y = a u + b, (N, C)
        instance_var_y = (instance_variance(deviations, positions)
                          * scale.square().flatten(1))
        affine = PerSampleAffine(scale.reshape(n, groups, size),
                                 offset.reshape(n, groups, size), instance_var_y)
        return affine, mean_z.reshape(n, groups, size)
