"""CELayer: the forward skeleton every CE layer shares, whatever its normalizer.

A CE layer is a torch normalizer class with :class:`CELayer` mixed in
(``class CE(CELayer, nn.BatchNorm2d)``); the block lives in its child ``ce``
(:class:`~cenet_mmdet.models.layers.block.CEBlock`), so the normalizer's
tensors keep their usual names. One forward, for every normalizer:

1. autocast off and full-float32 matmuls (:meth:`forward`); statistics in
   float32, float64 for float64 input;
2. the input grouped as ``(N, G, d, L)`` (a free view for contiguous NCHW);
3. per-sample moments about a per-(image, channel) shift (:meth:`_moments`):
   one pass, and no ``E[x^2] - E[x]^2`` cancellation however large
   ``|mean| / std`` is;
4. the normalizer's part (the subclass): its per-sample affine map, and in
   training the batch statistics of its output after one reduction
   (:meth:`_reduce`: local, or one packed ``all_reduce`` in the Sync forms);
5. the block's maps (:meth:`CEBlock.maps`; in a training step, steps 4-5 are
   one autograd node with a hand-written backward where the layer has one,
   :meth:`_train_maps`), applied by one GEMM, whose backward hands its GEMM
   operands to the moments' backward (:class:`~cenet_mmdet.ops.GradientLink`):
   one activation-sized gradient;
6. the output cast back to the input's dtype.

A training batch whose statistics are not finite (NaN/Inf input, e.g. an AMP
overflow) leaves every running buffer at its last finite value; the output is
NaN like the input. The skip is decided on the device (``torch.where``),
counted in the non-persistent buffer ``nonfinite_skips`` and logged once per
:attr:`CELayer.NONFINITE_LOG_EVERY` skips (the count is read every update on
the CPU, every :attr:`CELayer.NONFINITE_CHECK_EVERY` updates elsewhere).
"""
import logging
from typing import List, NamedTuple, Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor

from ...ops import (FoldConstants, GradientLink, apply_maps, centred_sums,
                    constant_maps, sample_moments, small_graph)
from ...ops import modes
from .block import BlockStatistics, CEBlock, MapsGradients, PerSampleAffine


class Moments(NamedTuple):
    """Per-sample moments of the grouped input ``u = x - shift``."""

    #: ``(N, G, d, L)``, ``u``: what the maps apply to
    source: Tensor
    #: ``(N, G, d)``, one value of each (image, channel); None: ``u = x``
    shift: Optional[Tensor]
    #: ``(N, G, d)``, :math:`\\sum_l u_l`
    sums: Tensor
    #: ``(N, G, d, d)`` Gram matrices (training) or ``(N, G, d)`` squares
    second: Tensor

    @property
    def positions(self) -> int:
        """``L = H * W``."""
        return self.source.size(-1)

    @property
    def squares(self) -> Tensor:
        """``(N, G, d)``, :math:`\\sum_l u_l^2` (a view)."""
        if self.second.dim() == self.sums.dim():
            return self.second
        return self.second.diagonal(dim1=-2, dim2=-1)

    def deviations(self) -> Tensor:
        """``(N, G, d)``, :math:`\\sum_l (u_l - \\bar u)^2` per (image, channel)
        (computed at each call: call it once)."""
        return centred_sums(self.sums, self.squares, self.positions)


class TrainAffine(NamedTuple):
    """What a layer's normalizer part gives in training (``_train_affine``)."""

    affine: PerSampleAffine
    stats: BlockStatistics
    #: the arguments of :meth:`CELayer._commit_running`: ``(updates, has_data,
    #: like)``
    running: tuple


