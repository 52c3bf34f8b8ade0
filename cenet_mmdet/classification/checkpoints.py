"""Checkpoints between the ImageNet classifier and the detection backbone.

* :func:`classifier_to_backbone`: an ``ImageClassifier`` checkpoint (e.g.
  ``work_dirs/ce-resnet101_8xb32_in1k/epoch_100.pth``) -> the ``backbone.*``
  tensors without the prefix, in the file format of the released converter,
  so that the detection configs' ``init_cfg=dict(type='Pretrained',
  checkpoint='checkpoints/cenet_r101_imagenet_mmdet.pth')`` loads it with no
  missing or unexpected keys. Command line:
  ``tools/model_converters/cls2backbone.py``.
* :func:`released_to_classifier`: the authors' released CE-ResNet checkpoint
  (``resnetv1ce50.pth.tar``) -> a whole ``ImageClassifier`` checkpoint
  (``backbone.*`` + ``head.fc.*``) for evaluating it on ImageNet val with
  ``tools/test.py``. Command line: ``tools/model_converters/cenet2cls.py``.

Both check every key and shape against a freshly built backbone and write
atomically; errors are :class:`cenet_mmdet.converters.ConversionError` and
nothing is written. The backbone is a CE-ResNet-50/101 inferred from the keys,
or, for any other backbone (CE-ResNet-18/34/152, CE-ResNeXt, CE-RegNet,
CE-MobileNetV2, ``CEBackbone``), the ``model.backbone`` of the training config
that MMEngine saves in the checkpoint (``meta['cfg']``).
"""
import os.path as osp
import pickle
import warnings
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..converters import (ConversionError, check_source_file,
                          convert_state_dict, infer_depth, load_source,
                          reference_state, save_atomic, split_checkpoint,
                          validate)

BACKBONE_PREFIX = 'backbone.'
HEAD_KEYS = ('head.fc.weight', 'head.fc.bias')
#: top-level modules of an ImageClassifier besides the backbone
CLASSIFIER_MODULES = ('head', 'neck', 'data_preprocessor')


def load_mmengine_checkpoint(path: str, unsafe_load: bool = False) -> object:
    """Load an MMEngine checkpoint on CPU through MMEngine's loader, i.e. with
    ``weights_only=True`` and the allow-list of :mod:`cenet_mmdet.compat` (its
    message hub pickles ``HistoryBuffer`` methods), unless ``unsafe_load``."""
    if unsafe_load:
        return load_source(path, unsafe_load)
    check_source_file(path)  # before MMEngine's loader (its advice is resume's)
    from mmengine.runner.checkpoint import CheckpointLoader
    try:
        return CheckpointLoader.load_checkpoint(path, map_location='cpu',
                                                logger='silent')
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f'cannot read {path} with torch.load(weights_only=True): {error}\n'
            f'If you trust this file, re-run with --unsafe-load.') from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(
            f'cannot read {path} as a PyTorch checkpoint: {error}') from error


#: the stem norm's name in a ResNet state dict -> the backbone's norm_cfg
#: (GN's num_groups is not in a checkpoint: 32, MMDetection's GN setting)
NORM_BY_ABBR = {
    'bn': dict(type='BN', requires_grad=True),
    'gn': dict(type='GN', num_groups=32, requires_grad=True),
    'in': dict(type='IN', requires_grad=True),
    'ln': dict(type='LN', requires_grad=True),
}


def norm_abbr(state: Mapping[str, Tensor]) -> str:
    """The normalizer of a (CE)ResNet state dict, from its stem norm's name
    (``bn1.*``, ``gn1.*``, ``in1.*``, ``ln1.*``); ``'bn'`` if none is found."""
    for abbr in NORM_BY_ABBR:
        if any(k.startswith(f'{abbr}1.') for k in state):
            return abbr
    return 'bn'


def ce_layout(state: Mapping[str, Tensor]
              ) -> Tuple[int, bool, Tuple[bool, ...], str]:
    """``(depth, stem_ce, stage_with_ce, norm abbreviation)`` of a CEResNet
    state dict."""
    depth = infer_depth(list(state))
    abbr = norm_abbr(state)
    stem_ce = any(k.startswith(f'{abbr}1.ce.') for k in state)
    stage_with_ce = tuple(
        any(k.startswith(f'layer{i}.0.{abbr}3.ce.') for k in state)
        for i in range(1, 5))
    return depth, stem_ce, stage_with_ce, abbr


