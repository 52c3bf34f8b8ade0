"""CE norm layers, registered in the root MMEngine ``MODELS`` registry so that
``mmcv.cnn.build_norm_layer(dict(type='CE'), C)`` finds them in every scope.

* :class:`CEBlock`: the CE block, its math stated once (``block.py``);
* :class:`CELayer`: the forward skeleton of every CE layer (``ce_layer.py``);
* :class:`CE` / :class:`SyncCE`: BN + CE (the released layer), fused;
* :class:`GroupNormCE` / :class:`SyncGroupNormCE`: GN, IN or LN + CE;
* :func:`build_ce_layer`: the CE layer over the normalizer a ``norm_cfg``
  names (what CEResNet uses).
"""
from mmengine.registry import MODELS

from .builder import (CE_NORM_TYPES, CE_TYPES, build_ce_layer, check_ce_cfg,
                      is_ce_layer)
from .block import (CE_VARIANTS, RELEASED_CE_KEYS, AdaptiveInstanceInverse,
                    BlockStatistics, CEBlock, PerSampleAffine)
from .ce import CE
from .ce_layer import CELayer
from .group_norm_ce import PER_SAMPLE_NORMS, GroupNormCE
from .sync_ce import SyncCE, SyncGroupNormCE, sync_form

MODELS.register_module('CE', module=CE)
MODELS.register_module('SyncCE', module=SyncCE)
MODELS.register_module('GroupNormCE', module=GroupNormCE)
MODELS.register_module('SyncGroupNormCE', module=SyncGroupNormCE)

__all__ = ['CE', 'SyncCE', 'GroupNormCE', 'SyncGroupNormCE', 'CELayer',
           'CEBlock', 'BlockStatistics', 'PerSampleAffine',
           'AdaptiveInstanceInverse', 'RELEASED_CE_KEYS',
           'CE_VARIANTS', 'CE_TYPES', 'CE_NORM_TYPES', 'PER_SAMPLE_NORMS',
           'build_ce_layer', 'check_ce_cfg', 'is_ce_layer', 'sync_form']
