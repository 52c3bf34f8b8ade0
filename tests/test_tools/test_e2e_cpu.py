"""End to end on CPU, as a user runs it: data -> distributed training ->
resume -> single-process and distributed testing with bbox/segm COCO AP.

1. ``tools/misc/make_synthetic_coco.py`` writes a tiny data set (128 px).
2. ``bash tools/dist_train.sh <SyncCE smoke config> 2``: two gloo processes,
   4 iterations, validation with CocoMetric (bbox + segm). A test-only hook
   (``e2e_hooks.DumpNormBuffersHook``) dumps each rank's backbone buffers:
   the SyncCE/SyncBN statistics must be identical on both ranks, and updated.
3. ``--resume`` with a larger ``train_cfg.max_iters`` continues at iteration 5.
4. ``tools/test.py`` and ``bash tools/dist_test.sh ... 2`` on the checkpoint:
   finite AP keys, and the same detections (boxes, scores, labels, masks) and
   AP from one and from two processes.
5. ``tools/train.py <CE smoke config>`` (one process) from a fixed initial
   checkpoint with perturbed statistics (``load_from``): every BN/CE buffer and
   parameter of the backbone is unchanged (frozen), while other weights train.

Runs in about 3-5 minutes on 2 cores. Every subprocess has a timeout.
"""
import glob
import json
import math
import os
import os.path as osp
import socket
import subprocess
import sys
from typing import Dict, List

import pytest
import torch

pytest.importorskip('mmdet')
import cenet_mmdet  # noqa: E402,F401  (allow-lists MMEngine checkpoint types)
from mmengine.runner.checkpoint import CheckpointLoader  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HERE = osp.dirname(osp.abspath(__file__))
SMOKE = osp.join(REPO, 'configs', 'cenet', 'smoke')
SYNC_CONFIG = osp.join(SMOKE, 'mask-rcnn_syncce-r50_fpn_shapes-smoke.py')
CE_CONFIG = osp.join(SMOKE, 'mask-rcnn_ce-r50_fpn_shapes-smoke.py')
AP_KEYS = ('coco/bbox_mAP', 'coco/segm_mAP')
TIMEOUT = 360


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run(cmd: List[str], cwd: str, env: Dict[str, str],
        timeout: int = TIMEOUT) -> str:
    """Run ``cmd``; return stdout+stderr, or fail with its tail."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b'')
        out = out.decode() if isinstance(out, bytes) else out
        pytest.fail(f'timed out after {timeout}s: {" ".join(cmd)}\n{out[-4000:]}')
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f'exit code {proc.returncode}: {" ".join(cmd)}\n'
                    f'{output[-6000:]}')
    return output


def metrics(work_dir: str) -> List[Dict]:
    """Every JSON-lines record with COCO AP keys under ``work_dir``."""
    records = []
    for path in sorted(glob.glob(osp.join(work_dir, '**', '*.json'),
                                 recursive=True)):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith('{') and 'coco/bbox_mAP' in line:
                    records.append(json.loads(line))
    return records


def assert_finite_ap(record: Dict) -> None:
    for key in AP_KEYS:
        assert key in record, f'{key} missing from {record}'
        assert math.isfinite(record[key]) and 0 <= record[key] <= 1, record


def checkpoint(path: str) -> Dict:
    assert osp.isfile(path), f'no checkpoint {path}'
    # MMEngine's loader, as resume and tools/test.py use it (weights_only=True
    # with the allow-list of cenet_mmdet.compat)
    return CheckpointLoader.load_checkpoint(path, map_location='cpu')


def tool_env() -> Dict[str, str]:
    """The environment of the tools' subprocesses."""
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        PATH=osp.dirname(sys.executable) + os.pathsep + env.get('PATH', ''),
        # e2e_hooks.py (the test-only hook) lives beside this file
        PYTHONPATH=HERE + os.pathsep + env.get('PYTHONPATH', ''),
        # one thread per process (torchrun's default for several processes):
        # the cores are shared, and oversubscribed OpenMP threads crawl
        OMP_NUM_THREADS='1',
        # the CPU (gloo) path on any machine: two processes cannot share one
        # GPU with NCCL
        CUDA_VISIBLE_DEVICES='')
    for name in ('MASTER_PORT', 'CENET_KILL'):
        env.pop(name, None)
    return env


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('e2e'))
    env = tool_env()
    run([sys.executable, osp.join(REPO, 'tools', 'misc', 'make_synthetic_coco.py'),
         osp.join(root, 'data', 'synthetic_shapes'), '--train', '8', '--val',
         '4', '--size', '128', '--seed', '0'], root, env)
    # the user's smoke config plus the buffer-dumping hook
    sync_config = osp.join(root, 'syncce_smoke_dump.py')
    with open(sync_config, 'w') as f:
        f.write(f"_base_ = {SYNC_CONFIG!r}\n"
                "custom_imports = dict(imports=['cenet_mmdet', 'e2e_hooks'], "
                "allow_failed_imports=False)\n"
                "custom_hooks = [dict(type='DumpNormBuffersHook')]\n")
    return dict(root=root, env=env, sync_config=sync_config)