def check_backbone_state(state: Mapping[str, Tensor], source: str) -> Dict:
    """Compare keys and shapes with a fresh ``CEResNet`` of the inferred
    layout; return that layout as a backbone config dict."""
    depth, stem_ce, stage_with_ce, abbr = ce_layout(state)
    norm_cfg = NORM_BY_ABBR[abbr]
    expected = reference_state(depth, stem_ce, stage_with_ce, norm_cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f'{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}'
              for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys ({", ".join(missing[:6])})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys '
                        f'({", ".join(unexpected[:6])})')
    if shapes:
        problems.append(f'{len(shapes)} shape mismatches ({"; ".join(shapes[:4])})')
    if problems:
        raise ConversionError(
            f'{source}: the backbone does not match CEResNet(depth={depth}, '
            f'stem_ce={stem_ce}, stage_with_ce={stage_with_ce}, norm '
            f'{norm_cfg["type"]}) with the default style (only pytorch-style, '
            f'non-deep-stem CE-ResNets are supported): ' + '; '.join(problems))
    layout = dict(type='CEResNet', depth=depth, stem_ce=stem_ce,
                  stage_with_ce=list(stage_with_ce))
    if abbr != 'bn':
        layout['norm_cfg'] = dict(norm_cfg)
    return layout


