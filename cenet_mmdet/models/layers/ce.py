"""CE: batch normalization followed by a Channel Equilibrium block.

:class:`CELayer` holds what every CE layer shares whatever normalizer
precedes the block (the block's maps, the guarded running update, the
synchronization hook); :class:`CE` is BN + CE, the released layer, and
:class:`~cenet_mmdet.models.layers.GroupNormCE` is GN/IN/LN + CE. The block
(:class:`CEBlock`) has three variants (paper Table 4): both branches
(``'ce'``, the default), BD only (``'bd'``) and AII only (``'aii'``).

Design notes
------------
* ``CE`` subclasses :class:`torch.nn.BatchNorm2d`, so MMCV/MMDetection treat it
  as a norm layer: ``build_norm_layer`` names it ``bn`` (``bn1``, ``bn3`` stay
  the torchvision names), ``norm_eval=True`` switches it to eval, and
  ``frozen_stages`` and the optimizer's norm weight-decay rules apply. The BN
  parameters and buffers keep their usual names; the CE block lives in the
  child module ``ce`` (``bn3.ce.running_whitening``, ...).
* BN and CE are computed together: every statistic (BN mean and variance, the
  CE group covariance, the AII per-instance variances) is derived from the
  per-sample moments of the *BN input* ``x``, and the whole layer is applied as
  one per-sample affine map ``M_n x_n + c_n`` (see
  :func:`cenet_mmdet.ops.fold_channel_equilibrium`). The BN output is never
  materialized, which makes the layer cheap and lets :class:`SyncCE`
  synchronize all statistics with one packed collective (after a small one
  that agrees on the reference of the sums).
* In training, the moments are taken on the input shifted per (image,
  channel) by one of its own values, then moved exactly to one reference
  shared by the batch (and by all workers in :class:`SyncCE`), and the maps
  are applied to the shifted input: one pass, and no ``E[x^2] - E[x]^2``
  cancellation however large ``|mean| / std`` is (tested up to 1e4 against a
  float64 reference). In eval on the CPU, the moments are first taken on the
  input itself, and used when every (image, channel) has
  ``mean^2 <= UNSHIFTED_MEAN_RATIO * var`` (100: at most 2 digits lost);
  otherwise the layer shifts as in training. This saves the shifted copy, an
  activation-sized tensor, in the common case (traced, compiled and CUDA runs
  always shift: no data-dependent branch, no host synchronization).
* Backward: the application's input gradient is written into one fresh
  tensor, and the moments' backward adds its own term into it in place
  (:class:`cenet_mmdet.ops.GradientLink`): one activation-sized gradient per
  layer, no accumulation pass.
* All statistics, the covariance and the Newton iteration run in float32 (float64
  for float64 inputs), also under ``torch.autocast``; the output has the input's
  dtype.
* A training batch whose statistics are not finite (NaN/Inf input, e.g. an
  AMP overflow) leaves every running buffer at its last finite value; the
  output is NaN like the input. The skip is decided on the device
  (``torch.where``), counted in the non-persistent buffer
  ``nonfinite_skips`` and logged once per :attr:`CE.NONFINITE_LOG_EVERY`
  skips (the count is read every update on the CPU, every
  :attr:`CE.NONFINITE_CHECK_EVERY` updates elsewhere).
* Loads are recorded: ``ce.loaded`` says whether the CE block's tensors have
  come from a state dict (see ``CEResNet.check_ce_weights``).
* Definitional choices beyond the released code (each is exact whenever the
  released code does not divide by zero): ``running_scale`` starts at 1 (the
  released code starts at 0, so an untrained block divides by zero in eval),
  the AII batch scale is :math:`\\sqrt{\\max(\\bar v, \\epsilon)}`, and
  per-instance variances are clamped at 0.
"""
import contextlib
import logging
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor, nn

from ...ops import (GradientLink, apply_maps, fold_channel_equilibrium,
                    inverse_sqrt_newton,
                    resolve_group_size, sample_moments, shifted_moments)

WHITENING_MODES = ('released', 'paper')
#: the block's variants (paper Table 4): both branches, BD only, AII only
CE_VARIANTS = ('ce', 'bd', 'aii')

