"""check_evaluator_covers_dataset: a test set that is part of the evaluator's
annotation file is refused.

The premise is checked first on MMDetection's own CocoMetric: exact
predictions on 2 of 3 annotated images give box AP < 1 against the whole file
and 1 against a file of those 2 images, so running a subset against the
whole file silently undercounts AP.
"""
import json

import pytest
import torch
from mmdet.evaluation import CocoMetric

from mmengine.runner import BaseLoop

from cenet_mmdet.engine import (EvaluationSubsetCheckHook,
                                EvaluationSubsetError,
                                check_evaluator_covers_dataset)

BOX = [10, 10, 20, 20]  # x, y, w, h


def write_ann(path, image_ids):
    images = [dict(id=i, width=64, height=64, file_name=f'{i}.png')
              for i in image_ids]
    annotations = [dict(id=i, image_id=i, category_id=1, bbox=BOX, area=400,
                        iscrowd=0) for i in image_ids]
    path.write_text(json.dumps(dict(images=images, annotations=annotations,
                                    categories=[dict(id=1, name='a')])))
    return str(path)


class ListDataset:
    """The part of a BaseDataset the check uses."""

    def __init__(self, image_ids):
        self.image_ids = list(image_ids)

    def __len__(self):
        return len(self.image_ids)

    def get_data_info(self, index):
        return dict(img_id=self.image_ids[index])


def box_ap(ann_file, run_ids):
    """CocoMetric's box AP with an exact prediction on each image run."""
    metric = CocoMetric(ann_file=ann_file, metric='bbox')
    metric.dataset_meta = dict(classes=('a', ))
    x, y, w, h = BOX
    for img_id in run_ids:
        prediction = dict(img_id=img_id, ori_shape=(64, 64), pred_instances=dict(
            bboxes=torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
            scores=torch.tensor([0.9]), labels=torch.tensor([0])))
        metric.process({}, [prediction])
    return metric.evaluate(len(run_ids))['coco/bbox_mAP']


def test_premise_coco_metric_counts_images_not_run(tmp_path):
    whole = write_ann(tmp_path / 'whole.json', [1, 2, 3])
    part = write_ann(tmp_path / 'part.json', [1, 2])
    assert box_ap(whole, [1, 2, 3]) == pytest.approx(1.0)
    assert box_ap(part, [1, 2]) == pytest.approx(1.0)
    assert box_ap(whole, [1, 2]) < 0.7  # the third image's box is a miss


def test_subset_is_refused_with_one_line(tmp_path):
    metric = CocoMetric(ann_file=write_ann(tmp_path / 'a.json', [1, 2, 3]))
    with pytest.raises(EvaluationSubsetError) as info:
        check_evaluator_covers_dataset(ListDataset([3, 1]), metric)
    message = str(info.value)
    assert '\n' not in message
    assert message.startswith('test_dataloader.dataset holds 2 of the 3 '
                              'images of test_evaluator.ann_file: ')
    assert 'count the other 1 as images with no detections' in message


def test_covering_sets_pass(tmp_path):
    metric = CocoMetric(ann_file=write_ann(tmp_path / 'a.json', [1, 2, 3]))
    # every image, in any order, repeated, or with images the file lacks
    for ids in ([1, 2, 3], [3, 2, 1, 1], [1, 2, 3, 4]):
        check_evaluator_covers_dataset(ListDataset(ids), metric)


def test_evaluator_holding_several_metrics(tmp_path):
    """Every COCO metric of an Evaluator is checked; others are skipped."""
    class Evaluator:
        metrics = [CocoMetric(),  # no ann_file
                   CocoMetric(ann_file=write_ann(tmp_path / 'a.json', [1])),
                   CocoMetric(ann_file=write_ann(tmp_path / 'b.json', [1, 2]))]
    with pytest.raises(EvaluationSubsetError, match='holds 1 of the 2 images'):
        check_evaluator_covers_dataset(ListDataset([1]), Evaluator())
    with pytest.raises(EvaluationSubsetError,
                       match='^val_dataloader.dataset .* val_evaluator'):
        check_evaluator_covers_dataset(ListDataset([1]), Evaluator(),
                                       loop='val')


def test_nothing_to_check(tmp_path):
    """No ann_file (the metric converts the dataset itself), or a dataset
    that gives no image ids: nothing is refused."""
    check_evaluator_covers_dataset(ListDataset([1]), CocoMetric())

    class NoIds(ListDataset):
        def get_data_info(self, index):
            return dict(img_path='x.png')
    metric = CocoMetric(ann_file=write_ann(tmp_path / 'a.json', [1, 2]))
    check_evaluator_covers_dataset(NoIds([1]), metric)
    check_evaluator_covers_dataset([1], metric)  # no get_data_info


class FakeValLoop(BaseLoop):
    def __init__(self, dataset, evaluator):
        self.dataloader = type('Loader', (), dict(dataset=dataset))()
        self.evaluator = evaluator

    def run(self):
        pass


def test_hook_checks_a_built_val_loop_only(tmp_path):
    metric = CocoMetric(ann_file=write_ann(tmp_path / 'a.json', [1, 2, 3]))
    hook = EvaluationSubsetCheckHook()
    runner = type('Runner', (), {})()
    runner._val_loop = FakeValLoop(ListDataset([1, 2]), metric)
    with pytest.raises(EvaluationSubsetError,
                       match=r'^val_dataloader.dataset holds 2 of the 3 '
                             r'images of val_evaluator.ann_file'):
        hook.before_run(runner)
    runner._val_loop = FakeValLoop(ListDataset([1, 2, 3]), metric)
    hook.before_run(runner)
    runner._val_loop = dict(type='ValLoop')  # not built: not built here
    hook.before_run(runner)
    runner._val_loop = None  # no validation
    hook.before_run(runner)
