"""What a user hands the tools slightly wrong stops with one line (issue #18).

* ``tools/test.py`` refuses a checkpoint that does not cover the model (an
  ImageNet classifier with another number of classes: MMEngine would warn,
  test with a random head and report top-1 0.0), before any data is read.
* ``tools/test.py`` with a fitting checkpoint that holds two ranks' random
  states: no RandomStateHook warning (nothing is resumed), and
  ``--cfg-options data_root=DIR`` alone moves the test set (the config's own
  ``data/imagenet`` does not exist here).
* ``tools/train.py`` with ``load_from`` a BN classifier (no CE tensors)
  stops before the first iteration: one error line, exit 1, no checkpoint.
* ``move_data_root`` on the shipped configs, and the ``--help`` text of
  ``make_synthetic_imagenet.py``.

About 1 minute on 2 cores (three ImageNet CE-ResNet-50 tool runs at 64 px).
"""
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List

import pytest
import torch

import cenet_mmdet  # noqa: F401
from mmengine.config import Config

from cenet_mmdet.engine import move_data_root
from cenet_mmdet.testing.imagenet_folder import make_imagenet_folder

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
IMAGENET = osp.join(REPO, 'configs', 'cenet', 'imagenet', 'ce-resnet50_8xb32_in1k.py')
COCO_CE = osp.join(REPO, 'configs', 'cenet', 'mask-rcnn_ce-r50_fpn_2x_coco.py')
NUM_CLASSES = 4
TIMEOUT = 600


