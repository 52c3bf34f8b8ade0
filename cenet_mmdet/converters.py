"""Convert the released CE-ResNet ImageNet checkpoint for :class:`CEResNet`.

The released checkpoint (``ResNet50v1+CE``) is a dict with ``epoch``,
``model`` (``'resnetv1ce50'``), ``state_dict``, ``best_prec1`` and
``optimizer``; its ``state_dict`` uses torchvision ResNet names plus a CE block
``ce1.*`` after the stem BN and ``layerA.B.ce.*`` after ``bn3`` of the CE
blocks, optionally all under ``module.``. MMDetection's ResNet uses the same
torchvision names, and in CEResNet the CE block is the child ``ce`` of the BN
it follows, so the mapping is::

    ce1.<k>          -> bn1.ce.<RELEASED_CE_KEYS[k]>
    layerA.B.ce.<k>  -> layerA.B.bn3.ce.<RELEASED_CE_KEYS[k]>
    fc.*             -> dropped (classifier)
    everything else  -> unchanged

The depth is inferred from the blocks per layer (``[3, 4, 6, 3]`` -> 50,
``[3, 4, 23, 3]`` -> 101) and the CE placement from the CE keys; the result is
checked key by key and shape by shape against a freshly built
``CEResNet(depth, stage_with_ce=..., stem_ce=...)`` before anything is
written. The output ``dict(state_dict=..., meta=...)`` loads with
``init_cfg=dict(type='Pretrained', checkpoint=DST)`` and is written
atomically (temporary file in the destination directory + ``os.replace``).

Command line: ``python tools/model_converters/cenet2mmdet.py SRC DST``.
"""
import argparse
import os
import os.path as osp
import pickle
import re
import sys
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .models.layers.block import RELEASED_CE_KEYS

#: blocks per layer -> ResNet depth
DEPTH_BY_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}

_STEM_CE = re.compile(r'^ce1\.(?P<suffix>.+)$')
_BLOCK_CE = re.compile(r'^(?P<block>layer(?P<stage>[1-4])\.(?P<index>\d+))\.ce\.'
                       r'(?P<suffix>.+)$')
_BLOCK = re.compile(r'^layer(?P<stage>\d+)\.(?P<index>\d+)\.')
_CONVERTED_CE = re.compile(r'^(bn1|layer\d+\.\d+\.bn3)\.ce\.')
_PLUGIN_TO_RELEASED = {v: k for k, v in RELEASED_CE_KEYS.items()}


class ConversionError(ValueError):
    """The source is not a convertible CE-ResNet checkpoint."""


@dataclass
class Conversion:
    """The converted state dict and what was done to get it."""

    state_dict: 'OrderedDict[str, Tensor]'
    depth: int
    stem_ce: bool
    stage_with_ce: Tuple[bool, ...]
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    filled: List[str] = field(default_factory=list)
    stripped_prefix: int = 0
    source_meta: Dict[str, object] = field(default_factory=dict)

    @property
    def num_ce_blocks(self) -> int:
        return int(self.stem_ce) + sum(
            n for n, flag in zip(DEPTH_TO_BLOCKS[self.depth], self.stage_with_ce)
            if flag)

    def summary(self, verbose: bool = False) -> str:
        """A human-readable report of the conversion."""
        from .models.backbones.ce_resnet import DEFAULT_STAGE_WITH_CE
        default = DEFAULT_STAGE_WITH_CE[self.depth]
        meta = self.source_meta
        source = ', '.join(f'{k} {meta[k]}' for k in ('model', 'epoch', 'best_prec1')
                           if k in meta) or 'bare state dict'
        lines = [
            f'source: {source}',
            f'target: CEResNet depth={self.depth}, stem_ce={self.stem_ce}, '
            f'stage_with_ce={self.stage_with_ce} ({self.num_ce_blocks} CE blocks)',
        ]
        if self.stage_with_ce != default or not self.stem_ce:
            lines.append(
                f'  NOTE: not the default CE placement for depth {self.depth} '
                f'(stem_ce=True, stage_with_ce={default}): set stem_ce='
                f'{self.stem_ce}, stage_with_ce={self.stage_with_ce} in the '
                f'backbone config')
        if self.stripped_prefix:
            lines.append(f"'module.' prefix stripped from {self.stripped_prefix} keys")
        lines.append(f'written: {len(self.state_dict)} keys')
        lines.append(f'  unchanged (torchvision names): {len(self.unchanged)}')
        stem = [m for m in self.mapped if m[0].startswith('ce1.')]
        blocks = [m for m in self.mapped if not m[0].startswith('ce1.')]
        lines.append(f'  CE keys mapped: {len(self.mapped)} '
                     f'({self.num_ce_blocks} CE blocks)')
        lines.append(f'    ce1.<k>         -> bn1.ce.<k\'>         : {len(stem)}')
        lines.append(f'    layerA.B.ce.<k> -> layerA.B.bn3.ce.<k\'>: {len(blocks)}')
        per_suffix = Counter(src.split('.ce.', 1)[-1] if '.ce.' in src
                             else src[len('ce1.'):] for src, _ in self.mapped)
        for suffix, count in sorted(per_suffix.items()):
            target = RELEASED_CE_KEYS[suffix]
            lines.append(f'      {suffix:<17} -> {target:<20} x{count}')
        if self.filled:
            lines.append(f'  filled (absent in source, BN num_batches_tracked = 0): '
                         f'{len(self.filled)}')
        lines.append(f'  dropped (classifier): {len(self.dropped)}'
                     + (f': {", ".join(self.dropped)}' if self.dropped else ''))
        if verbose:
            lines.append('mapping:')
            lines += [f'  {src} -> {dst}' for src, dst in self.mapped]
        return '\n'.join(lines)


