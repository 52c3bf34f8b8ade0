"""CE and SyncCE (world size 1) on CUDA in float32, and CEResNet on CUDA in
float64, against float64 CPU references; and CE with TF32 matmuls enabled.

References (both independent of the plugin's CE code):

* :class:`cenet_mmdet.testing.ReleasedBNCE` / ``swap_in_released_ce``: the
  plain-autograd transcription of the released BN + CE, run in float64 on the
  CPU with the same tensors: outputs, input and parameter gradients, running
  buffers, eval outputs;
* ``reference_ce`` and ``reference_batch_statistics`` of
  tests/test_layers/test_ce_precision.py (float64, step by step) for inputs
  with mean/std 1e3 and 1e4 (training, and eval with gradients) and for the
  TF32 checks.

Float32 results on CUDA must be within 1e-4 of the reference (max abs error
relative to the largest reference value), with TF32 off (cuBLAS and cuDNN) as
a float32 comparison requires. The same layers and steps run in float64 on
the device too, within 1e-10 of the float64 CPU reference: float32 round-off
cannot hide a small device-specific error there (a lost term, a wrong
reduction), so a failure means something; with TF32 on, CE's statistics and outputs must
still meet that bound (its Gram matrix, Newton steps and output map must not
run in TF32), gradients 1e-2. At mean/std 1e3-1e4 outputs must stay below
1e-5 and within 10x CUDA's own float32 BN error. The 50-layer network is
compared in float64 (1e-9): in float32 its untrained layers amplify
round-off to ~1e-1, which no useful bound can separate from an error.
"""
import copy
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.models.layers import CE, SyncCE
from cenet_mmdet.testing import ReleasedBNCE, released_to_plugin_keys
from cenet_mmdet.testing.released_ce import (plugin_to_released_keys,
                                             swap_in_released_ce)
from cuda_utils import (CUDA_MARKS, DEVICE, FullFP32, TF32Matmuls,
                        assert_grads_close, assert_relative, load_test_module,
                        relative_error)

pytestmark = CUDA_MARKS

PRECISION = load_test_module('test_layers/test_ce_precision.py')
F32 = 1e-4  # float32 bound, relative to the largest reference value
F64 = 1e-10  # a layer in float64 on the device, against float64 on the CPU
BOUND = {torch.float32: F32, torch.float64: F64}
LARGE_MEAN_CEILING = 1e-5  # CE's output error at mean/std 1e3-1e4 (CPU: 8e-7)
F64_NET = 1e-9  # CE-ResNet-50 in float64, device against CPU
STEPS = 2

# channels, input (N, H, W), CE options
CASES = [
    (64, (4, 28, 28), dict(group_size=64)),   # the stem: one group of 64
    (256, (2, 14, 10), dict(group_size=16)),  # a block: G = 16
    (128, (3, 7, 9), dict(group_size=16)),    # odd spatial size
    (32, (2, 8, 8), dict(group_size=16, pool_stats=True)),
]


@pytest.fixture(autouse=True)
def _full_fp32():
    """No TF32 (cuDNN defaults to it for convolutions) unless a test asks."""
    with FullFP32():
        yield


