"""End to end on CPU, as a user runs it: data -> distributed training ->
resume -> single-process and distributed testing with bbox/segm COCO AP.

The distributed steps read the SyncCE smoke run shared with
test_exact_resume.py (session fixtures of conftest.py, ``e2e_run.py``):

1. ``tools/misc/make_synthetic_coco.py`` writes a tiny data set (128 px).
2. ``bash tools/dist_train.sh <SyncCE smoke config> 2``: two gloo processes,
   8 iterations, validation with CocoMetric (bbox + segm). A test-only hook
   (``e2e_hooks.DumpNormBuffersHook``) dumps each rank's backbone buffers:
   the SyncCE/SyncBN statistics must be identical on both ranks, and updated.
3. ``--resume`` with a larger ``train_cfg.max_iters`` (8, of a run started
   for 6 and killed after iteration 5) continues at iteration 5.
4. ``tools/test.py`` and ``bash tools/dist_test.sh ... 2`` on the checkpoint:
   finite AP keys, and the same detections (boxes, scores, labels, masks) and
   AP from one and from two processes.
5. ``tools/train.py <CE smoke config>`` (one process) from a fixed initial
   checkpoint with perturbed statistics (``load_from``): every BN/CE buffer and
   parameter of the backbone is unchanged (frozen), while other weights train.

Every subprocess has a timeout.
"""
import os.path as osp
import sys
from typing import Dict

import pytest
import torch

pytest.importorskip('mmdet')
import cenet_mmdet  # noqa: E402,F401  (allow-lists MMEngine checkpoint types)

from e2e_run import (AP_KEYS, CE_CONFIG, ITERS, REPO, assert_finite_ap,  # noqa: E402
                     checkpoint, dist_env, metrics, run)


def test_dist_train_completes_with_ap(syncce_reference):
    work_dir = syncce_reference['work_dir']
    assert checkpoint(osp.join(work_dir, 'iter_4.pth'))['meta']['iter'] == 4
    ckpt = checkpoint(osp.join(work_dir, f'iter_{ITERS}.pth'))
    assert ckpt['meta']['iter'] == ITERS
    keys = ckpt['state_dict'].keys()
    assert 'backbone.layer2.0.bn3.ce.running_whitening' in keys
    assert 'backbone.bn1.ce.aii.gate.0.weight' in keys
    records = [r for r in metrics(work_dir) if r.get('step') == ITERS]
    assert records, f'no validation record at iteration {ITERS}'
    assert_finite_ap(records[-1])
    assert f'Iter(train) [{ITERS}/{ITERS}]' in syncce_reference['log']


def test_syncce_statistics_identical_on_both_ranks(syncce_reference):
    rank0, rank1 = syncce_reference['dumps']
    assert rank0['iter'] == rank1['iter'] == ITERS
    types = rank0['types']
    assert types['layer2.0.bn3'] == 'SyncCE'
    assert types['layer2.0.bn1'] == 'CPUSyncBatchNorm'  # SyncBN, on CPU
    assert rank0['buffers'].keys() == rank1['buffers'].keys()
    for name, value in rank0['buffers'].items():
        assert torch.equal(value, rank1['buffers'][name]), name
    # and they were updated by training (stage 2 is not frozen) ...
    buffers = rank0['buffers']
    whitening = buffers['layer2.0.bn3.ce.running_whitening']
    assert not torch.allclose(whitening, torch.eye(16).expand_as(whitening))
    assert int(buffers['layer2.0.bn3.num_batches_tracked']) == ITERS
    assert not torch.allclose(buffers['layer3.1.bn1.running_var'],
                              torch.ones(256))
    # ... but not in the frozen stem (frozen_stages=1)
    assert int(buffers['bn1.num_batches_tracked']) == 0


def test_resume_continues_from_saved_iteration(syncce_resumed):
    log = syncce_resumed['log']
    assert 'resumed epoch: 0, iter: 4' in log
    assert f'Iter(train) [5/{ITERS}]' in log
    assert f'Iter(train) [{ITERS}/{ITERS}]' in log
    assert f'Iter(train) [1/{ITERS}]' not in log
    ckpt = checkpoint(osp.join(syncce_resumed['work_dir'], f'iter_{ITERS}.pth'))
    assert ckpt['meta']['iter'] == ITERS
    before = checkpoint(osp.join(syncce_resumed['work_dir'], 'iter_4.pth'))
    key = 'backbone.layer2.0.bn3.ce.running_whitening'
    assert not torch.equal(ckpt['state_dict'][key], before['state_dict'][key])


