"""The ImageNet data path: dataset lists against the generated files, the
error messages, the transforms (RandomResizedCrop bounds and determinism,
ResizeEdge, PackInputs) and the top-k metric against hand computations."""
import math
import re
import os
import os.path as osp

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')
import cenet_mmdet  # noqa: E402,F401
from mmdet.registry import DATASETS, METRICS, TRANSFORMS  # noqa: E402

from cenet_mmdet.classification import (Accuracy, ClsDataSample,  # noqa: E402
                                        ImageNet, PackInputs,
                                        RandomResizedCrop, ResizeEdge,
                                        topk_accuracy)
from cenet_mmdet.testing.imagenet_folder import (make_imagenet_folder,  # noqa: E402
                                                 wnid)

NUM_CLASSES = 3


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('imagenet'))
    lists = make_imagenet_folder(root, num_classes=NUM_CLASSES,
                                 train_per_class=3, val_per_class=2, size=32)
    return root, lists


def items(dataset):
    return [(dataset.get_data_info(i)['img_path'],
             dataset.get_data_info(i)['gt_label']) for i in range(len(dataset))]


# ---- dataset ----------------------------------------------------------------
def test_split_with_meta_lists_the_generated_files(data_root):
    root, lists = data_root
    for split in ('train', 'val'):
        dataset = DATASETS.build(dict(type='ImageNet', data_root=root,
                                      split=split))
        assert dataset.ann_file == osp.join(root, 'meta', f'{split}.txt')
        expected = [(osp.join(root, split, rel), label)
                    for rel, label in lists[split]]
        assert items(dataset) == expected
    # train: class names are the sorted sub-folders; flat val: label indices
    train = ImageNet(data_root=root, split='train')
    assert train.metainfo['classes'] == tuple(wnid(k) for k in range(NUM_CLASSES))
    val = ImageNet(data_root=root, split='val')
    assert val.metainfo['classes'] == ('0', '1', '2')


def test_class_folders_without_list(data_root, tmp_path):
    root, lists = data_root
    os.rename(osp.join(root, 'meta'), str(tmp_path / 'meta_away'))
    try:
        dataset = ImageNet(data_root=root, split='train')
    finally:
        os.rename(str(tmp_path / 'meta_away'), osp.join(root, 'meta'))
    assert dataset.ann_file == ''
    # independent: walk the files on disk
    expected = []
    for label, name in enumerate(sorted(os.listdir(osp.join(root, 'train')))):
        for f in sorted(os.listdir(osp.join(root, 'train', name))):
            expected.append((osp.join(root, 'train', name, f), label))
    assert items(dataset) == expected
    assert sorted(expected) == sorted((osp.join(root, 'train', rel), label)
                                      for rel, label in lists['train'])
    # explicit data_prefix, no split, classes given
    same = ImageNet(data_root=root, data_prefix='train',
                    classes=[wnid(k) for k in range(NUM_CLASSES)])
    assert items(same) == expected


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape('image folder not found: '
                                 + str(tmp_path / 'nowhere' / 'train'))):
        ImageNet(data_root=str(tmp_path / 'nowhere'), split='train')


def _write_list(root, name, lines):
    path = osp.join(root, 'meta', name)
    with open(path, 'w') as f:
        f.write(''.join(line + '\n' for line in lines))
    return path


def test_list_line_naming_a_missing_file(data_root):
    root, lists = data_root
    lines = [f'{rel} {label}' for rel, label in lists['train']]
    lines.insert(2, f'{wnid(0)}/not_there.png 0')
    path = _write_list(root, 'broken.txt', lines)
    with pytest.raises(FileNotFoundError) as err:
        ImageNet(data_root=root, data_prefix='train', ann_file='meta/broken.txt')
    message = str(err.value)
    assert path in message and 'line 3' in message
    assert osp.join(root, 'train', wnid(0), 'not_there.png') in message


