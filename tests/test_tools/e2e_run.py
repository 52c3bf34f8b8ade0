"""The tools' subprocesses in the end-to-end tests, and one SyncCE smoke run
shared by tests/test_tools/test_e2e_cpu.py and test_exact_resume.py.

The shared run (the session fixtures of tests/test_tools/conftest.py call
these functions; each step runs once per test session, when a test first needs
it):

1. :func:`make_workspace`: ``tools/misc/make_synthetic_coco.py`` (8 training,
   4 validation images of 128 px) and the SyncCE smoke config with the test
   hooks of ``e2e_hooks.py`` and ``RandomStateHook``.
2. :func:`reference_run`: ``bash tools/dist_train.sh CONFIG 2``, 8 iterations
   uninterrupted, checkpoints every 4, validation (bbox + segm AP) at the end;
   each rank's backbone buffers dumped after training.
3. :func:`killed_run`: the same run started for 6 iterations, rank 1
   SIGKILLed right after iteration 5 (after ``iter_4.pth``); what the kill
   left (exit status, time the survivors took, checkpoints) is recorded
   before anything else touches its work dir.
4. :func:`resumed_run`: ``--resume`` in the killed run's work dir with
   ``train_cfg.max_iters=8`` (longer than the killed run, as
   docs/training.md's smoke sequence resumes): iterations 5 to 8.

Every subprocess has a timeout.
"""
import glob
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import time
from typing import Dict, List

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HERE = osp.dirname(osp.abspath(__file__))
SMOKE = osp.join(REPO, 'configs', 'cenet', 'smoke')
SYNC_CONFIG = osp.join(SMOKE, 'mask-rcnn_syncce-r50_fpn_shapes-smoke.py')
CE_CONFIG = osp.join(SMOKE, 'mask-rcnn_ce-r50_fpn_shapes-smoke.py')
AP_KEYS = ('coco/bbox_mAP', 'coco/segm_mAP')
TIMEOUT = 360

#: the shared run: iterations, the killed run's length, the kill
ITERS = 8
KILLED_ITERS = 6
KILL_AFTER = 5
NO_VALIDATION = 'train_cfg.val_begin=100'


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
    import math
    for key in AP_KEYS:
        assert key in record, f'{key} missing from {record}'
        assert math.isfinite(record[key]) and 0 <= record[key] <= 1, record


def checkpoint(path: str) -> Dict:
    """A checkpoint loaded with MMEngine's loader, as resume and tools/test.py
    load it (weights_only=True with the allow-list of cenet_mmdet.compat)."""
    import cenet_mmdet  # noqa: F401  (allow-lists MMEngine checkpoint types)
    from mmengine.runner.checkpoint import CheckpointLoader
    assert osp.isfile(path), f'no checkpoint {path}'
    return CheckpointLoader.load_checkpoint(path, map_location='cpu')


def tool_env() -> Dict[str, str]:
    """The environment of the tools' subprocesses."""
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        PATH=osp.dirname(sys.executable) + os.pathsep + env.get('PATH', ''),
        # e2e_hooks.py (the test-only hooks) lives beside this file
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


def dist_env(workspace: Dict) -> Dict[str, str]:
    return dict(workspace['env'], PORT=str(free_port()))


# ------------------------------------------------------------ the shared run
def make_workspace(root: str) -> Dict:
    env = tool_env()
    run([sys.executable, osp.join(REPO, 'tools', 'misc', 'make_synthetic_coco.py'),
         osp.join(root, 'data', 'synthetic_shapes'), '--train', '8', '--val',
         '4', '--size', '128', '--seed', '0'], root, env)
    # the user's smoke config plus the test hooks; RandomStateHook as in the
    # smoke config (custom_hooks is replaced, not merged)
    config = osp.join(root, 'syncce_smoke_e2e.py')
    with open(config, 'w') as f:
        f.write(f'_base_ = {SYNC_CONFIG!r}\n'
                "custom_imports = dict(imports=['cenet_mmdet', 'e2e_hooks'], "
                'allow_failed_imports=False)\n'
                "custom_hooks = [dict(type='RandomStateHook'), "
                "dict(type='DumpNormBuffersHook'), "
                f"dict(type='KillRankHook', after_iter={KILL_AFTER})]\n")
    return dict(root=root, env=env, config=config)


def dist_train(workspace: Dict, work_dir: str, *options: str, extra=(),
               kill: bool = False, check: bool = True):
    """``bash tools/dist_train.sh CONFIG 2`` with ``--cfg-options options``:
    its output, or (``check=False``) the finished process."""
    env = dist_env(workspace)
    if kill:
        env['CENET_KILL'] = '1'
    cmd = ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), workspace['config'],
           '2', '--work-dir', work_dir, *extra, '--cfg-options', *options]
    if check:
        return run(cmd, workspace['root'], env)
    return subprocess.run(cmd, cwd=workspace['root'], env=env,
                          capture_output=True, text=True, timeout=600)


def reference_run(workspace: Dict) -> Dict:
    """8 iterations uninterrupted, validation at the end; the buffers of
    both ranks after training."""
    import torch
    work_dir = osp.join(workspace['root'], 'uninterrupted')
    log = dist_train(workspace, work_dir, f'train_cfg.max_iters={ITERS}',
                     f'train_cfg.val_interval={ITERS}')
    dumps = [torch.load(osp.join(work_dir, f'norm_buffers_rank{r}.pth'),
                        weights_only=True) for r in range(2)]
    return dict(work_dir=work_dir, log=log, dumps=dumps)


def killed_run(workspace: Dict) -> Dict:
    """The run started for 6 iterations, rank 1 SIGKILLed after iteration
    5: its exit status, output, how long after the kill the launcher
    returned, and the checkpoints it left."""
    work_dir = osp.join(workspace['root'], 'killed')
    proc = dist_train(workspace, work_dir, f'train_cfg.max_iters={KILLED_ITERS}',
                      NO_VALIDATION, kill=True, check=False)
    finished = time.time()
    killed_at = None
    if osp.isfile(osp.join(work_dir, 'killed_at')):
        with open(osp.join(work_dir, 'killed_at')) as f:
            killed_at = float(f.read())
    return dict(work_dir=work_dir, returncode=proc.returncode,
                output=proc.stdout + proc.stderr, finished=finished,
                killed_at=killed_at,
                checkpoints=sorted(osp.basename(p) for p in glob.glob(
                    osp.join(work_dir, 'iter_*.pth'))))


def resumed_run(workspace: Dict, killed: Dict) -> Dict:
    """``--resume`` of the killed run with ``train_cfg.max_iters=8``."""
    log = dist_train(workspace, killed['work_dir'], f'train_cfg.max_iters={ITERS}',
                     NO_VALIDATION, extra=['--resume'])
    return dict(work_dir=killed['work_dir'], log=log)
