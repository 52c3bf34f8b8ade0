"""``--cfg-options data_root=DIR`` that moves the data, as users expect.

An OpenMMLab config computes its paths when it is read: ``data_root =
'data/coco/'`` is copied into every dataloader's ``data_root`` and into the
evaluators' ``ann_file`` (``data_root + 'annotations/...'``). Overriding the
top-level ``data_root`` afterwards changes that one variable and nothing
else, so the run silently reads the old data. :func:`move_data_root`, called
by ``tools/train.py`` and ``tools/test.py`` after the overrides are merged,
moves every path that was derived from the original ``data_root``.
"""
from typing import Any, Optional

__all__ = ['move_data_root']


def _moved(value: str, old: str, new: str) -> Optional[str]:
    """``value`` with the directory prefix ``old`` replaced by ``new``, or
    None when ``value`` is not under ``old``."""
    if value == old or value.startswith(old + '/'):
        return new + value[len(old):]
    return None


def _move(node: Any, old: str, new: str) -> int:
    """Rewrite the strings under ``node`` in place; how many were moved."""
    moved = 0
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return 0
    for key, value in items:
        if isinstance(value, str):
            replacement = _moved(value, old, new)
            if replacement is not None:
                node[key] = replacement
                moved += 1
        elif isinstance(value, tuple):
            replaced = [(_moved(v, old, new) if isinstance(v, str) else None)
                        for v in value]
            if any(r is not None for r in replaced):
                node[key] = type(value)(r if r is not None else v
                                        for r, v in zip(replaced, value))
                moved += sum(r is not None for r in replaced)
            else:
                moved += sum(_move(v, old, new) for v in value)
        else:
            moved += _move(value, old, new)
    return moved


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
            value = cfg[key]
            if isinstance(value, str):
                replacement = _moved(value, old_base, new_base)
                if replacement is not None:
                    cfg[key] = replacement
                    moved += 1
            else:
                moved += _move(value, old_base, new_base)
    return moved