DEPTH_TO_BLOCKS = {depth: blocks for blocks, depth in DEPTH_BY_BLOCKS.items()}


def to_released_key(key: str) -> str:
    """The released name of a CEResNet key (for messages); others unchanged."""
    match = re.match(r'^(?P<owner>bn1|layer\d+\.\d+\.bn3)\.ce\.(?P<suffix>.+)$', key)
    if match is None or match['suffix'] not in _PLUGIN_TO_RELEASED:
        return key
    owner = 'ce1' if match['owner'] == 'bn1' else match['owner'][:-len('.bn3')] + '.ce'
    return f'{owner}.{_PLUGIN_TO_RELEASED[match["suffix"]]}'


def _abbreviate(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def check_source_file(path: str) -> None:
    """Refuse a source that is not a readable, undamaged file."""
    from .compat import damaged_checkpoint_reason
    if osp.isdir(path):
        raise ConversionError(f'the source {path} is a directory; give the '
                              f'checkpoint file inside it (e.g. {path}/epoch_N.pth)')
    if not osp.isfile(path):
        raise ConversionError(f'source checkpoint not found: {path}')
    # checked first: a flipped byte in a stored tensor would load silently
    damage = damaged_checkpoint_reason(path)
    if damage is not None:
        raise ConversionError(
            f'cannot read {path}: {damage}. Convert another copy of the '
            f'checkpoint (a run killed while saving leaves such a file: take '
            f'an earlier epoch_N.pth).')


def load_source(path: str, unsafe_load: bool = False) -> object:
    """``torch.load`` the source on CPU, with ``weights_only=True`` unless
    ``unsafe_load`` (only for files you trust)."""
    check_source_file(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=not unsafe_load)
    except pickle.UnpicklingError as error:
        if unsafe_load:
            raise ConversionError(f'cannot read {path}: {error}') from error
        raise ConversionError(
            f'cannot read {path} with torch.load(weights_only=True): {error}\n'
            f'If you trust this file, re-run with --unsafe-load.') from error
    except Exception as error:  # torch raises many types for a bad file
        raise ConversionError(
            f'cannot read {path} as a PyTorch checkpoint: '
            f'{type(error).__name__}: {error}') from error


def split_checkpoint(
        checkpoint: object) -> Tuple[Mapping[str, Tensor], Dict[str, object]]:
    """``(state_dict, meta)`` of a released checkpoint or of a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(
            f'expected a checkpoint dict (with a "state_dict" key) or a state '
            f'dict, got {type(checkpoint).__name__}')
    if 'state_dict' in checkpoint:
        state = checkpoint['state_dict']
        meta = {}
        for key in ('model', 'epoch', 'best_prec1'):
            value = checkpoint.get(key)
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (str, int, float)):
                meta[key] = value
    else:
        state, meta = checkpoint, {}
    if not isinstance(state, Mapping) or not state:
        raise ConversionError('the checkpoint holds no state dict (empty or not '
                              'a dict)')
    not_names = [k for k in state if not isinstance(k, str)]
    if not_names:
        raise ConversionError(
            f'not a state dict: {len(not_names)} keys are not parameter names '
            f'(strings): {_abbreviate([repr(k) for k in not_names])}')
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ConversionError(
            f'not a state dict: {len(not_tensors)} values are not tensors '
            f'({_abbreviate(not_tensors)})')
    return state, meta


def infer_depth(keys: Sequence[str]) -> int:
    """The ResNet depth from the number of blocks in layer1..layer4."""
    indices: Dict[int, set] = {}
    for key in keys:
        match = _BLOCK.match(key)
        if match:
            indices.setdefault(int(match['stage']), set()).add(int(match['index']))
    if not indices:
        raise ConversionError('no layerX.Y.* keys: this is not a ResNet checkpoint')
    if sorted(indices) != [1, 2, 3, 4]:
        raise ConversionError(
            f'expected layer1..layer4, found layers {sorted(indices)}')
    blocks = []
    for stage in range(1, 5):
        found = sorted(indices[stage])
        if found != list(range(len(found))):
            raise ConversionError(
                f'layer{stage} has non-contiguous block indices {found}')
        blocks.append(len(found))
    depth = DEPTH_BY_BLOCKS.get(tuple(blocks))
    if depth is None:
        known = ', '.join(f'{list(b)} -> {d}' for b, d in DEPTH_BY_BLOCKS.items())
        raise ConversionError(
            f'cannot infer the depth: blocks per layer are {blocks}; CEResNet '
            f'supports {known} (a truncated or different checkpoint?)')
    return depth


def convert_state_dict(state_dict: Mapping[str, Tensor]) -> Conversion:
    """Map released keys to CEResNet keys (no validation against a model)."""
    stripped = 0
    state: 'OrderedDict[str, Tensor]' = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
            stripped += 1
        if key in state:
            raise ConversionError(f'duplicate key {key!r} after stripping "module."')
        state[key] = value
    converted = [k for k in state if _CONVERTED_CE.match(k)]
    if converted:
        raise ConversionError(
            f'already in CEResNet format ({_abbreviate(converted, 2)}): load it '
            f'directly with init_cfg=dict(type="Pretrained", checkpoint=...)')
    depth = infer_depth(list(state))

    out: 'OrderedDict[str, Tensor]' = OrderedDict()
    mapped, unchanged, dropped = [], [], []
    stem_ce = False
    ce_blocks: Dict[int, set] = {stage: set() for stage in range(1, 5)}
    unknown = []
    for key, value in state.items():
        # Real, contiguous copies: the released running_wm may be an expanded
        # (stride-0) identity.
        value = value.detach().clone(memory_format=torch.contiguous_format)
        stem = _STEM_CE.match(key)
        block = _BLOCK_CE.match(key)
        if key.startswith('fc.'):
            dropped.append(key)
            continue
        if stem or block:
            suffix = (stem or block)['suffix']
            if suffix not in RELEASED_CE_KEYS:
                unknown.append(key)
                continue
            if stem:
                stem_ce = True
                new_key = f'bn1.ce.{RELEASED_CE_KEYS[suffix]}'
            else:
                ce_blocks[int(block['stage'])].add(int(block['index']))
                new_key = f'{block["block"]}.bn3.ce.{RELEASED_CE_KEYS[suffix]}'
            mapped.append((key, new_key))
            out[new_key] = value
        else:
            unchanged.append(key)
            out[key] = value
    if unknown:
        raise ConversionError(
            f'unknown CE keys {_abbreviate(unknown)}; a released CE block has '
            f'{sorted(RELEASED_CE_KEYS)}')
    if not mapped:
        raise ConversionError(
            'no CE keys (ce1.*, layerX.Y.ce.*) found: this is not a CE-ResNet '
            'checkpoint (a plain ResNet? use type="ResNet" and MMDetection\'s '
            'own checkpoints for it)')
    blocks = DEPTH_TO_BLOCKS[depth]
    stage_with_ce = []
    for stage in range(1, 5):
        with_ce = sorted(ce_blocks[stage])
        if with_ce and len(with_ce) != blocks[stage - 1]:
            without = sorted(set(range(blocks[stage - 1])) - set(with_ce))
            raise ConversionError(
                f'layer{stage} has CE keys in blocks {with_ce} but not in '
                f'{without}: CEResNet puts CE in all blocks of a stage or none '
                f'(missing CE keys?)')
        stage_with_ce.append(bool(with_ce))
    return Conversion(out, depth, stem_ce, tuple(stage_with_ce), mapped,
                      unchanged, dropped, stripped_prefix=stripped)


def reference_state(depth: int, stem_ce: bool, stage_with_ce: Sequence[bool],
                    norm_cfg: Optional[dict] = None) -> Dict[str, Tensor]:
    """State dict (shapes and dtypes) of a fresh ``CEResNet`` of that layout
    (``norm_cfg``: the backbone's normalizer, BN by default)."""
    from .models.backbones.ce_resnet import CEResNet
    kwargs = dict(depth=depth, stem_ce=stem_ce, stage_with_ce=tuple(stage_with_ce))
    if norm_cfg is not None:
        kwargs['norm_cfg'] = norm_cfg
    try:
        with torch.device('meta'):
            model = CEResNet(**kwargs)
    except (NotImplementedError, RuntimeError):  # a layer refusing meta tensors
        model = CEResNet(**kwargs)
    return model.state_dict()


def validate(conversion: Conversion) -> None:
    """Check keys and shapes against a fresh CEResNet; fill absent BN
    ``num_batches_tracked`` with 0 (older PyTorch did not save it)."""
    expected = reference_state(conversion.depth, conversion.stem_ce,
                               conversion.stage_with_ce)
    state = conversion.state_dict
    for key in expected:
        owner = key[:-len('.num_batches_tracked')]
        if (key.endswith('.num_batches_tracked') and key not in state
                and f'{owner}.running_mean' in state):
            state[key] = torch.zeros((), dtype=torch.long)
            conversion.filled.append(key)
    missing = [to_released_key(k) for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f'{len(missing)} keys missing: {_abbreviate(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys: '
                        f'{_abbreviate([to_released_key(k) for k in unexpected])}')
    shapes = [f'{to_released_key(k)}: {tuple(state[k].shape)}, expected '
              f'{tuple(v.shape)}' for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if shapes:
        problems.append(f'{len(shapes)} shape mismatches: {_abbreviate(shapes, 4)}')
    kinds = [to_released_key(k) for k, v in expected.items()
             if k in state and state[k].is_floating_point() != v.is_floating_point()]
    if kinds:
        problems.append(f'wrong dtype kind (float vs integer): {_abbreviate(kinds)}')
    if problems:
        raise ConversionError(
            f'does not match CEResNet(depth={conversion.depth}, stem_ce='
            f'{conversion.stem_ce}, stage_with_ce={conversion.stage_with_ce}): '
            + '; '.join(problems))
    not_finite = [to_released_key(k) for k, v in state.items()
                  if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        raise ConversionError(f'non-finite values in {_abbreviate(not_finite)}')
    # Same order as the model's state dict.
    conversion.state_dict = OrderedDict((k, state[k]) for k in expected)


def save_atomic(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``:
    ``path`` is either the complete new file or untouched."""
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp',
                                   dir=directory)
    try:
        with os.fdopen(handle, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def convert_checkpoint(src: str, dst: str, unsafe_load: bool = False) -> Conversion:
    """Convert ``src`` (released CE-ResNet checkpoint or bare state dict) and
    write an MMEngine checkpoint ``dict(state_dict=..., meta=...)`` to ``dst``.

    Raises:
        ConversionError: nothing is written.
    """
    if osp.abspath(src) == osp.abspath(dst):
        raise ConversionError('SRC and DST are the same file')
    state, meta = split_checkpoint(load_source(src, unsafe_load))
    conversion = convert_state_dict(state)
    conversion.source_meta = meta
    validate(conversion)
    out_meta = dict(
        converted_from=osp.basename(src),
        converter='cenet_mmdet.converters (tools/model_converters/cenet2mmdet.py)',
        backbone=dict(type='CEResNet', depth=conversion.depth,
                      stem_ce=conversion.stem_ce,
                      stage_with_ce=list(conversion.stage_with_ce)),
        dropped_keys=list(conversion.dropped),
        source=dict(meta))
    try:
        save_atomic(dict(state_dict=conversion.state_dict, meta=out_meta), dst)
    except OSError as error:
        raise ConversionError(f'cannot write {dst}: {error}') from error
    return conversion


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog='cenet2mmdet.py',
        description='Convert the released CE-ResNet ImageNet checkpoint '
        '(resnetv1ce50, torchvision-style keys) into an MMEngine checkpoint '
        'for backbone=dict(type="CEResNet", init_cfg=dict(type="Pretrained", '
        'checkpoint=DST)).')
    parser.add_argument('src', help='released checkpoint (or bare state dict)')
    parser.add_argument('dst', help='output path (.pth)')
    parser.add_argument('--unsafe-load', action='store_true',
                        help='torch.load with weights_only=False (only for '
                        'files you trust)')
    parser.add_argument('--verbose', action='store_true',
                        help='print every mapped key')
    args = parser.parse_args(argv)
    try:
        conversion = convert_checkpoint(args.src, args.dst, args.unsafe_load)
    except ConversionError as error:
        print(f'cenet2mmdet: error: {error}', file=sys.stderr)
        print(f'cenet2mmdet: nothing written to {args.dst}', file=sys.stderr)
        return 1
    print(conversion.summary(verbose=args.verbose))
    print(f'saved to {args.dst}')
    return 0
