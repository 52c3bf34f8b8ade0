"""CE in any MMDetection backbone: a CE layer after the normalizers a config names.

The paper's rule is that CE goes between a normalization layer and the
non-linearity after it. :class:`CEPlacement` applies it to a built backbone:
every module whose name (relative to the backbone) fully matches one of the
``ce_positions`` patterns must be a normalizer (BN, SyncBN, GN, IN), and is
replaced by the CE layer over that same normalizer, built by
:func:`~cenet_mmdet.models.layers.build_ce_layer` with the normalizer's own
options (``eps``, ``momentum``, ``affine``, ``num_groups``, ``requires_grad``).
The replacement keeps the module's name, so the backbone's usual checkpoint
loads into the normalizer part and a CE checkpoint into the whole layer
(``layer1.0.bn3.ce.*``).

In a config, either the generic wrapper::

    backbone=dict(type='CEBackbone',
                  backbone=dict(type='mmdet.ResNeXt', depth=101, groups=32, ...),
                  ce_positions=[r'layer[1-3]\\.\\d+\\.bn3',
                                dict(pattern='bn1', group_size=64)])

or a named instance with the paper's placement, whose ``ce_positions``
default to :attr:`CEPlacement.DEFAULT_CE_POSITIONS` (:class:`CEResNeXt`,
:class:`CERegNet`, :class:`CEMobileNetV2`). ``frozen_stages`` and
``norm_eval`` reach the CE layers as in ``CEResNet`` (the backbone's own
``_freeze_stages`` runs again after the placement); the converters keep them
(they are CE layers like any other).
"""
import copy
import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmdet.models.backbones import MobileNetV2, RegNet, ResNeXt
from mmdet.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..layers import CELayer, build_ce_layer, check_ce_cfg
from .ce_weights import CEWeightsMixin

Position = Union[str, dict]

#: the CE-ResNet placement, for bottleneck backbones: the stem norm (one group)
#: and the last norm of every block of stages 1-3, never a downsample branch
RESNET_POSITIONS = (dict(pattern='bn1', group_size=64),
                    r'layer[1-3]\.\d+\.bn3')


def normalizer_cfg(module: nn.Module) -> Optional[dict]:
    """The MMCV ``norm_cfg`` of a torch normalizer module, with its options;
    None for a module that is not a normalizer CE can follow."""
    options = {}
    weight = getattr(module, 'weight', None)
    if isinstance(weight, torch.Tensor):
        options['requires_grad'] = weight.requires_grad
    if isinstance(module, _BatchNorm) and not isinstance(module, CELayer):
        if module.weight is not None and module.weight.dim() != 1:
            return None
        kind = 'SyncBN' if isinstance(module, nn.SyncBatchNorm) else 'BN'
        if not isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return None  # BN1d / BN3d: not an (N, C, H, W) normalizer
        return dict(type=kind, eps=module.eps, momentum=module.momentum,
                    affine=module.affine,
                    track_running_stats=module.track_running_stats, **options)
    if isinstance(module, nn.GroupNorm) and not isinstance(module, CELayer):
        return dict(type='GN', num_groups=module.num_groups, eps=module.eps,
                    affine=module.affine, **options)
    if isinstance(module, _InstanceNorm) and isinstance(module, nn.InstanceNorm2d):
        return dict(type='IN', eps=module.eps, affine=module.affine,
                    track_running_stats=module.track_running_stats, **options)
    return None


