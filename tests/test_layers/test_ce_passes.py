"""Passes over the activation per CE layer in eval: a layer that may not
branch on its data (on CUDA, compiled or traced) decides that before it takes
any moments, so it takes them once, about the shift (no unshifted pass that it
then drops: eager CUDA eval paid one; traced and compiled graphs drop the dead
pass themselves, which the traced test guards)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cenet_mmdet.models.layers import CE, GroupNormCE
from cenet_mmdet.ops import modes

SHAPE = (2, 32, 6, 6)


class ActivationReads(TorchDispatchMode):
    """Counts the reductions of an activation-sized tensor: ops that read a
    tensor of ``numel`` elements and return only smaller ones (the moment
    passes; the application's GEMM returns an activation-sized tensor)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.activation_numel = numel
        self.reductions = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        outputs = out if isinstance(out, (tuple, list)) else (out, )
        outputs = [o for o in outputs if isinstance(o, torch.Tensor)]
        if func.is_view:
            return out
        if (any(t.numel() == self.activation_numel for t in inputs) and outputs
                and all(o.numel() < self.activation_numel for o in outputs)):
            self.reductions.append(func.__name__)
        return out


def eval_layer(cls, **options):
    torch.manual_seed(0)
    layer = cls(SHAPE[1], group_size=8, **options)
    with torch.no_grad():
        layer(torch.randn(SHAPE) + 3)
    return layer.eval()


def count_reductions(run, x) -> list:
    with torch.no_grad(), ActivationReads(x.numel()) as counter:
        run(x)
    return counter.reductions


@pytest.mark.parametrize('cls,options', [(CE, {}), (GroupNormCE, dict(num_groups=4))])
def test_traced_eval_takes_the_moments_once(cls, options):
    layer = eval_layer(cls, **options)
    x = torch.randn(SHAPE) + 3
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x, ), check_trace=False)
    graph = traced.inlined_graph
    # the activation's sums and squares over positions, taken once
    moments = [node.kind() for node in graph.nodes()
               if node.kind() in ('aten::sum', 'aten::linalg_vector_norm')
               and _reads_activation(node)]
    assert moments == ['aten::sum', 'aten::linalg_vector_norm'], moments


def _reads_activation(node) -> bool:
    """Whether a traced node reduces a 4-D ``(N, G, d, L)`` tensor."""
    first = next(node.inputs()).type()
    return isinstance(first, torch._C.TensorType) and first.dim() == 4


def test_a_layer_that_may_not_branch_takes_the_moments_once(monkeypatch):
    """Stand-in for CUDA: the eager layer told that it may not branch."""
    layer = eval_layer(CE)
    x = torch.randn(SHAPE)
    eager = count_reductions(layer, x)
    assert len(eager) == 2, eager  # unshifted moments, accurate: kept
    with torch.no_grad():
        eager_out = layer(x)
    monkeypatch.setattr(modes, 'may_branch_on_data', lambda tensor: False)
    reductions = count_reductions(layer, x)
    assert len(reductions) == 2, reductions  # shifted moments, taken once
    torch.testing.assert_close(layer(x), eager_out, rtol=1e-5, atol=1e-6)


def test_eager_cpu_eval_still_retries_about_a_shift_when_needed():
    layer = eval_layer(CE)
    x = torch.randn(SHAPE) * 1e-3 + 1e3  # mean/std 1e6: the unshifted moments are dropped
    assert len(count_reductions(layer, x)) == 4
