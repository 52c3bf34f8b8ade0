"""The lower bounds of the benchmarks: three kinds of layer that stand in for
every CE layer and do less work than CE. ``bench_backbones.py`` puts them into
the network, ``bench_layers.py`` times them as single layers; both take the
kinds (``--kinds floor floor+gate floor+moments``), their layers and their
labels from here (:data:`FLOORS`, :data:`LABELS`).

``floor`` (:class:`MapsOnly`) is a lower bound for any exact implementation
of the released CE: the layer only applies fixed per-sample ``(N, G, d, d)``
maps and biases (the dense product that each CE output needs, since the
released function mixes the d channels of a group with a matrix that has a
per-image diagonal), with no statistics, no gate and no Newton step. The maps
are leaves that require grad, so that a train step also computes the map
gradient (``dM = g x^T``, ``dc``) that a real CE layer needs: its maps depend
on the input and the parameters, also under ``norm_eval=True``.

``floor+gate`` (:class:`GatedMapsOnly`) is a tighter lower bound: the floor
plus the least that an exact CE layer must also run, one pass over its input
for per-sample statistics (a sum over ``H*W``) and the AII gate's two GEMMs on
them, whose output enters the maps (so a train step also computes the gate's
weight gradients and the statistics' input gradient). It assumes that the
statistics cannot be taken inside the convolution that produces the input
(no PyTorch op on the CPU does that).

``floor+moments`` (:class:`MomentsMapsOnly`) is the least with PyTorch's CPU
ops as they are: the ``floor+gate`` with both per-sample moments that the AII
variance needs, taken by CE's own ``sample_moments`` (``sum`` and
``vector_norm``: two passes; ``torch.var_mean`` and ``layer_norm`` are
slower), the gate on the sums of squared deviations. A single fused pass for
both moments would undercut it, so it bounds implementations made of ATen
ops, not every exact implementation. CE's time beyond it is its own glue (BN
scale, fold, check).
"""
import torch
import torch.nn.functional as F
from torch import nn

from cenet_mmdet.models.layers import CELayer
from cenet_mmdet.ops import GradientLink, apply_maps, sample_moments


class MapsOnly(nn.Module):
    """Stands in for a CE layer: applies maps ``M x + c`` per sample and group
    (the product every CE output needs) and nothing else. The maps are leaves
    that require grad (a train step computes ``dM`` and ``dc``)."""

    def __init__(self, layer: CELayer) -> None:
        super().__init__()
        self.groups, self.size = layer.ce.num_groups, layer.ce.group_size
        self.maps = {}

    def leaves(self, x: torch.Tensor):
        """The maps ``(N, G, d, d)`` and biases ``(N, G, d, 1)`` for ``x``'s
        batch size, dtype and device (created once, requiring grad)."""
        n = x.size(0)
        key = (n, x.dtype, x.device)
        if key not in self.maps:
            eye = torch.eye(self.size, dtype=x.dtype, device=x.device)
            self.maps[key] = (
                (0.5 * eye.repeat(n, self.groups, 1, 1)).requires_grad_(),
                x.new_zeros(n, self.groups, self.size, 1).requires_grad_())
        return self.maps[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        matrix, bias = self.leaves(x)
        # (N, C, H, W) -> (N, G, d, H*W): a free view
        x_grouped = x.reshape(n, self.groups, self.size, h * w)
        return apply_maps(matrix, bias, x_grouped, x.shape)


class _LinkedSums(torch.autograd.Function):
    """``x -> sum_l x_l`` over the last dim; the backward adds its broadcast
    gradient in place into the maps' input gradient when handed over (as a
    CE layer's moments do, :class:`~cenet_mmdet.ops.GradientLink`)."""

    @staticmethod
    def forward(ctx, x_grouped: torch.Tensor, link: GradientLink) -> torch.Tensor:
        ctx.save_for_backward(x_grouped)
        ctx.link = link
        return x_grouped.sum(-1)

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor):
        x_grouped, = ctx.saved_tensors
        n, groups, size, positions = x_grouped.shape
        x_flat = x_grouped.reshape(n * groups, size, positions)
        handed = ctx.link.take(x_flat) if ctx.link is not None else None
        term = grad_sums.unsqueeze(-1)  # (N, G, d, 1)
        if handed is None:
            return term.expand_as(x_grouped).clone(), None
        # g_s + M^T g, one GEMM (see GradientLink)
        return torch.baddbmm(term.reshape(n * groups, size, 1), *handed
                             ).view(x_grouped.shape), None


