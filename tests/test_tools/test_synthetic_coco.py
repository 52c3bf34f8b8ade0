"""tools/misc/make_synthetic_coco.py: validity and determinism of the data set.

The annotations are checked against independent computations: polygon areas
and extents recomputed here, masks decoded by pycocotools, and the invariant
that the visible parts of the shapes of one image never overlap.
"""
import filecmp
import json
import os.path as osp
import subprocess
import sys
from itertools import combinations
from typing import Dict, List

import numpy as np
import pytest

pycocotools = pytest.importorskip('pycocotools')
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO, 'tools', 'misc', 'make_synthetic_coco.py')
SIZE = 96
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def generate(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, str(out), *args],
                          capture_output=True, text=True, timeout=120)


def load(out, split: str) -> Dict:
    with open(osp.join(out, 'annotations', f'instances_{split}.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp('shapes')
    result = generate(out, '--train', '12', '--val', '4', '--size', str(SIZE),
                      '--seed', '3', '--max-objects', '6')
    assert result.returncode == 0, result.stderr
    return out


def shoelace(flat: List[float]) -> float:
    xy = np.asarray(flat, float).reshape(-1, 2)
    area = 0.0
    for (x0, y0), (x1, y1) in zip(xy, np.roll(xy, -1, axis=0)):
        area += x0 * y1 - x1 * y0
    return abs(area) / 2


def decode(ann: Dict, height: int, width: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(ann['segmentation'], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_layout_and_ids(dataset, split):
    coco = load(dataset, split)
    expected = 12 if split == 'train' else 4
    assert len(coco['images']) == expected
    assert [c['name'] for c in coco['categories']] == [
        'circle', 'square', 'triangle']
    assert [c['id'] for c in coco['categories']] == [1, 2, 3]
    image_ids = [img['id'] for img in coco['images']]
    ann_ids = [ann['id'] for ann in coco['annotations']]
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(ann_ids)) == len(ann_ids)
    assert {ann['image_id'] for ann in coco['annotations']} <= set(image_ids)
    for img in coco['images']:
        path = osp.join(dataset, split, img['file_name'])
        with Image.open(path) as im:
            assert im.size == (img['width'], img['height']) == (SIZE, SIZE)
            assert im.mode == 'RGB'
    # pycocotools indexes it without complaint
    api = COCO(osp.join(dataset, 'annotations', f'instances_{split}.json'))
    assert len(api.getAnnIds()) == len(ann_ids) > len(image_ids)


def test_annotations_are_valid(dataset):
    coco = load(dataset, 'train')
    for ann in coco['annotations']:
        assert ann['iscrowd'] == 0
        assert ann['category_id'] in (1, 2, 3)
        assert len(ann['segmentation']) == 1
        poly = ann['segmentation'][0]
        assert len(poly) % 2 == 0 and len(poly) >= 6
        xy = np.asarray(poly).reshape(-1, 2)
        assert (xy >= 0).all() and (xy <= SIZE).all()
        assert ann['area'] > 0
        assert ann['area'] == pytest.approx(shoelace(poly), abs=1e-2)
        x, y, w, h = ann['bbox']
        assert w > 0 and h > 0
        assert [x, y, x + w, y + h] == pytest.approx(
            [xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()],
            abs=2e-3)
        pixels = decode(ann, SIZE, SIZE).sum()
        # the outline runs 1/8 px inside the pixel boundary of the region
        assert 0.85 * pixels <= ann['area'] <= pixels


def test_visible_parts_are_disjoint_and_occlusion_occurs(dataset):
    coco = load(dataset, 'train')
    by_image: Dict[int, List[Dict]] = {}
    for ann in coco['annotations']:
        by_image.setdefault(ann['image_id'], []).append(ann)
    touching = 0
    for anns in by_image.values():
        masks = [decode(ann, SIZE, SIZE) for ann in anns]
        for a, b in combinations(range(len(anns)), 2):
            assert not (masks[a] & masks[b]).any()
            # boxes of an occluder and an occluded shape intersect
            ax, ay, aw, ah = anns[a]['bbox']
            bx, by, bw, bh = anns[b]['bbox']
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                touching += 1
    assert touching > 0, 'no overlapping shapes in 12 images'


def test_colour_is_not_tied_to_class(dataset):
    coco = load(dataset, 'train')
    colours: Dict[int, List[np.ndarray]] = {}
    images = {img['id']: img for img in coco['images']}
    for ann in coco['annotations']:
        with Image.open(osp.join(dataset, 'train',
                                 images[ann['image_id']]['file_name'])) as im:
            pixels = np.asarray(im, float)[decode(ann, SIZE, SIZE)]
        colours.setdefault(ann['category_id'], []).append(pixels.mean(axis=0))
    for category, values in colours.items():
        if len(values) >= 3:
            assert np.std(np.stack(values), axis=0).max() > 30, category


def test_deterministic_and_prefix_stable(dataset, tmp_path):
    again = tmp_path / 'again'
    result = generate(again, '--train', '12', '--val', '4', '--size',
                      str(SIZE), '--seed', '3', '--max-objects', '6')
    assert result.returncode == 0, result.stderr
    for rel in ['annotations/instances_train.json',
                'annotations/instances_val.json', 'train/000000.png',
                'train/000011.png', 'val/000003.png']:
        assert filecmp.cmp(osp.join(dataset, rel), osp.join(again, rel),
                           shallow=False), rel
    # fewer images: the same first images
    fewer = tmp_path / 'fewer'
    assert generate(fewer, '--train', '3', '--val', '1', '--size', str(SIZE),
                    '--seed', '3', '--max-objects', '6').returncode == 0
    assert filecmp.cmp(osp.join(dataset, 'train/000002.png'),
                       osp.join(fewer, 'train/000002.png'), shallow=False)
    assert load(fewer, 'train')['annotations'] == [
        ann for ann in load(dataset, 'train')['annotations']
        if ann['image_id'] <= 3]
    # another seed: other images
    other = tmp_path / 'other'
    assert generate(other, '--train', '1', '--val', '0', '--size', str(SIZE),
                    '--seed', '4', '--max-objects', '6').returncode == 0
    assert not filecmp.cmp(osp.join(dataset, 'train/000000.png'),
                           osp.join(other, 'train/000000.png'), shallow=False)


def test_more_classes(tmp_path):
    result = generate(tmp_path, '--train', '4', '--val', '0', '--size', '64',
                      '--classes', 'hexagon,star,cross,circle')
    assert result.returncode == 0, result.stderr
    coco = load(tmp_path, 'train')
    assert [c['name'] for c in coco['categories']] == [
        'hexagon', 'star', 'cross', 'circle']
    assert {ann['category_id'] for ann in coco['annotations']} <= {1, 2, 3, 4}


@pytest.mark.parametrize('args, message', [
    (['--classes', 'circle,blob'], '--classes'),
    (['--classes', 'circle,circle'], '--classes'),
    (['--size', '16'], '--size'),
    (['--min-objects', '3', '--max-objects', '2'], '--min-objects'),
    (['--min-radius', '0.3', '--max-radius', '0.2'], '--min-radius'),
])
def test_bad_arguments(tmp_path, args, message):
    result = generate(tmp_path / 'bad', *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / 'bad').exists()
