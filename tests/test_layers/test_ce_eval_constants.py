"""The eval path of CE over BN with its input-independent part precomputed
(:meth:`CE._eval_constants`, :func:`cenet_mmdet.ops.constant_maps`): the
hand-written backward against float64 gradcheck, the same numbers as the path
that computes everything in the graph, and a cache that follows every change
of the tensors it comes from."""
import copy

import pytest
import torch

from cenet_mmdet.models.layers import CE, SyncCE
from cenet_mmdet.ops import constant_maps

SHAPE = (3, 32, 5, 6)


def trained_layer(dtype=torch.float64, **options) -> CE:
    torch.manual_seed(0)
    layer = CE(32, group_size=8, **options).to(dtype)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(torch.randn_like(param) * 0.3)
        for _ in range(2):
            layer.train()(torch.randn(4, 32, 5, 6, dtype=dtype) * 2 + 1)
    return layer.eval()


def graph_path(layer: CE, x: torch.Tensor) -> torch.Tensor:
    """The same layer computing every constant in the graph."""
    other = copy.deepcopy(layer)
    other._eval_constants = lambda dtype: None
    return other(x)


@pytest.mark.parametrize('shifted', [False, True])
def test_hand_written_backward_is_gradcheck_exact(shifted):
    layer = trained_layer().requires_grad_(False)
    constants = layer._eval_constants(torch.float64)
    assert constants is not None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 30, generator=gen, dtype=torch.float64)  # (N, G, d, L)
    shift = x[..., 0].clone() if shifted else None
    source = x - shift[..., None] if shifted else x
    sums = source.sum(-1).requires_grad_()
    squares = source.square().sum(-1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, q: constant_maps(s, q, 30, constants, shift), (sums, squares))


@pytest.mark.parametrize('options', [{}, dict(variant='aii'), dict(whitening='paper'),
                                     dict(frozen_gate=True), dict(affine=False)])
@pytest.mark.parametrize('mean', [0.0, 1e3])
def test_same_numbers_as_the_graph_path(options, mean):
    layer = trained_layer(**options)
    layer.requires_grad_(False)  # the paper's setting (1)
    x = (torch.randn(SHAPE, dtype=torch.float64) + mean).requires_grad_()
    weight = torch.randn(SHAPE, dtype=torch.float64)
    out = layer(x)
    (grad, ) = torch.autograd.grad((out * weight).sum(), x)
    assert layer._eval_cache is not None  # the constant path ran
    x_ref = x.detach().clone().requires_grad_()
    expected = graph_path(layer, x_ref)
    (expected_grad, ) = torch.autograd.grad((expected * weight).sum(), x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_paths_that_keep_the_graph():
    layer = trained_layer()
    x = torch.randn(SHAPE, dtype=torch.float64)
    layer(x)  # parameters train: computed in the graph (they need gradients)
    assert layer._eval_cache is None
    with torch.no_grad():
        layer(x)
    assert layer._eval_cache is not None
    assert trained_layer(variant='bd')._eval_constants(torch.float64) is None
    traced = torch.jit.trace(trained_layer().requires_grad_(False), (x, ))
    torch.testing.assert_close(traced(x), graph_path(trained_layer(), x))


def test_the_cache_follows_the_tensors():
    layer = trained_layer()
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        first = layer._eval_cache[1]
        layer(x)
        assert layer._eval_cache[1] is first  # reused
        for change in (lambda: layer.running_var.mul_(2),        # in place
                       lambda: layer.ce.running_whitening.add_(0.01),
                       lambda: layer.ce.aii.gate[0].weight.mul_(0.5),
                       lambda: layer.load_state_dict(trained_layer().state_dict())):
            change()
            out = layer(x)
            assert layer._eval_cache[1] is not first
            first = layer._eval_cache[1]
            torch.testing.assert_close(out, graph_path(layer, x), rtol=1e-12, atol=1e-14)
        layer.float()  # new storage and dtype
        out = layer(x.float())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, graph_path(layer, x.float()))
        # a .data write keeps the version: a switch to eval recomputes
        layer.weight.data.mul_(3)
        layer.train().eval()
        torch.testing.assert_close(layer(x.float()), graph_path(layer, x.float()))


def test_sync_ce_in_eval_uses_the_same_path():
    layer = trained_layer()
    synced = SyncCE.from_ce(layer)
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), layer(x), rtol=0, atol=0)


def test_a_hook_on_the_gate_sees_its_call():
    """The channel-analysis tools read the gate's input with a forward
    pre-hook on ``ce.aii``: with a hook, the layer computes in the graph."""
    layer = trained_layer()
    seen = []
    handle = layer.ce.aii.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (SHAPE[0], 32)
    assert layer._eval_cache is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out, rtol=1e-12, atol=1e-14)
    assert layer._eval_cache is not None  # without the hook: the constant path