@pytest.fixture(scope='module')
def single_test(syncce_workspace, syncce_reference):
    workspace = syncce_workspace
    work_dir = osp.join(workspace['root'], 'test_single')
    out = osp.join(work_dir, 'predictions.pkl')
    run([sys.executable, osp.join(REPO, 'tools', 'test.py'),
         workspace['config'],
         osp.join(syncce_reference['work_dir'], f'iter_{ITERS}.pth'),
         '--work-dir', work_dir, '--out', out], workspace['root'],
        workspace['env'])
    return dict(work_dir=work_dir, out=out)


def test_single_process_test(single_test):
    records = metrics(single_test['work_dir'])
    assert len(records) == 1
    assert_finite_ap(records[0])
    with open(single_test['out'], 'rb') as f:
        import pickle
        predictions = pickle.load(f)
    assert len(predictions) == 4
    assert {'bboxes', 'labels', 'scores', 'masks'} <= set(
        predictions[0]['pred_instances'])


def _predictions_by_image(path: str) -> Dict[int, Dict]:
    import pickle
    with open(path, 'rb') as f:
        predictions = pickle.load(f)
    return {p['img_id']: p['pred_instances'] for p in predictions}


def test_dist_test_matches_single_process(syncce_workspace, syncce_reference,
                                          single_test):
    """Two test processes give the same detections (every box, score, label
    and mask) as one; after a few iterations AP is near 0, so the AP alone
    could not tell them apart."""
    workspace = syncce_workspace
    work_dir = osp.join(workspace['root'], 'test_dist')
    out = osp.join(work_dir, 'predictions.pkl')
    run(['bash', osp.join(REPO, 'tools', 'dist_test.sh'), workspace['config'],
         osp.join(syncce_reference['work_dir'], f'iter_{ITERS}.pth'),
         '2', '--work-dir', work_dir, '--out', out], workspace['root'],
        dist_env(workspace))
    records = metrics(work_dir)
    assert len(records) == 1
    assert_finite_ap(records[0])
    single = metrics(single_test['work_dir'])[0]
    for key in AP_KEYS:
        assert records[0][key] == pytest.approx(single[key], abs=1e-3), key
    distributed = _predictions_by_image(out)
    alone = _predictions_by_image(single_test['out'])
    assert distributed.keys() == alone.keys() and len(alone) == 4
    assert sum(len(p['scores']) for p in alone.values()) > 0
    for img_id, expected in alone.items():
        actual = distributed[img_id]
        for key in ('bboxes', 'scores'):
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5,
                                       atol=1e-4, msg=f'{key} of image {img_id}')
        assert torch.equal(actual['labels'], expected['labels'])
        assert actual['masks'] == expected['masks'], f'masks of image {img_id}'


def _is_norm_tensor(name: str) -> bool:
    parts = name.split('.')
    return any(p.startswith('bn') or p == 'ce' for p in parts) or (
        'downsample' in parts and parts[-2] == '1')


def test_ce_statistics_stay_frozen(syncce_workspace):
    workspace = syncce_workspace
    from mmengine.config import Config
    from mmengine.runner import save_checkpoint

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(CE_CONFIG)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    # a fixed initial checkpoint whose statistics are not the defaults
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.backbone.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith(('running_var', 'running_scale')):
                tensor.uniform_(0.5, 1.5, generator=gen)
            elif name.endswith(('running_mean', 'bias')):
                tensor.normal_(0, 0.1, generator=gen)
            elif name.endswith('running_whitening'):
                noise = 0.02 * torch.randn(tensor.shape, generator=gen)
                tensor.add_(noise + noise.transpose(-1, -2))
    init_path = osp.join(workspace['root'], 'ce_init.pth')
    save_checkpoint(dict(state_dict=model.state_dict(), meta=dict()), init_path)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    work_dir = osp.join(workspace['root'], 'work_ce')
    run([sys.executable, osp.join(REPO, 'tools', 'train.py'), CE_CONFIG,
         '--work-dir', work_dir, '--cfg-options', f'load_from={init_path}',
         'train_cfg.val_begin=100'], workspace['root'], workspace['env'])
    final = checkpoint(osp.join(work_dir, 'iter_4.pth'))['state_dict']
    norm_keys = [k for k in initial
                 if k.startswith('backbone.') and _is_norm_tensor(k)]
    assert any('.bn3.ce.running_whitening' in k for k in norm_keys)
    assert any('bn1.ce.lambda_logit' in k for k in norm_keys)
    assert any(k.endswith('downsample.1.running_var') for k in norm_keys)
    for key in norm_keys:
        assert torch.equal(final[key], initial[key]), key
    # training did happen: trainable weights moved
    for key in ('backbone.layer2.0.conv2.weight', 'neck.fpn_convs.0.conv.weight',
                'roi_head.mask_head.conv_logits.weight'):
        assert not torch.equal(final[key], initial[key]), key
