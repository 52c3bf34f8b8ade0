"""Compatibility owned by the plugin: weights_only checkpoints, stack checks."""
import importlib.util
import os.path as osp
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import cenet_mmdet
from cenet_mmdet import compat
from mmengine.logging import HistoryBuffer
from mmengine.registry import DefaultScope
from mmengine.runner.checkpoint import _load_checkpoint


class _Toy(nn.Module):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.data_preprocessor = nn.Identity()

    def forward(self, inputs, targets=None, mode='loss'):
        inputs = torch.stack(inputs) if isinstance(inputs, list) else inputs
        # MMEngine's Runner moves the model to CUDA when there is one, and the
        # Identity preprocessor leaves the data where the loader made them
        inputs = inputs.to(self.linear.weight.device)
        out = self.linear(inputs)
        if mode == 'loss':
            targets = targets.to(out.device)
            return dict(loss=((out.squeeze(-1) - targets) ** 2).mean())
        return out

    def train_step(self, data, optim_wrapper):
        losses = self(*data, mode='loss')
        optim_wrapper.update_params(losses['loss'])
        return losses


class _ToyData(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.full((2,), float(index)), torch.tensor(float(index % 3))


def _runner(work_dir, max_iters, resume):
    from mmengine.runner import Runner
    return Runner(
        model=_Toy(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=_ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, num_workers=0,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume,
        default_scope='mmengine')


def test_mmengine_checkpoint_resumes_with_weights_only(tmp_path):
    """Save through the runner (message hub, history buffers), then resume.

    A Runner makes its ``default_scope`` current for good: the test puts the
    previous one back (a later ``MODELS.build`` of ``CEResNet`` would fail
    under the ``mmengine`` scope)."""
    before = _current_scope_name()
    with DefaultScope.overwrite_default_scope('mmengine'):
        _resume_through_the_runner(tmp_path)
        assert _current_scope_name() == 'mmengine'
    assert _current_scope_name() == before


def _current_scope_name():
    current = DefaultScope.get_current_instance()
    return None if current is None else current.scope_name


def _resume_through_the_runner(tmp_path):
    _runner(tmp_path, max_iters=2, resume=False).train()
    ckpt_path = osp.join(tmp_path, 'iter_2.pth')
    # the file really holds types that plain weights_only loading refuses
    raw = open(ckpt_path, 'rb').read()
    assert b'HistoryBuffer' in raw and b'getattr' in raw
    checkpoint = _load_checkpoint(ckpt_path, map_location='cpu')  # weights_only=True
    assert checkpoint['meta']['iter'] == 2
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer) and len(buffer.data[0]) == 2
    assert buffer.statistics('mean') == buffer.data[0].mean()
    runner = _runner(tmp_path, max_iters=4, resume=True)
    runner.train()
    assert runner.iter == 4
    assert osp.exists(osp.join(tmp_path, 'iter_4.pth'))


class _NotAllowed:
    pass


def test_weights_only_still_refuses_arbitrary_types(tmp_path):
    path = str(tmp_path / 'evil.pth')
    torch.save({'payload': _NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(path)
    # getattr is not allowed outside MMEngine's checkpoint loader
    torch.save({'fn': HistoryBuffer.mean}, path)
    with pytest.raises(pickle.UnpicklingError, match='getattr'):
        torch.load(path, weights_only=True)


def test_history_buffer_keeps_only_its_own_methods():
    buffer = HistoryBuffer([1.0, 2.0], [1, 1])
    state = buffer.__getstate__()
    state['statistics_methods'] = dict(state['statistics_methods'], mean=print,
                                       evil=print)
    restored = HistoryBuffer.__new__(HistoryBuffer)
    restored.__setstate__(state)
    assert HistoryBuffer._statistics_methods['mean'] is HistoryBuffer.mean
    assert 'evil' not in HistoryBuffer._statistics_methods
    assert restored.mean() == 1.5


def test_missing_mmcv_ops_gives_a_clear_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec',
        lambda name, *a: None if name == 'mmcv._ext' else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r'without its compiled ops.*tools/setup_env\.sh'):
        compat.check_environment()


def test_unsupported_version_gives_a_clear_message(monkeypatch):
    import mmengine
    monkeypatch.setattr(mmengine, '__version__', '0.9.0')
    with pytest.raises(ImportError, match=r'mmengine >=0\.10\.0,<0\.11\.0, found 0\.9\.0'):
        compat.check_environment()


def test_version_is_single_sourced():
    """The package, setup.py and the installed metadata agree on one version."""
    import importlib.metadata
    import re
    import runpy
    from pathlib import Path
    version_file = Path(cenet_mmdet.__file__).with_name('version.py')
    assert re.fullmatch(r'\d+\.\d+\.\d+', cenet_mmdet.__version__)
    assert runpy.run_path(str(version_file))['__version__'] == cenet_mmdet.__version__
    assert importlib.metadata.version('cenet-mmdet') == cenet_mmdet.__version__
    setup_text = (version_file.parent.parent / 'setup.py').read_text()
    assert 'version=read_version()' in setup_text
