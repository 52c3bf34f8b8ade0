"""A killed distributed run resumes to exactly the same weights.

On the SyncCE smoke run shared with test_e2e_cpu.py (session fixtures of
conftest.py, ``e2e_run.py``):

1. ``bash tools/dist_train.sh <SyncCE smoke config> 2``, 8 iterations,
   checkpoints every 4: the uninterrupted reference.
2. The same run started for 6 iterations, with rank 1 SIGKILLed right after
   iteration 5 (after ``iter_4.pth``): the surviving rank and the launcher
   must exit within 60 s.
3. ``--resume`` in that work dir (to 8 iterations) continues from iteration
   4: every tensor of ``iter_8.pth`` (weights, buffers, optimizer state)
   equals the reference (``torch.equal``), thanks to ``RandomStateHook``
   (switched on in the project's configs).
4. A checkpoint cut short on disk is refused on resume with a message naming
   it and saying why.

A single-process toy run checks the hook itself, including that without it the
resumed run differs (so the comparison can fail).
"""
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')
import cenet_mmdet  # noqa: E402,F401
from cenet_mmdet.compat import CheckpointFileError  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.runner.checkpoint import CheckpointLoader  # noqa: E402

from e2e_run import ITERS, KILLED_ITERS, REPO, checkpoint  # noqa: E402


def tensors(ckpt: dict) -> dict:
    """Every tensor of a checkpoint: state dict and optimizer state."""
    found = {f'state_dict.{k}': v for k, v in ckpt['state_dict'].items()}
    for index, state in ckpt['optimizer']['state'].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                found[f'optimizer.{index}.{key}'] = value
    return found


def test_smoke_and_coco_configs_switch_the_hook_on():
    from mmengine.config import Config
    for name in ('mask-rcnn_ce-r50_fpn_2x_coco.py', 'mask-rcnn_syncce-r50_fpn_2x_coco.py',
                 'mask-rcnn_ce-r101_fpn_2x_coco.py',
                 'mask-rcnn_syncce-r101_fpn_2x_coco.py',
                 'smoke/mask-rcnn_syncce-r50_fpn_shapes-smoke.py',
                 'smoke/mask-rcnn_ce-r50_fpn_shapes-smoke.py'):
        cfg = Config.fromfile(osp.join(REPO, 'configs', 'cenet', name))
        types = [hook['type'] for hook in cfg.get('custom_hooks', [])]
        assert 'RandomStateHook' in types, name


def test_killed_run_resumes_bit_for_bit(syncce_reference, syncce_killed,
                                        syncce_resumed):
    killed = syncce_killed
    assert killed['returncode'] != 0, killed['output'][-3000:]
    assert killed['killed_at'] is not None, killed['output'][-3000:]
    took = killed['finished'] - killed['killed_at']
    assert took < 60, f'survivors took {took:.0f}s'
    # what the kill left: the checkpoint of iteration 4, not the last one
    assert killed['checkpoints'] == ['iter_4.pth'], killed['checkpoints']
    assert KILLED_ITERS < ITERS

    assert 'resumed epoch: 0, iter: 4' in syncce_resumed['log']
    resumed = tensors(checkpoint(osp.join(syncce_resumed['work_dir'],
                                          f'iter_{ITERS}.pth')))
    reference = tensors(checkpoint(osp.join(syncce_reference['work_dir'],
                                            f'iter_{ITERS}.pth')))
    assert resumed.keys() == reference.keys()
    assert len(reference) > 400
    different = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:5]}'


