"""``sync_bn`` in a config, made CE-aware.

MMEngine's ``convert_sync_batchnorm`` rebuilds every ``_BatchNorm`` subclass as
a plain SyncBN and re-attaches its children, which would silently drop the CE
block of a :class:`~cenet_mmdet.models.layers.CE` layer. With the plugin
imported, ``sync_bn='torch'`` (or ``'mmcv'``) converts plain BN layers as
before, converts CE layers to :class:`~cenet_mmdet.models.layers.SyncCE`
(same tensors), and leaves SyncCE layers as they are.
``revert_sync_batchnorm`` needs no change: CE and SyncCE are not
``SyncBatchNorm`` subclasses, so it leaves them intact.
"""
import mmengine.model
import mmengine.model.utils
import mmengine.runner.runner
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.layers import CE, SyncCE

_mmengine_convert = mmengine.model.utils.convert_sync_batchnorm


def convert_sync_batchnorm(module: nn.Module,
                           implementation: str = 'torch') -> nn.Module:
    """MMEngine's converter, except that CE layers become SyncCE."""
    if implementation not in ('torch', 'mmcv'):
        raise ValueError('sync_bn should be "torch" or "mmcv", but got '
                         f'{implementation}')
    if isinstance(module, CE):
        return SyncCE.convert_sync_ce(module)
    if isinstance(module, _BatchNorm):
        return _mmengine_convert(module, implementation)
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, implementation)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def patch_mmengine_sync_bn() -> None:
    """Install :func:`convert_sync_batchnorm` where the MMEngine runner looks."""
    for namespace in (mmengine.model, mmengine.model.utils, mmengine.runner.runner):
        namespace.convert_sync_batchnorm = convert_sync_batchnorm