@pytest.mark.parametrize('line,expected', [
    ('{rel} 7', 'invalid label 7 (there are 3 classes: labels 0..2)'),
    ('{rel} -1', 'invalid label -1'),
    ('{rel} cat', "label 'cat' is not an integer"),
    ('{rel}', 'expected "<image path> <label>"'),
])
def test_list_line_with_a_bad_label(data_root, line, expected):
    root, lists = data_root
    rel = lists['train'][0][0]
    lines = [f'{r} {label}' for r, label in lists['train'][1:]]
    lines.append(line.format(rel=rel))
    path = _write_list(root, 'bad_label.txt', lines)
    with pytest.raises(ValueError) as err:
        ImageNet(data_root=root, data_prefix='train', ann_file='meta/bad_label.txt')
    assert f'{path}, line {len(lines)}' in str(err.value)
    assert expected in str(err.value)


def test_missing_list_file(data_root):
    root, _ = data_root
    with pytest.raises(FileNotFoundError,
                       match='annotation list not found: .*meta/none.txt'):
        ImageNet(data_root=root, data_prefix='train', ann_file='meta/none.txt')


def test_no_class_folders_and_empty_class_folder(tmp_path):
    flat = tmp_path / 'flat' / 'train'
    flat.mkdir(parents=True)
    (flat / 'a.png').write_bytes(b'')
    with pytest.raises(ValueError, match=re.escape(f'no class sub-folders in {flat}')):
        ImageNet(data_root=str(tmp_path / 'flat'), split='train')
    root = tmp_path / 'empty'
    make_imagenet_folder(str(root), num_classes=2, train_per_class=1,
                         val_per_class=1, size=16, with_meta=False)
    (root / 'train' / 'n00000002').mkdir()
    (root / 'train' / 'n00000002' / 'notes.txt').write_text('no image')
    with pytest.raises(ValueError, match='1 class folders hold no images .*'
                       + re.escape(str(root / 'train' / 'n00000002'))):
        ImageNet(data_root=str(root), split='train')


def test_pipeline_output(data_root):
    root, lists = data_root
    dataset = DATASETS.build(dict(
        type='ImageNet', data_root=root, split='val', pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='ResizeEdge', scale=36, edge='short'),
            dict(type='CenterCrop', crop_size=32),
            dict(type='PackInputs')]))
    item = dataset[1]
    assert item['inputs'].shape == (3, 32, 32)
    assert item['inputs'].dtype == torch.uint8
    assert isinstance(item['data_samples'], ClsDataSample)
    assert item['data_samples'].gt_label.tolist() == [lists['val'][1][1]]
    assert item['data_samples'].img_path == osp.join(root, 'val', lists['val'][1][0])


# ---- transforms -------------------------------------------------------------
def test_random_resized_crop_bounds_and_size():
    transform = TRANSFORMS.build(dict(type='RandomResizedCrop', scale=24))
    assert isinstance(transform, RandomResizedCrop)
    img = np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)
    np.random.seed(0)
    fallback = 0
    for _ in range(300):
        top, left, h, w = transform.rand_crop_params(img)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
        fraction = h * w / (90 * 120)
        # rounding of h and w moves area and ratio by at most ~1 px each
        assert 0.08 * 0.9 <= fraction <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        fallback += (h, w) == (90, 120)
    assert fallback < 300  # not always the fallback
    out = transform(dict(img=img.copy()))
    assert out['img'].shape == (24, 24, 3)
    assert out['img_shape'] == (24, 24)
    # (h, w) scale, as MMPretrain
    out = RandomResizedCrop(scale=(20, 30))(dict(img=img.copy()))
    assert out['img'].shape == (20, 30, 3)


def test_random_resized_crop_content_is_the_crop():
    """The output is the resized crop named by crop_bbox (independent
    recomputation with cv2)."""
    import cv2
    img = np.random.default_rng(1).integers(0, 255, (50, 70, 3), np.uint8)
    np.random.seed(3)
    out = RandomResizedCrop(scale=16)(dict(img=img.copy()))
    x1, y1, x2, y2 = out['crop_bbox']
    expected = cv2.resize(img[y1:y2 + 1, x1:x2 + 1], (16, 16),
                          interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out['img'], expected)


