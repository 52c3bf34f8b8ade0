"""See :mod:`cenet_mmdet.classification.checkpoints`.

Usage::

    python tools/model_converters/cls2backbone.py SRC DST [--unsafe-load] [--allow-no-ce]
"""
import os.path as osp
import sys

# this checkout's cenet_mmdet first (as tools/train.py does)
sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from cenet_mmdet.classification.checkpoints import cls2backbone_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(cls2backbone_main())
