"""MMEngine's ``sync_bn`` helpers keep CE blocks (``import cenet_mmdet`` patches
``convert_sync_batchnorm``; ``revert_sync_batchnorm`` needs no patch)."""
import copy
import contextlib

import mmengine.model
import mmengine.runner.runner
import pytest
import torch
import torch.distributed as dist
from torch import nn

import cenet_mmdet  # noqa: F401  (patches MMEngine's convert_sync_batchnorm)
from cenet_mmdet.engine import convert_sync_batchnorm as plugin_convert
from cenet_mmdet.models.layers import CE, SyncCE

C = 32


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                value.add_(torch.rand(value.shape, generator=gen) * 0.3)
    return module


def _tensor_ids(module: nn.Module) -> dict:
    return {k: v.data_ptr() for k, v in module.state_dict(keep_vars=True).items()}


def test_runner_uses_the_patched_converter():
    for namespace in (mmengine.model, mmengine.model.utils, mmengine.runner.runner):
        assert namespace.convert_sync_batchnorm is plugin_convert


@contextlib.contextmanager
def _one_process_group(tmp_path):
    """mmcv's SyncBatchNorm needs a process group to be constructed."""
    assert not dist.is_initialized()
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous',
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('implementation', ['torch', 'mmcv'])
def test_convert_turns_ce_into_syncce_with_same_tensors(implementation, tmp_path):
    if implementation == 'mmcv':
        from mmcv.ops import SyncBatchNorm as expected_sync_bn
        with _one_process_group(tmp_path):
            _check_convert(implementation, expected_sync_bn)
    else:
        _check_convert(implementation, nn.SyncBatchNorm)


def _check_convert(implementation, expected_sync_bn):
    bn, ce, sync = nn.BatchNorm2d(C), CE(C), SyncCE(C, frozen_gate=True)
    model = _randomized(nn.Sequential(bn, ce, sync))
    ce.eval()  # the mode must survive the conversion
    reference = copy.deepcopy(model).eval()
    ce_tensors, sync_state = _tensor_ids(ce), _tensor_ids(sync)

    converted = mmengine.model.convert_sync_batchnorm(model, implementation)

    assert isinstance(converted[0], expected_sync_bn)
    assert converted[0].weight is bn.weight
    assert type(converted[1]) is SyncCE
    assert converted[1].training is False
    assert _tensor_ids(converted[1]) == ce_tensors  # same tensors, same keys
    assert converted[2] is sync and _tensor_ids(sync) == sync_state
    assert converted[2].frozen_gate
    # the CE block is still computed: eval outputs are unchanged
    x = torch.randn(2, C, 4, 5)
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-6, atol=1e-6)


def test_convert_of_a_bare_ce_layer_returns_syncce():
    layer = CE(C)
    converted = mmengine.model.convert_sync_batchnorm(layer)
    assert type(converted) is SyncCE and converted.ce is layer.ce


def test_revert_leaves_ce_and_syncce_intact():
    sync_bn, sync, ce = nn.SyncBatchNorm(C), SyncCE(C), CE(C)
    model = _randomized(nn.Sequential(sync_bn, sync, ce))
    keys = list(model.state_dict())
    reference = copy.deepcopy(model).eval()

    reverted = mmengine.model.revert_sync_batchnorm(model)

    assert isinstance(reverted[0], nn.modules.batchnorm._BatchNorm)
    assert not isinstance(reverted[0], nn.SyncBatchNorm)
    assert reverted[1] is sync and type(reverted[1]) is SyncCE
    assert reverted[2] is ce and type(reverted[2]) is CE
    assert list(reverted.state_dict()) == keys
    x = torch.randn(2, C, 4, 5)
    reverted.eval()
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), reference(x), rtol=1e-6, atol=1e-6)


def test_convert_then_revert_round_trip_keeps_syncce():
    model = nn.Sequential(nn.BatchNorm2d(C), CE(C))
    model = mmengine.model.revert_sync_batchnorm(
        mmengine.model.convert_sync_batchnorm(model))
    assert type(model[0]) is not nn.SyncBatchNorm
    assert type(model[1]) is SyncCE  # falls back to CE outside distributed runs


def test_unknown_sync_bn_implementation_is_refused():
    import pytest
    from mmengine.model import convert_sync_batchnorm
    from cenet_mmdet.models.layers import CE
    with pytest.raises(ValueError, match='sync_bn should be "torch" or "mmcv"'):
        convert_sync_batchnorm(CE(16), 'foo')
