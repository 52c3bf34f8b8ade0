"""Exact resume: every rank's random states travel with the checkpoint.

MMEngine's resume restores weights, optimizer, schedulers and the iteration
count, but not the random generators. Training then continues with fresh
states: the RoI samplers (torch's generator), the random flips (numpy's) and
anything drawing from Python's ``random`` differ from the uninterrupted run,
so a killed and resumed run ends at other weights.

:class:`RandomStateHook` gathers the states of every rank right before a
checkpoint is saved (``all_gather_object`` on the iterations and epochs where
the ``CheckpointHook`` saves, so all ranks join the collective) and stores them
under ``checkpoint['random_states']``: one dict per rank with ``torch``
(CPU generator), ``cuda`` (every visible device, when CUDA is initialized),
``numpy`` and ``python``. On resume each rank gets its own states back at the
point where the uninterrupted run would have been: for iteration-based loops
after MMEngine has re-read the already trained batches (which draws from the
generators), before the first new batch is read; for epoch-based loops before
the next epoch's data loader starts.

Validation run by the training loop is made neutral: the states are taken
before it and put back after it, since a resumed run does not repeat the
validation that followed the checkpoint.

Limits (each says what is and is not exact): the world size must be the same
(else a warning, nothing restored); data-loader workers are re-seeded by
MMEngine's ``worker_init_fn`` and replay the skipped batches, which is exact
for a fixed ``randomness.seed``; epoch-based loops resume at an epoch boundary
(as MMEngine does).
"""
import random
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

STATE_KEY = 'random_states'


def capture_random_states() -> Dict[str, object]:
    """This process's generator states (torch, CUDA, numpy, Python)."""
    states = {
        'torch': torch.get_rng_state(),
        'numpy': np.random.get_state(),
        'python': random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: Dict[str, object]) -> None:
    """Set this process's generators to ``states`` (from
    :func:`capture_random_states`)."""
    torch.set_rng_state(states['torch'])
    np.random.set_state(states['numpy'])
    random.setstate(states['python'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def gather_random_states() -> List[Dict[str, object]]:
    """Every rank's states, in rank order; a collective: all ranks call it."""
    local = capture_random_states()
    if get_world_size() == 1:
        return [local]
    gathered: List[Optional[Dict[str, object]]] = [None] * get_world_size()
    dist.all_gather_object(gathered, local)
    # objects come back through pickling: tensors may be on another device
    return [_to_cpu(states) for states in gathered]


def _to_cpu(states: Dict[str, object]) -> Dict[str, object]:
    states = dict(states)
    states['torch'] = states['torch'].cpu()
    if 'cuda' in states:
        states['cuda'] = [state.cpu() for state in states['cuda']]
    return states


class _RestoreBeforeNewData:
    """Wraps a loop's data iterator: passes ``skip`` batches through (the
    ones MMEngine re-reads on resume), then restores the random states just
    before the first new batch and takes itself out of the loop."""

    def __init__(self, loop, iterator: Iterator, skip: int,
                 states: Dict[str, object]) -> None:
        self.loop, self.iterator = loop, iterator
        self.skip, self.states = skip, states

    def __iter__(self):
        return self

    def __next__(self):
        if self.skip > 0:
            self.skip -= 1
            return next(self.iterator)
        restore_random_states(self.states)
        self.loop.dataloader_iterator = self.iterator
        return next(self.iterator)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Store every rank's random states in checkpoints and restore them on
    resume, so that a killed run resumes to exactly the same weights.

    Add it with ``custom_hooks = [dict(type='RandomStateHook')]``. It follows
    the ``CheckpointHook`` of the runner (interval, ``save_begin``,
    ``save_last``, by epoch or by iteration) to know when to gather.
    """

    # before CheckpointHook (VERY_LOW) in after_train_iter/after_train_epoch
    priority = 'LOW'

    def __init__(self) -> None:
        self._gathered: Optional[List[Dict[str, object]]] = None
        self._loaded: Optional[List[Dict[str, object]]] = None
        self._loaded_at = None
        self._before_val: Optional[Dict[str, object]] = None

    # ------------------------------------------------------------ saving
    @staticmethod
    def _checkpoint_hook(runner) -> Optional[CheckpointHook]:
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook):
                return hook
        return None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        hook = self._checkpoint_hook(runner)
        if hook is None or hook.by_epoch:
            return
        if hook.every_n_train_iters(runner, hook.interval, hook.save_begin) or (
                hook.save_last and hook.is_last_train_iter(runner)):
            self._gathered = gather_random_states()

    def after_train_epoch(self, runner) -> None:
        hook = self._checkpoint_hook(runner)
        if hook is None or not hook.by_epoch:
            return
        if hook.every_n_epochs(runner, hook.interval, hook.save_begin) or (
                hook.save_last and hook.is_last_train_epoch(runner)):
            self._gathered = gather_random_states()

    # Validation during training must not move the training streams: a run
    # resumed after a checkpoint skips the validation that followed it (and
    # creating the val data loader's iterator alone draws from torch's
    # generator).
    def before_val(self, runner) -> None:
        self._before_val = capture_random_states()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            restore_random_states(self._before_val)
            self._before_val = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._gathered is not None:  # else: a save outside the hook's plan
            checkpoint[STATE_KEY] = self._gathered
            self._gathered = None

    # ----------------------------------------------------------- resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        states = checkpoint.get(STATE_KEY)
        meta = checkpoint.get('meta', {})
        self._loaded, self._loaded_at = None, None
        if states is None:
            return
        if not getattr(runner, '_resume', False):
            return  # a load of weights (load_from, tools/test.py): nothing to restore
        if len(states) != get_world_size():
            print_log(
                f'RandomStateHook: the checkpoint holds random states of '
                f'{len(states)} ranks, this run has {get_world_size()}: they '
                f'are not restored and the resumed run is not exact.',
                logger='current', level=30)
            return
        self._loaded = states
        self._loaded_at = (meta.get('epoch'), meta.get('iter'))

    def before_train_epoch(self, runner) -> None:
        if self._loaded is None:
            return
        # only when this run resumed at the checkpoint's position (not after
        # a load_from of weights, which starts at iteration 0)
        if (runner.epoch, runner.iter) != self._loaded_at or runner.iter == 0:
            self._loaded = None
            return
        states = self._loaded[get_rank()]
        self._loaded = None
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):  # iteration-based
            loop.dataloader_iterator = _RestoreBeforeNewData(
                loop, loop.dataloader_iterator, loop.iter, states)
        else:
            restore_random_states(states)
