"""The Channel Equilibrium block: its parameters, buffers and math, stated once.

The layers that carry a block (:class:`~cenet_mmdet.models.layers.CE` over BN,
:class:`~cenet_mmdet.models.layers.GroupNormCE` over GN/IN/LN, and their
synchronized forms) supply only what depends on the normalizer before it: the
normalizer's per-sample affine map and the batch statistics of its output,
reduced locally or across workers. Everything else is here.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import (FoldConstants, fold_channel_equilibrium, fold_constants,
                    gate_backward, gate_forward, inverse_sqrt_newton,
                    inverse_sqrt_newton_backward, resolve_group_size)

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


class BlockStatistics(NamedTuple):
    """The statistics a block's maps are made from (batch or running); None
    for a branch the variant lacks."""

    #: ``(G, d, d)``, :math:`W`, the whitening matrices (BD)
    whitening: Optional[Tensor]
    #: ``(G, d)``, :math:`\\mu`, the mean of the block input (BD)
    mean: Optional[Tensor]
    #: ``(1,)`` or ``()``, :math:`s`, the AII batch scale
    aii_scale: Optional[Tensor]


class PerSampleAffine(NamedTuple):
    """The normalizer before the block as ``y_n = a_n * u_n + b_n`` for the
    grouped input ``u`` (the input, or the input minus a per-sample shift)."""

    #: ``(G, d)``, or ``(N, G, d)`` for a per-sample normalizer, :math:`a`
    scale: Tensor
    #: ``(N, G, d)`` or ``(G, d)``, :math:`b_n`
    shift: Tensor
    #: ``(N, C)``, :math:`v_n`, the unbiased per-instance variances of ``y``
    instance_var: Tensor


class MapsGradients(NamedTuple):
    """The gradients of :meth:`CEBlock.maps` with respect to its inputs and
    the block's parameters (None for frozen ones)."""

    #: ``(G, d, d)``
    whitening: Tensor
    #: ``(1,)``
    aii_scale: Tensor
    #: ``(G, d)``, of :attr:`PerSampleAffine.scale`
    scale: Tensor
    #: ``(N, G, d)``, of :attr:`PerSampleAffine.shift`
    shift: Tensor
    #: ``(N, C)``, of :attr:`PerSampleAffine.instance_var`
    instance_var: Tensor
    #: ``(1,)``, of ``lambda_logit``
    lambda_logit: Tensor
    #: of the gate's ``(W_1, LN weight, LN bias, W_2)``, or None (frozen)
    gate: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]


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
    """AII: the gate of the per-instance rescaling, and its running scale.

    .. math::
        F(v_n) = \\sigma\\big(W_2\\, \\mathrm{ReLU}(\\mathrm{LN}(W_1 v_n))\\big)

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

    def weights(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W_1, LN weight, LN bias, W_2)``."""
        reduce, norm, _, expand = self.gate
        return reduce.weight, norm.weight, norm.bias, expand.weight

    def forward(self, variance: Tensor, trail: Optional[dict] = None) -> Tensor:
        """Gate values ``(N, C)`` in (0, 1) from per-instance variances ``(N, C)``,
        computed in the gate's dtype and returned in ``variance``'s. With a
        ``trail`` dict (same dtype only), its ``gate_trace`` is stored there
        (:func:`~cenet_mmdet.ops.gate_forward`)."""
        reduce, norm, _, expand = self.gate
        if trail is not None:
            gate, trail['gate_trace'] = gate_forward(variance, self.weights(), norm.eps)
            return gate
        # ``self.gate`` computed functionally: the same ops without four
        # submodule calls (a CE layer's fixed cost matters on the CPU).
        hidden = F.layer_norm(
            F.linear(variance.to(reduce.weight.dtype), reduce.weight),
            norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        gate = torch.sigmoid(F.linear(hidden.relu_(), expand.weight))
        return gate.to(variance.dtype)


class CEBlock(nn.Module):
    """One Channel Equilibrium block: its parameters, buffers and math.

    For the block input :math:`y_n` (the normalizer's output for sample
    :math:`n`, channels in groups of ``d``):

    .. math::
        p_n = \\lambda\\, W (y_n - \\mu) + (1 - \\lambda)\\,
              \\mathrm{diag}\\big(F(v_n) / s\\big)\\, y_n,\\qquad
        \\lambda = \\sigma(\\text{lambda\\_logit})

    * BD: :math:`W = P_T` (``'released'``, with :math:`\\mu = 0`) or
      :math:`P_T / \\sqrt{\\mathrm{tr}\\,\\Sigma}` (``'paper'``, with
      :math:`\\mu` the mean of :math:`y`), where :math:`P_T` is ``num_iters``
      Newton steps for the inverse square root of the trace-normalized group
      covariance :math:`\\Sigma + \\epsilon I` of :math:`y` over
      :math:`(N, H, W)`;
    * AII: :math:`v_{nc}` the unbiased variance of :math:`y_{nc}` over
      :math:`H W`, :math:`F` the gate (:class:`AdaptiveInstanceInverse`),
      :math:`s = \\sqrt{\\max(\\bar v, \\epsilon)}` with :math:`\\bar v` the
      mean of :math:`v` over :math:`(N, C)`;
    * in training :math:`\\Sigma, \\mu, s` come from the batch and update
      ``running_whitening`` (:math:`W`), ``running_mean`` and
      ``aii.running_scale`` by momentum; in eval they are those buffers.

    With the normalizer written as :math:`y_n = a_n \\odot u_n + b_n`
    (:class:`PerSampleAffine`), the layer is one map per sample,
    :math:`p_n = M_n u_n + c_n` (:meth:`maps`, see
    :func:`cenet_mmdet.ops.fold_channel_equilibrium`).

    Variants (paper Table 4), chosen by ``variant``: ``'ce'`` (both branches,
    the released block; the default), ``'bd'`` (:math:`\\lambda = 1`: no
    ``lambda_logit``, no ``aii``) and ``'aii'`` (:math:`\\lambda = 0`: no
    ``lambda_logit``, ``running_mean``, ``running_whitening``).

    Args:
        num_channels: ``C``.
        group_size: channels per whitening group ``d`` (halved until it divides
            ``C``). Default: 16.
        num_iters: Newton steps ``T``. Default: 3.
        eps: added to the covariance diagonal, and the floor of
            :math:`\\bar v`. Default: 1e-5.
        reduction: AII gate reduction. Default: 4.
        whitening: ``'released'`` (default) or ``'paper'``.
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
        # the (d, d) identity (not saved): no identity is made per call
        self.register_buffer('identity', torch.eye(self.group_size), persistent=False)
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

    # ----------------------------------------------------------------- math
    def batch_statistics(self, mean: Tensor, cov: Tensor, mean_instance_var: Tensor,
                         trail: Optional[dict] = None) -> BlockStatistics:
        """The block's statistics from the batch statistics of its input:
        ``mean`` ``(G, d)``, the group covariance ``cov`` ``(G, d, d)`` and
        :math:`\\bar v` (a scalar tensor). With a ``trail`` dict, what
        :meth:`batch_statistics_backward` needs is stored in it."""
        whitening = aii_scale = None
        if self.has_bd:
            eye = self.identity.to(cov.dtype)
            newton = None if trail is None else []
            whitening = inverse_sqrt_newton(torch.add(cov, eye, alpha=self.eps),
                                            self.num_iters,
                                            rescale=self.whitening == 'paper',
                                            trail=newton, eye=eye)
        if self.has_aii:
            aii_scale = mean_instance_var.clamp_min(self.eps).sqrt()
        if trail is not None:
            trail.update(newton=newton, mean_instance_var=mean_instance_var,
                         whitening=whitening, aii_scale=aii_scale)
        return BlockStatistics(whitening, mean if self.has_bd else None, aii_scale)

    def batch_statistics_backward(self, trail: dict, grad_whitening: Tensor,
                                  grad_aii_scale: Tensor) -> Tuple[Tensor, Tensor]:
        """The gradients of :meth:`batch_statistics` (released whitening, both
        branches) with respect to ``cov`` and ``mean_instance_var``, from those
        of the whitening and the AII scale."""
        grad_cov = inverse_sqrt_newton_backward(grad_whitening, trail['newton'])
        # s = sqrt(max(v, eps)): ds / dv = 1 / (2 s) where v >= eps
        mean_var, aii_scale = trail['mean_instance_var'], trail['aii_scale']
        grad_mean_var = torch.div(grad_aii_scale, aii_scale).mul_(0.5)
        return grad_cov, grad_mean_var.masked_fill_(mean_var < self.eps, 0)

    def running_statistics(self, dtype: torch.dtype) -> BlockStatistics:
        """The block's statistics from its running buffers, in ``dtype``."""
        whitening = aii_scale = mean = None
        if self.has_bd:
            whitening = self.running_whitening.to(dtype)
            mean = self.running_mean.to(dtype).squeeze(-1)
        if self.has_aii:
            aii_scale = self.aii.running_scale.to(dtype)
        return BlockStatistics(whitening, mean, aii_scale)

    def running_updates(self, stats: BlockStatistics
                        ) -> List[Tuple[Tensor, Tensor]]:
        """``(running buffer, new value)`` of each buffer, for a momentum update
        by the layer (which decides whether the batch is accepted)."""
        updates = []
        if self.has_bd:
            updates += [(self.running_mean, stats.mean.unsqueeze(-1)),
                        (self.running_whitening, stats.whitening)]
        if self.has_aii:
            updates.append((self.aii.running_scale, stats.aii_scale.reshape(1)))
        return updates

    def maps(self, stats: BlockStatistics, affine: PerSampleAffine,
             trail: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
        """The per-sample maps ``(M_n (N, G, d, d), c_n (N, G, d, 1))`` of
        normalizer and block together, for the input ``u`` of ``affine``. With
        a ``trail`` dict, what :meth:`maps_backward` needs is stored in it."""
        groups, size = self.num_groups, self.group_size
        scale = affine.scale
        lam = self.mixing(scale)
        if self.has_aii:
            # k_n = (1 - lambda) F(v_n) / s
            gate_scale = (1 - lam) / stats.aii_scale
            gate = self.aii(affine.instance_var, trail)
            instance_scale = gate * gate_scale
            if trail is not None:
                trail.update(lam=lam, gate_scale=gate_scale, gate=gate)
        else:
            instance_scale = affine.instance_var.new_zeros(affine.instance_var.shape)
        whitening = stats.whitening
        if whitening is None:  # AII only: lam = 0, no BD term
            whitening = scale.new_zeros(groups, size, size)
        center = stats.mean if self.whitening == 'paper' and self.has_bd else None
        if trail is not None:
            trail.update(scale=scale, shift=affine.shift)
        return fold_channel_equilibrium(
            lam, whitening, instance_scale.view(-1, groups, size), scale,
            affine.shift, center, trail, self.identity.to(scale.dtype))

    def maps_backward(self, trail: dict, grad_matrix: Tensor, grad_bias: Tensor
                      ) -> 'MapsGradients':
        """The gradients of :meth:`maps` (released whitening, both branches;
        a normalizer scale ``a`` ``(G, d)`` or one per sample ``(N, G, d)``).

        With :math:`A_n = \\lambda W + \\mathrm{diag}(k_n)`, :math:`M_n = A_n
        \\mathrm{diag}(a)` and :math:`c_n = A_n b_n`: :math:`\\partial A_n =
        \\partial M_n \\mathrm{diag}(a) + \\partial c_n b_n^T`,
        :math:`\\partial a = \\sum_n \\mathrm{colsum}(\\partial M_n \\odot
        A_n)`, :math:`\\partial b_n = A_n^T \\partial c_n`, then
        :math:`\\lambda`, :math:`W`, :math:`k_n = K F(v_n)` with :math:`K =
        (1 - \\lambda) / s`, and the gate's chain."""
        per_sample, scale, shift = trail['per_sample'], trail['scale'], trail['shift']
        lam, gate_scale = trail['lam'], trail['gate_scale']
        n, groups, size, _ = per_sample.shape
        batch = n * groups
        # (N, G, d, d) -> (N*G, d, d); (N, G, d, 1) @ (N, G, 1, d) added
        # columns scaled by a: (G, 1, d) or, one per sample, (N, G, 1, d)
        grad_per_sample = torch.baddbmm((grad_matrix * scale.unsqueeze(-2)).view(batch, size, size),
                                        grad_bias.reshape(batch, size, 1),
                                        shift.reshape(batch, 1, size))
        # (G, d), or (N, G, d) for a scale per sample
        grad_scale = (grad_matrix * per_sample).sum((0, 2) if scale.dim() == 2 else 2)
        # (N*G, d, d)^T @ (N*G, d, 1) -> (N, G, d)
        grad_shift = torch.bmm(per_sample.view(batch, size, size).mT,
                               grad_bias.reshape(batch, size, 1)).view(n, groups, size)
        grad_per_sample = grad_per_sample.view(n, groups, size, size)
        grad_sum = grad_per_sample.sum(0)  # (G, d, d): of lambda W
        grad_lam = torch.dot(grad_sum.view(-1), trail['whitening'].reshape(-1))
        grad_instance_scale = grad_per_sample.diagonal(dim1=-2, dim2=-1)  # (N, G, d)
        grad_gate = (grad_instance_scale * gate_scale).view(n, groups * size)
        grad_gate_scale = (grad_instance_scale * trail['gate'].view(n, groups, size)).sum()
        # K = (1 - lambda) / s: dK / dlambda = -1 / s, dK / ds = -K / s
        ratio = grad_gate_scale / trail['aii_scale']
        grad_logit = torch.ops.aten.sigmoid_backward(grad_lam - ratio, lam)
        grad_instance_var, grad_gate_weights = gate_backward(
            grad_gate, trail['gate_trace'], self.aii.weights(),
            weight_grads=not self.gate_frozen)
        return MapsGradients(
            whitening=grad_sum * lam, aii_scale=torch.mul(ratio, gate_scale).neg_(),
            scale=grad_scale, shift=grad_shift, instance_var=grad_instance_var,
            lambda_logit=grad_logit, gate=grad_gate_weights)

    def fused_backward_supported(self) -> bool:
        """Whether :meth:`maps_backward` and :meth:`batch_statistics_backward`
        cover this block: both branches, the released whitening, ``T >= 1``."""
        return self.variant == 'ce' and self.whitening == 'released' and self.num_iters >= 1

    def fold_constants(self, stats: BlockStatistics, scale: Tensor,
                       shift: Tensor) -> FoldConstants:
        """Everything of :meth:`maps` that does not depend on the input, for
        running statistics ``stats`` and a normalizer map ``y = a u + b`` with
        ``scale`` ``a`` and ``shift`` ``b`` ``(G, d)`` shared by the samples
        (:class:`~cenet_mmdet.ops.FoldConstants`; blocks with AII only)."""
        groups, size = self.num_groups, self.group_size
        whitening = stats.whitening
        if whitening is None:  # AII only: lam = 0, no BD term
            whitening = scale.new_zeros(groups, size, size)
        center = stats.mean if self.whitening == 'paper' and self.has_bd else None
        reduce, norm, _, expand = self.aii.gate
        return fold_constants(
            self.mixing(scale), whitening, scale, shift, center, stats.aii_scale,
            (reduce.weight, norm.weight, norm.bias, expand.weight), norm.eps)

    # --------------------------------------------------------------- loading
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