#: released CE key suffix -> key suffix inside :attr:`CE.ce` (the checkpoint map)
RELEASED_CE_KEYS = {
    'x_weight': 'lambda_logit',
    'running_mean': 'running_mean',
    'running_wm': 'running_whitening',
    'AR.running_scale': 'aii.running_scale',
    'AR.fc.0.weight': 'aii.gate.0.weight',
    'AR.fc.1.weight': 'aii.gate.1.weight',
    'AR.fc.1.bias': 'aii.gate.1.bias',
    'AR.fc.3.weight': 'aii.gate.3.weight',
}


@contextlib.contextmanager
def _full_fp32_matmuls(device_type: str) -> Iterator[None]:
    """cuBLAS float32 matmuls in full float32 (no TF32) inside the block, so
    that the Gram matrix and the Newton steps keep float32 accuracy when a user
    enables TF32 globally. A no-op off CUDA and when TF32 is already off."""
    if device_type != 'cuda':
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:  # torch >= 2.9: the per-backend setting, which cuBLAS reads
        name, previous, full = 'fp32_precision', matmul.fp32_precision, 'ieee'
    except AttributeError:
        name, previous, full = 'allow_tf32', matmul.allow_tf32, False
    if previous == full:
        yield
        return
    setattr(matmul, name, full)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def _is_eager() -> bool:
    """Whether the layer runs eagerly: not scripted, traced (also for ONNX)
    or compiled, so that it may read values and keep Python-side state."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    return not (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def _may_branch_on_data(tensor: Tensor) -> bool:
    """Whether the layer may choose its algorithm from the values of
    ``tensor``: only eagerly and on the CPU (on CUDA the choice would cost a
    host synchronization per layer; traced and compiled graphs must not
    depend on the data)."""
    return tensor.device.type == 'cpu' and _is_eager()


def _params_to_buffers(module: nn.Module) -> None:
    """Re-register every parameter of ``module`` (recursively) as a buffer.

    State-dict keys are unchanged, so checkpoints load either way, but the
    tensors are invisible to optimizers, ``requires_grad`` switches and DDP.
    """
    for submodule in module.modules():
        for name, param in list(submodule.named_parameters(recurse=False)):
            delattr(submodule, name)
            submodule.register_buffer(name, param.detach().clone())


class AdaptiveInstanceInverse(nn.Module):
    """AII: a gated per-instance rescaling by the inverse batch scale.

    .. math::
        \\mathrm{AII}(y)_{nc} = y_{nc}\\, \\sigma\\big(W_2\\,
        \\mathrm{ReLU}(\\mathrm{LN}(W_1 v_n))\\big)_c / s

    with :math:`v_{nc}` the unbiased variance of :math:`y_{nc}` over ``H*W`` and
    :math:`s = \\sqrt{\\mathrm{mean}_{n,c}\\, v_{nc}}` in training
    (``running_scale`` in eval).

    Args:
        num_channels: ``C``.
        reduction: the gate's hidden width is ``C // reduction``. Default: 4.
    """

    def __init__(self, num_channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = num_channels // reduction
        if hidden < 1:
            raise ValueError(f'reduction={reduction} leaves no hidden unit for '
                             f'{num_channels} channels')
        # Indices 0, 1, 3 match the released ``AR.fc`` layout.
        self.gate = nn.Sequential(
            nn.Linear(num_channels, hidden, bias=False), nn.LayerNorm(hidden),
            nn.ReLU(inplace=True), nn.Linear(hidden, num_channels, bias=False))
        # The released code starts at 0 (division by zero before training).
        self.register_buffer('running_scale', torch.ones(1))

    def forward(self, variance: Tensor) -> Tensor:
        """Gate values ``(N, C)`` in (0, 1) from per-instance variances ``(N, C)``."""
        # ``self.gate`` computed functionally: the same ops without four
        # submodule calls (a CE layer's fixed cost matters on the CPU).
        reduce, norm, _, expand = self.gate
        hidden = F.layer_norm(F.linear(variance, reduce.weight), norm.normalized_shape,
                              norm.weight, norm.bias, norm.eps)
        return torch.sigmoid(F.linear(hidden.relu_(), expand.weight))


class CEBlock(nn.Module):
    """The parameters and buffers of one Channel Equilibrium block.

    .. math::
        p = \\lambda\\, \\mathrm{BD}(y) + (1 - \\lambda)\\, \\mathrm{AII}(y),\\quad
        \\lambda = \\sigma(\\text{lambda\\_logit})

    The computation is done by the layer that owns the block (:class:`CE`,
    or :class:`~cenet_mmdet.models.layers.GroupNormCE`), which also owns the
    preceding normalizer.

    Variants (paper Table 4), chosen by ``variant``:

    * ``'ce'``: both branches mixed by the learnt :math:`\\lambda` (the
      released block; the default);
    * ``'bd'``: batch decorrelation only, :math:`p = \\mathrm{BD}(y)`
      (no ``lambda_logit``, no ``aii``);
    * ``'aii'``: adaptive instance inverse only, :math:`p = \\mathrm{AII}(y)`
      (no ``lambda_logit``, no ``running_mean``/``running_whitening``).

    Args:
        num_channels: ``C``.
        group_size: channels per whitening group ``d`` (halved until it divides
            ``C``). Default: 16.
        num_iters: Newton steps ``T``. Default: 3.
        eps: added to the covariance diagonal. Default: 1e-5.
        reduction: AII gate reduction. Default: 4.
        whitening: ``'released'`` (``P_T`` applied to the uncentred input) or
            ``'paper'`` (``P_T / sqrt(tr Sigma)`` applied to the centred input).
        variant: ``'ce'``, ``'bd'`` or ``'aii'``. Default: ``'ce'``.
    """

    def __init__(self,
                 num_channels: int,
                 group_size: int = 16,
                 num_iters: int = 3,
                 eps: float = 1e-5,
                 reduction: int = 4,
                 whitening: str = 'released',
                 variant: str = 'ce') -> None:
        super().__init__()
        if whitening not in WHITENING_MODES:
            raise ValueError(f'whitening must be one of {WHITENING_MODES}, '
                             f'got {whitening!r}')
        if variant not in CE_VARIANTS:
            raise ValueError(f'variant must be one of {CE_VARIANTS} (CE, '
                             f'BD only, AII only), got {variant!r}')
        if not isinstance(num_iters, int) or num_iters < 0:
            raise ValueError(f'num_iters must be an int >= 0, got {num_iters!r}')
        self.num_channels = num_channels
        self.group_size = resolve_group_size(num_channels, group_size)
        self.num_groups = num_channels // self.group_size
        self.num_iters = num_iters
        self.eps = eps
        self.whitening = whitening
        self.variant = variant
        if variant == 'ce':
            self.lambda_logit = nn.Parameter(torch.zeros(1))
        if self.has_aii:
            self.aii = AdaptiveInstanceInverse(num_channels, reduction)
        if self.has_bd:
            groups, size = self.num_groups, self.group_size
            self.register_buffer('running_mean', torch.zeros(groups, size, 1))
            # A real (G, d, d) tensor, not an expanded identity.
            self.register_buffer('running_whitening',
                                 torch.eye(size).repeat(groups, 1, 1))
        #: whether lambda and the AII gate are fixed (:meth:`freeze_gate`)
        self.gate_frozen = False
        #: whether every tensor of the block has come from a state dict at
        #: least once (else they hold their construction-time values)
        self.loaded = False

    @property
    def has_bd(self) -> bool:
        """Whether the block has the batch decorrelation branch."""
        return self.variant != 'aii'

    @property
    def has_aii(self) -> bool:
        """Whether the block has the adaptive instance inverse branch."""
        return self.variant != 'bd'

    def mixing(self, like: Tensor) -> Tensor:
        """:math:`\\lambda` ``(1,)`` in ``like``'s dtype: learnt for ``'ce'``,
        1 for ``'bd'``, 0 for ``'aii'``."""
        if self.variant == 'ce':
            return torch.sigmoid(self.lambda_logit.to(like.dtype))
        return like.new_full((1, ), 1.0 if self.variant == 'bd' else 0.0)

    def freeze_gate(self) -> None:
        """Fix lambda and the AII gate F (the paper's SyncCE detection setting)."""
        _params_to_buffers(self)
        self.gate_frozen = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        """Record in :attr:`loaded` whether this load holds every tensor of
        the block with its shape (torch's and MMEngine's loaders both come
        through here, strict or not)."""
        expected = self.state_dict(keep_vars=True)
        complete = all(
            prefix + key in state_dict
            and getattr(state_dict[prefix + key], 'shape', None) == value.shape
            for key, value in expected.items())
        self.loaded = self.loaded or complete
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f'{self.num_channels}, group_size={self.group_size}, '
                f'num_iters={self.num_iters}, eps={self.eps}, '
                f'whitening={self.whitening!r}, variant={self.variant!r}')


