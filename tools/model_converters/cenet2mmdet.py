"""Convert the released CE-ResNet ImageNet checkpoint for MMDetection.

Usage::

    python tools/model_converters/cenet2mmdet.py SRC DST [--verbose] [--unsafe-load]

The conversion logic lives in :mod:`cenet_mmdet.converters`.
"""
import os.path as osp
import sys

try:
    import cenet_mmdet  # noqa: F401
except ModuleNotFoundError as error:  # run from a checkout without installing
    if error.name != 'cenet_mmdet':
        raise
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from cenet_mmdet.converters import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
