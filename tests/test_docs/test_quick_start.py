"""The README's quick start runs, at its smallest size, and prints box and
mask AP.

``bash tools/quick_start.sh WORK`` with ``QS_ITERS=1 QS_TRAIN=2 QS_VAL=2
QS_SIZE=64``: the synthetic set is generated, a CE-ResNet-50 Mask R-CNN trains
one iteration through ``tools/train.py``, ``tools/test.py`` evaluates it, and
the last line reports box and mask AP (COCO AP x 100, finite), read from the
test run's metrics file. About 30 s on 2 cores (three tool processes).
"""
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
from glob import glob

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs', 'cenet', 'quick_start',
                  'mask-rcnn_ce-r50_fpn_shapes-quickstart.py')
SMALLEST = dict(QS_ITERS='1', QS_TRAIN='2', QS_VAL='2', QS_SIZE='64')


def test_quick_start_prints_box_and_mask_ap(tmp_path):
    work = str(tmp_path / 'quick_start')
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='',
               OMP_NUM_THREADS='1', **SMALLEST)
    run = subprocess.run(['bash', osp.join(REPO, 'tools', 'quick_start.sh'), work],
                         cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    last = run.stdout.strip().splitlines()[-1]
    match = re.match(r'\[quick_start\] CE-R50 Mask R-CNN after 1 iterations: '
                     r'box AP (-?[\d.]+), mask AP (-?[\d.]+) ', last)
    assert match, last
    box, mask = match.group(1), match.group(2)
    assert math.isfinite(float(box)) and math.isfinite(float(mask))
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
