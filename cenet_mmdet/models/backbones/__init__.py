"""Backbones, registered in MMDetection's ``MODELS`` (mmdet scope).

* :class:`CEResNet`: CE-ResNet-18/34/50/101/152 (the released placement);
* :class:`CEResNeXt`, :class:`CERegNet`, :class:`CEMobileNetV2`: named
  instances of the general route :class:`CEPlacement`;
* ``CEBackbone``: CE at chosen normalizers of any MMDetection backbone.
"""
from .ce_placement import (RESNET_POSITIONS, CEMobileNetV2, CEPlacement,
                           CERegNet, CEResNeXt, build_ce_backbone,
                           normalizer_cfg, place_ce)
from .ce_resnet import CEBottleneck, CEResNet
from .ce_weights import CEWeightsError, CEWeightsMixin

__all__ = ['CEBottleneck', 'CEResNet', 'CEWeightsError', 'CEWeightsMixin',
           'CEPlacement', 'CEResNeXt', 'CERegNet', 'CEMobileNetV2',
           'build_ce_backbone', 'normalizer_cfg', 'place_ce',
           'RESNET_POSITIONS']
