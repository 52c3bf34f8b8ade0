"""CE norm layers, registered in the root MMEngine ``MODELS`` registry so that
``mmcv.cnn.build_norm_layer(dict(type='CE'), C)`` finds them in every scope."""
from mmengine.registry import MODELS

from .ce import CE, CEBlock, AdaptiveInstanceInverse, RELEASED_CE_KEYS
from .sync_ce import SyncCE

MODELS.register_module('CE', module=CE)
MODELS.register_module('SyncCE', module=SyncCE)

__all__ = ['CE', 'SyncCE', 'CEBlock', 'AdaptiveInstanceInverse',
           'RELEASED_CE_KEYS']
