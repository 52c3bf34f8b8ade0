"""Build a CE layer over the normalizer a config names.

``build_ce_layer(ce_cfg, norm_cfg, C)`` is what :class:`CEResNet` uses at its
CE positions: ``norm_cfg`` (the backbone's) says which normalizer precedes the
block, ``ce_cfg`` whether the block's statistics are synchronized and the
block's options. A normalizer that cannot carry CE is refused by name; nothing
is replaced silently.

=============================  ================================  ==========
``norm_cfg`` type              layer (``ce_cfg`` CE / SyncCE)    name
=============================  ================================  ==========
``BN``, ``BN2d``               CE / SyncCE                       ``bn{i}``
``SyncBN``                     SyncCE / SyncCE                   ``bn{i}``
``GN`` (``num_groups``)        GroupNormCE / SyncGroupNormCE     ``gn{i}``
``IN``, ``IN2d``               GroupNormCE (``C`` groups) / ...  ``in{i}``
``LN`` (over C, H, W)          GroupNormCE (1 group) / ...       ``ln{i}``
=============================  ================================  ==========

Over SyncBN the CE block's statistics are synchronized with the BN ones (one
collective): a SyncBN batch is the global batch for both. The options of the
normalizer (``eps``, ``momentum``, ``affine``, ``num_groups``, ...) come from
``norm_cfg``; ``ce_cfg`` may override them.
"""
import copy
from typing import Dict, Tuple

from torch import nn

from .ce import CE
from .ce_layer import CELayer
from .group_norm_ce import GroupNormCE
from .sync_ce import SyncCE, SyncGroupNormCE

#: ``ce_cfg`` types
CE_TYPES = ('CE', 'SyncCE')
#: ``norm_cfg`` types CE can follow
CE_NORM_TYPES = ('BN', 'BN2d', 'SyncBN', 'GN', 'IN', 'IN2d', 'LN')


def _norm_options(norm_type: str, norm_cfg: dict,
                  num_features: int) -> Tuple[str, Dict]:
    """``(abbreviation, layer kwargs)`` for the normalizer ``norm_type`` with
    the options ``norm_cfg`` (without ``type`` and ``requires_grad``)."""
    options = dict(norm_cfg)

    def take(allowed, renames=None):
        unknown = sorted(set(options) - set(allowed) - set(renames or {}))
        if unknown:
            raise ValueError(
                f'norm_cfg type {norm_type!r}: option(s) {unknown} cannot be '
                f'carried over to a CE layer (known: '
                f'{sorted(set(allowed) | set(renames or {}))})')
        kwargs = {key: options[key] for key in allowed if key in options}
        for key, new in (renames or {}).items():
            if key in options:
                kwargs[new] = options[key]
        return kwargs

    if norm_type in ('BN', 'BN2d', 'SyncBN'):
        if options.get('track_running_stats', True) is not True:
            raise ValueError('CE over BN needs running statistics '
                             '(track_running_stats=True)')
        options.pop('track_running_stats', None)
        return 'bn', take(('eps', 'momentum', 'affine'))
    if norm_type == 'GN':
        if 'num_groups' not in options:
            raise ValueError("norm_cfg type 'GN' needs num_groups")
        return 'gn', dict(take(('num_groups', 'eps', 'affine')), norm='GN')
    if norm_type in ('IN', 'IN2d'):
        if options.pop('track_running_stats', False):
            raise ValueError(
                'CE over IN: IN with running statistics '
                '(track_running_stats=True) is not supported; CE follows IN '
                'normalized by each sample\'s own statistics')
        options.pop('momentum', None)  # no running statistics in IN
        kwargs = dict(take(('eps', 'affine')), norm='IN', num_groups=num_features)
        kwargs.setdefault('affine', False)  # torch's InstanceNorm2d default
        return 'in', kwargs
    # 'LN': mmcv builds nn.LayerNorm(C), which normalizes the last dimension
    # only; CE follows the LN of the paper, over (C, H, W) per sample with a
    # per-channel affine (GN with one group).
    return 'ln', dict(take(('eps', ), {'elementwise_affine': 'affine'}),
                      norm='LN', num_groups=1)


def check_ce_cfg(ce_cfg: dict, norm_cfg: dict) -> None:
    """Refuse, by name, a ``ce_cfg`` or a ``norm_cfg`` that cannot make a CE
    layer (:func:`build_ce_layer`), before anything is built.

    Raises:
        TypeError: a config that is not a dict with a ``type``.
        ValueError: a CE type other than ``CE``/``SyncCE``, or a norm type
            that cannot carry CE.
    """
    if not isinstance(ce_cfg, dict) or 'type' not in ce_cfg:
        raise TypeError(f'ce_cfg must be a dict with a "type" key, got {ce_cfg!r}')
    if not isinstance(norm_cfg, dict) or 'type' not in norm_cfg:
        raise TypeError(f'norm_cfg must be a dict with a "type" key, got {norm_cfg!r}')
    if ce_cfg['type'] not in CE_TYPES:
        raise ValueError(f'ce_cfg type must be one of {CE_TYPES}, got '
                         f'{ce_cfg["type"]!r} (the normalizer before CE comes '
                         f'from norm_cfg)')
    if norm_cfg['type'] not in CE_NORM_TYPES:
        raise ValueError(
            f'norm_cfg type {norm_cfg["type"]!r} cannot carry CE: CE follows a '
            f'normalizer of (N, C, H, W) maps with a per-channel affine, one of '
            f'{CE_NORM_TYPES}. Use one of these, or ce_cfg=None for no CE.')


def build_ce_layer(ce_cfg: dict, norm_cfg: dict, num_features: int,
                   postfix='') -> Tuple[str, CELayer]:
    """Build the CE layer over ``norm_cfg``'s normalizer.

    Args:
        ce_cfg: ``dict(type='CE' | 'SyncCE', **block options)``; its
            ``requires_grad`` defaults to ``norm_cfg``'s.
        norm_cfg: an MMCV norm config whose type is one of
            :data:`CE_NORM_TYPES`.
        num_features: ``C``.
        postfix: appended to the name, as in ``mmcv.cnn.build_norm_layer``.

    Returns:
        ``(name, layer)``, e.g. ``('gn3', GroupNormCE(...))``.
    """
    check_ce_cfg(ce_cfg, norm_cfg)
    ce_options = copy.deepcopy(dict(ce_cfg))
    norm_options = copy.deepcopy(dict(norm_cfg))
    ce_type, norm_type = ce_options.pop('type'), norm_options.pop('type')
    requires_grad = ce_options.pop('requires_grad',
                                   norm_options.pop('requires_grad', True))
    norm_options.pop('requires_grad', None)
    abbr, kwargs = _norm_options(norm_type, norm_options, num_features)
    kwargs.update(ce_options)
    sync = ce_type == 'SyncCE' or norm_type == 'SyncBN'
    if abbr == 'bn':
        cls = SyncCE if sync else CE
    else:
        if 'pool_stats' in kwargs:
            raise ValueError(f'pool_stats is an option of CE over BN only, not '
                             f'over {norm_type}')
        cls = SyncGroupNormCE if sync else GroupNormCE
    layer = cls(num_features, **kwargs)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return f'{abbr}{postfix}', layer


def is_ce_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a CE layer (over any normalizer)."""
    return isinstance(module, CELayer)
