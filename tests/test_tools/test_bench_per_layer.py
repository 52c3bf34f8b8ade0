"""Where CE's time goes, in the two scripts that answer it:

* ``bench_backbones.py --per-layer`` (per CE position, in place): every CE
  position's forward time inside the network is attributed to that position,
  in every kind, and the hooks leave the models as they were;
* ``profile_ce.py`` (per op): its table lists the ops whose self time grows
  the most from ResNet-50 to CE-ResNet-50, largest first, with their shares.
"""
import argparse
import sys
import time

import pytest
import torch

from test_bench_floor import load_bench, load_script

SLOW_S = 0.03


def slowed(module: torch.nn.Module) -> None:
    """Make ``module``'s forward ``SLOW_S`` seconds slower (inside the call)."""
    forward = module.forward

    def slow_forward(*args, **kwargs):
        time.sleep(SLOW_S)
        return forward(*args, **kwargs)

    module.forward = slow_forward


def test_per_layer_rows_attribute_time_to_the_right_position():
    bench = load_bench()
    positions = bench.ce_positions(50)
    assert len(positions) == 14 and positions[0] == 'bn1'
    models = {kind: bench.build(kind, 50) for kind in ('BN', 'CE', 'floor')}
    # a different slow position in each kind
    slow = {'BN': 'layer1.1.bn3', 'CE': 'layer3.5.bn3', 'floor': 'bn1'}
    for kind, name in slow.items():
        slowed(models[kind].get_submodule(name))
    args = argparse.Namespace(device='cpu', warmup=1, repeat=2)
    rows = bench.per_layer_rows(50, models, torch.randn(1, 3, 32, 32), args)

    assert [row[1] for row in rows] == positions + ['sum of the 14', 'whole network']
    assert rows[0][2] == '64, 16x16' and rows[-3][2] == '1024, 2x2'
    for column, kind in enumerate(models, start=3):
        times = {row[1]: float(row[column]) for row in rows}
        assert times[slow[kind]] >= SLOW_S * 1e3, kind
        assert all(times[name] < SLOW_S * 1e3 for name in positions
                   if name != slow[kind]), kind
        # the positions are part of the network's forward
        assert sum(times[name] for name in positions) <= times['whole network']
    for model in models.values():  # hooks removed
        assert not any(m._forward_hooks or m._forward_pre_hooks
                       for m in model.modules())


def test_per_layer_refuses_compile(capsys, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(sys, 'argv', ['bench_backbones.py', '--compile', '--per-layer'])
    with pytest.raises(SystemExit):
        bench.main()
    assert 'does not go with --compile' in capsys.readouterr().err


def test_clock_synchronizes_on_cuda_around_each_position(monkeypatch):
    """On CUDA a host clock alone would time kernel launches: each hook
    synchronizes the device first."""
    bench = load_bench()
    calls = []
    monkeypatch.setattr(bench, 'synchronize', calls.append)
    model = bench.build('CE', 50)
    model.eval()
    clock = bench.ForwardClock(model, ['bn1', 'layer3.5.bn3'], device='cuda')
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    clock.remove()
    assert calls == ['cuda'] * 4
    assert [len(times) for times in clock.times.values()] == [1, 1]


def test_profile_ce_lists_the_ops_that_ce_adds(monkeypatch, capsys):
    """A small eval profile: the rows are ops sorted by the time CE adds,
    with each share of the whole difference, and among them ops that
    ResNet-50 does not run at all in eval (CE's maps and gate)."""
    profile = load_script('profile_ce')
    monkeypatch.setattr(sys, 'argv', [
        'profile_ce.py', '--mode', 'eval', '--batch', '1', '--size', '32',
        '--steps', '1', '--threads', '1', '--top', '5'])
    profile.main()
    out = capsys.readouterr().out
    assert 'Per-op self CPU time, eval step, batch 1, 32x32' in out
    assert 'CE adds' in out
    rows = [line.strip('|').split(' | ') for line in out.splitlines()
            if line.startswith('| ') and not line.startswith('| op ')]
    assert len(rows) == 5
    differences = [float(row[3]) for row in rows]
    assert differences == sorted(differences, reverse=True) and differences[0] > 0
    assert all(row[4].strip().endswith('%') for row in rows)
    assert any(float(row[1]) == 0.0 and float(row[2]) > 0 for row in rows)
