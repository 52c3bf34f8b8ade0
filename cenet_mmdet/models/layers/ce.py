"""CE: batch normalization followed by a Channel Equilibrium block (the
released layer).

Design notes
------------
* ``CE`` subclasses :class:`torch.nn.BatchNorm2d`, so MMCV/MMDetection treat it
  as a norm layer: ``build_norm_layer`` names it ``bn`` (``bn1``, ``bn3`` stay
  the torchvision names), ``norm_eval=True`` switches it to eval, and
  ``frozen_stages`` and the optimizer's norm weight-decay rules apply. The BN
  parameters and buffers keep their usual names; the CE block lives in the
  child module ``ce`` (``bn3.ce.running_whitening``, ...).
* BN and CE are computed together (the skeleton is
  :class:`~cenet_mmdet.models.layers.ce_layer.CELayer`, the block's math
  :class:`~cenet_mmdet.models.layers.block.CEBlock`): every statistic (BN mean
  and variance, the CE group covariance, the AII per-instance variances) is
  derived from the per-sample moments of the *BN input* ``x``, and the whole
  layer is applied as one per-sample affine map ``M_n x_n + c_n``. The BN
  output is never materialized, which makes the layer cheap and lets
  :class:`SyncCE` synchronize all statistics with one packed collective
  (after a small one that agrees on the reference of the sums).
* This file holds BN's part only: BN as a per-sample affine map ``y = a u +
  b_n`` of the shifted input ``u``, and the batch statistics of ``y`` from
  those of ``x``: the covariance of ``y = a x + b`` is ``diag(a) Cov(x)
  diag(a)``, its mean is ``beta``, its per-instance variances ``a^2 Var(x)``.
* In training the per-sample moments are moved exactly to one reference
  shared by the batch (and by all workers in :class:`SyncCE`). In eval on
  the CPU the moments of the input itself are used when accurate
  (:attr:`UNSHIFTED_EVAL`, see ``CELayer._moments``); traced, compiled and
  CUDA runs always shift (no data-dependent branch, no host synchronization).
* Definitional choices beyond the released code (each is exact whenever the
  released code does not divide by zero): ``running_scale`` starts at 1 (the
  released code starts at 0, so an untrained block divides by zero in eval),
  the AII batch scale is :math:`\\sqrt{\\max(\\bar v, \\epsilon)}`, and
  per-instance variances are clamped at 0.
* Loads are recorded: ``ce.loaded`` says whether the CE block's tensors have
  come from a state dict (see ``CEResNet.check_ce_weights``).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import (FoldConstants, batch_moments, batch_moments_backward,
                    instance_variance, mean_and_covariance, modes)
from .block import PerSampleAffine
from .ce_layer import CELayer, Moments, TrainAffine


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks of its own."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


class CE(CELayer, nn.BatchNorm2d):
    """Batch normalization followed by Channel Equilibrium (the released CE).

    Args:
        num_features: ``C`` of an input ``(N, C, H, W)``.
        eps: BN epsilon. Default: 1e-5.
        momentum: running-statistics momentum of BN and CE. Default: 0.1.
        affine: BN affine parameters. Default: True.
        group_size: CE whitening group size ``d``. Default: 16 (64 in the stem).
        num_iters: Newton steps ``T``. Default: 3.
        ce_eps: covariance epsilon. Default: 1e-5.
        reduction: AII gate reduction. Default: 4.
        pool_stats: compute the CE mean and covariance on a 2x2 max-pooled copy
            of the BN output (released option, off in the released ResNet).
        whitening: ``'released'`` (default) or ``'paper'``.
        variant: ``'ce'`` (default), ``'bd'`` (BD only) or ``'aii'`` (AII
            only), see :class:`CEBlock`.
        frozen_gate: fix lambda and the AII gate (stored as buffers), as in the
            paper's SyncCE detection setting. Default: False.

    Shape:
        input and output ``(N, C, H, W)`` with ``H * W > 1``.
    """

    UNSHIFTED_EVAL = True

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: float = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 group_size: int = 16,
                 num_iters: int = 3,
                 ce_eps: float = 1e-5,
                 reduction: int = 4,
                 pool_stats: bool = False,
                 whitening: str = 'released',
                 variant: str = 'ce',
                 frozen_gate: bool = False) -> None:
        if not track_running_stats:
            raise ValueError('CE needs running statistics '
                             '(track_running_stats=True)')
        super().__init__(num_features, eps, momentum, affine, True)
        self.pool_stats = pool_stats
        self._init_ce_block(num_features, momentum, group_size, num_iters, ce_eps,
                            reduction, whitening, variant, frozen_gate)

    def _moments_in_graph(self, training: bool) -> bool:
        # in eval, BD only uses no moment (running statistics throughout)
        return training or self.ce.has_aii

    def _common_shift(self, shift: Tensor) -> Tensor:
        """The reference ``(G, d)`` about which the batch sums are taken: the
        first sample's shift (every worker must use the same one)."""
        return shift[0]

    def _bn_scale(self, var: Tensor) -> Tensor:
        """BN scale ``a = gamma / sqrt(var + eps)``, ``(C,)``."""
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.to(scale.dtype)
        return scale

    def _train_affine(self, moments: Moments, spatial: Tuple[int, int],
                      trail: Optional[dict] = None) -> TrainAffine:
        """BN's map, the block's statistics from batch statistics, and the
        running updates of both. With a ``trail`` dict, what
        :meth:`_train_backward` needs is stored in it."""
        shift, positions = moments.shift, moments.positions
        n, groups, size = moments.sums.shape
        channels = groups * size
        deviations = moments.deviations()  # (N, G, d)
        instance_var = instance_variance(deviations, positions)  # (N, C)
        # Batch sums about one reference t shared by all workers.
        reference = self._common_shift(shift)  # (G, d)
        offset = shift - reference  # (N, G, d)
        ref_sums, ref_gram = batch_moments(moments.sums, moments.second, offset,
                                           positions)
        # sum (x-t) (C), sum (x-t)(x-t)^T (G, d, d), sum_n var_nc (C); without
        # data the running buffers are not updated
        total_sum, total_gram, total_var, has_data, count, num_instances = (
            self._reduce_batch_sums(ref_sums, ref_gram, instance_var.sum(0), n,
                                    positions, min_count=2))
        # BN statistics: the mean relative to t first (small, accurate).
        mean_rel, cov_x = mean_and_covariance(total_sum.view(groups, size),
                                              total_gram, count)  # (G, d), (G, d, d)
        var = cov_x.diagonal(dim1=-2, dim2=-1).clamp_min(0)  # (G, d)
        rstd = torch.rsqrt(var + self.eps)
        scale = rstd * self.weight.to(rstd.dtype).view(groups, size) if self.affine else rstd
        beta = self._normalizer_beta(rstd).view(groups, size)
        # y = a (x - mean) + beta = a u + b_n with
        # b_n = a (shift_n - mean) + beta = a (offset_n - mean_rel) + beta.
        centred_offset = offset - mean_rel  # (N, G, d)
        square = scale * scale  # (G, d)
        affine = PerSampleAffine(scale, torch.addcmul(beta, scale, centred_offset),
                                 instance_var * square.view(channels))
        if self.pool_stats:
            mean_y, cov_y = self._pooled_statistics(moments.source, affine, count,
                                                    spatial)
        else:  # y = a x + b: mean beta, covariance diag(a) Cov(x) diag(a)
            mean_y = beta
            outer = scale.unsqueeze(-1) * scale.unsqueeze(-2)  # (G, d, d)
            cov_y = cov_x * outer
        # AII: per-instance variance of y is a^2 Var(x); batch scale from all N, C.
        mean_var = (total_var * square.view(channels)).sum() / (num_instances * channels)
        stats = self.ce.batch_statistics(mean_y, cov_y, mean_var, trail)
        updates = [
            (self.running_mean, (mean_rel + reference).view(channels)),
            (self.running_var, var.view(channels) * (count / (count - 1))),  # unbiased
        ] + self.ce.running_updates(stats)
        if trail is not None:
            trail.update(sums=moments.sums, deviations=deviations, offset=offset,
                         instance_var=instance_var, total_var=total_var,
                         count=count, num_instances=num_instances, positions=positions,
                         mean_rel=mean_rel, cov_x=cov_x, rstd=rstd, bn_scale=scale,
                         centred_offset=centred_offset, square=square, outer=outer)
        return TrainAffine(affine, stats, (updates, has_data, mean_rel))

    def _fused_backward_supported(self, dtype: torch.dtype) -> bool:
        return not self.pool_stats and super()._fused_backward_supported(dtype)

    def _train_backward(self, trail: dict, grad_matrix: Tensor, grad_bias: Tensor
                        ) -> Tuple[Optional[Tensor], ...]:
        """BN's part of the hand-written backward (``CELayer._train_backward``)."""
        ce = self.ce
        grads = ce.maps_backward(trail, grad_matrix, grad_bias)
        grad_cov_y, grad_mean_var = ce.batch_statistics_backward(
            trail, grads.whitening, grads.aii_scale)
        sums, deviations, offset = trail['sums'], trail['deviations'], trail['offset']
        scale, square, rstd, cov_x = (trail['bn_scale'], trail['square'], trail['rstd'],
                                      trail['cov_x'])
        n, groups, size = sums.shape
        channels = groups * size
        count = trail['count']
        # Only the symmetric part of d cov_y matters (every use of cov_y is
        # symmetric): D = d cov_y + d cov_y^T, twice that part.
        doubled = grad_cov_y + grad_cov_y.mT  # (G, d, d)
        # cov_y = cov_x * a a^T: d a = (D * cov_x) a, 2 d cov_x = D * a a^T
        grad_scale = torch.baddbmm(grads.scale.unsqueeze(-1), doubled * cov_x,
                                   scale.unsqueeze(-1)).squeeze(-1)  # (G, d)
        grad_cov = doubled * trail['outer']  # twice d cov_x
        # v_n = var_n * a^2, mean_var = <total_var, a^2> / (N C)
        grad_mean = grad_mean_var / (trail['num_instances'] * channels)
        grad_total_var = grad_mean * square.view(channels)
        grad_square = torch.addcmul((grads.instance_var * trail['instance_var']).sum(0),
                                    trail['total_var'], grad_mean)
        grad_scale.addcmul_(scale, grad_square.view(groups, size), value=2)
        # b_n = beta + a (offset_n - mean_rel)
        grad_beta = grads.shift.sum(0)  # (G, d)
        grad_scale.add_((grads.shift * trail['centred_offset']).sum(0))
        # a = rstd * gamma, rstd = (var + eps)^(-1/2), var = max(diag cov_x, 0):
        # d var = -0.5 d a gamma rstd^3 = -0.5 d gamma a rstd (d gamma = d a rstd)
        grad_weight = grad_scale * rstd
        grad_var = (grad_weight * scale).mul_(rstd)  # -2 d var
        grad_var.masked_fill_(cov_x.diagonal(dim1=-2, dim2=-1) < 0, 0)
        grad_cov.diagonal(dim1=-2, dim2=-1).add_(grad_var, alpha=-1.0)
        # cov_x = total_gram / count - m m^T, m = total_sum / count:
        # d m = -(d cov_x + d cov_x^T) m - a d beta
        negative = torch.baddbmm((scale * grad_beta).unsqueeze(-1), grad_cov,
                                 trail['mean_rel'].unsqueeze(-1)).view(channels)
        grad_total_sum, grad_total_gram, grad_total_var = self._reduce_gradients(
            negative / -count, grad_cov / (2 * count), grad_total_var)
        # var_n = max(dev_n / (L - 1), 0), dev_n = Q_n - S_n^2 / L
        length = trail['positions']
        grad_dev = (torch.addcmul(grad_total_var, grads.instance_var, square.view(channels))
                    .view(n, groups, size).masked_fill_(deviations < 0, 0)
                    .div_(length - 1))
        # d S_n = d total_sum + 2 d total_gram delta_n - 2 S_n d dev_n / L
        grad_sums = torch.addcmul(grad_total_sum.view(groups, size), sums, grad_dev,
                                  value=-2.0 / length)
        grad_sums.add_(batch_moments_backward(grad_total_gram, offset))
        # d G_n = d total_gram + diag(d dev_n), (N, G, d, d)
        grad_gram = torch.addcmul(grad_total_gram, grad_dev.unsqueeze(-1),
                                  self.ce.identity)
        return (grad_sums, grad_gram) + self._parameter_gradients(
            grads, grad_weight.view(channels), grad_beta.view(channels))

    def _pooled_statistics(self, source: Tensor, affine: PerSampleAffine,
                           count: Tensor, spatial: Tuple[int, int]
                           ) -> Tuple[Tensor, Tensor]:
        """Released ``pool_stats`` option: mean ``(G, d)`` and covariance
        ``(G, d, d)`` of the 2x2 max-pooled BN output ``y = a u + b_n``,
        normalized by the unpooled count."""
        n, groups, size, _ = source.shape
        y = source * affine.scale[..., None] + affine.shift[..., None]
        # (N, G, d, L) -> (N, C, H, W) -> pooled (N, G, d, L / 4)
        pooled = F.max_pool2d(y.reshape(n, groups * size, *spatial), 2, 2)
        pooled = pooled.reshape(n, groups, size, -1)
        mean_y = pooled.mean(dim=(0, 3))  # (G, d)
        centred = pooled - mean_y[None, :, :, None]
        cov = torch.matmul(centred, centred.transpose(-1, -2)).sum(0) / count
        return mean_y, cov

    def _eval_constants(self, dtype: torch.dtype) -> Optional[FoldConstants]:
        """BN's map and the block's fold from running statistics and
        parameters, computed once and kept while none of those tensors changes
        (cached per switch to eval, checked by each tensor's version, storage
        and device) and none of them takes a gradient: eval, and the frozen
        setting (1). None (computed in the graph) when traced or compiled, for
        a block without AII, when the gate's dtype differs, or when a hook is
        registered on the gate ``ce.aii`` (e.g. the channel-analysis tools')."""
        ce = self.ce
        if not (ce.has_aii and modes.is_eager()) or _has_hooks(ce.aii):
            return None  # (a hook on the gate must see its call: in the graph)
        sources = self._constant_sources()
        if modes.records_grad(*sources) or ce.aii.gate[0].weight.dtype != dtype:
            return None
        key = (dtype, [(t._version, t.data_ptr(), t.device) for t in sources])
        if self._eval_cache is not None and self._eval_cache[0] == key:
            return self._eval_cache[1]
        groups, size = ce.num_groups, ce.group_size
        with torch.no_grad():
            bn_scale = self._bn_scale(self.running_var.to(dtype))
            scale = bn_scale.view(groups, size)
            beta = self._normalizer_beta(bn_scale).view(groups, size)
            # b = beta - a * running_mean, (G, d)
            shift = torch.addcmul(beta, scale,
                                  self.running_mean.to(dtype).view(groups, size),
                                  value=-1)
            constants = ce.fold_constants(ce.running_statistics(dtype), scale, shift)
        self._eval_cache = (key, constants)
        return constants

    def _constant_sources(self) -> List[Tensor]:
        """Every tensor the eval constants come from."""
        return list(self.parameters()) + [
            buffer for buffer in self.buffers() if buffer.is_floating_point()]

    def _eval_affine(self, moments: Moments) -> PerSampleAffine:
        """BN's map from its running statistics, for ``u = x - shift`` (or
        ``x``)."""
        dtype = moments.source.dtype
        groups, size = self.ce.num_groups, self.ce.group_size
        bn_scale = self._bn_scale(self.running_var.to(dtype))
        scale_g = bn_scale.view(groups, size)
        beta = self._normalizer_beta(bn_scale).view(groups, size)
        running_mean = self.running_mean.to(dtype).view(groups, size)
        # b = a (shift - running_mean) + beta: the BN output of the shift
        # (the difference of two close numbers is exact: large means cost no
        # precision). Without a shift it is one (G, d) constant.
        if moments.shift is None:
            bn_shift = torch.addcmul(beta, scale_g, running_mean, value=-1)
        else:
            bn_shift = torch.addcmul(beta, scale_g, moments.shift - running_mean)
        # unbiased per-instance variance of y = a x, (N, C)
        instance_var_y = (instance_variance(moments.deviations(), moments.positions)
                          * bn_scale.square())
        return PerSampleAffine(scale_g, bn_shift, instance_var_y)