class GatedMapsOnly(MapsOnly):
    """:class:`MapsOnly` plus the least that any exact CE layer also runs
    besides its maps: one pass over the input for per-sample statistics (a
    sum over ``H*W``; a CE layer needs sums and squares, at least one pass)
    and the AII gate's two GEMMs on them, whose ``(N, C)`` output enters the
    maps' bias, so that a train step also computes the gate's weight
    gradients and the statistics' input gradient (added in place, as CE
    does). No Newton step, no fold, no second moment."""

    def __init__(self, layer: CELayer) -> None:
        super().__init__(layer)
        self.gate = layer.ce.aii.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        matrix, bias = self.leaves(x)
        x_grouped = x.reshape(n, self.groups, self.size, h * w)  # a free view
        link = None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            link = GradientLink()
        sums = (_LinkedSums.apply(x_grouped, link) if torch.is_grad_enabled()
                else x_grouped.sum(-1))  # (N, G, d)
        bias = bias + self.gated(sums).view(n, self.groups, self.size, 1)
        return apply_maps(matrix, bias, x_grouped, x.shape, link)

    def gated(self, statistics: torch.Tensor) -> torch.Tensor:
        """The AII gate ``(N, C)`` on per-sample statistics ``(N, G, d)``."""
        reduce, norm, _, expand = self.gate
        hidden = F.layer_norm(F.linear(statistics.flatten(1), reduce.weight),
                              norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return torch.sigmoid(F.linear(hidden.relu(), expand.weight))


class MomentsMapsOnly(GatedMapsOnly):
    """:class:`GatedMapsOnly` with both per-sample moments that the AII
    branch needs, taken by CE's own ``sample_moments`` (a sum and a
    ``vector_norm``: two passes, since no PyTorch CPU op returns both in
    one fast pass; a one-pass backward ``g_s + 2 g_q x`` added in place into
    the maps' input gradient, as in CE), and the gate on the sums of squared
    deviations ``Q - S^2 / L``. What CE runs beyond it is its own glue: the
    BN scale, the fold of BN, whitening and AII into the maps, and the
    accuracy check of the unshifted eval moments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        matrix, bias = self.leaves(x)
        x_grouped = x.reshape(n, self.groups, self.size, h * w)  # a free view
        link = GradientLink() if torch.is_grad_enabled() else None
        sums, squares = sample_moments(x_grouped, False, link)  # (N, G, d) each
        deviations = torch.addcmul(squares, sums, sums, value=-1 / (h * w))
        bias = bias + self.gated(deviations).view(n, self.groups, self.size, 1)
        return apply_maps(matrix, bias, x_grouped, x.shape, link)


#: the lower-bound kinds, from the loosest to the tightest, and the module
#: each puts in place of a CE layer
FLOORS = {'floor': MapsOnly, 'floor+gate': GatedMapsOnly,
          'floor+moments': MomentsMapsOnly}
#: each kind's name in the benchmarks' tables
LABELS = {'floor': 'floor (maps only)',
          'floor+gate': 'floor+gate (maps, one pass, gate)',
          'floor+moments': 'floor+moments (maps, both moments, gate)'}


def swap_in_floor(model: nn.Module, kind: str) -> int:
    """Replace every CE layer of ``model`` by the layer of the lower-bound
    ``kind`` (a key of :data:`FLOORS`); how many were replaced (an error if
    any CE layer is left)."""
    floor = FLOORS[kind]
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, CELayer):
            parent_name, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child, floor(module))
            replaced += 1
    left = [name for name, module in model.named_modules()
            if isinstance(module, CELayer)]
    if left:
        raise RuntimeError(f'floor: CE layers not replaced: {left}')
    return replaced
