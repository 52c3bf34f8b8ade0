#!/usr/bin/env python
"""Generate a tiny classification set in the ImageNet folder layout (see
:mod:`cenet_mmdet.testing.imagenet_folder`).

Usage::

    python tools/misc/make_synthetic_imagenet.py data/synthetic_imagenet \
        --classes 6 --train 50 --val 10 --size 72 --seed 0
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from cenet_mmdet.testing.imagenet_folder import make_imagenet_folder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description='Generate a tiny classification set in the ImageNet '
        'folder layout: ROOT/train/<class>/*.png, ROOT/val/*.png and '
        'ROOT/meta/{train,val}.txt (MMPretrain\'s lists), as read by '
        'configs/cenet/imagenet (data_root=ROOT).')
    parser.add_argument('root', help='output folder (created)')
    parser.add_argument('--classes', type=int, default=4,
                        help='number of classes (default: 4)')
    parser.add_argument('--train', type=int, default=4,
                        help='training images per class (default: 4)')
    parser.add_argument('--val', type=int, default=2,
                        help='validation images per class (default: 2)')
    parser.add_argument('--size', type=int, default=64,
                        help='image side in pixels (default: 64)')
    parser.add_argument('--seed', type=int, default=0,
                        help='random seed of the images (default: 0)')
    parser.add_argument('--no-meta', action='store_true',
                        help='no meta/*.txt (train is read from class folders)')
    args = parser.parse_args()
    lists = make_imagenet_folder(args.root, args.classes, args.train, args.val,
                                 args.size, args.seed, not args.no_meta)
    print(f'{args.root}: {len(lists["train"])} train, {len(lists["val"])} val '
          f'images, {args.classes} classes')
    return 0


if __name__ == '__main__':
    sys.exit(main())
