"""CE and CE-ResNet under ``torch.autocast`` (fp16 and bf16) on CUDA.

Under autocast a CE layer receives the half-precision output of a convolution;
it computes its statistics in float32 and returns the input's dtype. Checked
against a float32 run (autocast off) of the plugin on the same, already
rounded, input, and against the independent float64 reference
(:class:`cenet_mmdet.testing.ReleasedBNCE`, plain autograd, on the CPU) on
that input:

* the output dtype is the input's;
* the running statistics (BN mean/variance, CE mean, whitening, AII scale)
  equal those of the float32 run: they are computed in float32 from the same
  values; and they are within float32 accuracy (1e-4) of the reference's;
* outputs are finite and within the output dtype's rounding of the float32
  output and of the reference's; input and parameter gradients within 1e-2
  (relative) of both.
"""
import copy
from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor, nn

from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.models.layers import CE
from cenet_mmdet.testing import ReleasedBNCE, released_to_plugin_keys
from cenet_mmdet.testing.released_ce import plugin_to_released_keys
from cuda_utils import (CUDA_MARKS, DEVICE, FullFP32, assert_grads_close,
                        assert_relative)

pytestmark = CUDA_MARKS

DTYPES = [torch.float16, torch.bfloat16]
# output rounding: half a unit in the last place, relative to the largest value
OUTPUT_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_BOUND = 1e-2
F32 = 1e-4  # float32 statistics against the float64 reference
BUFFERS = ('running_mean', 'running_var', 'ce.running_mean',
           'ce.running_whitening', 'ce.aii.running_scale')


def skip_unsupported(dtype: torch.dtype) -> None:
    """bf16 autocast needs a GPU that supports it (Ampere or later)."""
    if (dtype == torch.bfloat16 and DEVICE == 'cuda'
            and not torch.cuda.is_bf16_supported()):
        pytest.skip('no bfloat16 on this GPU')


@pytest.fixture(autouse=True)
def _full_fp32():
    """The float32 runs compared against are full float32 (no TF32)."""
    with FullFP32():
        yield


def make_layer(channels: int, group_size: int) -> CE:
    torch.manual_seed(0)
    layer = CE(channels, group_size=group_size)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.ce.lambda_logit.fill_(0.3)
    return layer.to(DEVICE).train()


def released_reference(layer: CE) -> ReleasedBNCE:
    """The float64 CPU transcription of the released BN + CE holding
    ``layer``'s tensors."""
    reference = ReleasedBNCE(layer.num_features, group_size=layer.ce.group_size)
    reference.load_state_dict(plugin_to_released_keys(
        {k: v.cpu() for k, v in layer.state_dict().items()}))
    return reference.double().train()


def run_released(reference: ReleasedBNCE, x: Tensor, weight: Tensor
                 ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """:func:`run` of the reference in float64 on the CPU (plugin names)."""
    x = x.detach().cpu().double().requires_grad_()
    out = reference(x)
    (out * weight.cpu().double()).sum().backward()
    return out, x.grad, released_to_plugin_keys(
        {n: p.grad for n, p in reference.named_parameters()})


def run(layer: CE, x: Tensor, weight: Tensor, dtype: torch.dtype = None
        ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Training forward/backward (under autocast to ``dtype`` if given):
    output, input gradient, parameter gradients."""
    x = x.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=dtype or torch.float16,
                        enabled=dtype is not None):
        out = layer(x)
    (out.float() * weight).sum().backward()
    return out, x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('group_size,offset', [(64, 0.0), (16, 0.0), (16, 30.0)])
def test_ce_under_autocast_matches_float32(dtype, group_size, offset):
    skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 64, 20, 20, generator=gen) * 2 + offset).to(DEVICE)
    x_low = x.to(dtype)  # what a convolution under autocast hands over
    weight = torch.randn(x.shape, generator=gen).to(DEVICE)
    layer = make_layer(64, group_size)
    reference = copy.deepcopy(layer)
    released = released_reference(layer)
    out, grad_x, grads = run(layer, x_low, weight, dtype)
    out_ref, grad_x_ref, grads_ref = run(reference, x_low.float(), weight)
    out64, grad_x64, grads64 = run_released(released, x_low, weight)
    assert out.dtype == dtype and grad_x.dtype == dtype
    for expected, what in ((out_ref, 'float32 run'), (out64, 'float64 reference')):
        assert_relative(out, expected, OUTPUT_BOUND[dtype], f'{dtype} output, {what}')
    assert_relative(grad_x, grad_x_ref, GRAD_BOUND, f'{dtype} input grad')
    assert_relative(grad_x, grad_x64, GRAD_BOUND, f'{dtype} input grad, float64')
    assert_grads_close(grads, grads_ref, GRAD_BOUND, f'{dtype}')
    assert_grads_close(grads, grads64, GRAD_BOUND, f'{dtype}, float64')
    state, state_ref = layer.state_dict(), reference.state_dict()
    state64 = released_to_plugin_keys(released.state_dict())
    for name in BUFFERS:
        assert state[name].dtype == torch.float32, name
        torch.testing.assert_close(state[name], state_ref[name], rtol=1e-5,
                                   atol=1e-6, msg=lambda m: f'{name}: {m}')
        assert_relative(state[name], state64[name], F32, f'{dtype} {name}, float64')
    # eval under autocast: running statistics, the input's dtype
    layer.eval(), reference.eval(), released.eval()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
        out = layer(x_low)
    assert out.dtype == dtype
    with torch.no_grad():
        assert_relative(out, reference(x_low.float()), OUTPUT_BOUND[dtype],
                        f'{dtype} eval output')
        assert_relative(out, released(x_low.cpu().double()), OUTPUT_BOUND[dtype],
                        f'{dtype} eval output, float64 reference')


def test_float32_input_under_autocast_keeps_float32():
    """A float32 input (e.g. the first layer) gives a float32 output."""
    layer = make_layer(64, 16)
    x = torch.randn(2, 64, 8, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert layer(x).dtype == torch.float32


@pytest.mark.parametrize('dtype', DTYPES)
def test_ce_resnet50_narrow_under_autocast(dtype):
    """A CE-ResNet-50 (base_channels=8) training step under autocast: outputs
    in the autocast dtype, finite outputs and gradients, running buffers
    float32 and finite. (Accuracy is checked per layer above: this untrained
    network amplifies round-off, its float32 input gradient errs by 8e-2.)"""
    skip_unsupported(dtype)
    torch.manual_seed(0)
    model = CEResNet(depth=50, base_channels=8, norm_eval=False).to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = x.to(DEVICE)

    def step(net: nn.Module, enabled: bool) -> Tuple[Tensor, ...]:
        """One forward (autocast if ``enabled``) and backward."""
        with torch.autocast(DEVICE, dtype=dtype, enabled=enabled):
            outs = net(x)
        sum(o.float().square().mean() for o in outs).backward()
        return outs

    for out in step(model, True):
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for name, buffer in model.state_dict().items():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, name
            assert torch.isfinite(buffer).all(), name
