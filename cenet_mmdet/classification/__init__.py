"""ImageNet classification with MMEngine and MMDetection's registries only.

Registered in MMDetection's registries (``default_scope='mmdet'``, as used by
``tools/train.py`` / ``tools/test.py``), with MMPretrain's type and field
names: ``ImageClassifier``, ``LinearClsHead``, ``ClsDataPreprocessor``
(``MODELS``), ``ImageNet`` (``DATASETS``), ``RandomResizedCrop``,
``ResizeEdge``, ``PackInputs`` (``TRANSFORMS``), ``Accuracy``
(``METRICS``). Checkpoint helpers: :mod:`.checkpoints`.
"""
from .dataset import IMG_EXTENSIONS, ImageNet
from .metric import Accuracy, topk_accuracy
from .model import ClsDataPreprocessor, ImageClassifier, LinearClsHead
from .structures import ClsDataSample
from .transforms import PackInputs, RandomResizedCrop, ResizeEdge

__all__ = [
    'IMG_EXTENSIONS', 'ImageNet', 'Accuracy', 'topk_accuracy',
    'ClsDataPreprocessor', 'ImageClassifier', 'LinearClsHead', 'ClsDataSample',
    'PackInputs', 'RandomResizedCrop', 'ResizeEdge'
]
