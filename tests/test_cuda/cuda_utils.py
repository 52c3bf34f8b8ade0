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


class TF32Matmuls:
    """Context: TF32 allowed for cuBLAS matmuls and cuDNN convolutions, through
    both legacy switches (``allow_tf32`` and
    ``set_float32_matmul_precision('high')``); the previous values restored."""

    def __enter__(self) -> 'TF32Matmuls':
        self.saved = (torch.backends.cuda.matmul.allow_tf32,
                      torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision('high')
        torch.backends.cudnn.allow_tf32 = True
        return self

    def __exit__(self, *exc) -> None:
        matmul_tf32, cudnn_tf32, precision = self.saved
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


class FullFP32:
    """Context: no TF32 anywhere (cuBLAS and cuDNN), the previous values
    restored: float32 results comparable with float64 references."""

    def __enter__(self) -> 'FullFP32':
        self.saved = (torch.backends.cuda.matmul.allow_tf32,
                      torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
            self.saved)


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
