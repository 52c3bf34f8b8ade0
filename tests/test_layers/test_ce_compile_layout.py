"""CE compiled by Inductor with channels-last convolutions around it: the
batched GEMMs get inputs in a layout they accept (issue #20).

Inductor's layout optimization (on by default on the CPU) gives convolution
outputs the channels-last order, and pointwise ops after them inherit it. An
``(N, G, d, L)`` view of such a tensor reaches ``bmm``/``baddbmm`` with
strides that no batched GEMM accepts, and ATen then copies every ``(d, L)``
matrix apart: one ``aten::copy_`` of a 2-D ``(d, L)`` or ``(L, d)`` tensor
per sample and group, in the application's forward and in its backward. In a
compiled CE-ResNet-50 train step these copies took about a fifth of the time.
:func:`cenet_mmdet.ops.modes.contiguous_for_compiler` enforces the
contiguous strides of the GEMMs' activation-sized inputs. And the Functions
save those inputs three-dimensional, ``(N*G, d, L)``: Inductor lays out a
4-D tensor saved after a convolution channels-last (``G`` innermost for
``(N, G, d, L)``), which wrote the shifted input a second time.

The check: a conv -> CE (batch statistics: the Gram matrices) -> ReLU ->
conv -> CE (running statistics with gradients, the ``norm_eval=True`` path)
-> conv model, compiled with Inductor and layout optimization forced on,
runs one forward and backward under ``torch.profiler``: no 2-D copy of a
``(d, L)`` matrix, one forward and one backward graph in which every
``(N, G, d, L)`` and ``(N*G, d, L)`` tensor is contiguous, and the output,
the input gradient and every parameter gradient equal the eager model's.
Inductor compiles C++ here (about 20 s on 2 cores with an empty cache).
"""
import copy
import re

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.profiler import ProfilerActivity, profile

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.layers import CE

#: float32 agreement with eager, relative to the largest reference entry
F32 = 2e-5
GROUP, HEIGHT, WIDTH = 16, 12, 14


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 32, 1), CE(32, group_size=GROUP), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), CE(32, group_size=GROUP),
        nn.Conv2d(32, 8, 1))
    model[4].eval()  # running statistics, as under norm_eval=True
    with torch.no_grad():
        model[4].running_mean.uniform_(-0.5, 0.5)
        model[4].running_var.uniform_(0.5, 2.0)
    return model


def per_matrix_copies(events) -> list:
    """The profiled ``aten::copy_`` calls of a 2-D ``(d, L)`` or ``(L, d)``
    tensor: ATen's bmm copying the matrices of a batch one by one."""
    positions = HEIGHT * WIDTH
    shapes = ([GROUP, positions], [positions, GROUP])
    return [event for event in events if event.name == 'aten::copy_'
            and event.input_shapes and list(event.input_shapes[0]) in shapes]


def grouped_shape(batch: int) -> tuple:
    """``(N, G, d, L)`` of the CE layers' input (32 channels)."""
    return batch, 32 // GROUP, GROUP, HEIGHT * WIDTH


def contiguous_strides(shape: tuple) -> tuple:
    return tuple(torch.empty(shape, device='meta').stride())


def layouts_of(shape: tuple, code: str) -> set:
    """The strides of every buffer or view of ``shape`` in Inductor's
    generated code, but broadcasts (a stride 0: the GEMMs' ``(N*G, d, 1)``
    biases expanded over ``L``). A 4-D tensor that a compiled forward saves
    after a convolution is laid out channels-last (for ``(N, G, d, L)``:
    ``G`` innermost), which no GEMM takes: the shifted input was then
    written twice, that way for the backward and contiguous for the GEMMs."""
    sizes = ', '.join(str(size) for size in shape)
    layouts = {tuple(int(stride) for stride in match.split(','))
               for match in re.findall(rf'\({sizes}\), \(([0-9, ]+)\)', code)}
    return {strides for strides in layouts if 0 not in strides}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_compiled_ce_between_channels_last_convs_makes_no_per_matrix_copies():
    model = make_model()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 8, HEIGHT, WIDTH) * 2 + 1
    grad = torch.randn(2, 8, HEIGHT, WIDTH)
    expected_x = x.clone().requires_grad_()
    expected = model(expected_x)
    expected.backward(grad)

    torch._dynamo.reset()
    with inductor_config.patch(force_layout_optimization=True):
        compiled = torch.compile(twin, backend='inductor')
        warm_x = x.clone().requires_grad_()

        def step():
            compiled(warm_x).backward(grad)
        _, codes = run_and_get_code(step)  # compiles: the forward and backward code
        for parameter in twin.parameters():
            parameter.grad = None
        actual_x = x.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            actual = compiled(actual_x)
            actual.backward(grad)
    assert len(codes) == 2, 'one forward and one backward graph'
    code = '\n'.join(codes)
    n, groups, size, positions = grouped_shape(x.size(0))
    seen = 0
    for shape in ((n, groups, size, positions), (n * groups, size, positions)):
        layouts = layouts_of(shape, code)
        assert layouts <= {contiguous_strides(shape)}, (shape, layouts)
        seen += len(layouts)
    assert seen, 'no grouped tensor found in the generated code'
    copies = per_matrix_copies(prof.events())
    assert not copies, f'{len(copies)} per-matrix copies, e.g. {copies[0].input_shapes}'
    assert any(event.name in ('aten::bmm', 'aten::baddbmm') for event in prof.events())

    assert relative_error(actual, expected) <= F32
    assert relative_error(actual_x.grad, expected_x.grad) <= F32
    # every parameter gradient, relative to the larger of its own largest
    # entry and 1e-2 of the largest of all (the first conv's bias, followed
    # by batch statistics, has a gradient that is round-off only)
    floor = 1e-2 * max(p.grad.abs().max().item() for p in model.parameters())
    for (name, reference), parameter in zip(model.named_parameters(), twin.parameters()):
        assert parameter.grad is not None, name
        scale = max(reference.grad.abs().max().item(), floor)
        error = (parameter.grad - reference.grad).abs().max().item() / scale
        assert error <= F32, f'{name}: {error:.3g}'
