"""Environment checks and compatibility fixes owned by the plugin.

* :func:`check_environment`: supported versions, and an mmcv built with its
  compiled ops (Mask R-CNN needs ``RoIAlign`` and ``nms``). Fails with a clear
  message pointing at the set-up command instead of a deep ``ImportError``.
* :func:`allow_mmengine_checkpoints`: torch >= 2.6 loads with
  ``weights_only=True``; MMEngine 0.10.7 checkpoints then fail with
  "Unsupported global". Rather than disabling the safety, the few types that
  MMEngine checkpoints contain (its ``HistoryBuffer`` and the numpy types of
  the message hub) are added to torch's allow-list.
"""
import importlib.util

SETUP_HINT = 'run `bash tools/setup_env.sh` (see README.md)'

SUPPORTED = {
    'mmengine': ('0.10.0', '0.11.0'),
    'mmcv': ('2.0.0', '2.2.0'),
    'mmdet': ('3.0.0', '4.0.0'),
}


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split('+')[0].split('.')[:3]:
        digits = ''.join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class StackError(ImportError):
    """Raised when the installed OpenMMLab stack cannot run the plugin."""


def check_environment() -> None:
    """Raise :class:`ImportError` naming the problem and the fix."""
    for name, (low, high) in SUPPORTED.items():
        if importlib.util.find_spec(name) is None:
            raise StackError(
                f'cenet_mmdet needs {name} >={low},<{high}, which is not '
                f'installed: {SETUP_HINT}')
        module = __import__(name)
        version = getattr(module, '__version__', '0')
        if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
            raise StackError(
                f'cenet_mmdet supports {name} >={low},<{high}, found {version}: '
                f'{SETUP_HINT}')
    if importlib.util.find_spec('mmcv._ext') is None:
        raise StackError(
            'mmcv is installed without its compiled ops (mmcv._ext is missing; '
            'it was probably installed as mmcv-lite or built with '
            'MMCV_WITH_OPS=0). Mask R-CNN needs RoIAlign and nms: '
            f'{SETUP_HINT}, which builds mmcv 2.1.0 from source with its ops.')


def mmengine_checkpoint_globals() -> list:
    """The non-tensor types found in MMEngine checkpoints."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = getattr(np, '_core', None)
    multiarray = multiarray.multiarray if multiarray is not None else np.core.multiarray
    safe = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
            multiarray.scalar]
    # numpy >= 1.25 pickles dtypes by their classes (np.dtypes.Float64DType, ...)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        safe += [getattr(dtypes, name) for name in dir(dtypes)
                 if name.endswith('DType')]
    return safe


def allow_mmengine_checkpoints() -> None:
    """Allow-list MMEngine's checkpoint types for ``torch.load(weights_only=True)``."""
    import torch
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is not None:  # torch >= 2.4
        add_safe_globals(mmengine_checkpoint_globals())
