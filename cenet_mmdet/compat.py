"""Environment checks and compatibility fixes owned by the plugin.

* :func:`check_environment`: supported versions, and an mmcv built with its
  compiled ops (Mask R-CNN needs ``RoIAlign`` and ``nms``). Fails with a clear
  message pointing at the set-up command instead of a deep ``ImportError``.
* :func:`allow_mmengine_checkpoints`: torch >= 2.6 loads with
  ``weights_only=True``; MMEngine 0.10.7 checkpoints then fail with
  "Unsupported global". Rather than disabling the safety, the types that
  MMEngine checkpoints contain (its ``HistoryBuffer`` and the numpy types of
  the message hub) are added to torch's allow-list, and ``getattr`` (pickled
  ``HistoryBuffer`` methods) is allowed only inside MMEngine's checkpoint
  loader.
* :func:`fix_ssd_head_predict`: MMDetection 3.3.0's ``SSDHead`` cannot predict
  (``'SSDHead' object has no attribute 'loss_cls'``, open-mmlab/mmdetection
  issues 11063 and 11780): ``BaseDenseHead.predict_by_feat`` reads
  ``self.loss_cls``, which ``SSDHead`` never sets. The fix of the upstream pull
  request 11524: an ``SSDHead`` without ``loss_cls`` gets ``loss_cls = None``
  (so ``getattr(None, 'custom_cls_channels', False)`` is False), needed by the
  SSDLite CE-MobileNetV2 config.
"""
import importlib.util

SETUP_HINT = 'run `bash tools/setup_env.sh` (see docs/installation.md)'

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


def _filter_statistics_methods(setstate):
    """Wrap ``HistoryBuffer.__setstate__``: keep only its own statistics methods.

    MMEngine pickles the buffer's ``statistics_methods`` as
    ``getattr(HistoryBuffer, 'mean')``, and ``__setstate__`` merges them into a
    class-level table that is later called. Only the methods that really are
    ``HistoryBuffer``'s are kept, so a crafted checkpoint cannot inject others.
    """

    def __setstate__(self, state):
        from mmengine.logging.history_buffer import HistoryBuffer
        methods = state.get('statistics_methods', {})
        state['statistics_methods'] = {
            name: method for name, method in methods.items()
            if getattr(HistoryBuffer, name, None) is method
        }
        return setstate(self, state)

    __setstate__._cenet_wrapped = True
    return __setstate__


class CheckpointFileError(RuntimeError):
    """A checkpoint file on disk is truncated or corrupted."""


def damaged_checkpoint_reason(filename: str):
    """Why the local file ``filename`` is not a sound checkpoint, or ``None``.

    A torch checkpoint is a zip archive: it is sound when every member is
    present and passes its CRC check (``torch.load`` checks neither, and loads
    a flipped byte silently). A file in PyTorch's legacy format (a pickle) and
    anything that is not a local file are not checked (``None``).
    """
    import os
    import zipfile

    if not isinstance(filename, str) or not os.path.isfile(filename):
        return None
    if not zipfile.is_zipfile(filename):
        with open(filename, 'rb') as f:
            if f.read(1) == b'\x80':  # pickle protocol 2+: legacy format
                return None
        return ('it is not a complete zip archive (torch checkpoints are zip '
                'archives): truncated, corrupted, or not a checkpoint')
    try:
        with zipfile.ZipFile(filename) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f'its zip archive is damaged ({err})'
    if bad_member is not None:
        return f'its member {bad_member!r} fails its CRC check'
    return None


def _load_with_getattr(load_checkpoint):
    """Wrap ``CheckpointLoader.load_checkpoint``: allow ``getattr`` (used by the
    pickled ``HistoryBuffer`` methods) only while MMEngine loads a checkpoint,
    and refuse a local file that is truncated or corrupted (resume,
    ``load_from``, ``Pretrained``, ``tools/test.py``) with a message naming it,
    instead of an unpickling traceback or silently wrong weights."""
    import torch

    def wrapped(cls, filename, map_location=None, logger='current'):
        reason = damaged_checkpoint_reason(filename)
        if reason is not None:
            raise CheckpointFileError(
                f'cannot load checkpoint {filename}: {reason} (a run killed '
                f'while saving leaves such a file). Resume from an earlier '
                f'checkpoint (--resume <work_dir>/iter_N.pth or epoch_N.pth) '
                f'or delete this one.')
        with torch.serialization.safe_globals([getattr]):
            return load_checkpoint(cls, filename, map_location, logger)

    wrapped._cenet_wrapped = True
    return classmethod(wrapped)


def allow_mmengine_checkpoints() -> None:
    """Make MMEngine checkpoints load under ``torch.load(weights_only=True)``.

    * data types (``HistoryBuffer``, numpy arrays, dtypes, scalars) join
      torch's allow-list for every ``torch.load``;
    * ``getattr`` is allowed only inside MMEngine's ``CheckpointLoader``
      (resume, ``load_from``, ``Pretrained`` init, ``tools/test.py``), and the
      functions it may produce are restricted to ``HistoryBuffer``'s own.
    Idempotent; a no-op on torch < 2.5.
    """
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    serialization = torch.serialization
    if not (hasattr(serialization, 'add_safe_globals')
            and hasattr(serialization, 'safe_globals')):
        return
    serialization.add_safe_globals(mmengine_checkpoint_globals())
    if not getattr(HistoryBuffer.__setstate__, '_cenet_wrapped', False):
        HistoryBuffer.__setstate__ = _filter_statistics_methods(
            HistoryBuffer.__setstate__)
    loader = CheckpointLoader.__dict__['load_checkpoint'].__func__
    if not getattr(loader, '_cenet_wrapped', False):
        CheckpointLoader.load_checkpoint = _load_with_getattr(loader)


def fix_ssd_head_predict() -> None:
    """Give every ``SSDHead`` built from now on ``loss_cls = None`` when its
    ``__init__`` set none (see the module docstring). Idempotent; nothing on
    an MMDetection whose ``SSDHead`` sets ``loss_cls`` itself."""
    from mmdet.models.dense_heads import SSDHead

    init = SSDHead.__init__
    if getattr(init, '_cenet_wrapped', False):
        return

    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, 'loss_cls'):
            self.loss_cls = None

    wrapped._cenet_wrapped = True
    wrapped.__doc__ = init.__doc__
    SSDHead.__init__ = wrapped