def _parse_positions(ce_positions: Sequence[Position]) -> List[Tuple[str, dict]]:
    """``[(pattern, ce_cfg overrides)]`` from strings or
    ``dict(pattern=..., **overrides)``."""
    if isinstance(ce_positions, (str, bytes, dict)) or not isinstance(
            ce_positions, Sequence):
        raise TypeError(f'ce_positions must be a list of patterns (str or '
                        f'dict(pattern=..., **ce options)), got {ce_positions!r}')
    parsed = []
    for position in ce_positions:
        if isinstance(position, str):
            pattern, overrides = position, {}
        elif isinstance(position, dict) and isinstance(position.get('pattern'), str):
            overrides = dict(position)
            pattern = overrides.pop('pattern')
        else:
            raise TypeError(f'a ce_positions entry must be a pattern or '
                            f'dict(pattern=..., **ce options), got {position!r}')
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f'ce_positions pattern {pattern!r} is not a regular '
                             f'expression: {err}') from None
        parsed.append((pattern, overrides))
    return parsed


def place_ce(backbone: nn.Module, ce_cfg: dict,
             ce_positions: Sequence[Position]) -> List[str]:
    """Replace the normalizers of ``backbone`` at ``ce_positions`` by CE layers
    over them (see the module docstring); returns the names replaced.

    Raises:
        ValueError: with one line naming the pattern, for a pattern that
            matches no module, matches a module that is not a normalizer, or
            a normalizer the CE builder cannot carry.
    """
    where = type(backbone).__name__
    modules = dict(backbone.named_modules())
    chosen: Dict[str, Tuple[str, dict, dict]] = {}
    for pattern, overrides in _parse_positions(ce_positions):
        names = [name for name in modules if name and re.fullmatch(pattern, name)]
        if not names:
            raise ValueError(f'{where}: ce_positions pattern {pattern!r} matches '
                             f'no module of the backbone')
        for name in names:
            module = modules[name]
            norm_cfg = normalizer_cfg(module)
            if norm_cfg is None:
                raise ValueError(
                    f'{where}: ce_positions pattern {pattern!r} matches {name!r} '
                    f'({type(module).__name__}), which is not a normalizer CE can '
                    f'follow (BN, SyncBN, GN, IN over (N, C, H, W))')
            chosen[name] = (pattern, dict(ce_cfg, **overrides), norm_cfg)
    for name, (pattern, layer_cfg, norm_cfg) in chosen.items():
        module = modules[name]
        try:
            _, layer = build_ce_layer(layer_cfg, norm_cfg, module.num_features
                                      if hasattr(module, 'num_features')
                                      else module.num_channels)
        except ValueError as err:
            raise ValueError(f'{where}: ce_positions pattern {pattern!r} matches '
                             f'{name!r}, which cannot carry CE: {err}') from None
        layer.train(module.training)
        parent_name, _, child = name.rpartition('.')
        parent = modules[parent_name] if parent_name else backbone
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
            parent[int(child)] = layer
        else:
            setattr(parent, child, layer)
    return list(chosen)