def dist_env(workspace) -> Dict[str, str]:
    return dict(workspace['env'], PORT=str(free_port()))


@pytest.fixture(scope='module')
def dist_train(workspace):
    work_dir = osp.join(workspace['root'], 'work_syncce')
    log = run(['bash', osp.join(REPO, 'tools', 'dist_train.sh'),
               workspace['sync_config'], '2', '--work-dir', work_dir],
              workspace['root'], dist_env(workspace))
    dumps = [torch.load(osp.join(work_dir, f'norm_buffers_rank{r}.pth'),
                        weights_only=True) for r in range(2)]
    return dict(work_dir=work_dir, log=log, dumps=dumps)


def test_dist_train_completes_with_ap(dist_train):
    ckpt = checkpoint(osp.join(dist_train['work_dir'], 'iter_4.pth'))
    assert ckpt['meta']['iter'] == 4
    keys = ckpt['state_dict'].keys()
    assert 'backbone.layer2.0.bn3.ce.running_whitening' in keys
    assert 'backbone.bn1.ce.aii.gate.0.weight' in keys
    records = [r for r in metrics(dist_train['work_dir']) if r.get('step') == 4]
    assert records, 'no validation record at iteration 4'
    assert_finite_ap(records[-1])
    assert 'Iter(train) [4/4]' in dist_train['log']


def test_syncce_statistics_identical_on_both_ranks(dist_train):
    rank0, rank1 = dist_train['dumps']
    assert rank0['iter'] == rank1['iter'] == 4
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
    assert int(buffers['layer2.0.bn3.num_batches_tracked']) == 4
    assert not torch.allclose(buffers['layer3.1.bn1.running_var'],
                              torch.ones(256))
    # ... but not in the frozen stem (frozen_stages=1)
    assert int(buffers['bn1.num_batches_tracked']) == 0


@pytest.fixture(scope='module')
def resumed(workspace, dist_train):
    log = run(['bash', osp.join(REPO, 'tools', 'dist_train.sh'),
               workspace['sync_config'], '2', '--work-dir',
               dist_train['work_dir'], '--resume', '--cfg-options',
               'train_cfg.max_iters=6', 'train_cfg.val_begin=100'],
              workspace['root'], dist_env(workspace))
    return dict(log=log, work_dir=dist_train['work_dir'])


def test_resume_continues_from_saved_iteration(resumed):
    log = resumed['log']
    assert 'resumed epoch: 0, iter: 4' in log
    assert 'Iter(train) [5/6]' in log and 'Iter(train) [6/6]' in log
    assert 'Iter(train) [1/6]' not in log
    ckpt = checkpoint(osp.join(resumed['work_dir'], 'iter_6.pth'))
    assert ckpt['meta']['iter'] == 6
    before = checkpoint(osp.join(resumed['work_dir'], 'iter_4.pth'))
    key = 'backbone.layer2.0.bn3.ce.running_whitening'
    assert not torch.equal(ckpt['state_dict'][key], before['state_dict'][key])


@pytest.fixture(scope='module')
def single_test(workspace, resumed):
    work_dir = osp.join(workspace['root'], 'test_single')
    out = osp.join(work_dir, 'predictions.pkl')
    run([sys.executable, osp.join(REPO, 'tools', 'test.py'),
         workspace['sync_config'], osp.join(resumed['work_dir'], 'iter_6.pth'),
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


def test_dist_test_matches_single_process(workspace, resumed, single_test):
    """Two test processes give the same detections (every box, score, label
    and mask) as one; after a few iterations AP is near 0, so the AP alone
    could not tell them apart."""
    work_dir = osp.join(workspace['root'], 'test_dist')
    out = osp.join(work_dir, 'predictions.pkl')
    run(['bash', osp.join(REPO, 'tools', 'dist_test.sh'),
         workspace['sync_config'], osp.join(resumed['work_dir'], 'iter_6.pth'),
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


def test_ce_statistics_stay_frozen(workspace):
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