@pytest.fixture
def world_size_one(tmp_path) -> Iterator[None]:
    """A gloo process group of one process (file:// rendezvous)."""
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous',
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ helpers
def released_pair(channels: int, options: dict, seed: int = 0
                  ) -> Tuple[ReleasedBNCE, CE]:
    """A float64 CPU reference with non-trivial tensors and a float32 CUDA CE
    holding the same (float32-representable) values."""
    ref = ReleasedBNCE(channels, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in ref.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
        ref.bn.weight.add_(1.5)
        ref.ce.AR.fc[1].weight.add_(1.0)
        ref.bn.running_mean.copy_(torch.randn(channels, generator=gen))
        ref.bn.running_var.uniform_(0.5, 2.0, generator=gen)
    ref = ref.float().double()  # values that float32 holds exactly
    layer = CE(channels, **options)
    layer.load_state_dict(released_to_plugin_keys(ref.state_dict()))
    return ref, layer.to(DEVICE)


def make_input(channels: int, shape: Tuple[int, int, int], gen: torch.Generator
               ) -> Tensor:
    """Correlated channels with non-zero means (every statistic matters)."""
    n, h, w = shape
    mix = torch.eye(channels, dtype=torch.float64) + 0.3 * torch.randn(
        channels, channels, generator=gen, dtype=torch.float64)
    z = torch.randn(n, channels, h, w, generator=gen, dtype=torch.float64)
    x = torch.einsum('ij,njhw->nihw', mix, z) + 0.5
    return x.float()


def named_grads(module: nn.Module) -> Dict[str, Tensor]:
    return {name: param.grad for name, param in module.named_parameters()}


def layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype


def check_step(layer: nn.Module, ref: ReleasedBNCE, x: Tensor, weight: Tensor,
               what: str) -> None:
    """One training forward/backward of both; outputs and every gradient,
    within the bound of the layer's dtype."""
    dtype = layer_dtype(layer)
    bound = BOUND[dtype]
    x_cuda = x.to(DEVICE, dtype, copy=True).requires_grad_()
    x_ref = x.double().requires_grad_()
    out, expected = layer(x_cuda), ref(x_ref)
    assert out.dtype == dtype and out.device.type == DEVICE
    assert_relative(out, expected, bound, f'{what} output')
    (out * weight.to(DEVICE, dtype)).sum().backward()
    (expected * weight.double()).sum().backward()
    assert_relative(x_cuda.grad, x_ref.grad, bound, f'{what} input grad')
    ref_grads = released_to_plugin_keys(named_grads(ref))
    assert_grads_close(named_grads(layer), ref_grads, bound, what)


def check_buffers(layer: nn.Module, ref: ReleasedBNCE, steps: int, what: str) -> None:
    expected = released_to_plugin_keys(ref.state_dict())
    for name, value in layer.state_dict().items():
        if name == 'num_batches_tracked':
            assert value.item() == steps, what
            continue
        assert_relative(value, expected[name], BOUND[layer_dtype(layer)],
                        f'{what} {name}')


def train_and_eval(layer: nn.Module, ref: ReleasedBNCE, channels: int,
                   shape: Tuple[int, int, int], what: str) -> None:
    """``STEPS`` SGD steps of both, then the buffers and an eval forward."""
    opt_layer = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    layer.train(), ref.train()
    for step in range(STEPS):
        x = make_input(channels, shape, gen)
        weight = torch.randn(x.shape, generator=gen)
        check_step(layer, ref, x, weight, f'{what} step {step}')
        opt_layer.step(), opt_ref.step()
        opt_layer.zero_grad(), opt_ref.zero_grad()
    check_buffers(layer, ref, STEPS, what)
    layer.eval(), ref.eval()
    x = make_input(channels, shape, gen) * 1.5
    dtype = layer_dtype(layer)
    with torch.no_grad():
        assert_relative(layer(x.to(DEVICE, dtype)), ref(x.double()), BOUND[dtype],
                        f'{what} eval')


# -------------------------------------------------------------- (a) layers
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('channels,shape,options', CASES)
def test_ce_train_steps_and_eval_match_float64_cpu(channels, shape, options, dtype):
    ref, layer = released_pair(channels, options)
    train_and_eval(layer.to(dtype), ref, channels, shape,
                   f'CE {dtype} {channels} {options}')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('channels,shape,options',
                         [case for case in CASES if not case[2].get('pool_stats')])
def test_sync_ce_world_size_one_matches_float64_cpu(world_size_one, channels,
                                                    shape, options, dtype):
    ref, layer = released_pair(channels, options)
    layer = SyncCE.from_ce(layer).to(dtype)
    assert dist.get_world_size() == 1
    train_and_eval(layer, ref, channels, shape, f'SyncCE {dtype} {channels} {options}')


@pytest.mark.parametrize('ratio', [1e3, 1e4])
@pytest.mark.parametrize('group_size', [64, 16])
def test_large_mean_training_and_eval(group_size, ratio):
    """mean/std up to 1e4, as in test_ce_precision, against its float64
    reference: training output within 10x of CUDA's own float32 BN error and
    below ``LARGE_MEAN_CEILING``; input gradients and the batch statistic
    folded into every running buffer 1e-5; then eval with gradients (CUDA
    always takes the shifted moments; ``norm_eval=True`` training runs
    this): output, input and parameter gradients."""
    layer_cpu = PRECISION.make_layer(group_size)
    start = {k: v.clone().double() for k, v in layer_cpu.state_dict().items()}
    layer = copy.deepcopy(layer_cpu).to(DEVICE).train()
    x = PRECISION.make_input(ratio, per_image=False)
    x_cuda = x.to(DEVICE, copy=True).requires_grad_()
    x64 = x.double().requires_grad_()
    statistics = PRECISION.reference_batch_statistics(x, layer_cpu)
    expected = PRECISION.reference_ce(x64, layer_cpu, training=True)
    out = layer(x_cuda)
    PRECISION.assert_output_error(out, expected, x_cuda, layer, True,
                                  LARGE_MEAN_CEILING)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (out * weights.to(DEVICE)).sum().backward()
    (expected * weights.double()).sum().backward()
    assert_relative(x_cuda.grad, x64.grad, PRECISION.GRAD_CEILING,
                    'large-mean input grad')
    momentum, state = layer.momentum, layer.state_dict()
    for name, value in statistics.items():
        folded = (state[name].cpu().double() - (1 - momentum) * start[name]) / momentum
        assert_relative(folded, value, PRECISION.STAT_CEILING,
                        f'large-mean batch statistic of {name}')
    # eval with gradients, from running statistics of a batch with per-image
    # offsets (momentum 1)
    layer.momentum = 1.0
    with torch.no_grad():
        layer(PRECISION.make_input(ratio, per_image=True, seed=3).to(DEVICE))
    layer.eval()
    layer.zero_grad()
    reference = copy.deepcopy(layer).cpu()
    x = PRECISION.make_input(ratio, per_image=True)
    x_cuda = x.to(DEVICE, copy=True).requires_grad_()
    x64 = x.double().requires_grad_()
    out = layer(x_cuda)
    expected = PRECISION.reference_ce(x64, reference, training=False)
    PRECISION.assert_output_error(out, expected, x_cuda, layer, False,
                                  LARGE_MEAN_CEILING)
    (out * weights.to(DEVICE)).sum().backward()
    (expected * weights.double()).sum().backward()
    assert_relative(x_cuda.grad, x64.grad, PRECISION.GRAD_CEILING,
                    'large-mean eval input grad')
    PRECISION.assert_parameter_grads(layer, reference)


# ------------------------------------------------------------ (a) backbone
def released_key(key: str, ce_prefixes: List[str]) -> str:
    """The key of a plugin CEResNet tensor in the swapped-in released model."""
    for prefix in ce_prefixes:
        if key.startswith(prefix + '.'):
            suffix = key[len(prefix) + 1:]
            return f'{prefix}.{next(iter(plugin_to_released_keys({suffix: 0})))}'
    return key


def backbone_results(model: nn.Module, x: Tensor, weights: List[Tensor],
                     names: Dict[str, str]) -> Dict[str, Tensor]:
    """One training forward/backward, then an eval forward, of ``model`` (on
    its device and dtype): outputs, input grad, parameter grads and buffers,
    as float64 CPU tensors under the plugin's names (``names``: plugin name
    -> ``model``'s name)."""
    param = next(model.parameters())
    x = x.to(param.device, param.dtype, copy=True).requires_grad_()
    model.train()
    outs = model(x)
    sum((o * w.to(o)).sum() for o, w in zip(outs, weights)).backward()
    results = {f'output {i + 1}': o for i, o in enumerate(outs)}
    results['input grad'] = x.grad
    params, state = dict(model.named_parameters()), model.state_dict()
    for name, own in names.items():
        if own in params:
            results[f'grad of {name}'] = params[own].grad
        if state[own].is_floating_point():
            results[f'buffer {name}'] = state[own]
    model.eval()
    with torch.no_grad():
        for i, out in enumerate(model(x.detach())):
            results[f'eval output {i + 1}'] = out
    return {k: v.detach().cpu().double() for k, v in results.items()}


def test_ce_resnet50_narrow_forward_backward_matches_float64_cpu():
    """CE-ResNet-50 (base_channels=8), the plugin in float64 on the device
    against the released transcription in float64 on the CPU: outputs, input
    gradient, every parameter gradient and buffer after a training step, eval
    outputs, within ``F64_NET``. (In float32 this untrained 50-layer network
    amplifies round-off to ~1e-1 in its input gradient, on the CPU too, so a
    float32 comparison could only use a bound that nothing fails; float64
    keeps the amplified round-off near 1e-12, and any float32 step, lost
    term or device-specific error shows.)"""
    torch.manual_seed(0)
    # norm_eval=False: mmdet's default (True) keeps every CE in eval mode
    model = CEResNet(depth=50, base_channels=8, out_indices=(0, 1, 2, 3),
                     norm_eval=False)
    ce_prefixes = [name for name, module in model.named_modules()
                   if isinstance(module, CE)]
    assert len(ce_prefixes) == 14
    plugin_names = {key: key for key in model.state_dict()}
    released_names = {key: released_key(key, ce_prefixes) for key in plugin_names}
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        shapes = [out.shape for out in copy.deepcopy(model)(x)]
    weights = [torch.randn(shape, generator=gen) for shape in shapes]
    released = swap_in_released_ce(copy.deepcopy(model)).double()
    expected = backbone_results(released, x, weights, released_names)
    got = backbone_results(model.double().to(DEVICE), x, weights, plugin_names)
    assert got.keys() == expected.keys() and len(got) > 300
    grads = [key for key in expected if key.startswith('grad of ')]
    assert len(grads) > 100
    # a scalar gradient (a lambda's) is a sum of nearly cancelling terms:
    # relative to 1e-2 of the largest gradient at least
    assert_grads_close({key: got[key] for key in grads},
                       {key: expected[key] for key in grads}, F64_NET, 'float64')
    for key, value in expected.items():
        if key.endswith('.ce.running_mean'):
            # the mean of a BN output, exactly beta (here 0): round-off
            # relative to the BN output's unit scale
            error = (got[key] - value).abs().max().item()
            assert error <= F64_NET, f'{key}: error {error:.3g} > {F64_NET:g}'
        elif key not in grads:
            assert_relative(got[key], value, F64_NET, key)


# --------------------------------------------------------------------- TF32
@pytest.mark.parametrize('group_size', [64, 16])
def test_statistics_and_output_stay_float32_with_tf32_matmuls(group_size):
    """With TF32 allowed, CE's running_whitening (Gram matrix + Newton steps)
    and output are float32-accurate against the float64 reference; input
    gradients (autograd's matmuls follow the global setting) within 1e-2.

    A TF32 Gram matrix or output map errs by ~1e-3 relative: this fails then.
    """
    layer_cpu = PRECISION.make_layer(group_size)
    layer_cpu.momentum = 1.0  # the buffers are this batch's statistics
    layer = copy.deepcopy(layer_cpu).to(DEVICE).train()
    gen = torch.Generator().manual_seed(4)
    x = make_input(64, (4, 28, 28), gen) * 2 + 5
    x_cuda = x.to(DEVICE, copy=True).requires_grad_()
    x64 = x.double().requires_grad_()
    with TF32Matmuls():
        assert torch.backends.cuda.matmul.allow_tf32
        out = layer(x_cuda)
        weights = torch.randn(x.shape, generator=gen)
        (out * weights.to(DEVICE)).sum().backward()
    reference = ReleasedBNCE(64, group_size=group_size, momentum=1.0)
    reference.load_state_dict(plugin_to_released_keys(layer_cpu.state_dict()))
    reference.bn.momentum = 1.0
    reference = reference.double().train()
    expected = reference(x64)
    (expected * weights.double()).sum().backward()
    assert_relative(out, expected, F32, 'TF32 output')
    assert_relative(layer.ce.running_whitening, reference.ce.running_wm, F32,
                    'TF32 running_whitening')
    assert_relative(layer.ce.aii.running_scale, reference.ce.AR.running_scale, F32,
                    'TF32 running_scale')
    assert_relative(layer.running_var, reference.bn.running_var, F32,
                    'TF32 running_var')
    assert_relative(x_cuda.grad, x64.grad, 1e-2, 'TF32 input grad')
    # eval: the output map only
    layer.eval(), reference.eval()
    x = make_input(64, (2, 28, 28), gen) * 2 + 5
    with TF32Matmuls(), torch.no_grad():
        out = layer(x.to(DEVICE))
    assert_relative(out, reference(x.double()), F32, 'TF32 eval output')


def test_tf32_context_restores_the_settings():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with TF32Matmuls():
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == 'high'
    assert (torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32) == before


def test_tf32_context_is_in_effect_for_plain_matmuls():
    """Control for the TF32 test above: a plain float32 matmul under the same
    context does lose precision (TF32 keeps 10 mantissa bits: ~5e-4 relative;
    full float32: ~1e-7), so a CE that passed there keeps float32 itself."""
    if DEVICE != 'cuda' or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip('TF32 needs an Ampere or later GPU')
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(16, 64, 784, generator=gen, dtype=torch.float64)
    b = torch.randn(16, 784, 64, generator=gen, dtype=torch.float64)
    expected = a @ b
    a32, b32 = a.float().to(DEVICE), b.float().to(DEVICE)
    with TF32Matmuls():
        tf32 = a32 @ b32
    full = a32 @ b32
    assert relative_error(full, expected) < 2e-6
    assert relative_error(tf32, expected) > 2e-5