class CEPlacement(CEWeightsMixin):
    """Mixin: a backbone class with CE layers at ``ce_positions`` (see the
    module docstring); used as ``class CEResNeXt(CEPlacement, ResNeXt)``.

    Args:
        ce_cfg: the CE layers' config (``dict(type='CE' | 'SyncCE', **block
            options)``); ``None`` builds the plain backbone. Default:
            ``dict(type='CE')``.
        ce_positions: patterns (Python regular expressions, full match on
            module names relative to the backbone), or
            ``dict(pattern=..., **ce_cfg overrides)``. Default:
            :attr:`DEFAULT_CE_POSITIONS`.
        ce_from_scratch: as for ``CEResNet``. Default: False.
        **kwargs: the backbone's own arguments.
    """

    #: the positions of a named instance
    DEFAULT_CE_POSITIONS: Tuple[Position, ...] = ()

    def __init__(self, *args, ce_cfg: Optional[dict] = dict(type='CE'),
                 ce_positions: Optional[Sequence[Position]] = None,
                 ce_from_scratch: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ce_from_scratch = bool(ce_from_scratch)
        if ce_positions is None:
            ce_positions = self.DEFAULT_CE_POSITIONS
        _parse_positions(ce_positions)  # refused before anything is replaced
        self.ce_positions = list(ce_positions)
        if ce_cfg is None:
            return
        if not isinstance(ce_cfg, dict) or 'type' not in ce_cfg:
            raise TypeError(f'ce_cfg must be a dict with a "type" key (e.g. '
                            f'dict(type="CE")) or None, got {ce_cfg!r}')
        check_ce_cfg(ce_cfg, dict(type='BN'))  # its type (each normalizer: per position)
        if not self.ce_positions:
            raise ValueError(f'{type(self).__name__}: ce_positions is empty; '
                             f'name the normalizers CE follows')
        place_ce(self, copy.deepcopy(ce_cfg), self.ce_positions)
        if hasattr(self, '_freeze_stages'):
            self._freeze_stages()  # the new layers of frozen stages


@MODELS.register_module()
class CEResNeXt(CEPlacement, ResNeXt):
    """MMDetection's ``ResNeXt`` with CE where CE-ResNet has it (the paper does
    not place CE in a ResNeXt): after the stem norm (one group of 64
    channels) and ``bn3`` of every block of stages 1-3."""

    DEFAULT_CE_POSITIONS = RESNET_POSITIONS


@MODELS.register_module()
class CERegNet(CEPlacement, RegNet):
    """MMDetection's ``RegNet`` with CE where CE-ResNet has it (the paper does
    not place CE in a RegNet): after the stem norm (one group) and ``bn3``
    of every bottleneck of stages 1-3."""

    DEFAULT_CE_POSITIONS = RESNET_POSITIONS


@MODELS.register_module()
class CEMobileNetV2(CEPlacement, MobileNetV2):
    """MMDetection's ``MobileNetV2`` with CE as in the paper's CE-MobileNetV2:
    after the norm of every 3x3 depthwise convolution, before its ReLU6 (the
    last 1x1 convolution of a block has no non-linearity after it)."""

    DEFAULT_CE_POSITIONS = (r'layer\d\.\d+\.depthwise_conv\.bn', )


@lru_cache(maxsize=None)
def _placement_class(backbone_cls: type) -> type:
    """``<Name>WithCE``: :class:`CEPlacement` over ``backbone_cls``."""
    name = f'{backbone_cls.__name__}WithCE'
    cls = type(name, (CEPlacement, backbone_cls),
               {'__module__': __name__, '__qualname__': name,
                '__doc__': f'{backbone_cls.__name__} with CE at ce_positions.'})
    globals().setdefault(name, cls)  # picklable by name
    return cls


@MODELS.register_module(name='CEBackbone')
def build_ce_backbone(backbone: dict, ce_positions: Sequence[Position],
                      ce_cfg: Optional[dict] = dict(type='CE'),
                      ce_from_scratch: bool = False) -> nn.Module:
    """Any MMDetection backbone with CE at ``ce_positions``.

    Args:
        backbone: the backbone's config, as without CE.
        ce_positions, ce_cfg, ce_from_scratch: see :class:`CEPlacement`.

    Returns:
        an instance of ``<Backbone>WithCE``, a subclass of the backbone's class:
        the same state-dict keys, the same behaviour, CE at the positions.
    """
    if not isinstance(backbone, dict) or 'type' not in backbone:
        raise TypeError(f'CEBackbone: backbone must be a config dict with a '
                        f'"type", got {backbone!r}')
    options = copy.deepcopy(dict(backbone))
    backbone_type = options.pop('type')
    backbone_cls = (backbone_type if isinstance(backbone_type, type)
                    else MODELS.get(backbone_type))
    if backbone_cls is None:
        raise KeyError(f'CEBackbone: backbone type {backbone_type!r} is not '
                       f'registered in MMDetection\'s MODELS')
    if issubclass(backbone_cls, CEPlacement):
        backbone_cls = next(base for base in backbone_cls.__mro__[1:]
                            if not issubclass(base, CEPlacement))
    return _placement_class(backbone_cls)(
        ce_cfg=ce_cfg, ce_positions=ce_positions,
        ce_from_scratch=ce_from_scratch, **options)
