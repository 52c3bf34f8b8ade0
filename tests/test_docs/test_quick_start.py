"""The README's quick start runs, at its smallest size, prints box and mask
AP after a few progress lines, and keeps MMEngine's logs in its work
directory.

``bash tools/quick_start.sh WORK`` with ``QS_ITERS=1 QS_TRAIN=2 QS_VAL=2
QS_SIZE=64``: the synthetic set is generated, a CE-ResNet-50 Mask R-CNN trains
one iteration through ``tools/train.py``, ``tools/test.py`` evaluates it, and
the last line reports box and mask AP (COCO AP x 100, finite), read from the
test run's metrics file. The terminal gets at most ``MAX_LINES`` lines; each
stage's full output is in ``WORK/logs/{data,train,test}.log``, whose paths are
printed. About 30 s on 2 cores (three tool processes).

A stage that fails stops the run with a non-zero exit, the tail of its log and
the log's path (``QS_SIZE=16``: the data stage's own error, a second or two).
"""
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
from glob import glob

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs', 'cenet', 'quick_start',
                  'mask-rcnn_ce-r50_fpn_shapes-quickstart.py')
SMALLEST = dict(QS_ITERS='1', QS_TRAIN='2', QS_VAL='2', QS_SIZE='64')
MAX_LINES = 30


def quick_start(tmp_path, **qs_env):
    work = str(tmp_path / 'quick_start')
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='',
               OMP_NUM_THREADS='1', **qs_env)
    run = subprocess.run(['bash', osp.join(REPO, 'tools', 'quick_start.sh'), work],
                         cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=600)
    return work, run


def test_quick_start_prints_box_and_mask_ap(tmp_path):
    work, run = quick_start(tmp_path, **SMALLEST)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    last = run.stdout.strip().splitlines()[-1]
    match = re.match(r'\[quick_start\] CE-R50 Mask R-CNN after 1 iterations: '
                     r'box AP (-?[\d.]+), mask AP (-?[\d.]+) ', last)
    assert match, last
    box, mask = match.group(1), match.group(2)
    assert math.isfinite(float(box)) and math.isfinite(float(mask))
    # a short terminal output: one line per stage and its progress, no
    # MMEngine log lines
    assert len(output.splitlines()) <= MAX_LINES, output
    assert 'Iter(train)' not in output and 'mmengine' not in output, output
    assert re.search(r'iter 1/1 .*done in \d+ s', run.stdout), run.stdout
    assert re.search(r'image 2/2 .*done in \d+ s', run.stdout), run.stdout
    # the full logs are in the work directory, at the paths printed
    for name, holds in (('data', 'instances'), ('train', 'Iter(train)'),
                        ('test', 'Iter(test) [2/2]')):
        log = osp.join(work, 'logs', f'{name}.log')
        assert f'(log: {log})' in run.stdout, (name, run.stdout)
        with open(log) as f:
            assert holds in f.read(), name
    # the numbers are the test run's metrics, from the checkpoint just trained
    assert osp.isfile(osp.join(work, 'iter_1.pth'))
    (metrics_file, ) = glob(osp.join(work, 'test', '*', '*.json'))
    with open(metrics_file) as f:
        metrics = json.loads(f.read().strip().splitlines()[-1])
    assert box == f"{100 * metrics['coco/bbox_mAP']:.1f}"
    assert mask == f"{100 * metrics['coco/segm_mAP']:.1f}"
    # the generated set has the requested size and the config's classes
    with open(osp.join(work, 'data', 'annotations', 'instances_val.json')) as f:
        coco = json.load(f)
    assert len(coco['images']) == 2
    from mmengine.config import Config
    cfg = Config.fromfile(CONFIG)
    assert [c['name'] for c in coco['categories']] == \
        list(cfg.train_dataloader.dataset.metainfo.classes)


def test_a_failed_stage_stops_with_its_log_tail(tmp_path):
    """Images too small for make_synthetic_coco.py: the data stage fails, the
    run stops there, and its error is on the terminal with the log's path."""
    work, run = quick_start(tmp_path, **dict(SMALLEST, QS_SIZE='16'))
    assert run.returncode != 0, run.stdout + run.stderr
    log = osp.join(work, 'logs', 'data.log')
    assert '[quick_start] stage failed: 1/3 data exited with status' in run.stderr
    assert '--size must be >= 32, got 16' in run.stderr   # the tail of the log
    assert f'full log: {log}' in run.stderr
    with open(log) as f:
        assert '--size must be >= 32, got 16' in f.read()
    assert len((run.stdout + run.stderr).splitlines()) <= MAX_LINES
    assert 'CE-R50 Mask R-CNN after' not in run.stdout
    assert not osp.exists(osp.join(work, 'logs', 'train.log'))


@pytest.mark.parametrize('name,value', [('QS_ITERS', '0'), ('QS_BATCH', 'two')])
def test_a_bad_count_is_refused(tmp_path, name, value):
    work, run = quick_start(tmp_path, **{name: value})
    assert run.returncode == 2
    assert (f"[quick_start] {name} must be a whole number >= 1, got '{value}'"
            in run.stderr)
    assert not osp.exists(work)
