"""``--cfg-options data_root=DIR`` that moves the data, as users expect.

An OpenMMLab config computes its paths when it is read: ``data_root =
'data/coco/'`` is copied into every dataloader's ``data_root`` and into the
evaluators' ``ann_file`` (``data_root + 'annotations/...'``). Overriding the
top-level ``data_root`` afterwards changes that one variable and nothing
else, so the run silently reads the old data. :func:`move_data_root`, called
by ``tools/train.py`` and ``tools/test.py`` after the overrides are merged,
moves every path that was derived from the original ``data_root``.
"""
from typing import Any, Optional, Tuple

__all__ = ['move_data_root']


def _moved(value: str, old: str, new: str) -> Optional[str]:
    """``value`` with the directory prefix ``old`` replaced by ``new``, or
    None when ``value`` is not under ``old``."""
    if value == old or value.startswith(old + '/'):
        return new + value[len(old):]
    return None


def _move(value: Any, old: str, new: str) -> Tuple[Any, int]:
    """``(value with its paths under old moved, how many were moved)``;
    dicts and lists are rewritten in place, strings and tuples rebuilt."""
    if isinstance(value, str):
        moved = _moved(value, old, new)
        return (value, 0) if moved is None else (moved, 1)
    if isinstance(value, tuple):
        results = [_move(item, old, new) for item in value]
        return type(value)(item for item, _ in results), sum(n for _, n in results)
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return value, 0
    total = 0
    for key, item in items:
        item, count = _move(item, old, new)
        if count:
            value[key] = item
            total += count
    return value, total


def move_data_root(cfg, original: Optional[str]) -> int:
    """After the overrides: if ``cfg.data_root`` is no longer ``original``
    (the value the config file set), move every path of ``cfg`` under
    ``original`` (dataloaders' ``data_root``, evaluators' ``ann_file``, ...)
    to the new root. Returns the number of paths moved.

    Args:
        cfg: the merged ``mmengine.Config``.
        original: ``cfg.data_root`` as read from the file (None if unset).
    """
    new = cfg.get('data_root')
    if not isinstance(original, str) or not isinstance(new, str) or not original:
        return 0
    old_base, new_base = original.rstrip('/'), new.rstrip('/')
    if old_base == new_base or not old_base:
        return 0
    moved = 0
    for key in list(cfg.keys()):
        if key != 'data_root':
            value, count = _move(cfg[key], old_base, new_base)
            if count:
                cfg[key] = value
                moved += count
    return moved
