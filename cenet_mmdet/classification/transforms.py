"""Classification transforms that MMCV lacks (MMPretrain's names and fields).

* :class:`RandomResizedCrop`: the Inception / torchvision crop used for
  ImageNet training.
* :class:`ResizeEdge`: resize so that one edge (the short one by default) has
  a given length, keeping the aspect ratio (ImageNet test: short edge 256).
* :class:`PackInputs`: image to a ``(3, H, W)`` tensor and the label to a
  :class:`~cenet_mmdet.classification.model.ClsDataSample`.

Flipping and centre cropping are MMCV's ``RandomFlip`` and ``CenterCrop``.
Randomness comes from numpy's global generator (seeded by MMEngine's
``randomness`` setting and its data-loader worker seeding).
"""
import math
from typing import Sequence, Tuple, Union

import mmcv
import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmcv.transforms.utils import cache_randomness
from mmdet.registry import TRANSFORMS

from .structures import ClsDataSample


def _to_hw(scale: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(scale, int):
        scale = (scale, scale)
    if (not isinstance(scale, Sequence) or len(scale) != 2
            or not all(isinstance(v, int) and v > 0 for v in scale)):
        raise ValueError(f'{name} must be a positive int or (h, w), got {scale!r}')
    return int(scale[0]), int(scale[1])


@TRANSFORMS.register_module()
class RandomResizedCrop(BaseTransform):
    """Crop a random area and aspect ratio of the image, resize to ``scale``.

    As torchvision's ``RandomResizedCrop`` and MMPretrain's: up to
    ``max_attempts`` times, draw an area fraction ``s ~ U(crop_ratio_range)``
    and an aspect ratio ``r = w / h`` log-uniform in ``aspect_ratio_range``;
    the first crop ``w = round(sqrt(s * H * W * r))``,
    ``h = round(sqrt(s * H * W / r))`` that fits is placed uniformly at
    random. Otherwise: the largest centred crop whose ratio is clamped to
    ``aspect_ratio_range``.

    Required keys: ``img`` ``(H, W, C)``. Modified: ``img``, ``img_shape``.
    Added: ``crop_bbox`` ``(x1, y1, x2, y2)`` (inclusive, as ``mmcv.imcrop``).

    Args:
        scale: output size, an int (square) or ``(h, w)`` as in MMPretrain.
        crop_ratio_range: range of the crop area over the image area.
            Default: (0.08, 1.0).
        aspect_ratio_range: range of the crop's width over its height.
            Default: (3/4, 4/3).
        max_attempts: draws before the centred fallback. Default: 10.
        interpolation: ``mmcv.imresize`` interpolation. Default: 'bilinear'.
        backend: ``'cv2'`` or ``'pillow'``. Default: 'cv2'.
    """

    def __init__(self,
                 scale: Union[int, Sequence[int]],
                 crop_ratio_range: Tuple[float, float] = (0.08, 1.0),
                 aspect_ratio_range: Tuple[float, float] = (3. / 4., 4. / 3.),
                 max_attempts: int = 10,
                 interpolation: str = 'bilinear',
                 backend: str = 'cv2') -> None:
        super().__init__()
        self.scale = _to_hw(scale, 'scale')
        low, high = crop_ratio_range
        if not 0 < low <= high <= 1:
            raise ValueError('crop_ratio_range must satisfy 0 < low <= high <= 1, '
                             f'got {crop_ratio_range!r}')
        low_r, high_r = aspect_ratio_range
        if not 0 < low_r <= high_r:
            raise ValueError('aspect_ratio_range must satisfy 0 < low <= high, '
                             f'got {aspect_ratio_range!r}')
        if not isinstance(max_attempts, int) or max_attempts < 0:
            raise ValueError(f'max_attempts must be an int >= 0, got {max_attempts!r}')
        self.crop_ratio_range = (float(low), float(high))
        self.aspect_ratio_range = (float(low_r), float(high_r))
        self.max_attempts = max_attempts
        self.interpolation = interpolation
        self.backend = backend

    @cache_randomness
    def rand_crop_params(self, img: np.ndarray) -> Tuple[int, int, int, int]:
        """``(top, left, crop_h, crop_w)`` of a random crop of ``img``."""
        height, width = img.shape[:2]
        area = height * width
        log_low, log_high = (math.log(r) for r in self.aspect_ratio_range)
        for _ in range(self.max_attempts):
            target_area = np.random.uniform(*self.crop_ratio_range) * area
            ratio = math.exp(np.random.uniform(log_low, log_high))
            crop_w = int(round(math.sqrt(target_area * ratio)))
            crop_h = int(round(math.sqrt(target_area / ratio)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = np.random.randint(0, height - crop_h + 1)
                left = np.random.randint(0, width - crop_w + 1)
                return int(top), int(left), crop_h, crop_w
        # fallback: centred crop with the ratio clamped to the range
        in_ratio = width / height
        if in_ratio < self.aspect_ratio_range[0]:
            crop_w = width
            crop_h = int(round(crop_w / self.aspect_ratio_range[0]))
        elif in_ratio > self.aspect_ratio_range[1]:
            crop_h = height
            crop_w = int(round(crop_h * self.aspect_ratio_range[1]))
        else:
            crop_w, crop_h = width, height
        crop_h, crop_w = min(crop_h, height), min(crop_w, width)
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def transform(self, results: dict) -> dict:
        img = results['img']
        top, left, crop_h, crop_w = self.rand_crop_params(img)
        bbox = np.array([left, top, left + crop_w - 1, top + crop_h - 1])
        img = mmcv.imcrop(img, bboxes=bbox)
        img = mmcv.imresize(img, (self.scale[1], self.scale[0]),
                            interpolation=self.interpolation,
                            backend=self.backend)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['crop_bbox'] = bbox
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(scale={self.scale}, crop_ratio_range='
                f'{self.crop_ratio_range}, aspect_ratio_range='
                f'{self.aspect_ratio_range}, max_attempts={self.max_attempts}, '
                f'interpolation={self.interpolation!r}, backend={self.backend!r})')


@TRANSFORMS.register_module()
class ResizeEdge(BaseTransform):
    """Resize so that one edge has length ``scale``, keeping the aspect ratio.

    As MMPretrain's ``ResizeEdge``: the other edge is
    ``int(scale * other / edge)``.

    Required keys: ``img``. Modified: ``img``, ``img_shape``. Added:
    ``scale`` ``(w, h)``, ``scale_factor`` ``(w_factor, h_factor)``.

    Args:
        scale: length of the chosen edge after resizing.
        edge: ``'short'``, ``'long'``, ``'width'`` or ``'height'``.
            Default: 'short'.
        backend: ``'cv2'`` or ``'pillow'``. Default: 'cv2'.
        interpolation: ``mmcv.imresize`` interpolation. Default: 'bilinear'.
    """

    def __init__(self, scale: int, edge: str = 'short', backend: str = 'cv2',
                 interpolation: str = 'bilinear') -> None:
        super().__init__()
        if not isinstance(scale, int) or scale <= 0:
            raise ValueError(f'scale must be a positive int, got {scale!r}')
        if edge not in ('short', 'long', 'width', 'height'):
            raise ValueError("edge must be 'short', 'long', 'width' or 'height', "
                             f'got {edge!r}')
        self.scale = scale
        self.edge = edge
        self.backend = backend
        self.interpolation = interpolation

    def transform(self, results: dict) -> dict:
        img = results['img']
        height, width = img.shape[:2]
        if ((self.edge == 'short' and width < height)
                or (self.edge == 'long' and width > height)
                or self.edge == 'width'):
            new_w, new_h = self.scale, int(self.scale * height / width)
        else:
            new_w, new_h = int(self.scale * width / height), self.scale
        img = mmcv.imresize(img, (new_w, new_h), interpolation=self.interpolation,
                            backend=self.backend)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['scale'] = (new_w, new_h)
        results['scale_factor'] = (new_w / width, new_h / height)
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(scale={self.scale}, edge={self.edge!r}, '
                f'backend={self.backend!r}, interpolation={self.interpolation!r})')


@TRANSFORMS.register_module()
class PackInputs(BaseTransform):
    """Pack an image and its label for :class:`ImageClassifier`.

    Output: ``dict(inputs=uint8 tensor (C, H, W), data_samples=ClsDataSample)``
    with ``gt_label`` a ``(1,)`` long tensor (when ``gt_label`` is present)
    and the ``meta_keys`` that are present as metainfo.

    Args:
        meta_keys: keys copied to the data sample's metainfo.
            Default: ``('sample_idx', 'img_path', 'ori_shape', 'img_shape',
            'scale_factor', 'flip', 'flip_direction')``.
    """

    def __init__(self,
                 meta_keys: Sequence[str] = ('sample_idx', 'img_path',
                                             'ori_shape', 'img_shape',
                                             'scale_factor', 'flip',
                                             'flip_direction')) -> None:
        super().__init__()
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        img = results['img']
        if img.ndim == 2:
            img = img[..., None]
        inputs = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        sample = ClsDataSample(metainfo={k: results[k] for k in self.meta_keys
                                         if k in results})
        if results.get('gt_label') is not None:
            sample.set_gt_label(results['gt_label'])
        return dict(inputs=inputs, data_samples=sample)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(meta_keys={self.meta_keys})'
