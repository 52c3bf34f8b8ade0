#!/usr/bin/env python
"""Generate a synthetic COCO-style instance-segmentation data set of shapes.

Every image holds several filled shapes (by default circles, squares and
triangles; optionally hexagons, stars and crosses) of random size, rotation,
colour and stripe texture on a noisy, textured background. Colour is not tied
to the class. Shapes may overlap (a later shape occludes an earlier one); the
annotation of an occluded shape is its *visible* part.

Output layout (what ``configs/cenet/smoke/*.py`` and the benchmark expect)::

    OUT/train/000000.png ...            RGB PNGs, S x S
    OUT/val/000000.png ...
    OUT/annotations/instances_train.json
    OUT/annotations/instances_val.json

Annotation guarantees (checked by ``tests/test_tools/test_synthetic_coco.py``):

* one polygon per instance (the outline of its visible region, which is one
  connected region without holes), with at least 3 vertices, in COCO's
  continuous pixel coordinates (pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``);
* ``area`` is the area of that polygon (> 0), ``bbox`` is ``[x, y, w, h]`` of
  the polygon's extent, ``iscrowd`` is 0, image and annotation ids are unique;
* category ids are ``1..K`` in the order of ``--classes``.

Deterministic: the same arguments produce byte-identical files. Image ``i`` of a
split depends only on ``(seed, split, i)`` and the shape options, so a larger
``--train`` extends a smaller one.

Usage::

    python tools/misc/make_synthetic_coco.py data/shapes --train 200 --val 50 \
        --size 128 --seed 0
"""
import argparse
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

SHAPES = ('circle', 'square', 'triangle', 'hexagon', 'star', 'cross')
DEFAULT_CLASSES = ('circle', 'square', 'triangle')
SPLITS = ('train', 'val')
#: Sub-pixel precision of rasterization and contour tracing.
_SUPERSAMPLE = 4


def shape_outline(kind: str, center: Tuple[float, float], radius: float,
                  angle: float) -> np.ndarray:
    """Vertices ``(V, 2)`` (x, y; float64) of a shape of circumradius ``radius``.

    Args:
        kind: one of :data:`SHAPES`.
        center: ``(cx, cy)`` in pixels.
        radius: circumradius in pixels (> 0).
        angle: rotation in radians.
    """
    if kind == 'circle':
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        radii = np.full_like(t, radius)
    elif kind in ('square', 'triangle', 'hexagon'):
        sides = {'square': 4, 'triangle': 3, 'hexagon': 6}[kind]
        t = np.linspace(0, 2 * np.pi, sides, endpoint=False)
        radii = np.full_like(t, radius)
    elif kind == 'star':
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    elif kind == 'cross':
        a, b = radius / np.sqrt(1 + 0.35**2), 0.35 * radius / np.sqrt(1 + 0.35**2)
        pts = np.array([(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a),
                        (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)])
        t = np.arctan2(pts[:, 1], pts[:, 0])
        radii = np.hypot(pts[:, 0], pts[:, 1])
    else:
        raise ValueError(f'unknown shape {kind!r}; choose from {SHAPES}')
    t = t + angle
    return np.stack([center[0] + radii * np.cos(t),
                     center[1] + radii * np.sin(t)], axis=1)


def rasterize(outline: np.ndarray, size: int) -> np.ndarray:
    """Binary mask ``(S*k, S*k)`` (uint8, k = supersampling) of a polygon."""
    hi = size * _SUPERSAMPLE
    mask = np.zeros((hi, hi), np.uint8)
    # pixel (x, y) of the fine grid covers [x, x+1): its centre is x + 0.5
    pts = np.round(outline * _SUPERSAMPLE - 0.5).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8)
    return mask


def downsample(mask: np.ndarray) -> np.ndarray:
    """Fine mask ``(S*k, S*k)`` -> image-resolution mask ``(S, S)`` (majority)."""
    k = _SUPERSAMPLE
    s = mask.shape[0] // k
    cover = mask.reshape(s, k, s, k).mean(axis=(1, 3))
    return (cover >= 0.5).astype(np.uint8)


def visible_polygon(mask: np.ndarray) -> Optional[List[float]]:
    """The outline of an image-resolution mask ``(S, S)`` as a flat COCO polygon.

    Returns ``None`` unless the mask is one connected region without holes.
    Vertices lie on pixel corners (COCO continuous coordinates): the outline of
    the region obtained by tracing pixel centres of a ``k x``-upsampled mask,
    mapped back so that it runs ``0.5 / k`` px inside the pixel boundary.
    """
    k = _SUPERSAMPLE
    fine = np.kron(mask, np.ones((k, k), np.uint8))
    contours, hierarchy = cv2.findContours(fine, cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) != 1 or hierarchy is None or (hierarchy[..., 3] >= 0).any():
        return None
    pts = contours[0].reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:
        return None
    pts = (pts + 0.5) / k
    return [round(float(v), 3) for v in pts.reshape(-1)]


