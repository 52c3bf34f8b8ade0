"""tools/benchmarks/bench_native.py times CE's eval path rewritten as one
Python function and in C++; its claims hold only if the rewrites compute
CE's function bit for bit, including the inputs that CE takes about a
shift, and refuse what they do not cover."""
import shutil

import pytest
import torch

from cenet_mmdet.models.layers import CE
from test_bench_floor import load_script


def randomize(layer: CE, seed: int) -> None:
    """Every tensor that enters the maps away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (layer.weight, layer.bias, layer.running_mean, layer.ce.lambda_logit,
                       *layer.ce.aii.gate.parameters()):
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
        for tensor in (layer.running_var, layer.ce.aii.running_scale):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
        whitening = layer.ce.running_whitening
        whitening.add_(torch.randn(whitening.shape, generator=gen) * 0.1)


def check_rewrite(eval_maps, monkeypatch) -> None:
    """A CE-ResNet-50 routed through ``eval_maps`` gives CE's outputs bit
    for bit, and goes through CE exactly where CE's accuracy check of the
    unshifted moments fails (and gives CE's output there too)."""
    bench = load_script('bench_native')
    torch.manual_seed(0)
    reference = bench.build('CE', 50)
    for index, (_, layer) in enumerate(reference.ce_layers()):
        randomize(layer, index)
    rewritten = bench.build('CE', 50)
    rewritten.load_state_dict(reference.state_dict())
    assert bench.rewrite(rewritten, eval_maps) == 14
    reference.eval(), rewritten.eval()
    x = torch.randn(2, 3, 64, 64)
    decisions = []
    check = CE._unshifted_is_accurate
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(CE, '_unshifted_is_accurate', lambda self, *args: (
            decisions.append(check(self, *args)) or decisions[-1]))
        expected = reference(x)
    with torch.no_grad():
        for level, got in zip(expected, rewritten(x)):
            assert torch.equal(level, got)
    assert len(decisions) == 14 and decisions.count(True) >= 7
    assert bench.CALLS == {'all': 14, 'shifted': decisions.count(False)}
    shifted = bench.CALLS['shifted']

    layer = CE(32).eval()
    randomize(layer, 99)
    other = CE(32).eval()
    other.load_state_dict(layer.state_dict())
    other.forward = lambda inputs: bench._rewritten_forward(eval_maps, other, inputs)
    far = torch.randn(2, 32, 5, 5) + 1e3  # mean^2 > 100 var everywhere
    with torch.no_grad():
        assert torch.equal(other(far), layer(far))
    assert bench.CALLS == {'all': 15, 'shifted': shifted + 1}


def test_flat_rewrite_is_ce_bit_for_bit(monkeypatch):
    check_rewrite(load_script('bench_native').flat_eval_maps, monkeypatch)


@pytest.mark.skipif(shutil.which('ninja') is None or shutil.which('c++') is None,
                    reason='the C++ prototype needs ninja and a C++ compiler')
def test_native_rewrite_is_ce_bit_for_bit(monkeypatch):
    check_rewrite(load_script('bench_native').native_eval_maps(), monkeypatch)


def test_rewrite_refuses_what_it_does_not_cover():
    bench = load_script('bench_native')
    model = bench.build('CE', 50)
    model.ce_layers()[3][1].ce.variant = 'bd'
    with pytest.raises(ValueError, match='layer1.2.bn3: the rewrites cover the released CE only'):
        bench.rewrite(model, bench.flat_eval_maps)
    model = bench.build('CE', 50)
    bench.rewrite(model, bench.flat_eval_maps)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match='eval without gradients, float32'):
        model.train()
        model(x)
    model.eval()
    with pytest.raises(RuntimeError, match='eval without gradients, float32'):
        model(x)  # gradients enabled