class CELayer:
    """The forward skeleton and the running-statistics bookkeeping of a CE layer.

    A subclass calls :meth:`_init_ce_block` in its ``__init__`` and supplies
    the normalizer's part:

    * :meth:`_train_affine`: from the moments, the normalizer's per-sample
      affine map and the block's batch statistics (after one
      :meth:`_reduce_batch_sums`), and the running updates to commit;
    * :meth:`_eval_affine`: the normalizer's per-sample affine map from its
      running statistics (or its per-sample ones);
    * optionally :meth:`_train_backward`, the hand-written backward of a
      training step's small graph (:meth:`_train_maps`),
      :attr:`UNSHIFTED_EVAL` (see :meth:`_moments`) and
      :meth:`_moments_in_graph`.

    ``isinstance(m, CELayer)`` finds every CE layer.
    """

    #: a skipped (non-finite) running-statistics update is logged once per
    #: this many skips of the layer (the 1st, the N+1-th, ...)
    NONFINITE_LOG_EVERY = 100
    #: off the CPU the skip count is read once per this many updates
    NONFINITE_CHECK_EVERY = 100
    #: whether eval may take the moments of the unshifted input (see
    #: :meth:`_moments`)
    UNSHIFTED_EVAL = False
    #: In eval on the CPU, with :attr:`UNSHIFTED_EVAL`, moments are taken on
    #: the unshifted input when every (image, channel) has ``mean^2 <=
    #: UNSHIFTED_MEAN_RATIO * var`` (at most 2 digits lost)
    UNSHIFTED_MEAN_RATIO = 100.0

    # ---------------------------------------------------------------- set-up
    def _init_ce_block(self, num_features: int, momentum: float, group_size: int,
                       num_iters: int, ce_eps: float, reduction: int,
                       whitening: str, variant: str, frozen_gate: bool) -> None:
        """Check and set ``momentum`` (of every running buffer); build the
        block ``self.ce`` and the skip counter."""
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f'momentum must be a float in [0, 1], got {momentum!r}')
        self.momentum = momentum
        self.ce = CEBlock(num_features, group_size, num_iters, ce_eps, reduction,
                          whitening, variant)
        if frozen_gate:
            self.ce.freeze_gate()
        # training batches whose statistics were not finite (not saved)
        self.register_buffer('nonfinite_skips', torch.zeros((), dtype=torch.long),
                             persistent=False)
        self._nonfinite_seen = 0
        self._updates_unread = 0
        #: (key, FoldConstants) of eval (see :meth:`_eval_constants`)
        self._eval_cache = None

    @property
    def frozen_gate(self) -> bool:
        """Whether lambda and the AII gate are fixed (stored as buffers)."""
        return self.ce.gate_frozen

    @property
    def variant(self) -> str:
        """The block's variant: ``'ce'``, ``'bd'`` or ``'aii'``."""
        return self.ce.variant

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f'{type(self).__name__} expects a 4-D input '
                             f'(N, C, H, W), got shape {tuple(x.shape)}')
        if x.size(1) != self.num_features:
            raise ValueError(f'{type(self).__name__} was built for '
                             f'{self.num_features} channels, got an input with '
                             f'{x.size(1)} (shape {tuple(x.shape)})')
        if x.size(2) * x.size(3) < 2:
            raise ValueError(
                f'{type(self).__name__}: the AII branch needs at least 2 spatial '
                f'positions per channel (unbiased variance over H*W), got '
                f'{tuple(x.shape)}')

    def _check_batch(self, x_grouped: Tensor) -> None:
        if x_grouped.size(0) == 0:
            raise ValueError(
                f'{type(self).__name__}: expected more than 1 value per channel '
                f'when training with batch statistics, got an empty batch '
                f'{tuple(x_grouped.shape)} (N, G, d, H*W)')

    # --------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        device_type = x.device.type
        if not modes.needs_autocast_off(device_type):
            return self._forward(x)
        with torch.autocast(device_type, enabled=False), \
                modes.full_fp32_matmuls(device_type):
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        """The layer, with autocast off and full-fp32 matmuls."""
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        n, c, h, w = x.shape
        # (N, C, H, W) -> (N, G, d, L): free for contiguous NCHW input.
        x_grouped = x.to(compute_dtype).reshape(n, self.ce.num_groups,
                                                self.ce.group_size, h * w)
        training = self._use_batch_stats()
        if training:
            self._check_batch(x_grouped)
        # The moments' backward adds into the application's input gradient,
        # when the moments are in the graph.
        link = (GradientLink() if modes.records_grad()
                and self._moments_in_graph(training) else None)
        moments = self._moments(x_grouped, training, link)
        constants = None if training else self._eval_constants(compute_dtype)
        if constants is not None:  # eval: only the gate depends on the input
            matrix, bias = constant_maps(moments.sums, moments.squares,
                                         moments.positions, constants,
                                         moments.shift)
        elif training:
            matrix, bias = self._train_maps(moments, (h, w))
        else:
            affine = self._eval_affine(moments)
            stats = self.ce.running_statistics(compute_dtype)
            matrix, bias = self.ce.maps(stats, affine)
        # (N, G, d, d) @ (N, G, d, L) + (N, G, d, 1) -> (N, C, H, W)
        out = apply_maps(matrix, bias, moments.source, (n, c, h, w), link)
        return out.to(x.dtype)

    def _train_maps(self, moments: Moments, spatial: Tuple[int, int]
                    ) -> Tuple[Tensor, Tensor]:
        """The maps of a training step, and the running updates committed.

        Eagerly, with autograd recording and where the layer has a
        hand-written backward (:meth:`_fused_backward_supported`), the small
        graph from the moments to the maps is one autograd node
        (:func:`~cenet_mmdet.ops.small_graph`); otherwise autograd records it
        op by op (compiled, traced, the other options)."""
        def graph(sums: Tensor, second: Tensor, *params: Tensor,
                  trail: Optional[dict] = None):
            affine, stats, running = self._train_affine(
                moments._replace(sums=sums, second=second), spatial, trail)
            matrix, bias = self.ce.maps(stats, affine, trail)
            return matrix, bias, running

        sums, second = moments.sums, moments.second
        params = list(self.parameters())
        if (modes.is_eager() and modes.records_grad(sums, second, *params)
                and self._fused_backward_supported(sums.dtype)):
            matrix, bias, running = small_graph(graph, self._train_backward,
                                                (sums, second, *params))
        else:
            matrix, bias, running = graph(sums, second)
        self._commit_running(*running)
        return matrix, bias

    def _fused_backward_supported(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`_train_backward` covers this layer's options for
        inputs of ``dtype``: the block's (:meth:`CEBlock.fused_backward_supported`),
        with every parameter and gate weight in ``dtype``."""
        return self.ce.fused_backward_supported() and all(
            tensor.dtype == dtype
            for tensor in list(self.parameters()) + list(self.ce.aii.weights()))

    def _train_backward(self, trail: dict, grad_matrix: Tensor, grad_bias: Tensor
                        ) -> Tuple[Optional[Tensor], ...]:
        """The gradients of :meth:`_train_affine` and ``ce.maps`` with
        respect to the inputs of :meth:`_train_maps`: the moments ``(sums,
        second)``, then one per parameter (:meth:`_parameter_gradients`)."""
        raise NotImplementedError

    def _parameter_gradients(self, grads: MapsGradients, weight: Optional[Tensor],
                             bias: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        """One gradient per parameter, in ``self.parameters()``'s order: the
        normalizer's ``weight`` and ``bias`` ``(C,)``, and the block's from
        ``grads``."""
        by_tensor = {id(self.weight): weight, id(self.bias): bias} if self.affine else {}
        if self.ce.variant == 'ce':
            by_tensor[id(self.ce.lambda_logit)] = grads.lambda_logit
        if grads.gate is not None:
            by_tensor.update(zip(map(id, self.ce.aii.weights()), grads.gate))
        return tuple(by_tensor.get(id(param)) for param in self.parameters())

    def _use_batch_stats(self) -> bool:
        return self.training

    def train(self, mode: bool = True):
        self._eval_cache = None  # recomputed once per switch to eval
        return super().train(mode)

    def _eval_constants(self, dtype: torch.dtype) -> Optional[FoldConstants]:
        """The eval maps' input-independent part, or None where the layer
        computes it in the graph (the default)."""
        return None

    def _moments_in_graph(self, training: bool) -> bool:
        """Whether the layer's output depends on the moments (then the
        moments' backward takes the application's input gradient)."""
        return True

    def _moments(self, x_grouped: Tensor, training: bool,
                 link: Optional[GradientLink]) -> Moments:
        """Per-sample moments (Gram matrices in training, squares in eval).

        They are taken about a shift, one value of each (image, channel),
        which holds no gradient (the layer does not depend on it; it is folded
        back exactly into the maps). With :attr:`UNSHIFTED_EVAL`, in eval, and
        only where the layer may branch on data (eagerly on the CPU: decided
        before any pass), the input itself is tried first and kept when every
        (image, channel) has ``mean^2 <= UNSHIFTED_MEAN_RATIO * var``
        (:meth:`_unshifted_is_accurate`), which saves the shifted copy.
        """
        if (self.UNSHIFTED_EVAL and not training
                and modes.may_branch_on_data(x_grouped)):
            moments = Moments(x_grouped, None, *sample_moments(x_grouped, False, link))
            if self._unshifted_is_accurate(moments.sums, moments.squares,
                                           moments.positions):
                return moments
            # (dropped, with their autograd node: shifted below)
        shift = x_grouped[..., :1].detach()  # (N, G, d, 1), a view
        source = x_grouped - shift
        return Moments(source, shift.squeeze(-1),
                       *sample_moments(source, training, link))

    def _unshifted_is_accurate(self, sums: Tensor, squares: Tensor,
                               positions: int) -> bool:
        """Whether every ``(image, channel)`` has ``mean^2 <= R var`` (``R =``
        :attr:`UNSHIFTED_MEAN_RATIO`), so that the one-pass deviations
        ``D = Q - S^2 / L`` lose at most ``log10(1 + R)`` digits. With the
        squares ``Q = L (mean^2 + var)`` and ``D = L var`` that is
        ``Q <= (1 + R) D``, i.e. ``Q - (1 + R) S^2 / (R L) >= 0``: one
        ``addcmul`` and one ``min`` (NaN compares False). ``R <= 0`` never
        takes the input itself."""
        ratio = self.UNSHIFTED_MEAN_RATIO
        if ratio <= 0:
            return False
        with torch.no_grad():
            margin = torch.addcmul(squares, sums, sums,
                                   value=-(1 + ratio) / (ratio * positions))
            return margin.numel() == 0 or margin.min().item() >= 0

    def _train_affine(self, moments: Moments, spatial: Tuple[int, int],
                      trail: Optional[dict] = None) -> TrainAffine:
        raise NotImplementedError

    def _eval_affine(self, moments: Moments) -> PerSampleAffine:
        raise NotImplementedError

    # ------------------------------------------------------------ statistics
    def _reduce(self, packed: Tensor) -> Tensor:
        """Combine the packed batch statistics across workers (identity here)."""
        return packed

    def _synchronized(self) -> bool:
        """Whether :meth:`_reduce` combines the batch sums of several workers."""
        return False

    def _reduce_batch_sums(self, first: Tensor, second: Tensor, instance_var: Tensor,
                           num_samples: int, positions: int, min_count: int = 1):
        """The batch sums of a training step, over the workers with one
        :meth:`_reduce` when synchronized.

        From this worker's sums over its ``num_samples`` images: ``first``
        ``(G, d)`` or ``(C,)``, ``second`` ``(G, d, d)``, ``instance_var``
        ``(C,)`` (or its total, ``(1,)``). Returns ``(first (C,), second
        (G, d, d), instance_var,
        has_data, count, num_instances)``, the counts ``N*L`` and ``N`` clamped
        to ``min_count`` and 1 (an all-empty synchronized batch has no
        statistics, ``has_data`` False, and divides by no 0). Not
        synchronized: the counts are numbers and ``has_data`` True; else
        tensors, after one :meth:`_reduce` of the packed ``[first | second |
        instance_var | N*L | N]``.
        """
        if not self._synchronized():
            return (first.reshape(-1), second, instance_var, True,
                    max(num_samples * positions, min_count), max(num_samples, 1))
        groups, size, _ = second.shape
        channels = groups * size
        packed = torch.cat([
            first.flatten(),
            second.flatten(),
            instance_var,
            second.new_tensor([num_samples * positions, num_samples]),
        ])
        packed = self._reduce(packed)
        total_first, total_second, total_var, counts = torch.split(
            packed, [channels, channels * size, instance_var.numel(), 2])
        return (total_first, total_second.view(groups, size, size), total_var,
                counts[0] > 0, counts[0].clamp_min(min_count), counts[1].clamp_min(1))

    def _reduce_gradients(self, *grads: Tensor) -> Tuple[Tensor, ...]:
        """In a hand-written backward: the gradients of the reduced sums,
        summed over the workers like the sums (one :meth:`_reduce`)."""
        if not self._synchronized():
            return grads
        # [grad first (C) | grad second (G*d*d) | grad instance_var (C)]
        packed = self._reduce(torch.cat([grad.reshape(-1) for grad in grads]))
        return tuple(part.view_as(grad) for part, grad in zip(
            packed.split([grad.numel() for grad in grads]), grads))

    def _commit_running(self, updates: List[Tuple[Tensor, Tensor]],
                        has_data: Tensor, like: Tensor) -> None:
        """Momentum update of every running buffer in ``updates``.

        None when ``has_data`` is False, and none when any new statistic is
        not finite (a NaN/Inf batch, e.g. an AMP overflow): the buffers keep
        their last finite values and :attr:`nonfinite_skips` counts the skip.
        Both are decided on the device (``torch.where``: no host
        synchronization)."""
        with torch.no_grad():
            buffers = [buffer for buffer, _ in updates]
            # every new statistic in one flat tensor: (sum of sizes,)
            values = torch.cat([value.reshape(-1) for _, value in updates])
            # 0 * x is 0 for every finite x and NaN otherwise: one reduction
            finite = (values * 0).sum() == 0
            if has_data is True:  # (a number: not synchronized)
                accept, skipped = finite, ~finite
            else:
                accept, skipped = has_data & finite, has_data & ~finite
            self.nonfinite_skips.add_(skipped)
            tracked = getattr(self, 'num_batches_tracked', None)
            if tracked is not None:
                tracked.add_(accept)
            if all(buffer.dtype == values.dtype for buffer in buffers):
                # lerp(b, b, w) == b exactly: a rejected update changes nothing
                values = torch.where(accept, values,
                                     torch.cat([b.reshape(-1) for b in buffers]))
                chosen = [part.view_as(buffer) for part, buffer in zip(
                    values.split([b.numel() for b in buffers]), buffers)]
                torch._foreach_lerp_(buffers, chosen, self.momentum)
            else:  # buffers in another dtype than the statistics (a .half() model)
                for buffer, (_, value) in zip(buffers, updates):
                    value = torch.where(accept, value.to(buffer.dtype), buffer)
                    buffer.lerp_(value, self.momentum)
        if self._should_read_skips(like):
            self._report_nonfinite_skips()

    def _should_read_skips(self, like: Tensor) -> bool:
        """Whether to read :attr:`nonfinite_skips` now: every update eagerly on
        the CPU, every :attr:`NONFINITE_CHECK_EVERY` updates on other devices
        (one host synchronization per that many), never when traced or
        compiled."""
        if not modes.is_eager():
            return False
        if like.device.type == 'cpu':
            return True
        self._updates_unread += 1
        if self._updates_unread < self.NONFINITE_CHECK_EVERY:
            return False
        self._updates_unread = 0
        return True

    def _report_nonfinite_skips(self) -> None:
        """Log the 1st, (N+1)-th, (2N+1)-th, ... skipped update (``N =``
        :attr:`NONFINITE_LOG_EVERY`)."""
        skips, seen = int(self.nonfinite_skips), self._nonfinite_seen
        self._nonfinite_seen = skips
        every = self.NONFINITE_LOG_EVERY
        if (skips - 1) // every <= (seen - 1) // every:
            return
        print_log(
            f'{type(self).__name__}({self.num_features}): a training batch gave '
            f'non-finite statistics (NaN/Inf input, e.g. an AMP overflow); its '
            f'running statistics keep their last finite values ({skips} '
            f'batch(es) skipped so far in this layer; logged once per {every}).',
            logger='current', level=logging.WARNING)

    def _normalizer_beta(self, like: Tensor) -> Tensor:
        """The normalizer's shift ``beta`` ``(C,)`` (zeros without affine)."""
        if self.affine:
            return self.bias.to(like.dtype)
        return like.new_zeros(self.num_features)
