"""The lower-bound kinds (tools/benchmarks/floors.py) are honest bounds:
every CE layer is replaced, and a train step computes the map gradient that
a real CE layer needs; bench_backbones.py and bench_layers.py take the kinds
from that one module."""
import os.path as osp
import sys

import pytest
import torch

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.layers import CE
from cenet_mmdet.testing import scripts

BENCH = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                 'tools', 'benchmarks')


def load_script(name: str):
    """``tools/benchmarks/<name>.py`` as a module (it imports its siblings)."""
    return scripts.load_script(osp.join(BENCH, f'{name}.py'), f'_{name}',
                               with_siblings=True)


def load_bench():
    return load_script('bench_backbones')


def test_the_lower_bound_kinds_are_defined_once():
    """Both benchmarks offer exactly the kinds of floors.py, with its layers
    and labels, and define no floor layer of their own."""
    from torch import nn
    backbones, layers = load_bench(), load_script('bench_layers')
    floors = sys.modules['floors']
    assert list(floors.FLOORS) == list(floors.LABELS) == [
        'floor', 'floor+gate', 'floor+moments']
    for bench in (backbones, layers):
        assert {k: v for k, v in bench.KINDS.items() if k.startswith('floor')} == floors.LABELS
        assert bench.FLOORS is floors.FLOORS
        own = [name for name, value in vars(bench).items()
               if isinstance(value, type) and issubclass(value, nn.Module)
               and value.__module__ == bench.__name__]
        assert not own, own


