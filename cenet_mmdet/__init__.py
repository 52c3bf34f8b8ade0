"""cenet-mmdet: Channel Equilibrium (CE) norm layers and CE-ResNet backbones
for MMDetection. Importing the package registers ``CE``, ``SyncCE`` (root
MMEngine ``MODELS``), ``CEResNet`` (MMDetection ``MODELS``) and the ImageNet
classification path of :mod:`cenet_mmdet.classification` (MMDetection's
registries)."""
from .compat import (allow_mmengine_checkpoints, check_environment,
                     fix_ssd_head_predict)
from .version import __version__

check_environment()
allow_mmengine_checkpoints()

from . import models  # noqa: E402,F401  (registration)
from .engine import patch_mmengine_sync_bn, patch_torch_sync_bn  # noqa: E402

patch_mmengine_sync_bn()
patch_torch_sync_bn()
fix_ssd_head_predict()

__all__ = ['__version__']

# the ImageNet classification path (registration in MMDetection's registries)
from . import classification  # noqa: E402,F401
