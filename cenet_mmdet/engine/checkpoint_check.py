"""Checkpoints that do not fit the model stop the run, with what to do.

MMEngine loads checkpoints non-strictly: missing keys and shape mismatches
only log a warning, and the run goes on with those tensors at their initial
values. Two cases are refused here:

* :class:`CEWeightsCheckHook` (training): a ``load_from`` (or resume) that
  leaves CE layers of a :class:`~cenet_mmdet.models.backbones.CEResNet` at
  their initial values (a BN ResNet or BN detector checkpoint), unless the
  backbone opts in with ``ce_from_scratch=True``. The ``Pretrained``
  ``init_cfg`` of the backbone is checked by ``CEResNet.init_weights``
  itself. ``tools/train.py`` adds the hook to every run.
* :func:`check_checkpoint_covers` (testing, ``tools/test.py``): a checkpoint
  that lacks some of the model's tensors or holds them with other shapes
  (e.g. an ImageNet head with another number of classes).
"""
import re
from typing import Dict, List, Mapping, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import Tensor, nn

from ..models.backbones import CEResNet, CEWeightsError

__all__ = ['CEWeightsCheckHook', 'CheckpointMismatchError',
           'check_checkpoint_covers', 'checkpoint_mismatch', 'CEWeightsError']


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not hold every tensor of the model, with its shape."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper or a test-time-augmentation model."""
    while is_model_wrapper(model) or (
            hasattr(model, 'module') and type(model).__name__.endswith('TTAModel')):
        model = model.module
    return model


@HOOKS.register_module()
class CEWeightsCheckHook(Hook):
    """Before training: refuse a loaded checkpoint (``load_from`` or resume)
    that left CE layers of a CEResNet at their initial values.

    See :meth:`cenet_mmdet.models.backbones.CEResNet.check_ce_weights` for
    the rule and the opt-in (``ce_from_scratch=True``).
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        if not getattr(runner, '_has_loaded', False):
            return  # nothing loaded by the runner (init_cfg is checked at init)
        load_from = getattr(runner, '_load_from', None)
        source = (f'checkpoint {load_from!r} (load_from)' if load_from
                  else 'the resumed checkpoint')
        for module in _unwrap(runner.model).modules():
            if isinstance(module, CEResNet):
                module.check_ce_weights(source)


def _state_dict_of(checkpoint: object) -> Mapping[str, Tensor]:
    if isinstance(checkpoint, Mapping) and 'state_dict' in checkpoint:
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(
            f'not a checkpoint: expected a dict with a "state_dict" or a state '
            f'dict, got {type(checkpoint).__name__}')
    # MMEngine's loader strips a DDP "module." prefix the same way
    return {re.sub(r'^module\.', '', key): value
            for key, value in checkpoint.items()}


def checkpoint_mismatch(model: nn.Module,
                        state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """What of ``model``'s state the ``state_dict`` does not cover (missing
    keys, shape mismatches), or ``None``. Extra keys are allowed."""
    expected: Dict[str, Tensor] = _unwrap(model).state_dict()
    missing = [key for key in expected if key not in state_dict]
    shapes = [f'{key} {tuple(state_dict[key].shape)} vs the model\'s '
              f'{tuple(value.shape)}' for key, value in expected.items()
              if key in state_dict and hasattr(state_dict[key], 'shape')
              and tuple(state_dict[key].shape) != tuple(value.shape)]
    problems: List[str] = []
    if missing:
        problems.append(f'{len(missing)} of the model\'s {len(expected)} tensors '
                        f'are missing ({", ".join(missing[:3])}'
                        f'{", ..." if len(missing) > 3 else ""})')
    if shapes:
        problems.append(f'{len(shapes)} have another shape ({"; ".join(shapes[:2])}'
                        f'{"; ..." if len(shapes) > 2 else ""})')
    return '; '.join(problems) or None


def check_checkpoint_covers(model: nn.Module, filename: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless the checkpoint
    ``filename`` holds every tensor of ``model`` with its shape."""
    from mmengine.runner.checkpoint import _load_checkpoint
    try:
        checkpoint = _load_checkpoint(filename, map_location='cpu',
                                      logger='silent')
    except FileNotFoundError as error:
        raise CheckpointMismatchError(
            f'checkpoint not found: {filename} ({error})') from error
    problem = checkpoint_mismatch(model, _state_dict_of(checkpoint))
    if problem is not None:
        raise CheckpointMismatchError(
            f'checkpoint {filename} does not fit the model of this config: '
            f'{problem}. Is it the checkpoint of this config (same classes, '
            f'backbone and heads)?')