def config_backbone(checkpoint) -> Optional[dict]:
    """``model.backbone`` of the training config MMEngine saved in the
    checkpoint (``meta['cfg']``, the config's text), or None."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    text = meta.get('cfg') if isinstance(meta, Mapping) else None
    if not isinstance(text, str):
        return None
    from mmengine.config import Config
    try:
        cfg = Config.fromstring(text, '.py')
    except Exception as error:  # noqa: BLE001 (any parse error: no config)
        warnings.warn(f'the config saved in the checkpoint does not parse '
                      f'({type(error).__name__}); inferring the backbone')
        return None
    backbone = cfg.get('model', {}).get('backbone')
    return backbone.to_dict() if hasattr(backbone, 'to_dict') else backbone


def is_inferable(backbone_cfg: Optional[dict]) -> bool:
    """Whether the backbone's layout is inferred from its keys (a CE-ResNet-50
    or 101, the released layout) rather than built from its config."""
    return backbone_cfg is None or (backbone_cfg.get('type') in ('CEResNet',
                                                                 'mmdet.CEResNet')
                                    and backbone_cfg.get('depth') in (50, 101))


def check_backbone_against_cfg(state: Mapping[str, Tensor], backbone_cfg: dict,
                               source: str) -> Dict:
    """Compare keys and shapes with the backbone built from its config (on
    the meta device); return that config without its ``init_cfg``."""
    import cenet_mmdet  # noqa: F401 (registers the backbones)
    from mmdet.registry import MODELS
    layout = {k: v for k, v in backbone_cfg.items()
              if k not in ('init_cfg', 'pretrained')}
    try:
        try:
            with torch.device('meta'):
                model = MODELS.build(dict(layout))
        except (NotImplementedError, RuntimeError):  # a layer refusing meta
            model = MODELS.build(dict(layout))
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f'{source}: cannot build the backbone of its saved '
                              f'config ({layout.get("type")!r}): {error}') from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConversionError(
            f'{source}: the backbone does not match its saved config '
            f'{layout.get("type")!r}: {len(missing)} missing keys '
            f'({", ".join(missing[:6])}), {len(unexpected)} unexpected '
            f'({", ".join(unexpected[:6])}), {len(shapes)} shape mismatches '
            f'({", ".join(shapes[:4])})')
    layout['num_ce_layers'] = len({k.split('.ce.')[0] for k in state if '.ce.' in k})
    return layout


def classifier_to_backbone(src: str, dst: str, unsafe_load: bool = False,
                           allow_no_ce: bool = False) -> Dict:
    """Write the backbone of an ``ImageClassifier`` checkpoint to ``dst``.

    Args:
        src: MMEngine checkpoint of an ``ImageClassifier`` (keys
            ``backbone.*``, ``head.*``) or its bare state dict.
        dst: output file, ``dict(state_dict=..., meta=...)`` with the
            backbone keys without ``backbone.``.
        unsafe_load: unpickle ``src`` fully (only for trusted files).
            Default: False.
        allow_no_ce: accept a backbone without CE layers (a BN classifier),
            with a warning; refused otherwise. Default: False.

    Returns:
        the ``meta`` written (with the backbone layout under ``'backbone'``).
    """
    if osp.abspath(src) == osp.abspath(dst):
        raise ConversionError('SRC and DST are the same file')
    checkpoint = load_mmengine_checkpoint(src, unsafe_load)
    state, _ = split_checkpoint(checkpoint)
    state = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                        for k, v in state.items())
    backbone = OrderedDict((k[len(BACKBONE_PREFIX):], v) for k, v in state.items()
                           if k.startswith(BACKBONE_PREFIX))
    if not backbone:
        hint = (' It looks like a backbone checkpoint already (keys conv1.*, '
                'layer1.*): load it directly.'
                if 'conv1.weight' in state else '')
        raise ConversionError(
            f'{src}: no "{BACKBONE_PREFIX}*" keys, so not an ImageClassifier '
            f'checkpoint (first keys: {", ".join(list(state)[:4])}).{hint}')
    others = sorted({k.split('.', 1)[0] for k in state
                     if not k.startswith(BACKBONE_PREFIX)} - set(CLASSIFIER_MODULES))
    if others:
        raise ConversionError(
            f'{src}: not an ImageClassifier checkpoint: it also holds '
            f'{", ".join(m + ".*" for m in others)} (a detector?). '
            f'cls2backbone.py extracts the backbone of an ImageNet classifier; '
            f'to start a detector from a detector checkpoint use '
            f'load_from=<checkpoint> in its config.')
    backbone_cfg = config_backbone(checkpoint)
    if is_inferable(backbone_cfg):
        layout = check_backbone_state(backbone, src)
        has_ce = layout['stem_ce'] or any(layout['stage_with_ce'])
    else:
        layout = check_backbone_against_cfg(backbone, backbone_cfg, src)
        has_ce = layout['num_ce_layers'] > 0
    if not has_ce:
        if not allow_no_ce:
            raise ConversionError(
                f'{src}: the backbone has no CE layers (a BN ResNet classifier, '
                f'ce_cfg=None?): a CEResNet config would start every CE layer '
                f'from scratch. Extract a CE classifier, or pass --allow-no-ce '
                f'if a CE-less backbone is what you want.')
        warnings.warn(f'{src}: the backbone has no CE layers (--allow-no-ce): '
                      f'load it into CEResNet(ce_cfg=None), or set '
                      f'ce_from_scratch=True on a CE backbone')
    source_meta = checkpoint.get('meta', {}) if isinstance(checkpoint, Mapping) else {}
    meta = dict(
        converted_from=osp.basename(src),
        converter='cenet_mmdet.classification.checkpoints '
        '(tools/model_converters/cls2backbone.py)',
        backbone=layout,
        dropped_keys=[k for k in state if not k.startswith(BACKBONE_PREFIX)],
        source={k: source_meta[k] for k in ('epoch', 'iter')
                if isinstance(source_meta, Mapping) and k in source_meta})
    try:
        save_atomic(dict(state_dict=backbone, meta=meta), dst)
    except OSError as error:
        raise ConversionError(f'cannot write {dst}: {error}') from error
    return meta


def released_to_classifier(src: str, dst: str,
                           unsafe_load: bool = False) -> Dict:
    """Convert the released CE-ResNet classifier to an ``ImageClassifier``
    checkpoint (``backbone.*`` as the released converter maps it, ``fc.*`` ->
    ``head.fc.*``).

    Returns:
        the ``meta`` written (backbone layout, ``num_classes``).
    """
    if osp.abspath(src) == osp.abspath(dst):
        raise ConversionError('SRC and DST are the same file')
    state, source_meta = split_checkpoint(load_source(src, unsafe_load))
    state = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                        for k, v in state.items())
    if 'fc.weight' not in state or 'fc.bias' not in state:
        raise ConversionError(
            f'{src}: no classifier (fc.weight / fc.bias), so it cannot be '
            f'evaluated as a classifier; for detection use '
            f'tools/model_converters/cenet2mmdet.py')
    conversion = convert_state_dict(state)
    validate(conversion)
    out: 'OrderedDict[str, Tensor]' = OrderedDict(
        (BACKBONE_PREFIX + k, v) for k, v in conversion.state_dict.items())
    fc_weight = state['fc.weight'].detach().clone()
    out['head.fc.weight'] = fc_weight
    out['head.fc.bias'] = state['fc.bias'].detach().clone()
    meta = dict(
        converted_from=osp.basename(src),
        converter='cenet_mmdet.classification.checkpoints '
        '(tools/model_converters/cenet2cls.py)',
        backbone=dict(type='CEResNet', depth=conversion.depth,
                      stem_ce=conversion.stem_ce,
                      stage_with_ce=list(conversion.stage_with_ce)),
        num_classes=int(fc_weight.shape[0]),
        source=dict(source_meta))
    try:
        save_atomic(dict(state_dict=out, meta=meta), dst)
    except OSError as error:
        raise ConversionError(f'cannot write {dst}: {error}') from error
    return meta


def _run(prog: str, function, description: str, src_help: str,
         dst_help: str, argv=None, allow_no_ce: bool = False) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument('src', help=src_help)
    parser.add_argument('dst', help=dst_help)
    parser.add_argument('--unsafe-load', action='store_true',
                        help='torch.load with weights_only=False (only for '
                        'files you trust)')
    if allow_no_ce:
        parser.add_argument('--allow-no-ce', action='store_true',
                            help='accept a backbone without CE layers (a BN '
                            'classifier); refused by default')
    args = parser.parse_args(argv)
    options = dict(allow_no_ce=args.allow_no_ce) if allow_no_ce else {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            meta = function(args.src, args.dst, args.unsafe_load, **options)
        for warning in caught:
            print(f'{prog}: warning: {warning.message}', file=sys.stderr)
    except ConversionError as error:
        print(f'{prog}: error: {error}', file=sys.stderr)
        print(f'{prog}: nothing written to {args.dst}', file=sys.stderr)
        return 1
    backbone = meta['backbone']
    if 'num_ce_layers' in backbone:  # built from the checkpoint's config
        print(f'backbone: {backbone["type"]} ({backbone["num_ce_layers"]} CE '
              f'layers), from the config saved in the checkpoint')
    else:
        print(f'backbone: CEResNet depth={backbone["depth"]}, stem_ce='
              f'{backbone["stem_ce"]}, stage_with_ce='
              f'{tuple(backbone["stage_with_ce"])}')
    if 'num_classes' in meta:
        print(f'head: {meta["num_classes"]} classes')
    print(f'saved to {args.dst}')
    return 0


def cls2backbone_main(argv=None) -> int:
    """``tools/model_converters/cls2backbone.py SRC DST``; the exit status."""
    return _run(
        'cls2backbone.py', classifier_to_backbone,
        'Extract the CEResNet backbone of an ImageClassifier checkpoint '
        '(configs/cenet/imagenet) for the detection configs '
        '(init_cfg=dict(type="Pretrained", checkpoint=DST)).',
        'classifier checkpoint (e.g. work_dirs/ce-resnet101_8xb32_in1k/'
        'epoch_100.pth)', 'output, e.g. checkpoints/cenet_r101_imagenet_mmdet.pth',
        argv, allow_no_ce=True)


def cenet2cls_main(argv=None) -> int:
    """``tools/model_converters/cenet2cls.py SRC DST``; the exit status."""
    return _run(
        'cenet2cls.py', released_to_classifier,
        'Convert the released CE-ResNet classifier (resnetv1ce50.pth.tar) into '
        'an ImageClassifier checkpoint for configs/cenet/imagenet '
        '(tools/test.py CONFIG DST).',
        'released checkpoint', 'output, e.g. checkpoints/cenet_r50_imagenet_cls.pth',
        argv)
