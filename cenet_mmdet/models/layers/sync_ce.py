"""SyncCE: CE whose batch statistics are computed over all workers.

(:class:`SyncGroupNormCE`, GN/IN/LN + CE, synchronizes its CE block the same
way; its normalizer is per sample and needs nothing. See its docstring.)

What is synchronized, and how it is weighted
--------------------------------------------
Every batch statistic of the layer is a sum over positions or instances, so
each worker contributes its local sums and counts and the layer uses the global
sums divided by the global counts:

* BN mean and (biased) variance of the input, hence the running mean and the
  unbiased running variance, from ``sum_x`` and the Gram diagonal over
  ``N*H*W`` positions;
* the CE group means and covariances (hence the whitening matrices) from the
  same sums: the covariance of the BN output ``y = a x + b`` is
  ``diag(a) Cov(x) diag(a)``;
* the AII batch scale ``sqrt(mean_{n,c} Var_hw(y_nc))`` from the sum of the
  per-instance variances over ``N`` instances.

This is exactly what one process computes on the concatenated batch, also when
workers hold different ``N`` or ``H*W`` (detection pads each GPU's batch to its
own size). Per-worker means are never averaged with equal weights. The AII gate
is per instance and needs no communication.

Per layer and training forward, a small ``all_reduce`` first agrees on the
reference ``t`` of the sums (``C + 1`` numbers, forward only, see
:class:`SyncCE`), then one ``all_reduce`` (SUM) carries, packed in one tensor
(float32, also under autocast; float64 for float64 inputs)::

    [ sum_x (C) | sum_x x x^T per group (G*d*d) | sum_n var_nc (C) | N*H*W | N ]

(moments of ``x - t`` for a reference ``t`` shared by the workers, see
:class:`SyncCE`), i.e. ``4 * (2*C + C*d + 2)`` bytes for float32: 18,440 bytes for C=256,
d=16; 16,904 bytes for the stem (C=64, d=64); 73,736 bytes for C=1024, d=16.
The backward pass all-reduces the gradient of the sums once (without the two
counts), so a training step costs two collectives of about that size per
layer, plus the small one. Evaluation uses running statistics and communicates nothing. A worker
with an empty batch (``N = 0``) still joins both collectives and contributes
zeros; if every worker's batch is empty, the outputs are empty and the running
statistics are left unchanged.
"""
import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...ops import modes
from .ce import CE, CELayer
from .group_norm_ce import GroupNormCE


class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce: the backward all-reduces the gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every worker's loss depends on the global sums, so the gradient of
        # the total loss w.r.t. a local sum is the sum of all workers' gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _SyncStatistics:
    """Mixin: the batch statistics of a CE layer summed over the workers of
    ``process_group`` (one packed, differentiable ``all_reduce``); the layer
    itself when torch.distributed is not initialized, the world size is 1, or
    in eval mode."""

    process_group: Optional[dist.ProcessGroup] = None

    def _distributed(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _synchronized(self) -> bool:
        return self._distributed()

    def _check_batch(self, x_grouped: Tensor) -> None:
        if not self._distributed():  # an empty local batch is fine when synced
            super()._check_batch(x_grouped)

    def _reduce(self, packed: Tensor) -> Tensor:
        """``packed`` summed over the workers: differentiably where autograd
        records it, else in place (the callers' packed tensors are fresh)."""
        if not self._distributed():
            return packed
        if modes.records_grad(packed):
            return _AllReduceSum.apply(packed, self.process_group)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)
        return packed

    @classmethod
    def convert_sync_ce(cls, module: nn.Module,
                        process_group: Optional[dist.ProcessGroup] = None
                        ) -> nn.Module:
        """Recursively replace every CE layer that is not yet synchronized by
        its synchronized form (same parameters, buffers and train/eval mode):
        :class:`CE` by SyncCE, :class:`GroupNormCE` by
        :class:`SyncGroupNormCE`."""
        synced = sync_form(module)
        if synced is not None:
            return synced.from_ce(module, process_group)
        for name, child in module.named_children():
            new_child = cls.convert_sync_ce(child, process_group)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    @classmethod
    def from_ce(cls, layer: CELayer,
                process_group: Optional[dist.ProcessGroup] = None) -> CELayer:
        """The synchronized form of ``layer`` holding the same tensors
        (shared, not copied)."""
        if getattr(layer, 'pool_stats', False):
            raise ValueError('cannot convert a CE layer with pool_stats=True to '
                             'SyncCE')
        synced = cls.__new__(cls)
        # shallow copies of the module's dicts: the tensors are shared
        synced.__dict__.update({
            key: copy.copy(value) if isinstance(value, dict) else value
            for key, value in layer.__dict__.items()
        })
        synced.process_group = process_group
        return synced


