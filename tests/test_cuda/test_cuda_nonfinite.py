"""CUDA: a non-finite training batch is skipped on the device, with no host
synchronization (issue #18, 5). Run by tools/gpu/gpu_check.sh.

``torch.cuda.set_sync_debug_mode('error')`` raises on any synchronizing call
inside the training forward of a CE layer, the NaN batch included; the
buffers must equal those of the same layer that never saw that batch, and
the skip count is read only every ``NONFINITE_CHECK_EVERY`` updates.
"""
import copy

import pytest
import torch

from cenet_mmdet.models.layers import CE
from cuda_utils import CUDA_MARKS, DEVICE

pytestmark = CUDA_MARKS


def _buffers(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()
            if 'running' in k or k.endswith('num_batches_tracked')}


def test_nan_batch_skipped_without_host_sync(monkeypatch):
    torch.manual_seed(0)
    layer = CE(32).to(DEVICE).train()
    layer.NONFINITE_CHECK_EVERY = 10 ** 6  # no read of the count in this test
    reference = copy.deepcopy(layer)
    good = [torch.randn(4, 32, 6, 6, device=DEVICE) for _ in range(2)]
    bad = torch.randn(4, 32, 6, 6, device=DEVICE)
    bad[1, 3, 2, 2] = float('nan')
    layer(good[0]), reference(good[0])
    strict = DEVICE == 'cuda'
    if strict:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.no_grad():
            layer(bad)
            layer(good[1])
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode('default')
    reference(good[1])
    after, expected = _buffers(layer), _buffers(reference)
    for key in expected:
        assert torch.equal(after[key], expected[key]), key
    assert int(layer.nonfinite_skips) == 1


def test_skip_count_is_read_once_per_check_interval(monkeypatch):
    from cenet_mmdet.models.layers import ce_layer as ce_module
    logged = []
    monkeypatch.setattr(ce_module, 'print_log',
                        lambda message, **kwargs: logged.append(message))
    layer = CE(32).to(DEVICE).train()
    layer.NONFINITE_CHECK_EVERY = 3
    bad = torch.full((2, 32, 4, 4), float('nan'), device=DEVICE)
    with torch.no_grad():
        for _ in range(2):
            layer(bad)
        if DEVICE == 'cuda':  # the count is not read yet
            assert logged == []
        layer(bad)  # the third update reads it
    if DEVICE == 'cuda':  # one log for the 3 skips seen at once
        assert len(logged) == 1 and '(3 batch(es) skipped' in logged[0], logged
    else:  # on the CPU every update reads: the first skip is logged
        assert len(logged) == 1 and '(1 batch(es) skipped' in logged[0], logged
