"""Every converter a user may call keeps the CE blocks of a CE-ResNet.

Each check counts the CE layers of each exact type after the conversion (14
in CE-ResNet-50; SyncCE subclasses CE, so ``isinstance`` would not tell them
apart) and compares the eval output with the unconverted model: a converter
that drops the CE block (as torch's ``convert_sync_batchnorm`` did,
re-attaching the ``ce`` child that nothing calls) changes the output while the
state dict still loads. ``revert_sync_batchnorm`` leaves CE and SyncCE as they
are (docs/sync_ce.md, "Converters keep CE").
"""
import copy
import io

import mmengine.model
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import cenet_mmdet  # noqa: F401  (patches the converters)
from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.models.layers import CE, GroupNormCE, SyncCE, SyncGroupNormCE

NUM_CE = 14  # CE-ResNet-50: stem + 3 + 4 + 6


def count(model: nn.Module, kind=CE) -> int:
    """Modules of exactly the type ``kind`` (not of its subclasses)."""
    return sum(type(m) is kind for m in model.modules())


@pytest.fixture(scope='module')
def backbone():
    """A narrow CE-ResNet-50 with non-trivial CE statistics and lambda."""
    torch.manual_seed(0)
    model = CEResNet(depth=50, base_channels=8, out_indices=(3,))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
        for layer in model.modules():
            if isinstance(layer, CE):
                layer.ce.lambda_logit.fill_(0.8)
    return model.eval()


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[-1]


def count_plain_norms(model: nn.Module) -> int:
    """BN-like layers that are not CE (BN, SyncBN, MMEngine's BatchNormXd)."""
    return sum(isinstance(m, _BatchNorm) and not isinstance(m, CE)
               for m in model.modules())


def assert_same_function(model, reference, num_ce=NUM_CE, kind=CE):
    assert count(model, kind) == num_ce
    other = SyncCE if kind is CE else CE
    assert count(model, other) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(eval_output(model, x), eval_output(reference, x),
                               rtol=1e-5, atol=1e-5)


def test_torch_convert_sync_batchnorm_makes_syncce(backbone):
    model = copy.deepcopy(backbone)
    ce_state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert count(converted, SyncCE) == NUM_CE
    # plain BN layers (downsample, stage 4) become SyncBatchNorm as before
    assert count(converted, nn.SyncBatchNorm) == count(backbone, nn.BatchNorm2d) > 0
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    # same tensors: CE's buffers and parameters are shared, not copied
    for key, pointer in ce_state.items():
        if '.ce.' in key:
            assert converted.state_dict()[key].data_ptr() == pointer, key
    assert_same_function(converted, backbone, kind=SyncCE)


def test_torch_convert_is_idempotent_and_keeps_process_group(backbone):
    group = object()  # stands for a process group; only stored
    once = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(backbone), group)
    synced = [m for m in once.modules() if isinstance(m, (SyncCE, nn.SyncBatchNorm))]
    assert len(synced) == count(backbone, nn.BatchNorm2d) + NUM_CE
    assert all(m.process_group is group for m in synced)
    twice = nn.SyncBatchNorm.convert_sync_batchnorm(once)
    assert count(twice, SyncCE) == NUM_CE
    assert_same_function(twice, backbone, kind=SyncCE)


def test_round_trips_through_revert(backbone):
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(backbone))
    plain_bn = count(backbone, nn.BatchNorm2d)
    assert count_plain_norms(backbone) == plain_bn > 0
    reverted = mmengine.model.revert_sync_batchnorm(torch_sync)
    assert count(reverted, nn.SyncBatchNorm) == 0
    # SyncBN layers become (MMEngine's) BN again; SyncCE layers stay SyncCE
    assert count_plain_norms(reverted) == plain_bn
    assert_same_function(reverted, backbone, kind=SyncCE)
    # CE layers stay CE
    assert_same_function(mmengine.model.revert_sync_batchnorm(
        copy.deepcopy(backbone)), backbone, kind=CE)
    mm_sync = mmengine.model.convert_sync_batchnorm(copy.deepcopy(backbone))
    assert_same_function(mm_sync, backbone, kind=SyncCE)
    assert_same_function(mmengine.model.revert_sync_batchnorm(
        copy.deepcopy(mm_sync)), backbone, kind=SyncCE)
    again = nn.SyncBatchNorm.convert_sync_batchnorm(
        mmengine.model.revert_sync_batchnorm(mm_sync))
    assert_same_function(again, backbone, kind=SyncCE)


def test_converters_over_group_norm_ce():
    """GN + CE: torch's and MMEngine's converters give GN + SyncCE (the CE
    block's statistics are the batch statistics to synchronize), leave the
    plain GN layers alone, are idempotent, and revert keeps them; the
    function is unchanged throughout."""
    torch.manual_seed(0)
    model = CEResNet(depth=50, base_channels=8, out_indices=(3,),
                     norm_cfg=dict(type='GN', num_groups=4)).train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    model.eval()
    plain_gn = sum(type(m) is nn.GroupNorm for m in model.modules())
    assert count(model, GroupNormCE) == NUM_CE and plain_gn > 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def check(converted, kind):
        assert count(converted, kind) == NUM_CE
        assert sum(type(m) is nn.GroupNorm for m in converted.modules()) == plain_gn
        torch.testing.assert_close(eval_output(converted, x), eval_output(model, x),
                                   rtol=1e-5, atol=1e-5)

    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    check(torch_sync, SyncGroupNormCE)
    check(nn.SyncBatchNorm.convert_sync_batchnorm(torch_sync), SyncGroupNormCE)
    check(mmengine.model.revert_sync_batchnorm(torch_sync), SyncGroupNormCE)
    check(mmengine.model.convert_sync_batchnorm(copy.deepcopy(model)),
          SyncGroupNormCE)
    check(mmengine.model.revert_sync_batchnorm(copy.deepcopy(model)), GroupNormCE)


def test_deepcopy_and_whole_model_pickling(backbone):
    assert_same_function(copy.deepcopy(backbone), backbone)
    buffer = io.BytesIO()
    torch.save(backbone, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is CEResNet
    assert_same_function(loaded, backbone)
    # and a SyncCE model
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(backbone))
    buffer = io.BytesIO()
    torch.save(synced, buffer)
    buffer.seek(0)
    assert_same_function(torch.load(buffer, weights_only=False), backbone,
                         kind=SyncCE)


def test_torch_compile_of_an_eval_model(backbone):
    """Inductor's generated code (the other compile tests use ``aot_eager``)
    on the stem and stage 1 of the trained backbone (4 CE layers: the whole
    backbone takes about a minute of C++ compilation on 2 cores)."""
    model = copy.deepcopy(backbone).eval()
    stem_and_stage1 = nn.Sequential(model.conv1, model.bn1, model.relu,
                                    model.maxpool, model.layer1)
    assert count(stem_and_stage1) == 4
    compiled = torch.compile(stem_and_stage1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = stem_and_stage1(x)
        actual = compiled(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
