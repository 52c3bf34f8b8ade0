"""A test set that covers only part of the evaluator's annotation file stops
the run.

MMDetection's ``CocoMetric`` evaluates every image of its ``ann_file``
(``COCOeval.params.imgIds`` is the file's image ids, not the ids of the
images the loop ran). An image that the test loop did not run, because the
dataset is a subset of the file (``test_dataloader.dataset.indices=N``, a
filter, another ``ann_file`` for the dataset), counts as an image with no
detection: every one of its objects is a miss and AP drops with no message.
For example, BN box AP 5.8 on 300 images read 2.1 when 100 of them were run.
:func:`check_evaluator_covers_dataset` refuses that case: ``tools/test.py``
and ``tools/analysis_tools/channel_ablation.py`` call it on the test loop,
and :class:`EvaluationSubsetCheckHook` (added by ``tools/train.py``) on the
validation loop before training starts.
"""
from typing import List, Optional, Set

from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop

__all__ = ['EvaluationSubsetCheckHook', 'EvaluationSubsetError',
           'check_evaluator_covers_dataset', 'dataset_image_ids']


class EvaluationSubsetError(ValueError):
    """The test set holds only some of the evaluator's annotated images."""


def dataset_image_ids(dataset) -> Optional[Set]:
    """The ``img_id`` of every sample of ``dataset``; None if the dataset
    does not give them (no ``get_data_info`` or no ``img_id``)."""
    if not hasattr(dataset, 'get_data_info'):
        return None
    ids = set()
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        if not isinstance(info, dict) or 'img_id' not in info:
            return None
        ids.add(info['img_id'])
    return ids


def _coco_metrics(evaluator) -> List:
    """The metrics of ``evaluator`` that evaluate against a loaded COCO
    annotation file (``CocoMetric`` and its subclasses)."""
    # (a CocoMetric's own ``metrics`` attribute holds names: 'bbox', 'segm')
    metrics = [evaluator] if isinstance(evaluator, BaseMetric) else getattr(
        evaluator, 'metrics', [])
    return [m for m in metrics if getattr(m, '_coco_api', None) is not None]


def check_evaluator_covers_dataset(dataset, evaluator,
                                   loop: str = 'test') -> None:
    """Raise :class:`EvaluationSubsetError` if a COCO metric of ``evaluator``
    would evaluate images that ``dataset`` does not hold.

    Args:
        dataset: the loop's dataset (``runner.test_loop.dataloader.dataset``).
        evaluator: the loop's ``Evaluator`` (or one metric).
        loop: ``'test'`` or ``'val'``: the config keys the message names
            (``{loop}_dataloader``, ``{loop}_evaluator``).
    """
    metrics = _coco_metrics(evaluator)
    if not metrics:
        return
    ran = dataset_image_ids(dataset)
    if ran is None:
        return
    for metric in metrics:
        annotated = set(metric._coco_api.get_img_ids())
        not_run = annotated - ran
        if not_run:
            raise EvaluationSubsetError(
                f'{loop}_dataloader.dataset holds {len(annotated & ran)} of '
                f'the {len(annotated)} images of {loop}_evaluator.ann_file: '
                f'COCO AP would count the other {len(not_run)} as images '
                f'with no detections. Set {loop}_evaluator.ann_file to an '
                f'annotation file of exactly the images run, or run every '
                f'image')


@HOOKS.register_module()
class EvaluationSubsetCheckHook(Hook):
    """Before training, :func:`check_evaluator_covers_dataset` on the
    validation loop: a validation set that is part of the evaluator's
    annotation file stops the run before its first iteration."""

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        # Runner.train builds the validation loop before this hook; a loop
        # still held as a config (runner.test(), or no training) is not
        # built here, so that checking consumes no random numbers
        loop = getattr(runner, '_val_loop', None)
        if isinstance(loop, BaseLoop) and hasattr(loop, 'dataloader') and \
                hasattr(loop, 'evaluator'):
            check_evaluator_covers_dataset(loop.dataloader.dataset,
                                           loop.evaluator, loop='val')
