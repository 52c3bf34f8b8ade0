"""Every execution-mode predicate of CE, and every workaround that depends on one.

A CE layer runs eagerly, under ``torch.compile``, traced (TorchScript, the
TorchScript ONNX exporter), under ``torch.export`` (the dynamo ONNX exporter),
on the CPU or CUDA, with or without autograd recording. What may differ
between these modes is decided here and nowhere else; the layers and the
autograd Functions only call these functions.

Workarounds, each used where its function is called:

* :func:`plain_ops_only`: traced runs use plain functional ops, not the
  autograd Functions nor ``out=`` writes (exporters see into neither).
* :func:`may_branch_on_data`: the eval path of CE over BN chooses its moments
  from the data only eagerly on the CPU (elsewhere a choice would be a host
  synchronization, or baked into a graph).
* :func:`is_eager`: Python-side state (the non-finite skip log) is read only
  eagerly.
* :func:`link_allowed`: the gradient hand-over between two backward functions
  is a side effect a compiled graph cannot hold; compiled, autograd adds.
* :func:`contiguous_for_compiler`: under ``torch.compile`` (not
  ``torch.export``), contiguous strides are enforced with Inductor's private
  prim ``torch.ops.prims.inductor_force_stride_order``.
* :func:`full_fp32_matmuls`: cuBLAS float32 matmuls without TF32 inside the
  block.
"""
import contextlib
from typing import Iterator

import torch
from torch import Tensor


def is_compiling() -> bool:
    """Whether the code is being traced by ``torch.compile`` or ``torch.export``."""
    return torch.compiler.is_compiling()


def plain_ops_only() -> bool:
    """Traced for TorchScript or ONNX: plain functional ops only (exporters
    cannot see into an autograd Function nor follow ``out=`` writes)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def is_eager() -> bool:
    """Whether the layer runs eagerly: not scripted, traced (also for ONNX)
    or compiled, so that it may read values and keep Python-side state."""
    if torch.jit.is_scripting():
        return False
    return not (plain_ops_only() or is_compiling())


def may_branch_on_data(tensor: Tensor) -> bool:
    """Whether a layer may choose its algorithm from the values of ``tensor``:
    only eagerly and on the CPU (on CUDA the choice would cost a host
    synchronization per layer; traced and compiled graphs must not depend on
    the data). Decide this *before* computing anything for the choice."""
    return tensor.device.type == 'cpu' and is_eager()


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of
    them requires grad); with no tensors, whether grad mode is on."""
    if not torch.is_grad_enabled():
        return False
    if len(tensors) == 0:
        return True
    return any(t.requires_grad for t in tensors)


def creating_graph() -> bool:
    """Inside an autograd Function's backward: whether the backward itself is
    recorded (``create_graph=True``), so that no in-place or ``out=`` write
    may be used."""
    return torch.is_grad_enabled()


def link_allowed() -> bool:
    """Whether two backward functions may hand a gradient over (a side effect
    between them): not under ``torch.compile``, where each would be a graph
    break; compiled, the two input gradients are added by autograd (and fused
    by the compiler)."""
    return not is_compiling()


def contiguous_for_compiler(tensor: Tensor) -> Tensor:
    """``tensor`` as is in eager mode and under ``torch.export``; under
    ``torch.compile``, with its contiguous strides enforced.

    Inductor's layout optimization (on by default on the CPU) gives the
    convolutions channels-last outputs and lets the pointwise ops after them
    inherit that order. An ``(N, G, d, L)`` view of such a tensor reaches
    ``bmm`` as ``(N*G, d, L)`` with strides that no batched GEMM accepts, and
    ATen then copies every ``(d, L)`` matrix apart: in a compiled
    CE-ResNet-50 train step these copies took about a fifth of the time
    (docs/dev/performance-methods.md). Enforcing the strides costs at most one
    layout conversion, fused into the kernel that produces the tensor. (An
    eager ``.contiguous()`` would be dropped by the compiler: traced, the
    tensor already is contiguous.)

    This uses Inductor's *private* prim ``inductor_force_stride_order`` (the
    one public way to pin strides inside a compiled graph that Inductor
    honours); an exported program must not hold it. The prim has no autograd
    formula: call this inside the autograd Functions' forward and backward,
    or on tensors that need no gradient.
    """
    if not is_compiling() or torch.compiler.is_exporting():
        return tensor
    from torch._inductor import inductor_prims  # noqa: F401 (registers the prim)
    return torch.ops.prims.inductor_force_stride_order(
        tensor, torch._prims_common.make_contiguous_strides_for(tensor.shape))


def needs_autocast_off(device_type: str) -> bool:
    """Whether the layer must switch autocast off and guard its matmuls: not
    on the CPU without autocast (the common case skips the context managers,
    which cost per call)."""
    return device_type != 'cpu' or torch.is_autocast_enabled(device_type)


@contextlib.contextmanager
def full_fp32_matmuls(device_type: str) -> Iterator[None]:
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
