"""Generate a tiny classification data set in the ImageNet folder layout.

Layout (MMPretrain's; what ``configs/cenet/imagenet`` reads)::

    ROOT/train/<wnid>/<wnid>_<i>.png      class sub-folders (sorted = labels)
    ROOT/val/val_<i>.png                  flat, labels only in the list
    ROOT/meta/train.txt                   "<wnid>/<wnid>_<i>.png <label>"
    ROOT/meta/val.txt                     "val_<i>.png <label>"

Class ``k`` (``wnid`` ``n%08d``) is a pattern (a filled shape, a ring,
stripes of one orientation, a checkerboard, ...) of random colour, position,
size and orientation jitter on a noisy background, and images are of random
size around ``size`` (not square), so that the crop and resize transforms do
real work. Deterministic: image ``i`` of a split depends only on
``(seed, split, i)``.
"""
import os
import os.path as osp
from typing import Dict, List, Tuple

import cv2
import numpy as np

PATTERNS = ('disc', 'square', 'triangle', 'plus', 'ring', 'hstripes',
            'vstripes', 'dstripes', 'checker', 'dots')


def wnid(label: int) -> str:
    """The class folder name of ``label``."""
    return f'n{label:08d}'


def _colour(rng: np.random.Generator, avoid: np.ndarray = None) -> Tuple[int, ...]:
    while True:
        colour = rng.integers(0, 256, 3)
        if avoid is None or np.abs(colour - avoid).sum() > 180:
            return tuple(int(c) for c in colour)


def draw_pattern(label: int, height: int, width: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 BGR image of class ``label``."""
    background = rng.integers(0, 256, 3)
    img = np.empty((height, width, 3), np.float32)
    img[:] = background
    img += rng.normal(0, 12, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    fg = _colour(rng, background)
    side = min(height, width)
    radius = int(side * rng.uniform(0.22, 0.38))
    cy = int(rng.integers(radius, height - radius + 1))
    cx = int(rng.integers(radius, width - radius + 1))
    pattern = PATTERNS[label % len(PATTERNS)]
    if pattern == 'disc':
        cv2.circle(img, (cx, cy), radius, fg, -1)
    elif pattern == 'ring':
        cv2.circle(img, (cx, cy), radius, fg, max(2, radius // 3))
    elif pattern in ('square', 'triangle', 'plus'):
        angle = rng.uniform(-0.4, 0.4)
        if pattern == 'square':
            corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
            scale = radius * 0.8
        elif pattern == 'triangle':
            corners = [(0, -1.1), (1, 0.7), (-1, 0.7)]
            scale = radius
        else:
            t = 0.3
            corners = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
                       (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
            scale = radius
        rot = np.array([[np.cos(angle), -np.sin(angle)],
                        [np.sin(angle), np.cos(angle)]])
        points = (np.array(corners) @ rot.T) * scale + (cx, cy)
        cv2.fillPoly(img, [np.round(points).astype(np.int32)], fg)
    else:
        period = int(rng.integers(6, 11))
        yy, xx = np.mgrid[0:height, 0:width]
        if pattern == 'hstripes':
            mask = (yy // (period // 2)) % 2 == 0
        elif pattern == 'vstripes':
            mask = (xx // (period // 2)) % 2 == 0
        elif pattern == 'dstripes':
            mask = ((xx + yy) // (period // 2)) % 2 == 0
        elif pattern == 'checker':
            mask = ((xx // period) + (yy // period)) % 2 == 0
        else:  # dots
            mask = ((xx % period - period / 2)**2 +
                    (yy % period - period / 2)**2) < (period / 4)**2
        inside = (yy - cy)**2 + (xx - cx)**2 < (radius * 1.3)**2
        img[mask & inside] = fg
    return img


def make_imagenet_folder(root: str, num_classes: int = 4,
                         train_per_class: int = 4, val_per_class: int = 2,
                         size: int = 64, seed: int = 0,
                         with_meta: bool = True) -> Dict[str, List[Tuple[str, int]]]:
    """Write the data set under ``root``; return the lists written.

    Args:
        root: output folder (created).
        num_classes: K (patterns repeat after 10). Default: 4.
        train_per_class / val_per_class: images per class. Default: 4 / 2.
        size: nominal image side; each image is ``h x w`` with ``h, w`` in
            ``[size, 1.25 * size]``. Default: 64.
        seed: random seed. Default: 0.
        with_meta: also write ``meta/{train,val}.txt``. Default: True.

    Returns:
        ``{'train': [(relative path, label), ...], 'val': [...]}``, relative
        to ``root/<split>``.
    """
    lists: Dict[str, List[Tuple[str, int]]] = {'train': [], 'val': []}
    for split_index, (split, per_class) in enumerate(
            (('train', train_per_class), ('val', val_per_class))):
        index = 0
        for label in range(num_classes):
            for i in range(per_class):
                rng = np.random.default_rng([seed, split_index, index])
                height = int(rng.integers(size, int(size * 1.25) + 1))
                width = int(rng.integers(size, int(size * 1.25) + 1))
                img = draw_pattern(label, height, width, rng)
                if split == 'train':
                    rel = f'{wnid(label)}/{wnid(label)}_{i}.png'
                else:
                    rel = f'val_{index:05d}.png'
                path = osp.join(root, split, rel)
                os.makedirs(osp.dirname(path), exist_ok=True)
                if not cv2.imwrite(path, img):
                    raise OSError(f'cannot write {path}')
                lists[split].append((rel, label))
                index += 1
    if with_meta:
        os.makedirs(osp.join(root, 'meta'), exist_ok=True)
        for split, items in lists.items():
            with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
                f.writelines(f'{rel} {label}\n' for rel, label in items)
    return lists
