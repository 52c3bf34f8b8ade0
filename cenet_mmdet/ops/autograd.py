"""The autograd side of CE's ops: the fused Functions and the gradient link.

:func:`sample_moments` (per-sample sums and Gram matrices or squares) and
:func:`apply_maps` (one per-sample affine map by one batched GEMM) are the two
passes of a CE layer over its activations; each has a hand-written backward
that makes one activation-sized gradient, and :class:`GradientLink` joins the
two backward functions into one gradient tensor. Which implementation runs in
which execution mode is decided by :mod:`cenet_mmdet.ops.modes`.

Notation: an input ``x`` of shape ``(N, C, H, W)`` is viewed as
``(N, G, d, L)`` with ``G`` groups of ``d`` contiguous channels and ``L = H * W``
positions. For a contiguous NCHW tensor this view is free (no copy).
"""
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import modes
from .functional import GateTrace, gate_backward, gate_forward
from .modes import contiguous_for_compiler


class GradientLink:
    """Hands the input gradient of :func:`apply_maps`, as its two GEMM
    operands :math:`(M^T, g)`, to the backward of :func:`sample_moments` of
    the *same* input, which computes :math:`M^T g` plus its own terms in one
    ``baddbmm`` (and one more for a Gram matrix): one ``(N, G, d, L)``
    gradient tensor instead of two plus autograd's accumulation (fresh
    activation-sized tensors are what a CPU step pays most for, launches
    what a GPU step pays for). Autograd always runs the application's
    backward first, since its maps are computed from the moments. Under
    ``create_graph=True`` nothing is handed over (plain accumulation).
    """

    __slots__ = ('operands', )

    def __init__(self) -> None:
        #: ``(M^T (N*G, d, d), g (N*G, d, L))`` or None
        self.operands: Optional[Tuple[Tensor, Tensor]] = None

    def take(self, like: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The handed-over operands (once), or None; ``like`` is the
        ``(N*G, d, L)`` input whose gradient they make."""
        operands, self.operands = self.operands, None
        if operands is None or modes.creating_graph():
            return None
        matrix_t, grad = operands
        shape = (matrix_t.size(0), matrix_t.size(1), grad.size(-1))
        if shape != tuple(like.shape):
            raise RuntimeError('GradientLink joins two different inputs: '
                               f'{shape} vs {tuple(like.shape)}')
        return operands


def sample_moments(x_grouped: Tensor,
                   with_gram: bool = True,
                   link: Optional[GradientLink] = None) -> Tuple[Tensor, Tensor]:
    """Per-sample first and second moments of a grouped input.

    Args:
        x_grouped: ``(N, G, d, L)``.
        with_gram: return the full per-group Gram matrices (training) instead
            of only their diagonals (evaluation).
        link: shared with the :func:`apply_maps` call on the same
            ``x_grouped`` (see :class:`GradientLink`). Default: None.

    Returns:
        ``sums`` ``(N, G, d)``: :math:`\\sum_l x_{l}`, and either ``gram``
        ``(N, G, d, d)``: :math:`\\sum_l x_l x_l^T`, or ``squares``
        ``(N, G, d)``: :math:`\\sum_l x_l^2`.
    """
    link = link if modes.link_allowed() else None
    if with_gram:
        return _GroupMoments.apply(x_grouped, link)
    if modes.plain_ops_only():
        return _instance_moments(x_grouped)
    if not modes.records_grad(x_grouped):
        return _instance_moments(_moment_source(x_grouped))
    return _InstanceMoments.apply(x_grouped, link)


def _gemm_operand(x_grouped: Tensor) -> Tensor:
    """The ``(N*G, d, L)`` matrices of ``x_grouped`` ``(N, G, d, L)``, as the
    batched GEMMs take them and as the Functions save them for the backward
    (a free view in eager mode; compiled, see :func:`contiguous_for_compiler`).

    Saved three-dimensional on purpose: Inductor lays out every 4-D tensor
    that a compiled forward saves after a convolution as channels-last,
    which for ``(N, G, d, L)`` puts ``G`` innermost, so the shifted input
    was written twice, once that way for the backward and once contiguous
    for the GEMMs. The backward formulas below therefore work on the 3-D
    operand only (docs/dev/performance-methods.md).
    """
    n, groups, size, positions = x_grouped.shape
    # (N, G, d, L) -> (N*G, d, L)
    return contiguous_for_compiler(x_grouped.reshape(n * groups, size, positions))


def _save_operand(ctx, x_grouped: Tensor, *others: Tensor,
                  x_flat: Optional[Tensor] = None) -> None:
    """Save ``others`` and the GEMM operand for the backward: the input
    itself in eager mode (a view made inside a Function's forward would cut
    a double backward off from it), the 3-D operand ``x_flat`` (made here
    when None) when compiled."""
    operand = x_grouped
    if modes.is_compiling():
        operand = _gemm_operand(x_grouped) if x_flat is None else x_flat
    ctx.save_for_backward(*others, operand)
    ctx.grouped_shape = x_grouped.shape


def _saved_operand(ctx) -> Tuple[Tensor, ...]:
    """What :func:`_save_operand` saved: ``others`` and the operand as
    ``(N*G, d, L)`` (``ctx.saved_tensors`` is unpacked once: a checkpointed
    layer allows no more)."""
    n, groups, size, positions = ctx.grouped_shape
    *others, operand = ctx.saved_tensors
    return (*others, operand.reshape(n * groups, size, positions))


def _moment_source(x_grouped: Tensor) -> Tensor:
    """``x_grouped`` in eager mode; compiled, the GEMM operand viewed as
    ``(N, G, d, L)``, so that Inductor writes that operand and takes the
    moments from it in one pass over the input (from the input itself, the
    moments were a second pass)."""
    if not modes.is_compiling():
        return x_grouped
    return _gemm_operand(x_grouped).view(x_grouped.shape)


def _instance_moments(x_grouped: Tensor) -> Tuple[Tensor, Tensor]:
    sums = x_grouped.sum(dim=-1)
    return sums, torch.linalg.vector_norm(x_grouped, dim=-1).square()


class _InstanceMoments(torch.autograd.Function):
    r"""``x -> (sum_l x_l, sum_l x_l^2)`` with a one-pass backward
    :math:`\partial/\partial x = g_s + 2 g_q x` (the norm's own backward
    takes several passes over ``x``)."""

    @staticmethod
    def forward(ctx, x_grouped: Tensor,
                link: Optional[GradientLink]) -> Tuple[Tensor, Tensor]:
        _save_operand(ctx, x_grouped)
        ctx.link = link
        return _instance_moments(_moment_source(x_grouped))

    @staticmethod
    def backward(ctx, grad_sums: Optional[Tensor],
                 grad_squares: Optional[Tensor]):
        x_flat, = _saved_operand(ctx)  # (N*G, d, L)
        term_shape = x_flat.shape[:2] + (1, )  # (N*G, d, 1)
        grad = None
        handed = _handed_operands(ctx, x_flat)
        if handed is not None:  # M^T g (+ g_s), one GEMM
            grad = (torch.bmm(*handed) if grad_sums is None else
                    torch.baddbmm(grad_sums.reshape(term_shape), *handed))
            grad_sums = None
        # (N*G, d, 1) terms broadcast over L, added in place where possible
        # (``addcmul`` with a broadcast first operand expands and copies it).
        if grad_squares is not None:
            term = (2 * grad_squares).reshape(term_shape)
            grad = x_flat * term if grad is None else grad.addcmul_(x_flat, term)
        if grad_sums is not None:
            term = grad_sums.reshape(term_shape)
            grad = term.expand_as(x_flat).clone() if grad is None else grad.add_(term)
        return (None if grad is None else grad.view(ctx.grouped_shape)), None


def _handed_operands(ctx, x_flat: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """The operands handed over through ``ctx.link`` (see
    :class:`GradientLink`), or None."""
    if ctx.link is None:
        return None
    return ctx.link.take(x_flat)


class _GroupMoments(torch.autograd.Function):
    r"""``x -> (sum_l x_l, sum_l x_l x_l^T)`` with a one-matmul backward.

    Plain autograd differentiates the Gram matrix with two matmuls and a
    strided add; here :math:`\partial/\partial x = (G + G^T) x + g_s 1^T`,
    one ``baddbmm``.
    """

    @staticmethod
    def forward(ctx, x_grouped: Tensor,
                link: Optional[GradientLink]) -> Tuple[Tensor, Tensor]:
        n, groups, size, _ = x_grouped.shape
        x_flat = _gemm_operand(x_grouped)
        _save_operand(ctx, x_grouped, x_flat=x_flat)
        ctx.link = link
        sums = x_grouped.sum(dim=-1)
        # (N*G, d, L) @ (N*G, L, d) -> (N*G, d, d): one batched matmul, no copy.
        gram = torch.bmm(x_flat, x_flat.transpose(1, 2)).view(n, groups, size, size)
        return sums, gram

    @staticmethod
    def backward(ctx, grad_sums: Optional[Tensor],
                 grad_gram: Optional[Tensor]):
        x_flat, = _saved_operand(ctx)  # (N*G, d, L)
        batch, size, _ = x_flat.shape
        term_shape = (batch, size, 1)
        handed = _handed_operands(ctx, x_flat)  # (M^T, g) of M^T g, or None
        if grad_gram is None:
            term = grad_sums.reshape(term_shape)
            if handed is None:
                return term.expand_as(x_flat).clone().view(ctx.grouped_shape), None
            return torch.baddbmm(term, *handed).view(ctx.grouped_shape), None
        # (N, G, d, d) -> (N*G, d, d)
        symmetric = (grad_gram + grad_gram.transpose(-1, -2)).reshape(batch, size, size)
        if handed is None:
            sums_term = (grad_gram.new_zeros(term_shape) if grad_sums is None
                         else grad_sums.reshape(term_shape))
            # (N*G, d, d) @ (N*G, d, L) + (N*G, d, 1) -> (N*G, d, L)
            grad = torch.baddbmm(sums_term, symmetric, x_flat)
        else:  # g_s + M^T g + (G + G^T) x
            grad = (torch.bmm(*handed) if grad_sums is None else
                    torch.baddbmm(grad_sums.reshape(term_shape), *handed))
            grad.baddbmm_(symmetric, x_flat)
        return grad.view(ctx.grouped_shape), None


def apply_maps(matrix: Tensor, bias: Tensor, x_grouped: Tensor,
               out_shape: Sequence[int],
               link: Optional[GradientLink] = None) -> Tensor:
    """``M_n x_n + c_n`` for every sample and group, in a new ``out_shape``
    tensor (``(N, C, H, W)``, ``C * H * W = G * d * L``).

    One ``baddbmm`` (the bias is added by the GEMM). The result is a fresh
    tensor, not a view, so that callers may modify it in place (e.g. a
    checkpointed block's in-place ReLU).

    Args:
        matrix: ``(N, G, d, d)``.
        bias: ``(N, G, d, 1)``.
        x_grouped: ``(N, G, d, L)``.
        out_shape: the shape of the result.
        link: shared with the :func:`sample_moments` call on the same
            ``x_grouped`` (see :class:`GradientLink`). Default: None.
    """
    if modes.plain_ops_only():
        n, groups, size, positions = x_grouped.shape
        return torch.baddbmm(bias.reshape(n * groups, size, 1),
                             matrix.reshape(n * groups, size, size),
                             x_grouped.reshape(n * groups, size, positions)
                             ).reshape(out_shape)
    if modes.records_grad(matrix, bias, x_grouped):
        link = link if modes.link_allowed() else None
        return _ApplyMaps.apply(matrix, bias, x_grouped, tuple(out_shape), link)
    return _apply_flat(matrix, bias, _gemm_operand(x_grouped), out_shape)


def _apply_flat(matrix: Tensor, bias: Tensor, x_flat: Tensor,
                out_shape: Sequence[int]) -> Tensor:
    batch, size, positions = x_flat.shape
    out = x_flat.new_empty(out_shape)
    # (N*G, d, 1) + (N*G, d, d) @ (N*G, d, L) -> (N*G, d, L), written into out
    torch.baddbmm(bias.reshape(batch, size, 1), matrix.reshape(batch, size, size),
                  x_flat, out=out.view(batch, size, positions))
    return out


class _ApplyMaps(torch.autograd.Function):
    r"""``(M, c, x) -> M x + c`` per sample and group, with a backward of two
    ``bmm`` and one sum: :math:`\partial M = g x^T`, :math:`\partial c =
    \sum_l g`, :math:`\partial x = M^T g` (no copies of the activation)."""

    @staticmethod
    def forward(ctx, matrix: Tensor, bias: Tensor, x_grouped: Tensor,
                out_shape: Tuple[int, ...], link: Optional[GradientLink]) -> Tensor:
        x_flat = _gemm_operand(x_grouped)
        _save_operand(ctx, x_grouped, matrix, x_flat=x_flat)
        ctx.link = link
        return _apply_flat(matrix, bias, x_flat, out_shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        matrix, x_flat = _saved_operand(ctx)
        n, groups, size, positions = ctx.grouped_shape
        batch = n * groups
        # (N, C, H, W) -> (N*G, d, L); compiled, in its contiguous layout
        grad_flat = contiguous_for_compiler(grad_out).reshape(batch, size, positions)
        grad_matrix = grad_bias = grad_x = None
        if ctx.needs_input_grad[0]:
            # (N*G, d, L) @ (N*G, L, d) -> (N*G, d, d)
            grad_matrix = torch.bmm(grad_flat, x_flat.transpose(1, 2)
                                    ).view(n, groups, size, size)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_flat.sum(-1, keepdim=True).view(n, groups, size, 1)
        if ctx.needs_input_grad[2]:
            matrix_t = matrix.reshape(batch, size, size).transpose(1, 2)
            if (ctx.link is not None and ctx.needs_input_grad[0]
                    and not modes.creating_graph()):
                # The moments' backward (which follows: the matrix depends on
                # the moments) computes M^T g with its own terms.
                ctx.link.operands = (matrix_t, grad_flat)
            elif modes.creating_graph():  # no out= writes
                grad_x = torch.bmm(matrix_t, grad_flat).view(ctx.grouped_shape)
            else:
                # (N*G, d, d)^T @ (N*G, d, L) -> (N*G, d, L), written into a
                # fresh (N, G, d, L) tensor: not a view, so that autograd may
                # add other gradients into it in place
                grad_x = x_flat.new_empty(ctx.grouped_shape)
                torch.bmm(matrix_t, grad_flat, out=grad_x.view(batch, size, positions))
        return grad_matrix, grad_bias, grad_x, None, None




def constant_maps(sums: Tensor, squares: Tensor, positions: int,
                  constants: 'FoldConstants',
                  shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The per-sample maps of an eval CE layer from its moments and its
    :class:`~cenet_mmdet.ops.functional.FoldConstants`: the gate, then the
    fold (one autograd Function with a hand-written backward to ``sums`` and
    ``squares``; the constants take no gradient).

    Args:
        sums, squares: ``(N, G, d)``, the per-sample moments of the input
            about ``shift`` (``(N, G, d)``, or None: the input itself).
        positions: ``L``.
        constants: the layer's constants (:func:`fold_constants`).

    Returns:
        ``matrix`` ``(N, G, d, d)`` and ``bias`` ``(N, G, d, 1)``.
    """
    return _ConstantMaps.apply(sums, squares, positions, constants, shift)


class _ConstantMaps(torch.autograd.Function):
    r"""``(S, Q) -> (M, c)`` for constant :math:`P, D, Q, b, K, F`:

    .. math::
        v = \max(a^2 \odot (Q - S^2 / L), 0) / (L - 1),\quad
        k = K\, \sigma(W_2\, \mathrm{ReLU}(\mathrm{LN}(W_1 v))),\quad
        M = P + \mathrm{diag}(k) D,\quad c = Q + k \odot b

    Backward: :math:`\partial k = \mathrm{diag}(\partial M) \odot a +
    \partial c \odot b`, then the gate's chain by hand (``sigmoid_backward``,
    two GEMMs, ``threshold_backward``, ``native_layer_norm_backward``), and
    :math:`\partial Q = \partial D_{ev}`, :math:`\partial S = -2 S
    \partial D_{ev} / L` for the deviations :math:`D_{ev} = Q - S^2/L`.
    """

    @staticmethod
    def forward(ctx, sums: Tensor, squares: Tensor, positions: int,
                constants, shift: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        n, groups, size = sums.shape
        # sum of squared deviations per (image, channel), (N, G, d)
        deviations = torch.addcmul(squares, sums, sums, value=-1.0 / positions)
        # a^2 * deviations, (N, C); the variance is it / (L - 1), clamped at 0
        scaled = deviations.view(n, groups * size) * constants.variance_scale
        gate, trace = gate_forward(scaled.clamp_min(0), constants.gate,
                                   constants.gate_eps, 1.0 / (positions - 1))
        instance_scale = (gate * constants.gate_scale).view(n, groups, size)
        shift_n, bias_n = constants.shift, constants.bias
        if shift is not None:  # b + a t_n and Q + P t_n, (N, G, d)
            shift_n = torch.addcmul(shift_n, constants.scale, shift)
            bias_n = bias_n + torch.matmul(constants.whitened,
                                           shift.unsqueeze(-1)).squeeze(-1)
        # (G, d, d) + (N, G, d, 1) * (G, d, d) -> (N, G, d, d)
        matrix = torch.addcmul(constants.whitened, instance_scale.unsqueeze(-1),
                               constants.diagonal)
        bias = torch.addcmul(bias_n, instance_scale, shift_n).unsqueeze(-1)
        ctx.save_for_backward(sums, scaled, shift_n, *trace)
        ctx.constants, ctx.positions = constants, positions
        return matrix, bias

    @staticmethod
    def backward(ctx, grad_matrix: Optional[Tensor], grad_bias: Optional[Tensor]):
        sums, scaled, shift_n, *trace = ctx.saved_tensors
        constants, positions = ctx.constants, ctx.positions
        n = sums.size(0)
        # dk = diag(dM) * a + dc * b, (N, G, d)
        grad_scale = sums.new_zeros(sums.shape)
        if grad_matrix is not None:
            grad_scale = grad_matrix.diagonal(dim1=-2, dim2=-1) * constants.scale
        if grad_bias is not None:
            grad_scale = torch.addcmul(grad_scale, grad_bias.squeeze(-1), shift_n)
        grad_gate = grad_scale.reshape(n, scaled.size(1)) * constants.gate_scale  # (N, C)
        grad_variance, _ = gate_backward(grad_gate, GateTrace(*trace), constants.gate,
                                         1.0 / (positions - 1))
        # through the clamp at 0
        grad_variance = grad_variance.masked_fill_(scaled < 0, 0)
        grad_squares = (grad_variance * constants.variance_scale).view(sums.shape)
        grad_sums = (grad_squares * sums).mul_(-2.0 / positions)
        return grad_sums, grad_squares, None, None, None


def small_graph(forward: Callable[..., Tuple[Tensor, Tensor, Any]],
                backward: Callable[..., Sequence[Optional[Tensor]]],
                inputs: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Any]:
    """``forward(*inputs, trail=None)`` as one autograd node: a layer's small
    graph (statistics, Newton steps, gate, fold), which autograd would record
    as about two hundred tiny ops forward and backward.

    ``forward(*inputs, trail)`` returns ``(matrix, bias, extra)``: two
    differentiable tensors and anything else (e.g. the running statistics,
    which take no gradient); with a ``trail`` dict it stores in it what
    ``backward(trail, grad_matrix, grad_bias)`` needs, which returns one
    gradient (or None) per input. The forward runs without recording; the
    backward is the hand-written one, except under ``create_graph=True``,
    where the forward is recomputed on the saved inputs under autograd (so
    that higher derivatives are exact).
    """
    extra = []
    matrix, bias = _SmallGraph.apply(forward, backward, extra, *inputs)
    return matrix, bias, extra[0]


class _SmallGraph(torch.autograd.Function):
    """See :func:`small_graph`."""

    @staticmethod
    def forward(ctx, forward, backward, extra: list, *inputs: Tensor):
        trail: dict = {}
        matrix, bias, rest = forward(*inputs, trail=trail)
        extra.append(rest)
        ctx.save_for_backward(*inputs)
        ctx.trail, ctx.graph, ctx.graph_backward = trail, forward, backward
        return matrix, bias

    @staticmethod
    def backward(ctx, grad_matrix: Tensor, grad_bias: Tensor):
        inputs = ctx.saved_tensors
        if modes.creating_graph():  # recompute under autograd: exact higher orders
            wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[3 + i]]
            matrix, bias, _ = ctx.graph(*inputs, trail=None)
            found = torch.autograd.grad(
                (matrix, bias), [inputs[i] for i in wanted], (grad_matrix, grad_bias),
                create_graph=True, allow_unused=True)
            grads = [None] * len(inputs)
            for index, grad in zip(wanted, found):
                grads[index] = grad
        else:
            grads = ctx.graph_backward(ctx.trail, grad_matrix, grad_bias)
        return (None, None, None) + tuple(grads)