class SyncCE(_SyncStatistics, CE):
    """SyncBN + CE with every batch statistic synchronized across workers.

    Deliberately not a subclass of :class:`torch.nn.SyncBatchNorm`, which
    MMEngine's ``revert_sync_batchnorm`` would rebuild as a plain BN. Falls back
    to :class:`CE` when torch.distributed is not initialized, the world size is
    1, or in eval mode (then an empty batch is an error, as for CE).

    CE takes its training sums about a reference ``t`` close to the data (for
    accuracy when ``|mean| >> std``). The sums of different workers can only be
    added when they share ``t``, so a worker's ``t`` is the mean of the first
    sample value of each channel over the workers that hold data: one small
    forward-only ``all_reduce`` of ``C + 1`` numbers before the packed one
    (an empty worker contributes zeros and still joins).

    Args:
        num_features: ``C`` of an input ``(N, C, H, W)``.
        process_group: the group to synchronize over. Default: the world.
        **kwargs: the options of :class:`CE` (``pool_stats`` is not supported).

    Shape:
        input and output ``(N, C, H, W)`` with ``H * W > 1``; in distributed
        training ``N``, ``H`` and ``W`` may differ between workers and ``N``
        may be 0.
    """

    def __init__(self, num_features: int, *args,
                 process_group: Optional[dist.ProcessGroup] = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        if self.pool_stats:
            raise ValueError('SyncCE does not support pool_stats=True (the pooled '
                             'covariance would need a second collective)')
        self.process_group = process_group

    def _common_shift(self, shift: Tensor) -> Tensor:
        if not self._distributed():
            return super()._common_shift(shift)
        groups, size = shift.shape[1:]
        # [first sample's shift (C) | 1 if this worker holds data]: (C + 1,)
        local = torch.cat([shift[:1].sum(0).flatten(),
                           shift.new_tensor([min(shift.size(0), 1)])])
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.process_group)
        reference = local[:-1] / local[-1].clamp_min(1)
        return reference.view(groups, size)  # (G, d)


class SyncGroupNormCE(_SyncStatistics, GroupNormCE):
    """GN (or IN, or LN) + CE with the CE block's batch statistics synchronized
    across workers.

    The normalizer is per sample and needs no communication; the block's
    sums (of ``y - beta``, a reference every worker shares) go in one packed
    ``all_reduce`` per training forward (and one for its gradient), as in
    :class:`SyncCE`::

        [ sum_z (C) | sum_z z z^T per group (G*d*d) | sum_nc var_nc (1) | N*H*W | N ]

    Falls back to :class:`GroupNormCE` when torch.distributed is not
    initialized, the world size is 1, or in eval mode.

    Args:
        num_features: ``C`` of an input ``(N, C, H, W)``.
        process_group: the group to synchronize over. Default: the world.
        **kwargs: the options of :class:`GroupNormCE`.
    """

    def __init__(self, num_features: int, *args,
                 process_group: Optional[dist.ProcessGroup] = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group


def sync_form(layer: nn.Module) -> Optional[type]:
    """The synchronized class of a CE layer that is not synchronized yet
    (None for anything else)."""
    if isinstance(layer, _SyncStatistics):
        return None
    if isinstance(layer, CE):
        return SyncCE
    if isinstance(layer, GroupNormCE):
        return SyncGroupNormCE
    return None