def polygon_area(flat: Sequence[float]) -> float:
    """Shoelace area of a flat polygon ``[x0, y0, x1, y1, ...]``."""
    xy = np.asarray(flat, np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def polygon_bbox(flat: Sequence[float]) -> List[float]:
    """``[x, y, w, h]`` of the extent of a flat polygon."""
    xy = np.asarray(flat, np.float64).reshape(-1, 2)
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    return [round(float(x0), 3), round(float(y0), 3),
            round(float(x1 - x0), 3), round(float(y1 - y0), 3)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background ``(S, S, 3)`` float32 in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    gradient = rng.uniform(-50, 50, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * gradient[0] + yy[..., None] * gradient[1]
    for _ in range(3):  # low-frequency waves and stripes
        freq = rng.uniform(1, 12)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0, 18, size=3).astype(np.float32)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta))
                      + phase)
        img = img + wave[..., None] * amp
    # blotches: smoothed noise
    blotch = rng.normal(0, 1, size=(size // 8 + 1, size // 8 + 1, 3))
    blotch = cv2.resize(blotch.astype(np.float32), (size, size),
                        interpolation=cv2.INTER_CUBIC)
    return img + 12 * blotch


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """An object's colour and stripe texture ``(S, S, 3)`` float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
    freq = rng.uniform(2, 20)
    theta = rng.uniform(0, np.pi)
    amp = rng.uniform(0, 30) * rng.choice([-1, 1], size=3).astype(np.float32)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    return colour + wave[..., None] * amp


def make_image(rng: np.random.Generator, size: int, classes: Sequence[str],
               num_objects: Tuple[int, int], radius_frac: Tuple[float, float],
               max_occlusion: float, noise: float, min_contrast: float = 40.0,
               max_tries: int = 200) -> Tuple[np.ndarray, List[Dict]]:
    """Render one image.

    Args:
        rng: the image's random generator.
        size: image side ``S``.
        classes: the shape names, class index = position.
        num_objects: inclusive range of the number of shapes.
        radius_frac: range of the circumradius as a fraction of ``S``.
        max_occlusion: largest fraction of a shape that later shapes may hide.
        noise: standard deviation of the per-pixel Gaussian noise.
        min_contrast: smallest RGB distance between a shape's mean colour and
            the mean colour of what it covers (20 draws, then the last is kept).
        max_tries: placement attempts per shape before giving up on it.

    Returns:
        ``(image (S, S, 3) uint8 RGB, objects)``; each object is a dict with
        ``label`` (class index), ``polygon`` (flat list) and ``mask`` (S, S).
    """
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    full_masks: List[np.ndarray] = []  # image-resolution full masks, paint order
    labels: List[int] = []
    for _ in range(count):
        for _ in range(max_tries):
            label = int(rng.integers(len(classes)))
            radius = rng.uniform(*radius_frac) * size
            center = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            mask = downsample(rasterize(
                shape_outline(classes[label], tuple(center), radius, angle), size))
            if mask.sum() < 16:
                continue
            candidate = full_masks + [mask]
            visible = _visible_masks(candidate)
            if all(_acceptable(v, full, max_occlusion)
                   for v, full in zip(visible, candidate)):
                full_masks.append(mask)
                labels.append(label)
                break
    image = _background(rng, size)
    for mask in full_masks:
        inside = mask.astype(bool)
        under = image[inside].mean(axis=0)
        for _ in range(20):  # keep every shape visible against what it covers
            tex = _texture(rng, size)
            if np.linalg.norm(tex[inside].mean(axis=0) - under) >= min_contrast:
                break
        image = np.where(inside[..., None], tex, image)
    image = image + rng.normal(0, noise, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    objects = []
    for label, vis in zip(labels, _visible_masks(full_masks)):
        objects.append(dict(label=label, polygon=visible_polygon(vis), mask=vis))
    return image, objects


def _visible_masks(masks: List[np.ndarray]) -> List[np.ndarray]:
    """Visible part of each mask when painted in order (later ones on top)."""
    visible = []
    covered = np.zeros_like(masks[0]) if masks else None
    for mask in reversed(masks):
        visible.append(mask & (1 - covered))
        covered = covered | mask
    return visible[::-1]


def _acceptable(visible: np.ndarray, full: np.ndarray,
                max_occlusion: float) -> bool:
    if visible.sum() < max(16, (1 - max_occlusion) * full.sum()):
        return False
    polygon = visible_polygon(visible)
    return polygon is not None and polygon_area(polygon) > 0


def make_split(out: str, split: str, num_images: int, size: int, seed: int,
               classes: Sequence[str], **image_kwargs) -> Dict:
    """Write the images of one split and return its COCO dict."""
    split_index = SPLITS.index(split)
    img_dir = osp.join(out, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_index, index])
        image, objects = make_image(rng, size, classes, **image_kwargs)
        file_name = f'{index:06d}.png'
        Image.fromarray(image).save(osp.join(img_dir, file_name), format='PNG')
        image_id = index + 1
        images.append(dict(id=image_id, file_name=file_name, width=size,
                           height=size))
        for obj in objects:
            polygon = obj['polygon']
            annotations.append(dict(
                id=ann_id, image_id=image_id, category_id=obj['label'] + 1,
                segmentation=[polygon], area=round(polygon_area(polygon), 3),
                bbox=polygon_bbox(polygon), iscrowd=0))
            ann_id += 1
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(classes)]
    return dict(info=dict(description=f'synthetic shapes, seed {seed}',
                          version='1.0'),
                images=images, annotations=annotations, categories=categories)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Generate a synthetic COCO instance-segmentation set')
    parser.add_argument('out', help='output directory')
    parser.add_argument('--train', type=int, default=200,
                        help='number of training images (default: 200)')
    parser.add_argument('--val', type=int, default=50,
                        help='number of validation images (default: 50)')
    parser.add_argument('--size', type=int, default=128,
                        help='image side in pixels (default: 128)')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--classes', default=','.join(DEFAULT_CLASSES),
                        help=f'comma-separated shapes from {",".join(SHAPES)} '
                        f'(default: {",".join(DEFAULT_CLASSES)})')
    parser.add_argument('--min-objects', type=int, default=2)
    parser.add_argument('--max-objects', type=int, default=5)
    parser.add_argument('--min-radius', type=float, default=0.07,
                        help='smallest circumradius, fraction of --size')
    parser.add_argument('--max-radius', type=float, default=0.22,
                        help='largest circumradius, fraction of --size')
    parser.add_argument('--max-occlusion', type=float, default=0.4,
                        help='largest hidden fraction of a shape (default 0.4)')
    parser.add_argument('--noise', type=float, default=10.0,
                        help='std of the per-pixel noise (default: 10)')
    parser.add_argument('--min-contrast', type=float, default=40.0,
                        help='smallest RGB distance between a shape and what it '
                        'covers (default: 40)')
    args = parser.parse_args(argv)
    args.classes = [c.strip() for c in args.classes.split(',') if c.strip()]
    errors = []
    unknown = [c for c in args.classes if c not in SHAPES]
    if unknown or not args.classes or len(set(args.classes)) != len(args.classes):
        errors.append(f'--classes must be distinct names from {SHAPES}, got '
                      f'{args.classes}')
    if args.train < 0 or args.val < 0:
        errors.append('--train and --val must be >= 0')
    if args.size < 32:
        errors.append(f'--size must be >= 32, got {args.size}')
    if not 1 <= args.min_objects <= args.max_objects:
        errors.append('need 1 <= --min-objects <= --max-objects')
    if not 0 < args.min_radius <= args.max_radius <= 0.5:
        errors.append('need 0 < --min-radius <= --max-radius <= 0.5')
    if args.min_radius * args.size < 3:
        errors.append('--min-radius * --size must be >= 3 pixels')
    if not 0 <= args.max_occlusion < 1:
        errors.append('need 0 <= --max-occlusion < 1')
    if args.noise < 0 or args.min_contrast < 0:
        errors.append('--noise and --min-contrast must be >= 0')
    if errors:
        parser.error('; '.join(errors))
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    image_kwargs = dict(
        num_objects=(args.min_objects, args.max_objects),
        radius_frac=(args.min_radius, args.max_radius),
        max_occlusion=args.max_occlusion, noise=args.noise,
        min_contrast=args.min_contrast)
    os.makedirs(osp.join(args.out, 'annotations'), exist_ok=True)
    for split, count in zip(SPLITS, (args.train, args.val)):
        coco = make_split(args.out, split, count, args.size, args.seed,
                          args.classes, **image_kwargs)
        path = osp.join(args.out, 'annotations', f'instances_{split}.json')
        with open(path, 'w') as f:
            json.dump(coco, f, separators=(',', ':'))
        print(f'{split}: {len(coco["images"])} images, '
              f'{len(coco["annotations"])} instances -> {path}')


if __name__ == '__main__':
    main()
