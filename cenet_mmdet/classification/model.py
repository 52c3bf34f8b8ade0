"""A minimal image classifier: backbone -> neck (global average pooling) ->
linear head -> cross-entropy. Config fields as in MMPretrain
(``ImageClassifier``, ``LinearClsHead``, ``ClsDataPreprocessor``), so that
``model.backbone`` moves unchanged between this path and an MMPretrain config.

The neck is MMDetection's ``GlobalAveragePooling`` and the loss MMDetection's
``CrossEntropyLoss`` (both already registered in its ``MODELS``).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel, BaseModule, ImgDataPreprocessor
from mmdet.registry import MODELS
from torch import Tensor, nn

from .structures import ClsDataSample

Features = Union[Tensor, Tuple[Tensor, ...]]


@MODELS.register_module()
class ClsDataPreprocessor(ImgDataPreprocessor):
    """Stack, convert to float and normalize images (MMPretrain's fields).

    Args:
        num_classes: number of classes (recorded; batch augmentations of
            MMPretrain are not provided). Default: None.
        mean: per-channel mean subtracted, in the channel order after
            ``to_rgb``. Default: None (no normalization).
        std: per-channel standard deviation. Default: None.
        pad_size_divisor: pad height and width to a multiple. Default: 1.
        pad_value: padding value. Default: 0.
        to_rgb: swap BGR (as loaded by OpenCV) to RGB. Default: False.
        non_blocking: non-blocking host-to-device copy. Default: False.
    """

    def __init__(self,
                 num_classes: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None,
                 pad_size_divisor: int = 1,
                 pad_value: float = 0,
                 to_rgb: bool = False,
                 non_blocking: bool = False) -> None:
        super().__init__(mean=mean, std=std, pad_size_divisor=pad_size_divisor,
                         pad_value=pad_value, bgr_to_rgb=to_rgb,
                         non_blocking=non_blocking)
        self.num_classes = num_classes


@MODELS.register_module()
class LinearClsHead(BaseModule):
    """A fully connected layer on the last feature map's pooled vector.

    Args:
        num_classes: K, the number of classes.
        in_channels: C, the width of the pooled feature (2048 for ResNet-50).
        loss: the loss config. Default:
            ``dict(type='CrossEntropyLoss', loss_weight=1.0)``.
        topk: kept for MMPretrain configs (accuracy is the evaluator's
            ``Accuracy``). Default: (1,).
        init_cfg: Default: ``dict(type='Normal', layer='Linear', std=0.01)``.

    Shape:
        features: a tuple whose last entry is ``(N, C)``; output ``(N, K)``.
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 loss: dict = dict(type='CrossEntropyLoss', loss_weight=1.0),
                 topk: Union[int, Tuple[int, ...]] = (1, ),
                 init_cfg: Optional[dict] = dict(
                     type='Normal', layer='Linear', std=0.01)) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.topk = (topk, ) if isinstance(topk, int) else tuple(topk)
        self.loss_module = MODELS.build(loss) if isinstance(loss, dict) else loss
        self.fc = nn.Linear(in_channels, num_classes)

    def pre_logits(self, feats: Features) -> Tensor:
        """The last feature ``(N, C)``."""
        return feats[-1] if isinstance(feats, (tuple, list)) else feats

    def forward(self, feats: Features) -> Tensor:
        """Logits ``(N, K)``."""
        return self.fc(self.pre_logits(feats))

    def loss(self, feats: Features,
             data_samples: List[ClsDataSample]) -> Dict[str, Tensor]:
        """``dict(loss=...)``, the loss of the logits against ``gt_label``."""
        logits = self(feats)
        target = torch.cat([s.gt_label for s in data_samples]).to(logits.device)
        return dict(loss=self.loss_module(logits, target))

    def predict(self, feats: Features,
                data_samples: Optional[List[Optional[ClsDataSample]]] = None
                ) -> List[ClsDataSample]:
        """Data samples with ``pred_score`` (softmax) and ``pred_label``."""
        scores = F.softmax(self(feats), dim=1).detach()
        if data_samples is None:
            data_samples = [None] * scores.size(0)
        out = []
        for score, sample in zip(scores, data_samples):
            sample = ClsDataSample() if sample is None else sample
            out.append(sample.set_pred_score(score))
        return out


@MODELS.register_module()
class ImageClassifier(BaseModel):
    """``backbone -> neck -> head``, with MMPretrain's ``ImageClassifier`` fields.

    ``forward(inputs, data_samples, mode)``: ``'tensor'`` gives the logits
    ``(N, K)`` of images ``(N, 3, H, W)``, ``'loss'`` a loss dict,
    ``'predict'`` data samples with ``pred_score`` / ``pred_label``.

    Args:
        backbone: backbone config, e.g. ``dict(type='CEResNet', depth=50,
            out_indices=(3,))``.
        neck: e.g. ``dict(type='GlobalAveragePooling')``. Default: None.
        head: e.g. ``dict(type='LinearClsHead', num_classes=1000,
            in_channels=2048)``.
        pretrained: checkpoint of the whole classifier (an ``init_cfg`` of
            type 'Pretrained'). Default: None.
        train_cfg: unused (MMPretrain's batch augmentations). Default: None.
        data_preprocessor: Default: ``dict(type='ClsDataPreprocessor')``.
        init_cfg: Default: None.
    """

    def __init__(self,
                 backbone: dict,
                 neck: Optional[dict] = None,
                 head: Optional[dict] = None,
                 pretrained: Optional[str] = None,
                 train_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[Union[dict, nn.Module]] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if pretrained is not None:
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        if head is None:
            raise ValueError('ImageClassifier needs a head config')
        if data_preprocessor is None:
            data_preprocessor = dict(type='ClsDataPreprocessor')
        if isinstance(data_preprocessor, dict):
            data_preprocessor = dict(data_preprocessor)
            data_preprocessor.setdefault('type', 'ClsDataPreprocessor')
            # built here, from MMDetection's registry: BaseModel would use the
            # root registry, which lacks ClsDataPreprocessor without a scope
            data_preprocessor = MODELS.build(data_preprocessor)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        self.neck = MODELS.build(neck) if neck is not None else None
        self.head = MODELS.build(head)

    def extract_feat(self, inputs: Tensor) -> Features:
        """Backbone (and neck) features of images ``(N, 3, H, W)``."""
        feats = self.backbone(inputs)
        if self.neck is not None:
            feats = self.neck(feats)
        return feats

    def forward(self, inputs: Tensor,
                data_samples: Optional[List[ClsDataSample]] = None,
                mode: str = 'tensor'):
        if mode == 'tensor':
            return self.head(self.extract_feat(inputs))
        if mode == 'loss':
            return self.head.loss(self.extract_feat(inputs), data_samples)
        if mode == 'predict':
            return self.head.predict(self.extract_feat(inputs), data_samples)
        raise RuntimeError(f'invalid mode {mode!r}: expected "tensor", "loss" '
                           f'or "predict"')