def test_truncated_checkpoint_is_refused_on_resume(syncce_workspace):
    """``tools/train.py --resume`` on a checkpoint cut short on disk fails
    with the plugin's message naming the file and saying why (the path holds
    no "truncated": the word must come from the message)."""
    workspace = syncce_workspace
    source = osp.join(workspace['root'], 'sound.pth')
    torch.save(dict(state_dict={f'w{i}': torch.randn(64) for i in range(32)},
                    meta=dict(iter=4)), source)
    cut = osp.join(workspace['root'], 'cut_short', 'iter_4.pth')
    os.makedirs(osp.dirname(cut))
    with open(source, 'rb') as f:
        data = f.read()
    with open(cut, 'wb') as f:
        f.write(data[:len(data) // 3])
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'train.py'), workspace['config'],
         '--work-dir', osp.dirname(cut), '--resume', cut,
         '--cfg-options', f'train_cfg.max_iters={ITERS}',
         'train_cfg.val_begin=100', f'train_cfg.val_interval={ITERS}'],
        cwd=workspace['root'], env=workspace['env'], capture_output=True,
        text=True, timeout=300)
    output = proc.stderr + proc.stdout
    assert proc.returncode != 0, output[-3000:]
    assert 'truncated' not in cut
    message = (f'cannot load checkpoint {cut}: it is not a complete zip archive '
               '(torch checkpoints are zip archives): truncated, corrupted, or '
               'not a checkpoint')
    assert message in output, output[-3000:]


# ------------------------------------------------- the hook, single process
class _NoisyDataset(torch.utils.data.Dataset):
    """Draws from numpy's and Python's generators while loading (flips)."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        import random
        x = torch.full((4,), float(index))
        if np.random.rand() < 0.5:
            x = -x
        return dict(inputs=x * random.random())


def _toy_runner(work_dir: str, max_iters: int, hook: bool, resume: bool = False):
    """A Runner (scope ``mmengine``): callers run it inside
    ``DefaultScope.overwrite_default_scope('mmengine')``, which puts the
    previous scope back (a Runner leaves its own current for good)."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.dropout = torch.nn.Dropout(0.5)  # torch's generator

        def forward(self, inputs, data_samples=None, mode='loss'):
            return dict(loss=self.dropout(self.linear(inputs)).square().mean())

    torch.manual_seed(0)  # the same initial weights in every run
    return Runner(
        model=Toy(), work_dir=work_dir,
        train_dataloader=dict(dataset=_NoisyDataset(), batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate'),
                              num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=3,
                                           by_epoch=False)),
        custom_hooks=[dict(type='RandomStateHook')] if hook else [],
        randomness=dict(seed=0), resume=resume, default_scope='mmengine',
        log_level='WARNING')


def _final_weights(tmp_path, hook: bool) -> tuple:
    with DefaultScope.overwrite_default_scope('mmengine'):
        full = _toy_runner(str(tmp_path / f'full{hook}'), 9, hook)
        full.train()
        split_dir = str(tmp_path / f'split{hook}')
        _toy_runner(split_dir, 3, hook).train()
        resumed = _toy_runner(split_dir, 9, hook, resume=True)
        resumed.train()
    return full.model.state_dict(), resumed.model.state_dict()


def test_hook_makes_a_single_process_resume_exact(tmp_path):
    full, resumed = _final_weights(tmp_path, hook=True)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    full, resumed = _final_weights(tmp_path, hook=False)
    assert not all(torch.equal(full[k], resumed[k]) for k in full)


def test_checkpoint_holds_every_rank_states(tmp_path):
    with DefaultScope.overwrite_default_scope('mmengine'):
        _toy_runner(str(tmp_path / 'one'), 3, hook=True).train()
    ckpt = CheckpointLoader.load_checkpoint(str(tmp_path / 'one' / 'iter_3.pth'))
    states = ckpt['random_states']
    assert len(states) == 1
    assert {'torch', 'numpy', 'python'} <= set(states[0])


@pytest.mark.parametrize('damage', ['truncated', 'flipped'])
def test_damaged_checkpoint_is_refused_naming_it(tmp_path, damage):
    path = tmp_path / 'iter_1.pth'
    torch.save(dict(state_dict=dict(w=torch.randn(1000))), path)
    data = bytearray(path.read_bytes())
    if damage == 'truncated':
        data = data[:len(data) // 2]
    else:  # torch.load itself would load this silently
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFileError, match=f'cannot load checkpoint {path}'):
        CheckpointLoader.load_checkpoint(str(path))


def test_legacy_format_checkpoints_still_load(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save(dict(state_dict=dict(w=torch.ones(3))), path,
               _use_new_zipfile_serialization=False)
    loaded = CheckpointLoader.load_checkpoint(str(path))
    assert torch.equal(loaded['state_dict']['w'], torch.ones(3))