def test_floor_replaces_all_14_layers_and_differentiates_its_maps():
    bench = load_bench()
    model = bench.build('floor', 50)
    floors = [m for m in model.modules() if isinstance(m, bench.MapsOnly)]
    assert len(floors) == 14
    assert not any(isinstance(m, CE) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    bench.train_fn(model, x)()
    for layer in floors:
        (matrix, bias), = layer.maps.values()
        assert matrix.is_leaf and matrix.requires_grad and bias.requires_grad
        assert matrix.grad is not None and matrix.grad.abs().sum() > 0
        assert bias.grad is not None and bias.grad.abs().sum() > 0


def check_gated_floor(kind: str, floor: str, offset: float, statistics,
                      **tolerance) -> None:
    """The bound ``kind`` replaces all 14 CE layers of CE-ResNet-50 by its
    layer (class ``floor``), and that layer's output and every gradient
    (input, maps, gate weights), in a train step and without gradients,
    equal a plain autograd reference: the maps plus the AII gate on
    ``statistics(grouped)`` ``(N, C)`` of the ``(N, G, d, L)`` input (random,
    plus ``offset``), added
    into the maps' bias. The in-place hand-over of the statistics' input
    gradient is not a shortcut (the gradient through them is not zero)."""
    import torch.nn.functional as F
    bench = load_bench()
    model = bench.build(kind, 50)
    layer_class = bench.FLOORS[kind]
    assert layer_class.__name__ == floor
    assert sum(isinstance(m, layer_class) for m in model.modules()) == 14
    assert not any(isinstance(m, CE) for m in model.modules())

    torch.manual_seed(0)
    layer = layer_class(CE(32, group_size=8))
    x = (torch.randn(2, 32, 3, 4) + offset).requires_grad_()
    grad = torch.randn(2, 32, 3, 4)
    out = layer(x)
    out.backward(grad)
    (matrix, bias), = layer.maps.values()
    reduce, norm, _, expand = layer.gate
    leaves = [t.detach().clone().requires_grad_() for t in (
        x, matrix, bias, reduce.weight, norm.weight, norm.bias, expand.weight)]
    x_ref, matrix_ref, bias_ref, w1, ln_w, ln_b, w2 = leaves
    grouped = x_ref.reshape(2, 4, 8, 12)
    gate = torch.sigmoid(F.linear(F.layer_norm(
        F.linear(statistics(grouped), w1), (8, ), ln_w, ln_b).relu(), w2))
    expected = (matrix_ref @ grouped + bias_ref + gate.view(2, 4, 8, 1)).reshape(x.shape)
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    for actual, reference in zip(
            (x, matrix, bias, reduce.weight, norm.weight, norm.bias, expand.weight),
            leaves):
        torch.testing.assert_close(actual.grad, reference.grad, **tolerance)
    through_statistics = x.grad - (matrix.transpose(-1, -2) @ grad.reshape(2, 4, 8, 12)
                                   ).reshape(x.shape)
    assert through_statistics.abs().max() > 1e-3
    assert reduce.weight.grad.abs().sum() > 0 and expand.weight.grad.abs().sum() > 0


def test_gated_floor_is_the_floor_plus_one_pass_and_the_gate():
    """``floor+gate``: the maps plus a sum over ``H*W`` and the AII gate on
    it (see :func:`check_gated_floor`)."""
    check_gated_floor('floor+gate', 'GatedMapsOnly', 0.0,
                      lambda grouped: grouped.sum(-1).flatten(1))


def test_moments_floor_is_the_gated_floor_with_both_moments():
    """``floor+moments``: the maps plus both per-sample moments and the AII
    gate on the sums of squared deviations ``Q - S^2 / L`` (see
    :func:`check_gated_floor`), against a two-pass reference."""
    def deviations(grouped):
        centred = grouped - grouped.mean(-1, keepdim=True)
        return (centred * centred).sum(-1).flatten(1)  # (N, C)

    check_gated_floor('floor+moments', 'MomentsMapsOnly', 2.0,
                      deviations, rtol=1e-4, atol=1e-5)


def test_norm_gn_builds_every_kind_with_gn(monkeypatch):
    """``--norm GN``: the plain ResNet has GN everywhere, CEResNet has GN + CE
    (GroupNormCE) at the 14 CE positions, the floor replaces all 14."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from cenet_mmdet.models.layers import CELayer, GroupNormCE
    bench = load_bench()
    monkeypatch.setattr(bench, 'NORM', 'GN')
    models = {kind: bench.build(kind, 50) for kind in ('BN', 'CE', 'floor')}
    for model in models.values():
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert sum(isinstance(m, GroupNormCE) for m in models['CE'].modules()) == 14
    assert not any(isinstance(m, CELayer) for m in models['BN'].modules())
    assert not any(isinstance(m, CELayer) for m in models['floor'].modules())
    assert sum(isinstance(m, bench.MapsOnly) for m in models['floor'].modules()) == 14
    assert bench.label('CE') == 'CEResNet (GN+CE)' and bench.label('BN') == 'ResNet (GN)'


def test_floor_map_gradient_is_g_x_transposed():
    bench = load_bench()
    layer = bench.MapsOnly(CE(32))
    x = torch.randn(2, 32, 3, 4)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    (matrix, bias), = layer.maps.values()
    # reference: out = M x + c per sample and group of d = 16 channels
    xg, gg = x.reshape(2, 2, 16, 12), grad.reshape(2, 2, 16, 12)
    assert torch.allclose(out.reshape(2, 2, 16, 12), 0.5 * xg)
    assert torch.allclose(matrix.grad, gg @ xg.transpose(-1, -2), atol=1e-5)
    assert torch.allclose(bias.grad, gg.sum(-1, keepdim=True), atol=1e-5)


def test_cpu_peak_memory_of_a_train_step_is_measured():
    """The CPU memory column (issue #20, 4): a fresh process per backbone,
    the step's peak over the resident set before it. It grows with the
    batch, and holds at least the gradients of ResNet-50's 25.6M float32
    parameters (~98 MB)."""
    bench = load_bench()
    small = bench.cpu_train_step_mb('BN', 50, 1, 64, 1)
    large = bench.cpu_train_step_mb('BN', 50, 8, 64, 1)
    assert small > 90, small
    assert large > small + 20, (small, large)


def load_bench_layers():
    return load_script('bench_layers')


def stub_timings(monkeypatch, bench, floor_ms: float = 1.0) -> None:
    """Every timing of ``bench.main`` 1 ms (the floor's ``floor_ms``), 3 repeats."""
    monkeypatch.setattr(bench, 'interleaved_times', lambda fns, *args: {
        kind: [0.001 * (floor_ms if kind == 'floor' else 1)] * 3 for kind in fns})


def test_bench_layers_floor_is_the_maps_only_layer_and_totals_weight_by_count(
        monkeypatch, capsys):
    """bench_layers.py's floor applies ``0.5 x`` (the maps only, as in the
    backbone floor), and its total row is each shape's median times the
    number of CE layers of that shape (1 + 3 + 4 + 6 = 14 in CE-ResNet-50)."""
    bench = load_bench_layers()
    assert [shape[-1] for shape in bench.SHAPES] == [1, 3, 4, 6]
    floor = bench.build('floor', 32, 16)
    x = torch.randn(2, 32, 3, 3)
    assert type(floor).__name__ == 'MapsOnly'
    assert torch.equal(floor(x), 0.5 * x)
    assert {kind: type(bench.build(kind, 32, 16)).__name__ for kind in bench.KINDS} == {
        'BN': 'BatchNorm2d', 'CE': 'CE', 'SyncCE': 'SyncCE', 'released': 'ReleasedBNCE',
        'floor': 'MapsOnly', 'floor+gate': 'GatedMapsOnly',
        'floor+moments': 'MomentsMapsOnly'}

    # every timing 1 ms for BN, 2 ms for the floor: totals 14 and 28 ms
    monkeypatch.setattr(bench, 'SHAPES', [('a', 16, 4, 16, 5), ('b', 32, 4, 16, 9)])
    stub_timings(monkeypatch, bench, floor_ms=2.0)
    monkeypatch.setattr(sys, 'argv', ['bench_layers.py', '--kinds', 'floor',
                                      '--repeat', '3', '--threads', '1'])
    bench.main()
    out = capsys.readouterr().out
    assert '| BN | 14.00 | 14.00 |' in out
    assert '| floor (maps only) | 28.00 | 28.00 |' in out
    assert 'The 14 CE positions of CE-ResNet-50 in total (5 + 9 layers' in out
    assert '| b (32x4x4) | floor (maps only) | 2.00 | 2.00x (2.00-2.00) |' in out
    # only BN (always) and the kinds asked for
    labels = {line.split(' | ')[1] for line in out.splitlines()
              if line.startswith('| a (') or line.startswith('| b (')}
    assert labels == {'BN', 'floor (maps only)'}


def test_bench_layers_train_column_statistics(monkeypatch, capsys):
    """``--train-stats running`` times the train column with the layers in
    eval mode (norm_eval=True, as bench_backbones' train step); the default
    uses batch statistics."""
    bench = load_bench_layers()
    monkeypatch.setattr(bench, 'SHAPES', [('a', 16, 4, 16, 1)])
    stub_timings(monkeypatch, bench)
    original = bench.train_fn
    modes = []

    def spy(layer, x):
        modes.append((type(layer).__name__, layer.training))
        return original(layer, x)
    monkeypatch.setattr(bench, 'train_fn', spy)
    for stats, training in (('batch', True), ('running', False)):
        modes.clear()
        monkeypatch.setattr(sys, 'argv', ['bench_layers.py', '--kinds', 'CE',
                                          '--train-stats', stats, '--threads', '1'])
        bench.main()
        assert modes == [('BatchNorm2d', training), ('CE', training)]
        assert f'train with {stats} statistics' in capsys.readouterr().out


def test_bench_layers_spatial_overrides_every_shape(monkeypatch, capsys):
    bench = load_bench_layers()
    stub_timings(monkeypatch, bench)
    monkeypatch.setattr(sys, 'argv', ['bench_layers.py', '--kinds', 'BN', '--spatial', '2',
                                      '--threads', '1'])
    bench.main()
    out = capsys.readouterr().out
    for name, channels, *_ in bench.SHAPES:
        assert f'| {name} ({channels}x2x2) | BN |' in out


def test_compile_option_is_parsed_and_passed_to_torch_compile(monkeypatch):
    """``--compile-option NAME=VALUE`` reads the value as a literal, refuses a
    malformed option, and reaches every ``torch.compile`` as ``options``."""
    import argparse
    import types
    bench = load_bench()
    assert bench.compile_option('layout_optimization=False') == ('layout_optimization', False)
    assert bench.compile_option('max_autotune=1') == ('max_autotune', 1)
    assert bench.compile_option('cpp.simdlen=avx') == ('cpp.simdlen', 'avx')
    for bad in ('layout_optimization', '=False'):
        with pytest.raises(argparse.ArgumentTypeError, match='NAME=VALUE'):
            bench.compile_option(bad)

    seen = []

    class Stop(Exception):
        pass

    def fake_compile(model, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(bench.torch, 'compile', fake_compile)
    args = types.SimpleNamespace(compile_backend='inductor',
                                 compile_option=[('layout_optimization', False)])
    with pytest.raises(Stop):
        bench.compiled_times({'BN': bench.build('BN', 50)}, torch.randn(1, 3, 32, 32), args)
    assert seen == [dict(backend='inductor', options={'layout_optimization': False})]
    seen.clear()
    args.compile_option = []
    with pytest.raises(Stop):
        bench.compiled_times({'BN': bench.build('BN', 50)}, torch.randn(1, 3, 32, 32), args)
    assert seen == [dict(backend='inductor', options=None)]
