"""See :mod:`cenet_mmdet.classification.checkpoints`.

Usage::

    python tools/model_converters/cenet2cls.py SRC DST [--unsafe-load]
"""
import os.path as osp
import sys

# this checkout's cenet_mmdet first (as tools/train.py does)
sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from cenet_mmdet.classification.checkpoints import cenet2cls_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(cenet2cls_main())