def tool(args: List[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def build_classifier(num_classes: int, ce: bool = True):
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    cfg = Config.fromfile(IMAGENET)
    cfg.model.head.num_classes = num_classes
    cfg.model.data_preprocessor.num_classes = num_classes
    if not ce:
        cfg.model.backbone.ce_cfg = None
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('edges'))
    data_root = osp.join(root, 'elsewhere', 'imagenet')
    make_imagenet_folder(data_root, num_classes=NUM_CLASSES, train_per_class=2,
                         val_per_class=1, size=72, seed=0)
    torch.manual_seed(0)
    states = dict(torch=torch.get_rng_state(), numpy=None, python=None)
    checkpoints = {}
    for name, classes, ce in (('fits', NUM_CLASSES, True),
                              ('ten_classes', 10, True),
                              ('bn', NUM_CLASSES, False)):
        path = osp.join(root, f'{name}.pth')
        torch.save(dict(state_dict=build_classifier(classes, ce).state_dict(),
                        meta=dict(epoch=1, iter=4),
                        random_states=[states, states]), path)
        checkpoints[name] = path
    return dict(root=root, data_root=data_root, checkpoints=checkpoints)


def imagenet_test_options(data_root: str) -> List[str]:
    loader = 'test_dataloader'
    return [f'data_root={data_root}', f'model.head.num_classes={NUM_CLASSES}',
            f'model.data_preprocessor.num_classes={NUM_CLASSES}',
            f'{loader}.batch_size=2', f'{loader}.num_workers=0',
            f'{loader}.persistent_workers=False',
            f'{loader}.dataset.pipeline.1.scale=72',
            f'{loader}.dataset.pipeline.2.crop_size=64']


def test_test_script_refuses_a_checkpoint_of_another_head(workspace):
    proc = tool([osp.join(REPO, 'tools', 'test.py'), IMAGENET,
                 workspace['checkpoints']['ten_classes'], '--work-dir',
                 osp.join(workspace['root'], 'wd_refused'), '--cfg-options']
                + imagenet_test_options(workspace['data_root']), workspace['root'])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if 'error' in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith('test.py: error: checkpoint ')
    assert ('head.fc.weight (10, 2048) vs the model\'s (4, 2048)' in errors[0])
    assert 'Traceback' not in proc.stderr
    assert 'accuracy/top1' not in proc.stdout + proc.stderr


def test_test_script_moves_data_root_and_warns_of_no_resume(workspace):
    work_dir = osp.join(workspace['root'], 'wd_fits')
    proc = tool([osp.join(REPO, 'tools', 'test.py'), IMAGENET,
                 workspace['checkpoints']['fits'], '--work-dir', work_dir,
                 '--cfg-options'] + imagenet_test_options(workspace['data_root']),
                workspace['root'])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert 'accuracy/top1' in output
    assert 'random states' not in output and 'not exact' not in output
    # the 4 validation images of data_root=..., not data/imagenet
    assert not osp.exists(osp.join(workspace['root'], 'data'))


def test_train_script_refuses_load_from_without_ce(workspace):
    work_dir = osp.join(workspace['root'], 'wd_train')
    loader = 'train_dataloader'
    proc = tool([osp.join(REPO, 'tools', 'train.py'), IMAGENET, '--work-dir',
                 work_dir, '--cfg-options',
                 f'load_from={workspace["checkpoints"]["bn"]}',
                 f'data_root={workspace["data_root"]}',
                 f'model.head.num_classes={NUM_CLASSES}',
                 f'model.data_preprocessor.num_classes={NUM_CLASSES}',
                 'train_cfg.max_epochs=1', f'{loader}.batch_size=2',
                 f'{loader}.num_workers=0', f'{loader}.persistent_workers=False',
                 'val_dataloader.num_workers=0',
                 'val_dataloader.persistent_workers=False',
                 f'{loader}.dataset.pipeline.1.scale=64'], workspace['root'])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if 'error' in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    bn = workspace['checkpoints']['bn']
    assert errors[0].startswith(
        f"train.py: error: CEResNet: 14 of 14 CE layers (bn1, layer1.0.bn3, "
        f"layer1.1.bn3, ...) got no CE weights from checkpoint '{bn}' (load_from)")
    assert 'Traceback' not in proc.stderr
    assert not any(name.endswith('.pth') for _, _, files in os.walk(work_dir)
                   for name in files)
    assert 'Iter(train)' not in proc.stdout and 'Epoch(train)' not in proc.stdout


def paths_of(cfg) -> Dict[str, str]:
    out = {}
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        out[loader] = cfg[loader].dataset.data_root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        out[evaluator] = cfg[evaluator].get('ann_file')
    return out


@pytest.mark.parametrize('config, new', [(IMAGENET, '/mnt/in1k'),
                                         (COCO_CE, '/mnt/coco/'),
                                         (COCO_CE, '/mnt/coco')])
def test_data_root_override_moves_every_derived_path(config, new):
    cfg = Config.fromfile(config)
    original = cfg.data_root
    before = paths_of(cfg)
    cfg.merge_from_dict({'data_root': new})
    moved = move_data_root(cfg, original)
    after = paths_of(cfg)
    base = original.rstrip('/')
    expected = {key: (None if value is None else new.rstrip('/') + value[len(base):])
                for key, value in before.items()}
    assert after == expected
    assert moved == sum(v is not None for v in before.values())
    if config == COCO_CE:
        assert after['val_evaluator'] == '/mnt/coco/annotations/instances_val2017.json'
    # nothing else changes, and an unchanged data_root moves nothing
    assert move_data_root(cfg, cfg.data_root) == 0


def test_make_synthetic_imagenet_help_is_complete(tmp_path):
    proc = tool([osp.join(REPO, 'tools', 'misc', 'make_synthetic_imagenet.py'),
                 '--help'], str(tmp_path))
    assert proc.returncode == 0
    text = ' '.join(proc.stdout.split())
    description = text.split('positional arguments:')[0].split(' ] ', 1)[-1]
    assert description.rstrip().endswith('.'), description
    assert description.count('(') == description.count(')'), description
    for option in ('--classes', '--train', '--val', '--size', '--seed'):
        assert f'{option} ' in text
        after = text.split(f'{option} {option.strip("-").upper()} ', 1)[1]
        assert after.split()[0] not in ('--', '-h'), (option, after[:40])


@pytest.mark.parametrize('resume', [False, True])
def test_random_state_warning_only_on_a_resume(resume, monkeypatch):
    """Two ranks' states in a one-process run: a plain load (load_from,
    tools/test.py) restores nothing and says nothing; a resume warns."""
    from types import SimpleNamespace

    from cenet_mmdet.engine import random_state
    logged = []
    monkeypatch.setattr(random_state, 'print_log',
                        lambda message, **kwargs: logged.append(message))
    states = random_state.capture_random_states()
    hook = random_state.RandomStateHook()
    hook.after_load_checkpoint(SimpleNamespace(_resume=resume),
                               dict(random_states=[states, states],
                                    meta=dict(epoch=0, iter=4)))
    assert hook._loaded is None
    assert len(logged) == int(resume), logged
    if resume:
        assert 'random states of 2 ranks, this run has 1' in logged[0]