def test_random_resized_crop_deterministic_under_seed():
    img = np.random.default_rng(2).integers(0, 255, (64, 80, 3), np.uint8)
    transform = RandomResizedCrop(scale=16)

    def draws(seed):
        np.random.seed(seed)
        return [transform(dict(img=img.copy()))['crop_bbox'].tolist()
                for _ in range(5)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_random_resized_crop_fallback_is_centred_and_clamped():
    img = np.zeros((10, 100, 3), np.uint8)  # ratio 10 > 4/3
    transform = RandomResizedCrop(scale=8, crop_ratio_range=(0.9, 1.0),
                                  max_attempts=0)
    top, left, h, w = transform.rand_crop_params(img)
    assert (h, w) == (10, round(10 * 4 / 3))
    assert left == (100 - w) // 2 and top == 0
    with pytest.raises(ValueError, match='crop_ratio_range'):
        RandomResizedCrop(scale=8, crop_ratio_range=(0.5, 1.5))


def test_resize_edge():
    img = np.zeros((30, 60, 3), np.uint8)
    out = ResizeEdge(scale=12)(dict(img=img))
    assert out['img'].shape == (12, 24, 3)  # short edge (height) -> 12
    out = ResizeEdge(scale=12, edge='long')(dict(img=np.zeros((30, 60, 3), np.uint8)))
    assert out['img'].shape == (6, 12, 3)
    out = ResizeEdge(scale=256)(dict(img=np.zeros((375, 500, 3), np.uint8)))
    assert out['img'].shape[:2] == (256, int(256 * 500 / 375))


def test_pack_inputs_layout():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = PackInputs()(dict(img=img, gt_label=2, img_path='x.png'))
    assert torch.equal(out['inputs'], torch.from_numpy(img).permute(2, 0, 1))
    assert out['data_samples'].gt_label.tolist() == [2]
    assert out['data_samples'].img_path == 'x.png'


# ---- metric -----------------------------------------------------------------
def test_topk_accuracy_against_hand_computation():
    scores = torch.tensor([
        [0.10, 0.50, 0.20, 0.15, 0.05, 0.00],   # label 1: top1 hit
        [0.40, 0.30, 0.20, 0.06, 0.03, 0.01],   # label 2: rank 3
        [0.01, 0.02, 0.03, 0.04, 0.05, 0.85],   # label 0: rank 6 (miss top5)
        [0.30, 0.25, 0.20, 0.15, 0.09, 0.01],   # label 4: rank 5
    ])
    labels = torch.tensor([1, 2, 0, 4])
    # by hand: top1 1/4, top2 1/4, top3 2/4, top5 3/4
    assert topk_accuracy(scores, labels, (1, 2, 3, 5)) == pytest.approx(
        [25.0, 25.0, 50.0, 75.0])
    metric = METRICS.build(dict(type='Accuracy', topk=(1, 5)))
    assert isinstance(metric, Accuracy)
    samples = [ClsDataSample().set_pred_score(s).set_gt_label(int(label))
               for s, label in zip(scores, labels)]
    metric.process({}, [s.to_dict() for s in samples[:3]])
    metric.process({}, [s.to_dict() for s in samples[3:]])
    result = metric.evaluate(4)
    assert result == pytest.approx({'accuracy/top1': 25.0, 'accuracy/top5': 75.0})
    assert math.isclose(samples[2].pred_label.item(), 5)


def test_generator_cli_is_deterministic(tmp_path):
    """tools/misc/make_synthetic_imagenet.py: the layout of docs/imagenet.md, and the
    same arguments give byte-identical files."""
    import subprocess
    import sys
    script = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                      'tools', 'misc', 'make_synthetic_imagenet.py')
    trees = []
    for name in ('a', 'b'):
        root = tmp_path / name
        subprocess.run([sys.executable, script, str(root), '--classes', '3',
                        '--train', '2', '--val', '1', '--size', '24'],
                       check=True, capture_output=True, timeout=120)
        files = {}
        for dirpath, _, filenames in os.walk(root):
            for f in filenames:
                path = osp.join(dirpath, f)
                with open(path, 'rb') as handle:
                    files[osp.relpath(path, root)] = handle.read()
        trees.append(files)
    assert trees[0] == trees[1]
    assert sorted(k for k in trees[0] if k.startswith('meta')) == [
        osp.join('meta', 'train.txt'), osp.join('meta', 'val.txt')]
    assert sum(k.startswith('train' + os.sep) for k in trees[0]) == 6
    assert trees[0][osp.join('meta', 'val.txt')].decode().splitlines() == [
        'val_00000.png 0', 'val_00001.png 1', 'val_00002.png 2']
