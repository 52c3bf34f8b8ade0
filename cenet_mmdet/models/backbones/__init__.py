"""Backbones, registered in MMDetection's ``MODELS`` (mmdet scope)."""
from .ce_resnet import CEBottleneck, CEResNet, CEWeightsError

__all__ = ['CEBottleneck', 'CEResNet', 'CEWeightsError']
