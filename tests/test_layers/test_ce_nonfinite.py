"""A non-finite training batch leaves the running statistics intact (issue #18, 5).

The output of a NaN batch may be NaN (the input is), but every running buffer
(BN ``running_mean``/``running_var``, CE ``running_mean``,
``running_whitening``, ``running_scale``, ``num_batches_tracked``) keeps its
last finite value, the skip is counted in ``nonfinite_skips`` and logged
once per ``NONFINITE_LOG_EVERY`` skips. Reference: the same layer fed only
the finite batches.
"""
import copy

import pytest
import torch

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.models.layers import CE, SyncCE
from cenet_mmdet.models.layers import ce_layer as ce_module


def buffers(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()
            if not k.endswith(('weight', 'bias', 'lambda_logit'))}


def assert_same_buffers(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def batches(seed, count=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 32, 5, 5, generator=generator) * 3 + 1
            for _ in range(count)]


def poisoned(value):
    x = torch.randn(4, 32, 5, 5)
    x[2, 7, 1, 3] = value
    return x


@pytest.mark.parametrize('layer_type', [CE, SyncCE])
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_running_statistics_skip_a_non_finite_batch(layer_type, bad):
    torch.manual_seed(0)
    layer = layer_type(32).train()
    reference = copy.deepcopy(layer)
    first, second = batches(0, 2)
    layer(first), reference(first)
    before = buffers(layer)
    out = layer(poisoned(bad))
    assert not torch.isfinite(out).all()  # the output may be non-finite
    assert_same_buffers(buffers(layer), before)  # the statistics are not
    assert int(layer.nonfinite_skips) == 1
    # training goes on as if the batch had never come
    layer(second), reference(second)
    assert_same_buffers(buffers(layer), buffers(reference))
    assert int(reference.nonfinite_skips) == 0
    # and eval is finite
    assert torch.isfinite(layer.eval()(first)).all()


def test_skips_are_logged_once_per_n(monkeypatch):
    logged = []
    monkeypatch.setattr(ce_module, 'print_log',
                        lambda message, **kwargs: logged.append(message))
    layer = CE(32).train()
    layer.NONFINITE_LOG_EVERY = 3
    layer(batches(1, 1)[0])
    assert logged == []
    for _ in range(7):
        layer(poisoned(float('nan')))
    assert int(layer.nonfinite_skips) == 7
    counts = [int(m.split(' batch(es) skipped')[0].rsplit('(', 1)[1]) for m in logged]
    assert counts == [1, 4, 7], logged
    assert 'CE(32)' in logged[0] and 'non-finite' in logged[0]
    layer(batches(2, 1)[0])  # a finite batch logs nothing
    assert len(logged) == 3


def test_skip_count_is_not_saved():
    layer = CE(32)
    assert 'nonfinite_skips' not in layer.state_dict()
    assert 'nonfinite_skips' in dict(layer.named_buffers())


def test_backbone_stays_usable_after_a_nan_batch():
    torch.manual_seed(0)
    model = CEResNet(depth=50, norm_eval=False).train()
    model(torch.randn(2, 3, 64, 64))
    before = copy.deepcopy(model.state_dict())
    bad = torch.randn(2, 3, 64, 64)
    bad[0, 0, 5, 5] = float('nan')
    model(bad)
    after = model.state_dict()
    for name, layer in model.ce_layers():
        prefix = f'{name}.'
        for key, value in after.items():
            if key.startswith(prefix) and 'running' in key:
                assert torch.equal(value, before[key]), key
        assert int(layer.nonfinite_skips) == 1, name
    # (the plain BN layers of the downsample branches and of bn1/bn2 are
    # torch's BatchNorm2d, which does take the NaN)
