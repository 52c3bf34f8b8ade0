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

from ...ops import instance_variance, mean_and_covariance
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
        affine, mean_z = self._normalizer_affine(moments, trail)
        n, groups, size = moments.sums.shape
        positions, scale = moments.positions, affine.scale
        batch = n * groups
        sums = moments.sums.reshape(batch, size, 1)
        # per-sample centred scatter of u (= of x): G_n - S_n S_n^T / L, (N, G, d, d)
        scatter = torch.baddbmm(moments.second.reshape(batch, size, size), sums,
                                sums.mT, alpha=-1.0 / positions).view(n, groups, size, size)
        outer = scale.unsqueeze(-1) * scale.unsqueeze(-2)  # a_n a_n^T
        # sum_n z_n z_n^T = sum_n (scatter_n * a_n a_n^T + L mean_z_n mean_z_n^T):
        # (G, d, N) @ (G, N, d) -> (G, d, d)
        total_scatter = torch.baddbmm((scatter * outer).sum(0), mean_z.permute(1, 2, 0),
                                      mean_z.transpose(0, 1), alpha=positions)
        # sum z (C), sum z z^T (G, d, d), sum_nc var_nc (1,); without data the
        # running buffers are not updated
        total_sum, total_scatter, total_var, has_data, count, num_instances = (
            self._reduce_batch_sums(positions * mean_z.sum(0), total_scatter,
                                    affine.instance_var.sum().reshape(1), n, positions))
        mean_z_batch, cov_y = mean_and_covariance(total_sum.view(groups, size),
                                                  total_scatter, count)
        mean_y = mean_z_batch + self._normalizer_beta(mean_z_batch).view(groups, size)
        stats = self.ce.batch_statistics(
            mean_y, cov_y, total_var / (num_instances * groups * size), trail)
        if trail is not None:
            trail.update(sums=moments.sums, positions=positions, scatter=scatter,
                         outer=outer, mean_z=mean_z, count=count,
                         num_instances=num_instances, mean_z_batch=mean_z_batch)
        return TrainAffine(affine, stats,
                           (self.ce.running_updates(stats), has_data, mean_y))

    def _train_backward(self, trail: dict, grad_matrix: Tensor, grad_bias: Tensor
                        ) -> Tuple[Optional[Tensor], ...]:
        """The normalizer's part of the hand-written backward
        (``CELayer._train_backward``)."""
        ce = self.ce
        grads = ce.maps_backward(trail, grad_matrix, grad_bias)
        grad_cov_y, grad_mean_var = ce.batch_statistics_backward(
            trail, grads.whitening, grads.aii_scale)
        sums, positions, count = trail['sums'], trail['positions'], trail['count']
        n, groups, size = sums.shape
        channels = groups * size
        norm_groups = self.num_groups
        per_group = channels // norm_groups
        # Only the symmetric part of d cov_y matters: D = d cov_y + d cov_y^T.
        doubled = grad_cov_y + grad_cov_y.mT  # (G, d, d)
        # cov_y = total_scatter / count - m m^T, m = total_sum / count
        negative = torch.bmm(doubled, trail['mean_z_batch'].unsqueeze(-1))  # -count d m
        grad_total_sum, grad_total_scatter, grad_total_var = self._reduce_gradients(
            negative / -count, doubled / (2 * count),
            (grad_mean_var / (trail['num_instances'] * channels)).reshape(1))
        scale, mean_z, scatter = trail['gn_scale'], trail['mean_z'], trail['scatter']
        scale_g = scale.view(n, groups, size)
        # scatter_z_n = scatter_n * a_n a_n^T + L mean_z_n mean_z_n^T, T = d total
        # (symmetric): d scatter_n = T * a_n a_n^T, d a_n = 2 (T * scatter_n) a_n,
        # d mean_z_n = 2 L T mean_z_n (+ L d total_sum)
        grad_scatter = grad_total_scatter * trail['outer']  # (N, G, d, d)
        batch = n * groups
        grad_scale = torch.baddbmm(grads.scale.reshape(batch, size, 1),
                                   (grad_total_scatter * scatter).view(batch, size, size),
                                   scale_g.reshape(batch, size, 1), alpha=2)
        grad_scale = grad_scale.view(n, norm_groups, per_group)
        # d total_sum / 2 + T mean_z_n: (G, d, d) @ (G, d, N) -> (G, d, N) -> (N, G, d)
        cross = torch.baddbmm(grad_total_sum.view(groups, size, 1), grad_total_scatter,
                              mean_z.permute(1, 2, 0), beta=0.5).permute(2, 0, 1)
        grad_mean_z = torch.add(grads.shift, cross, alpha=2 * positions)
        grad_mean_z = grad_mean_z.view(n, norm_groups, per_group)
        # v_n = var_n * a_n^2 (and mean_var = sum v / (N C))
        instance_var = trail['gn_instance_var']  # (N, C), unscaled
        grad_v = grads.instance_var + grad_total_var  # (N, C)
        grad_instance_var = grad_v * trail['gn_square'].view(n, channels)
        grad_scale.addcmul_(scale, (grad_v * instance_var).view(scale.shape), value=2)
        # b_n = mean_z_n - a_n mean_k + beta; mean_z = a_n centre
        mean_k, centre = trail['mean_k'], trail['centre']
        shift = grads.shift.view(scale.shape)
        grad_scale.addcmul_(shift, mean_k, value=-1).addcmul_(grad_mean_z, centre)
        grad_centre = grad_mean_z * scale  # (N, K, C/K)
        # a = rstd gamma; rstd = (max(var, 0) + eps)^(-1/2), (N, K, 1):
        # d var = -0.5 rstd^3 sum_p d a gamma = -0.5 rstd^2 sum_p d a a
        rstd = trail['rstd']
        grad_weight = (grad_scale * rstd).sum(0).view(channels) if self.affine else None
        rstd = rstd.squeeze(-1)  # (N, K)
        grad_var = ((grad_scale * scale).sum(-1) * (rstd * rstd)
                    ).masked_fill_(trail['gn_var'] < 0, 0)  # -2 d var
        # var = (sum_p dev / L + sum_p centre^2) / P: (-0.5 of) d var / P
        grad_centre.addcmul_(centre, grad_var.unsqueeze(-1), value=-1.0 / per_group)
        # centre = relative - mean_p relative, relative = mean_k + constant
        grad_mean_k = grad_centre - grad_centre.mean(-1, keepdim=True)
        grad_mean_k.addcmul_(shift, scale, value=-1)
        # var_n = max(dev_n / (L - 1), 0) and dev_n = Q_n - S_n^2 / L
        deviations = trail['deviations']
        grad_dev = (grad_instance_var.view(n, groups, size)
                    .masked_fill(deviations < 0, 0).div_(positions - 1))
        grad_dev.view(n, norm_groups, per_group).add_(
            grad_var.unsqueeze(-1), alpha=-0.5 / (positions * per_group))
        # mean_k = S / L; scatter = G - S S^T / L:
        # d S = (d mean_k - 2 S d dev - 2 d scatter S) / L
        grad_sums = torch.addcmul(grad_mean_k.view(n, groups, size), sums, grad_dev,
                                  value=-2)
        grad_sums = torch.baddbmm(grad_sums.view(batch, size, 1),
                                  grad_scatter.view(batch, size, size),
                                  sums.reshape(batch, size, 1), beta=1.0 / positions,
                                  alpha=-2.0 / positions).view(n, groups, size)
        grad_scatter.diagonal(dim1=-2, dim2=-1).add_(grad_dev)  # d G_n
        grad_bias = grads.shift.sum(0).view(channels) if self.affine else None
        return (grad_sums, grad_scatter) + self._parameter_gradients(
            grads, grad_weight, grad_bias)

    def _eval_affine(self, moments: Moments) -> PerSampleAffine:
        """The normalizer's per-sample map (it has no running statistics)."""
        return self._normalizer_affine(moments)[0]

    def _normalizer_affine(self, moments: Moments, trail: Optional[dict] = None
                           ) -> Tuple[PerSampleAffine, Tensor]:
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
        # sum_l (u - mean_c)^2 = Q - S mean_c, (N, G, d)
        deviations = torch.addcmul(moments.squares, moments.sums, mean_c, value=-1)
        # (N, G, d) -> (N, K, C/K): the normalizer's groups of channels
        shift_k = moments.shift.reshape(n, norm_groups, per_group)
        mean_k = mean_c.reshape(n, norm_groups, per_group)
        relative = (shift_k - shift_k[..., :1]) + mean_k  # channel mean - ref
        centre = relative - relative.mean(-1, keepdim=True)  # mean_c - mu_nk
        # mean_p (dev / L + centre^2), (N, K), biased
        var = torch.addcmul(deviations.reshape(n, norm_groups, per_group) / positions,
                            centre, centre).mean(-1)
        rstd = torch.rsqrt(var.clamp_min(0) + self.eps).unsqueeze(-1)  # (N, K, 1)
        scale = rstd.expand(n, norm_groups, per_group)
        if self.affine:
            scale = scale * self.weight.to(rstd.dtype).view(norm_groups, per_group)
        # y = a (u + shift - mu) + beta, shift - mu = centre - mean_c
        mean_z = scale * centre  # per-sample mean of y - beta
        offset = torch.addcmul(self._normalizer_beta(rstd).view(norm_groups, per_group),
                               scale, centre - mean_k)
        # unbiased per-instance variance of y = a u + b, (N, C)
        instance_var = instance_variance(deviations, positions)
        square = scale * scale
        instance_var_y = instance_var * square.flatten(1)
        affine = PerSampleAffine(scale.reshape(n, groups, size),
                                 offset.reshape(n, groups, size), instance_var_y)
        if trail is not None:
            trail.update(deviations=deviations, mean_k=mean_k, centre=centre,
                         gn_var=var, rstd=rstd, gn_scale=scale, gn_square=square,
                         gn_instance_var=instance_var)
        return affine, mean_z.reshape(n, groups, size)
