"""``sync_bn`` in a config, made CE-aware.

MMEngine's ``convert_sync_batchnorm`` rebuilds every ``_BatchNorm`` subclass as
a plain SyncBN and re-attaches its children, which would silently drop the CE
block of a :class:`~cenet_mmdet.models.layers.CE` layer. With the plugin
imported, ``sync_bn='torch'`` (or ``'mmcv'``) converts plain BN layers as
before, converts CE layers to their synchronized form (same tensors: CE to
:class:`~cenet_mmdet.models.layers.SyncCE`, GN/IN/LN + CE to
:class:`~cenet_mmdet.models.layers.SyncGroupNormCE`, whose CE block has batch
statistics to synchronize), and leaves synchronized layers as they are.
``revert_sync_batchnorm`` needs no change: CE and SyncCE are not
``SyncBatchNorm`` subclasses, so it leaves them intact.

PyTorch's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` (called by plain
training scripts, Lightning's ``sync_batchnorm=True`` and many codebases) has
the same flaw: it rebuilds a CE layer as a ``SyncBatchNorm``, re-attaches the
``ce`` child that nothing calls any more, and the state dict still loads.
:func:`patch_torch_sync_bn` makes it convert CE layers to their synchronized
form as well (GN/IN/LN + CE included, as ``sync_bn`` does).
"""
import mmengine.model
import mmengine.model.utils
import mmengine.runner.runner
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.layers import CELayer, SyncCE

_mmengine_convert = mmengine.model.utils.convert_sync_batchnorm


def convert_sync_batchnorm(module: nn.Module,
                           implementation: str = 'torch') -> nn.Module:
    """MMEngine's converter, except that CE layers become SyncCE."""
    if implementation not in ('torch', 'mmcv'):
        raise ValueError('sync_bn should be "torch" or "mmcv", but got '
                         f'{implementation}')
    if isinstance(module, CELayer):  # synchronized ones are left as they are
        return SyncCE.convert_sync_ce(module)
    if isinstance(module, _BatchNorm):
        return _mmengine_convert(module, implementation)
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, implementation)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _torch_convert_sync_batchnorm(cls, module: nn.Module,
                                  process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm``, except that CE layers
    become SyncCE (same tensors) instead of a SyncBN that drops the CE block."""
    if isinstance(module, CELayer):  # synchronized ones are left as they are
        return SyncCE.convert_sync_ce(module, process_group)
    # torch's body recurses through ``cls.convert_sync_batchnorm``: this one
    return _torch_convert(cls, module, process_group)


_torch_convert = nn.SyncBatchNorm.convert_sync_batchnorm.__func__
_torch_convert = getattr(_torch_convert, '_cenet_original', _torch_convert)
_torch_convert_sync_batchnorm._cenet_original = _torch_convert


def patch_torch_sync_bn() -> None:
    """Install the CE-aware converter as ``nn.SyncBatchNorm``'s classmethod."""
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(
        _torch_convert_sync_batchnorm)


def patch_mmengine_sync_bn() -> None:
    """Install :func:`convert_sync_batchnorm` where the MMEngine runner looks."""
    for namespace in (mmengine.model, mmengine.model.utils, mmengine.runner.runner):
        namespace.convert_sync_batchnorm = convert_sync_batchnorm
