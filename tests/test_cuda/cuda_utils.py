"""Helpers shared by the CUDA tests (imported by path, no package needed)."""
import importlib.util
import os
import os.path as osp
from types import ModuleType
from typing import Dict

import pytest
import torch

TESTS = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: where the CUDA tests run: 'cuda', or 'cpu' to check the tests' own logic
#: on a machine without a GPU (CENET_CUDA_TESTS_DEVICE=cpu; slow, not CI)
DEVICE = os.environ.get('CENET_CUDA_TESTS_DEVICE', 'cuda')

#: the marks of every CUDA test module
CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(),
                       reason='needs a CUDA device'),
]


def load_test_module(relative: str) -> ModuleType:
    """Import a test file of this suite by path (its helpers, not its tests)."""
    path = osp.join(TESTS, relative)
    name = '_cuda_ref_' + osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 on the CPU."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    return (actual - expected).abs().max().item() / max(scale, 1e-30)


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, bound: float,
                    what: str) -> None:
    """Shape equal and :func:`relative_error` within ``bound``."""
    assert tuple(actual.shape) == tuple(expected.shape), what
    assert torch.isfinite(actual).all(), f'{what}: not finite'
    error = relative_error(actual, expected)
    assert error <= bound, f'{what}: relative error {error:.3g} > {bound:g}'


def _precision_switches():
    """``(object, attribute)`` of every float32-precision switch: the legacy
    TF32 ones and the float32 matmul precision first, then torch >= 2.9's
    per-backend ``fp32_precision`` settings (setting a legacy switch rewrites
    those, so they are restored last)."""
    backends = torch.backends
    found = [(backends.cuda.matmul, 'allow_tf32'), (backends.cudnn, 'allow_tf32')]
    for path in ('', 'cuda.matmul', 'cudnn', 'cudnn.conv', 'cudnn.rnn', 'mkldnn',
                 'mkldnn.matmul', 'mkldnn.conv', 'mkldnn.rnn'):
        target = backends
        for part in filter(None, path.split('.')):
            target = getattr(target, part, None)
        if target is not None and hasattr(target, 'fp32_precision'):
            found.append((target, 'fp32_precision'))
    return found


class _PrecisionContext:
    """Saves every float32-precision switch on entry and restores all of them
    (exactly, new-style settings included) on exit."""

    def __enter__(self):
        self.saved = (torch.get_float32_matmul_precision(),
                      [(obj, attr, getattr(obj, attr))
                       for obj, attr in _precision_switches()])
        self.apply()
        return self

    def apply(self) -> None:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        precision, switches = self.saved
        torch.set_float32_matmul_precision(precision)
        for obj, attr, value in switches:
            setattr(obj, attr, value)


class TF32Matmuls(_PrecisionContext):
    """Context: TF32 allowed for cuBLAS matmuls and cuDNN convolutions, through
    both legacy switches (``allow_tf32`` and
    ``set_float32_matmul_precision('high')``); the previous values restored."""

    def apply(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision('high')
        torch.backends.cudnn.allow_tf32 = True


class FullFP32(_PrecisionContext):
    """Context: no TF32 anywhere (cuBLAS and cuDNN), the previous values
    restored: float32 results comparable with float64 references."""

    def apply(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def assert_grads_close(actual: Dict[str, torch.Tensor],
                       expected: Dict[str, torch.Tensor], bound: float,
                       what: str) -> None:
    """Every gradient of ``actual`` against ``expected`` (same names).

    The error is relative to the larger of the tensor's largest entry and
    1e-2 of the largest entry of all the gradients: a scalar gradient such as
    lambda's is a sum of terms that nearly cancel, so its own size is no
    measure of float32 round-off.
    """
    floor = 1e-2 * max(g.detach().abs().max().item() for g in expected.values())
    for name, grad in actual.items():
        reference = expected[name]
        assert torch.isfinite(grad).all(), f'{what} grad of {name}: not finite'
        scale = max(reference.detach().abs().max().item(), floor, 1e-30)
        error = (grad.detach().cpu().double() - reference.detach().cpu().double()
                 ).abs().max().item() / scale
        assert error <= bound, (f'{what} grad of {name}: error {error:.3g} of '
                                f'scale {scale:.3g} > {bound:g}')