class CELayer:
    """What every CE layer shares, whatever normalizer precedes the block.

    A mixin for a torch normalizer class (``class CE(CELayer,
    nn.BatchNorm2d)``): the input checks, the autocast-free forward, the
    per-sample maps of the block (:meth:`_maps`), the guarded running-buffer
    update and the synchronization hooks (:meth:`_reduce`, overridden by the
    synchronized layers). A subclass calls :meth:`_init_ce_block` in its
    ``__init__`` and implements ``_forward``. ``isinstance(m, CELayer)`` finds
    every CE layer.
    """

    #: a skipped (non-finite) running-statistics update is logged once per
    #: this many skips of the layer (the 1st, the N+1-th, ...)
    NONFINITE_LOG_EVERY = 100
    #: off the CPU the skip count is read once per this many updates
    NONFINITE_CHECK_EVERY = 100

    def _init_ce_block(self, num_features: int, group_size: int, num_iters: int,
                       ce_eps: float, reduction: int, whitening: str, variant: str,
                       frozen_gate: bool) -> None:
        """Build the block ``self.ce`` and the skip counter."""
        self.ce = CEBlock(num_features, group_size, num_iters, ce_eps, reduction,
                          whitening, variant)
        if frozen_gate:
            self.ce.freeze_gate()
        # training batches whose statistics were not finite (not saved)
        self.register_buffer('nonfinite_skips', torch.zeros((), dtype=torch.long),
                             persistent=False)
        self._nonfinite_seen = 0
        self._updates_unread = 0

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

    # ------------------------------------------------------------ statistics
    def _reduce(self, packed: Tensor) -> Tensor:
        """Combine the packed batch statistics across workers (identity here)."""
        return packed

    def _reduce_batch_sums(self, first: Tensor, second: Tensor, instance_var: Tensor,
                           num_samples: int, positions: int, min_count: int = 1
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The batch sums of a training step, over the workers with one
        :meth:`_reduce` when synchronized.

        Packs ``[first (C) | second (G*d*d) | instance_var (C) | N*L | N]``
        from this worker's sums over its ``num_samples`` images: ``first``
        ``(G, d)`` or ``(C,)``, ``second`` ``(G, d, d)``, ``instance_var``
        ``(C,)``. Returns ``(first (C,), second (G, d, d), instance_var (C,),
        has_data, count, num_instances)``, the counts clamped to ``min_count``
        and 1: an all-empty synchronized batch has no statistics (``has_data``
        False) and divides by no 0.
        """
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
            packed, [channels, channels * size, channels, 2])
        return (total_first, total_second.view(groups, size, size), total_var,
                counts[0] > 0, counts[0].clamp_min(min_count), counts[1].clamp_min(1))

    def _use_batch_stats(self) -> bool:
        return self.training

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        device_type = x.device.type
        if device_type == 'cpu' and not torch.is_autocast_enabled(device_type):
            return self._forward(x)  # no context needed (saves per-call time)
        with torch.autocast(device_type, enabled=False), \
                _full_fp32_matmuls(device_type):
            return self._forward(x)

    @staticmethod
    def _instance_variance(deviations: Tensor, positions: int) -> Tensor:
        """Unbiased per-instance variance ``(N, C)`` from the sums of squared
        deviations ``(N, G, d)``, clamped at 0."""
        return (deviations / (positions - 1)).clamp_min(0).flatten(1)

    def _block_statistics(self, cov_y: Tensor, mean_var: Tensor
                          ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The whitening matrices ``(G, d, d)`` of the batch covariance
        ``cov_y`` of the normalizer output (BD) and the AII batch scale
        :math:`\\sqrt{\\max(\\bar v, \\epsilon)}` from the mean per-instance
        variance ``mean_var``; None for a branch the variant lacks."""
        ce = self.ce
        whitening = aii_scale = None
        if ce.has_bd:
            eye = torch.eye(ce.group_size, dtype=cov_y.dtype, device=cov_y.device)
            whitening = inverse_sqrt_newton(
                cov_y + ce.eps * eye, ce.num_iters, rescale=ce.whitening == 'paper')
        if ce.has_aii:
            aii_scale = mean_var.clamp_min(ce.eps).sqrt()
        return whitening, aii_scale

    def _block_updates(self, mean_y: Tensor, whitening: Optional[Tensor],
                       aii_scale: Optional[Tensor]) -> List[Tuple[Tensor, Tensor]]:
        """``(running buffer, new value)`` of the block's buffers."""
        ce = self.ce
        updates = []
        if ce.has_bd:
            updates += [(ce.running_mean, mean_y.unsqueeze(-1)),
                        (ce.running_whitening, whitening)]
        if ce.has_aii:
            updates.append((ce.aii.running_scale, aii_scale.reshape(1)))
        return updates

    def _running_block(self, dtype: torch.dtype
                       ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """``(whitening (G, d, d), aii_scale (1,), mean_y (G, d))`` from the
        running buffers (None for a branch the variant lacks)."""
        ce = self.ce
        whitening = aii_scale = mean_y = None
        if ce.has_bd:
            whitening = ce.running_whitening.to(dtype)
            mean_y = ce.running_mean.to(dtype).squeeze(-1)
        if ce.has_aii:
            aii_scale = ce.aii.running_scale.to(dtype)
        return whitening, aii_scale, mean_y

    def _commit_running(self, updates: List[Tuple[Tensor, Tensor]],
                        has_data: Tensor, like: Tensor) -> None:
        """Momentum update of every running buffer in ``updates``.

        None when ``has_data`` is False, and none when any new statistic is
        not finite (a NaN/Inf batch, e.g. an AMP overflow): the buffers keep
        their last finite values and :attr:`nonfinite_skips` counts the skip.
        Both are decided on the device (``torch.where``: no host
        synchronization)."""
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(value).all()
                                  for _, value in updates]).all()
            accept = has_data & finite
            self.nonfinite_skips.add_((has_data & ~finite).to(self.nonfinite_skips.dtype))
            tracked = getattr(self, 'num_batches_tracked', None)
            if tracked is not None:
                tracked.add_(accept.to(tracked.dtype))
            for buffer, value in updates:
                # lerp(b, b, w) == b exactly: a rejected update changes nothing
                value = torch.where(accept, value.to(buffer.dtype), buffer)
                buffer.lerp_(value, self.momentum)
        if self._should_read_skips(like):
            self._report_nonfinite_skips()

    def _should_read_skips(self, like: Tensor) -> bool:
        """Whether to read :attr:`nonfinite_skips` now: every update eagerly on
        the CPU, every :attr:`NONFINITE_CHECK_EVERY` updates on other devices
        (one host synchronization per that many), never when traced or
        compiled."""
        if not _is_eager():
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

    def _maps(self, whitening: Optional[Tensor], aii_scale: Optional[Tensor],
              instance_var_y: Tensor, scale: Tensor, shift_n: Tensor,
              mean_y: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Per-sample ``(matrix, bias)`` of the layer for the normalizer
        output ``y = a x + b_n`` (``scale`` ``a``: ``(G, d)``, or ``(N, G, d)``
        for a per-sample normalizer; ``shift_n`` ``(N, G, d)``); a branch the
        variant lacks (None) contributes nothing."""
        ce = self.ce
        groups, size = ce.num_groups, ce.group_size
        lam = ce.mixing(scale)
        if ce.has_aii:
            gate = self._gate(instance_var_y)
            instance_scale = (1 - lam) * gate / aii_scale  # (N, C)
        else:
            instance_scale = instance_var_y.new_zeros(instance_var_y.shape)
        if whitening is None:  # AII only: lam = 0, no BD term
            whitening = scale.new_zeros(groups, size, size)
        center = mean_y if ce.whitening == 'paper' and ce.has_bd else None
        return fold_channel_equilibrium(
            lam, whitening, instance_scale.view(-1, groups, size), scale, shift_n,
            center)

    def _gate(self, instance_var_y: Tensor) -> Tensor:
        """AII gate, evaluated in the gate's own dtype, returned in the input's."""
        gate_dtype = self.ce.aii.gate[0].weight.dtype
        return self.ce.aii(instance_var_y.to(gate_dtype)).to(instance_var_y.dtype)


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

    #: In eval on the CPU, moments are taken on the unshifted input when every
    #: (image, channel) has ``mean^2 <= UNSHIFTED_MEAN_RATIO * var`` (at most 2
    #: digits lost); otherwise about a per-(image, channel) shift.
    UNSHIFTED_MEAN_RATIO = 100.0

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
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f'momentum must be a float in [0, 1], got {momentum!r}')
        super().__init__(num_features, eps, momentum, affine, True)
        self.pool_stats = pool_stats
        self._init_ce_block(num_features, group_size, num_iters, ce_eps, reduction,
                            whitening, variant, frozen_gate)

    def _common_shift(self, shift: Tensor) -> Tensor:
        """The reference ``(G, d)`` about which the batch sums are taken: the
        first sample's shift (every worker must use the same one)."""
        return shift[0]

    def _forward(self, x: Tensor) -> Tensor:
        """The layer, with autocast off and full-fp32 matmuls."""
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x_compute = x.to(compute_dtype)
        n, c, h, w = x.shape
        ce = self.ce
        # (N, C, H, W) -> (N, G, d, L): free for contiguous NCHW input.
        x_grouped = x_compute.reshape(n, ce.num_groups, ce.group_size, h * w)
        # The moments' backward adds into the application's input gradient,
        # when the moments are in the graph: in eval, BD only uses none of
        # them (running statistics throughout), so nothing is handed over.
        training = self._use_batch_stats()
        link = (GradientLink() if torch.is_grad_enabled()
                and (training or ce.has_aii) else None)
        if training:
            # Shifted one-pass moments: every (image, channel) is shifted by
            # one of its own values, so the sums stay accurate however large
            # |mean| / std is. The shift is folded back exactly into the maps
            # (and holds no gradient: the layer does not depend on it).
            shift = x_grouped[..., :1].detach().contiguous()  # (N, G, d, 1)
            source = x_grouped - shift
            matrix, bias = self._train_maps(source, shift.squeeze(-1), h, w, link)
        else:
            matrix, bias, source = self._eval_maps(x_grouped, link)
        # (N, G, d, d) @ (N, G, d, L) + (N, G, d, 1) -> (N, C, H, W)
        out = apply_maps(matrix, bias, source, (n, c, h, w), link)
        return out.to(x.dtype)

    def _bn_scale(self, var: Tensor) -> Tensor:
        """BN scale ``a = gamma / sqrt(var + eps)``, ``(C,)``."""
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.to(scale.dtype)
        return scale

    def _bn_beta(self, like: Tensor) -> Tensor:
        """BN output offset ``beta`` ``(C,)`` (zeros without affine)."""
        if self.affine:
            return self.bias.to(like.dtype)
        return like.new_zeros(self.num_features)

    @staticmethod
    def _deviations(sums: Tensor, squares: Tensor, positions: int) -> Tensor:
        """``sum_l (x_l - mean)^2 = Q - S^2 / L`` per (image, channel),
        ``(N, G, d)`` (plain ops: traced for ONNX, ``L`` is a tensor)."""
        return squares - sums.square() / positions

    def _train_maps(self, x_shifted: Tensor, shift: Tensor, h: int, w: int,
                    link: Optional[GradientLink] = None) -> Tuple[Tensor, Tensor]:
        """Maps from batch statistics.

        ``x_shifted`` ``(N, G, d, L)`` is ``x - shift`` with ``shift``
        ``(N, G, d)`` one value of each image and channel; the maps apply to
        ``x_shifted``.
        """
        ce = self.ce
        n, groups, size, positions = x_shifted.shape
        self._check_batch(x_shifted)
        channels = groups * size
        sums, gram = sample_moments(x_shifted, True, link)  # about shift
        squares = gram.diagonal(dim1=-2, dim2=-1)  # (N, G, d)
        instance_var = self._instance_variance(
            self._deviations(sums, squares, positions), positions)
        # Batch sums about one reference t shared by all workers.
        reference = self._common_shift(shift)  # (G, d)
        offset = shift - reference  # (N, G, d)
        ref_sums, ref_gram = shifted_moments(sums, gram, offset, positions)
        # sum (x-t) (C), sum (x-t)(x-t)^T (G, d, d), sum_n var_nc (C); without
        # data the running buffers are not updated
        total_sum, total_gram, total_var, has_data, count, num_instances = (
            self._reduce_batch_sums(ref_sums.sum(0), ref_gram.sum(0),
                                    instance_var.sum(0), n, positions, min_count=2))

        # BN statistics; the mean relative to t first (small, accurate).
        mean_rel = total_sum / count  # (C,)
        second = total_gram / count  # (G, d, d)
        var = (second.diagonal(dim1=-2, dim2=-1).flatten() - mean_rel.square()).clamp_min(0)
        mean = mean_rel + reference.flatten()
        bn_scale = self._bn_scale(var)
        beta = self._bn_beta(bn_scale)
        scale_g, mean_rel_g = bn_scale.view(groups, size), mean_rel.view(groups, size)
        # y = a (x - mean) + beta = a x_shifted + b_n with
        # b_n = a (shift_n - mean) + beta = a (offset_n - mean_rel) + beta.
        shift_n = scale_g * (offset - mean_rel_g) + beta.view(groups, size)

        # BD: covariance of y = a x + b is diag(a) Cov(x) diag(a); mean(y) = beta.
        cov_x = second - mean_rel_g.unsqueeze(-1) * mean_rel_g.unsqueeze(-2)
        cov_y = cov_x * scale_g.unsqueeze(-1) * scale_g.unsqueeze(-2)
        mean_y = beta.view(groups, size)
        if self.pool_stats:
            cov_y, mean_y = self._pooled_covariance(x_shifted, scale_g, shift_n,
                                                    count, h, w)
        # AII: per-instance variance of y is a^2 Var(x); batch scale from all N, C.
        mean_var = (total_var * bn_scale.square()).sum() / (num_instances * channels)
        whitening, aii_scale = self._block_statistics(cov_y, mean_var)
        self._update_running(mean, var, count, has_data, mean_y, whitening,
                             aii_scale)
        return self._maps(whitening, aii_scale, instance_var * bn_scale.square(),
                          scale_g, shift_n, mean_y)

    def _pooled_covariance(self, x_shifted: Tensor, scale_g: Tensor,
                           shift_n: Tensor, count: Tensor, h: int,
                           w: int) -> Tuple[Tensor, Tensor]:
        """Released ``pool_stats`` option: mean and covariance of the 2x2
        max-pooled BN output ``y = a x_shifted + b_n``, normalized by the
        unpooled count."""
        n, groups, size, _ = x_shifted.shape
        y = x_shifted * scale_g[..., None] + shift_n[..., None]
        pooled = F.max_pool2d(y.reshape(n, groups * size, h, w), 2, 2)
        pooled = pooled.reshape(n, groups, size, -1)
        mean_y = pooled.mean(dim=(0, 3))  # (G, d)
        centred = pooled - mean_y[None, :, :, None]
        cov = torch.matmul(centred, centred.transpose(-1, -2)).sum(0) / count
        return cov, mean_y

    def _update_running(self, mean: Tensor, var: Tensor, count: Tensor,
                        has_data: Tensor, mean_y: Tensor,
                        whitening: Optional[Tensor],
                        aii_scale: Optional[Tensor]) -> None:
        """Momentum update of the BN and block buffers (see
        :meth:`CELayer._commit_running`)."""
        updates = [
            (self.running_mean, mean),
            (self.running_var, var * (count / (count - 1))),  # unbiased
        ] + self._block_updates(mean_y, whitening, aii_scale)
        self._commit_running(updates, has_data, mean)

    def _eval_maps(self, x_grouped: Tensor,
                   link: Optional[GradientLink] = None
                   ) -> Tuple[Tensor, Tensor, Tensor]:
        """Maps from running statistics: ``(matrix, bias, source)`` such that
        the layer output is ``matrix @ source + bias`` per sample and group.

        The moments are first taken on the input itself (no copy). When some
        ``(image, channel)`` has ``mean^2 > UNSHIFTED_MEAN_RATIO * var`` (the
        one-pass variance would lose digits), everything is recomputed about
        a per-(image, channel) shift, exactly as in training (one more pass,
        only for such inputs). Traced, compiled and CUDA runs always shift
        (no data-dependent branch, no host synchronization).
        """
        positions = x_grouped.size(-1)
        sums, squares = sample_moments(x_grouped, False, link)
        deviations = self._deviations(sums, squares, positions)
        if self._unshifted_is_accurate(squares, deviations):
            return self._eval_maps_about(x_grouped, deviations, None)
        # (the unshifted moments are dropped, with their autograd node)
        shift = x_grouped[..., :1].detach().contiguous()  # (N, G, d, 1)
        x_shifted = x_grouped - shift
        sums, squares = sample_moments(x_shifted, False, link)
        deviations = self._deviations(sums, squares, positions)
        return self._eval_maps_about(x_shifted, deviations, shift.squeeze(-1))

    def _unshifted_is_accurate(self, squares: Tensor, deviations: Tensor) -> bool:
        """Whether every ``(image, channel)`` has ``mean^2 <= R var`` (``R =``
        :attr:`UNSHIFTED_MEAN_RATIO`), so that the one-pass deviations
        ``D = Q - S^2 / L`` lose at most ``log10(1 + R)`` digits. With the
        squares ``Q = L (mean^2 + var)`` and ``D = L var`` that is
        ``Q <= (1 + R) D`` (NaN compares False)."""
        if not _may_branch_on_data(squares):
            return False
        with torch.no_grad():
            return bool(torch.all(
                squares <= deviations * (1 + self.UNSHIFTED_MEAN_RATIO)))

    def _eval_maps_about(self, source: Tensor, deviations: Tensor,
                         shift: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Eval maps for ``source = x - shift`` (``shift`` ``(N, G, d)``, or
        ``None`` for the input itself) from the sums of squared deviations
        ``(N, G, d)`` of each ``(image, channel)``."""
        dtype = source.dtype
        _, groups, size, positions = source.shape
        bn_scale = self._bn_scale(self.running_var.to(dtype))
        scale_g = bn_scale.view(groups, size)
        beta = self._bn_beta(bn_scale).view(groups, size)
        running_mean = self.running_mean.to(dtype).view(groups, size)
        # b = a (shift - running_mean) + beta: the BN output of the shift
        # (the difference of two close numbers is exact: large means cost no
        # precision). Without a shift it is one (G, d) constant.
        if shift is None:
            bn_shift = torch.addcmul(beta, scale_g, running_mean, value=-1)
        else:
            bn_shift = torch.addcmul(beta, scale_g, shift - running_mean)
        # unbiased per-instance variance of y = a x, (N, C)
        instance_var_y = self._instance_variance(deviations, positions) * bn_scale.square()
        whitening, aii_scale, mean_y = self._running_block(dtype)
        return self._maps(whitening, aii_scale, instance_var_y, scale_g, bn_shift,
                          mean_y) + (source, )
