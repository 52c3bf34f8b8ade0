"""tools/model_converters/cenet2mmdet.py: mapping, report, errors, atomicity.

The numerical round trip (converted checkpoint in CEResNet == released
network) is in tests/test_backbones/test_ce_resnet_pretrained.py.
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

import cenet_mmdet  # noqa: F401
from cenet_mmdet.converters import (ConversionError, convert_state_dict,
                                    infer_depth, main, to_released_key)
from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.testing.released_resnet import (ReleasedCEResNet,
                                                 perturb_released_resnet_,
                                                 released_checkpoint)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(ROOT, 'tools', 'model_converters', 'cenet2mmdet.py')


@pytest.fixture(scope='module')
def released_state():
    """State dict of a released-layout CE-ResNet-50 with perturbed values."""
    torch.manual_seed(0)
    model = ReleasedCEResNet(50, num_classes=10)
    perturb_released_resnet_(model, torch.Generator().manual_seed(0))
    return model.state_dict()


def checkpoint_of(state, **extra):
    checkpoint = dict(epoch=100, model='resnetv1ce50',
                      state_dict=OrderedDict(state), best_prec1=78.2,
                      optimizer=dict(state={}, param_groups=[]))
    checkpoint.update(extra)
    return checkpoint


def run(tmp_path, checkpoint, capsys, *args, dst_name='out.pth'):
    """Save ``checkpoint``, run the converter in-process; (rc, out, err, dst)."""
    src = tmp_path / 'src.pth.tar'
    if checkpoint is not None:
        torch.save(checkpoint, src)
    dst = tmp_path / 'converted' / dst_name
    capsys.readouterr()
    rc = main([str(src), str(dst), *args])
    out, err = capsys.readouterr()
    return rc, out, err, dst


def assert_refused(rc, err, dst, *fragments):
    assert rc == 1
    assert 'cenet2mmdet: error:' in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not dst.exists()
    if dst.parent.exists():  # no temporary file left behind either
        assert os.listdir(dst.parent) == []


# ----------------------------------------------------------------- success
def test_converts_and_reports(tmp_path, capsys, released_state):
    rc, out, err, dst = run(tmp_path, checkpoint_of(released_state), capsys)
    assert rc == 0, err
    assert 'source: model resnetv1ce50, epoch 100, best_prec1 78.2' in out
    assert ('target: CEResNet depth=50, stem_ce=True, stage_with_ce=(True, True, '
            'True, False) (14 CE blocks)') in out
    assert 'CE keys mapped: 112 (14 CE blocks)' in out
    assert "ce1.<k>         -> bn1.ce.<k'>         : 8" in out
    assert "layerA.B.ce.<k> -> layerA.B.bn3.ce.<k'>: 104" in out
    assert 'x_weight          -> lambda_logit         x14' in out
    assert 'running_wm        -> running_whitening    x14' in out
    assert 'dropped (classifier): 2: fc.weight, fc.bias' in out
    assert 'NOTE' not in out and "'module.' prefix" not in out
    expected = CEResNet(depth=50).state_dict()
    unchanged = len([k for k in released_state if '.ce.' not in k
                     and not k.startswith(('ce1.', 'fc.'))])
    assert f'unchanged (torchvision names): {unchanged}' in out
    assert f'written: {len(expected)} keys' in out
    assert unchanged + 112 == len(expected)

    converted = torch.load(dst, map_location='cpu', weights_only=True)
    state = converted['state_dict']
    assert list(state) == list(expected)  # model order
    assert all(state[k].shape == v.shape for k, v in expected.items())
    assert torch.equal(state['bn1.ce.lambda_logit'], released_state['ce1.x_weight'])
    assert torch.equal(state['layer3.5.bn3.ce.aii.gate.1.bias'],
                       released_state['layer3.5.ce.AR.fc.1.bias'])
    assert torch.equal(state['layer1.0.downsample.1.running_var'],
                       released_state['layer1.0.downsample.1.running_var'])
    meta = converted['meta']
    assert meta['backbone'] == dict(type='CEResNet', depth=50, stem_ce=True,
                                    stage_with_ce=[True, True, True, False])
    assert meta['dropped_keys'] == ['fc.weight', 'fc.bias']
    assert meta['source'] == dict(model='resnetv1ce50', epoch=100, best_prec1=78.2)
    assert sorted(os.listdir(dst.parent)) == ['out.pth']
    # verbose lists every mapping
    rc, out, _, _ = run(tmp_path, checkpoint_of(released_state), capsys, '--verbose')
    assert rc == 0
    assert '  layer2.3.ce.AR.running_scale -> layer2.3.bn3.ce.aii.running_scale' in out


def test_module_prefix_bare_state_and_tensor_metadata(tmp_path, capsys,
                                                      released_state):
    prefixed = OrderedDict(('module.' + k, v) for k, v in released_state.items())
    rc, out, err, dst = run(tmp_path, prefixed, capsys)  # bare, prefixed
    assert rc == 0, err
    assert f"'module.' prefix stripped from {len(prefixed)} keys" in out
    assert 'source: bare state dict' in out
    state = torch.load(dst, weights_only=True)['state_dict']
    assert torch.equal(state['layer1.2.bn3.ce.running_whitening'],
                       released_state['layer1.2.ce.running_wm'])
    checkpoint = checkpoint_of(released_state, best_prec1=torch.tensor(78.25),
                               epoch=torch.tensor(99))
    rc, out, err, dst = run(tmp_path, checkpoint, capsys)
    assert rc == 0, err
    assert torch.load(dst, weights_only=True)['meta']['source'] == dict(
        model='resnetv1ce50', epoch=99, best_prec1=78.25)


def test_expanded_running_wm_and_missing_num_batches_tracked(tmp_path, capsys,
                                                             released_state):
    """The released running_wm can be a stride-0 expanded identity; older
    PyTorch saved no num_batches_tracked."""
    state = OrderedDict((k, v) for k, v in released_state.items()
                        if not k.endswith('num_batches_tracked'))
    state['layer1.0.ce.running_wm'] = torch.eye(16).expand(16, 16, 16)
    assert state['layer1.0.ce.running_wm'].stride() == (0, 16, 1)
    rc, out, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert rc == 0, err
    num_bn = len([k for k in released_state if k.endswith('num_batches_tracked')])
    assert f'filled (absent in source, BN num_batches_tracked = 0): {num_bn}' in out
    converted = torch.load(dst, weights_only=True)['state_dict']
    wm = converted['layer1.0.bn3.ce.running_whitening']
    assert wm.is_contiguous() and torch.equal(wm, torch.eye(16).repeat(16, 1, 1))
    model = CEResNet(depth=50)
    model.load_state_dict(converted, strict=True)
    model.layer1[0].bn3.ce.running_whitening.mul_(0.5)  # writable, not aliased
    assert model.layer1[0].bn3.ce.running_whitening[3, 0, 0] == 0.5


def test_non_default_placement_is_reported(tmp_path, capsys):
    torch.manual_seed(0)
    model = ReleasedCEResNet(50, num_classes=10,
                             stage_with_ce=(True, True, False, False))
    rc, out, err, dst = run(tmp_path, checkpoint_of(model.state_dict()), capsys)
    assert rc == 0, err
    assert 'NOTE: not the default CE placement for depth 50' in out
    assert 'stage_with_ce=(True, True, False, False)' in out
    converted = torch.load(dst, weights_only=True)
    assert converted['meta']['backbone']['stage_with_ce'] == [True, True, False, False]
    CEResNet(depth=50, stage_with_ce=(True, True, False, False)).load_state_dict(
        converted['state_dict'], strict=True)


def test_overwrites_existing_destination_atomically(tmp_path, capsys,
                                                    released_state):
    dst = tmp_path / 'converted' / 'out.pth'
    dst.parent.mkdir()
    dst.write_bytes(b'old')
    rc, _, err, _ = run(tmp_path, checkpoint_of(released_state), capsys)
    assert rc == 0, err
    assert 'state_dict' in torch.load(dst, weights_only=True)
    assert os.listdir(dst.parent) == ['out.pth']


# ------------------------------------------------------------------ errors
def test_refuses_plain_resnet(tmp_path, capsys):
    torch.manual_seed(0)
    plain = ReleasedCEResNet(50, num_classes=10, stem_ce=False,
                             stage_with_ce=(False,) * 4)
    rc, _, err, dst = run(tmp_path, checkpoint_of(plain.state_dict()), capsys)
    assert_refused(rc, err, dst, 'no CE keys', 'not a CE-ResNet checkpoint',
                   'nothing written')


def test_refuses_wrong_shape(tmp_path, capsys, released_state):
    state = OrderedDict(released_state)
    state['layer2.1.ce.running_wm'] = torch.eye(8).repeat(64, 1, 1)
    state['layer3.0.conv2.weight'] = torch.zeros(256, 256, 1, 1)
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst, '2 shape mismatches',
                   'layer2.1.ce.running_wm: (64, 8, 8), expected (32, 16, 16)',
                   'layer3.0.conv2.weight: (256, 256, 1, 1), expected (256, 256, 3, 3)')


def test_refuses_truncated_depth(tmp_path, capsys, released_state):
    state = OrderedDict((k, v) for k, v in released_state.items()
                        if not k.startswith('layer3.5.'))
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst, 'cannot infer the depth',
                   'blocks per layer are [3, 4, 5, 3]', '[3, 4, 6, 3] -> 50',
                   '[3, 4, 23, 3] -> 101')


def test_refuses_missing_file(tmp_path, capsys):
    rc, _, err, dst = run(tmp_path, None, capsys)
    assert_refused(rc, err, dst, 'source checkpoint not found')


def test_refuses_missing_ce_keys(tmp_path, capsys, released_state):
    state = OrderedDict(released_state)
    del state['layer2.1.ce.running_wm']
    del state['ce1.AR.running_scale']
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst, '2 keys missing', 'ce1.AR.running_scale',
                   'layer2.1.ce.running_wm')
    # a whole CE block missing from one block of a CE stage
    state = OrderedDict((k, v) for k, v in released_state.items()
                        if not k.startswith('layer2.3.ce.'))
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst,
                   'layer2 has CE keys in blocks [0, 1, 2] but not in [3]')


def test_refuses_unknown_and_unexpected_keys(tmp_path, capsys, released_state):
    state = OrderedDict(released_state)
    state['layer1.0.ce.AR.fc.2.weight'] = torch.ones(3)
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst, 'unknown CE keys layer1.0.ce.AR.fc.2.weight')
    state = OrderedDict(released_state)
    state['layer4.0.ce.x_weight'] = torch.zeros(1)  # CE in one block of layer4
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst, 'layer4 has CE keys in blocks [0] but not in [1, 2]')
    state = OrderedDict(released_state)
    state['head.weight'] = torch.zeros(3)
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst, '1 unexpected keys: head.weight')


def test_refuses_non_finite_and_non_state_dicts(tmp_path, capsys, released_state):
    state = OrderedDict(released_state)
    state['layer1.0.ce.AR.running_scale'] = torch.tensor([float('nan')])
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst, 'non-finite values in layer1.0.ce.AR.running_scale')
    rc, _, err, dst = run(tmp_path, [1, 2, 3], capsys)
    assert_refused(rc, err, dst, 'expected a checkpoint dict')
    rc, _, err, dst = run(tmp_path, dict(state_dict=dict(a=1, b=torch.ones(1))), capsys)
    assert_refused(rc, err, dst, 'not a state dict: 1 values are not tensors (a)')
    rc, _, err, dst = run(tmp_path, dict(state_dict={}), capsys)
    assert_refused(rc, err, dst, 'holds no state dict')
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    dst = tmp_path / 'converted' / 'x.pth'
    capsys.readouterr()
    rc = main([str(tmp_path / 'notes.txt'), str(dst)])
    err = capsys.readouterr().err
    assert_refused(rc, err, dst, 'cannot read', 'not a complete zip archive')
    assert '--unsafe-load' not in err  # not an unsafe type: not a checkpoint


def test_refuses_non_string_keys(tmp_path, capsys, released_state):
    state = OrderedDict(released_state)
    state[3] = torch.ones(1)
    state[('layer1', 0)] = torch.ones(1)
    rc, _, err, dst = run(tmp_path, checkpoint_of(state), capsys)
    assert_refused(rc, err, dst,
                   'not a state dict: 2 keys are not parameter names (strings): '
                   "3, ('layer1', 0)")


@pytest.mark.parametrize('damage', ['truncated', 'flipped'])
def test_refuses_a_damaged_archive(tmp_path, capsys, released_state, damage):
    src = tmp_path / 'src.pth.tar'
    torch.save(checkpoint_of(released_state), src)
    data = bytearray(src.read_bytes())
    if damage == 'truncated':  # a copy or a save that was cut short
        data = data[:len(data) // 2]
    else:  # one flipped byte inside the stored tensors
        data[len(data) // 2] ^= 0xFF
    src.write_bytes(bytes(data))
    dst = tmp_path / 'converted' / 'out.pth'
    capsys.readouterr()
    rc = main([str(src), str(dst)])
    err = capsys.readouterr().err
    expected = ('not a complete zip archive' if damage == 'truncated' else
                'fails its CRC check')
    assert_refused(rc, err, dst, f'cannot read {src}', expected)
    assert '--unsafe-load' not in err


def test_half_tensors_convert_and_integer_tensors_are_refused(
        tmp_path, capsys, released_state):
    half = OrderedDict((k, v.half() if v.is_floating_point() else v)
                       for k, v in released_state.items())
    rc, _, err, dst = run(tmp_path, checkpoint_of(half), capsys)
    assert rc == 0, err
    backbone = CEResNet(depth=50)
    converted = torch.load(dst, weights_only=True)['state_dict']
    backbone.load_state_dict(converted)
    loaded = backbone.state_dict()
    assert torch.equal(loaded['bn1.ce.running_whitening'],
                       half['ce1.running_wm'].float())
    assert torch.equal(loaded['layer1.0.bn3.ce.aii.gate.0.weight'],
                       half['layer1.0.ce.AR.fc.0.weight'].float())
    integer = OrderedDict(released_state)
    integer['layer2.1.ce.running_wm'] = integer['layer2.1.ce.running_wm'].long()
    rc, _, err, dst = run(tmp_path, checkpoint_of(integer), capsys,
                          dst_name='integer.pth')
    dst.parent.joinpath('out.pth').unlink()  # the half conversion's output
    assert_refused(rc, err, dst, 'wrong dtype kind (float vs integer): '
                   'layer2.1.ce.running_wm')


def test_untrusted_pickle_needs_unsafe_load(tmp_path, capsys, released_state):
    checkpoint = checkpoint_of(released_state, args=argparse.Namespace(lr=0.1))
    rc, _, err, dst = run(tmp_path, checkpoint, capsys)
    assert_refused(rc, err, dst, 'weights_only=True', '--unsafe-load')
    rc, _, err, dst = run(tmp_path, checkpoint, capsys, '--unsafe-load')
    assert rc == 0, err
    assert dst.exists()


def test_refuses_an_already_converted_checkpoint(tmp_path, capsys, released_state):
    rc, _, err, dst = run(tmp_path, checkpoint_of(released_state), capsys)
    assert rc == 0, err
    again = tmp_path / 'again.pth'
    capsys.readouterr()
    assert main([str(dst), str(again)]) == 1
    assert 'already in CEResNet format (bn1.ce.' in capsys.readouterr().err
    assert not again.exists()


def test_unwritable_destination(tmp_path, capsys, released_state):
    blocker = tmp_path / 'converted'
    blocker.write_text('a file where the output directory should be')
    rc, _, err, _ = run(tmp_path, checkpoint_of(released_state), capsys)
    assert rc == 1 and 'cannot write' in err


def test_failed_conversion_keeps_existing_destination(tmp_path, capsys,
                                                      released_state):
    dst = tmp_path / 'converted' / 'out.pth'
    dst.parent.mkdir()
    dst.write_bytes(b'previous')
    state = OrderedDict(released_state)
    del state['layer1.0.conv1.weight']
    rc, _, err, _ = run(tmp_path, checkpoint_of(state), capsys)
    assert rc == 1 and 'layer1.0.conv1.weight' in err
    assert dst.read_bytes() == b'previous'
    assert os.listdir(dst.parent) == ['out.pth']


def test_same_source_and_destination(tmp_path, capsys, released_state):
    src = tmp_path / 'ckpt.pth'
    torch.save(checkpoint_of(released_state), src)
    before = src.read_bytes()
    assert main([str(src), str(src)]) == 1
    assert 'same file' in capsys.readouterr().err
    assert src.read_bytes() == before


# ------------------------------------------------------------ unit helpers
def test_infer_depth_and_key_names():
    def keys(blocks):
        return [f'layer{s + 1}.{b}.conv1.weight' for s, n in enumerate(blocks)
                for b in range(n)]
    assert infer_depth(keys([3, 4, 6, 3])) == 50
    assert infer_depth(keys([3, 4, 23, 3])) == 101
    with pytest.raises(ConversionError, match=r'\[3, 4, 36, 3\]'):
        infer_depth(keys([3, 4, 36, 3]))  # ResNet-152
    with pytest.raises(ConversionError, match='non-contiguous'):
        infer_depth(keys([3, 4, 6, 3]) + ['layer1.7.conv1.weight'])
    with pytest.raises(ConversionError, match='not a ResNet'):
        infer_depth(['conv1.weight', 'fc.weight'])
    assert to_released_key('bn1.ce.lambda_logit') == 'ce1.x_weight'
    assert to_released_key('layer2.3.bn3.ce.aii.gate.3.weight') == \
        'layer2.3.ce.AR.fc.3.weight'
    assert to_released_key('layer2.3.bn3.weight') == 'layer2.3.bn3.weight'
    with pytest.raises(ConversionError, match='duplicate key'):
        convert_state_dict(OrderedDict([('conv1.weight', torch.ones(1)),
                                        ('module.conv1.weight', torch.ones(1))]))


# ---------------------------------------------------------------- the CLI
def _cli(*args):
    path = ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_script(tmp_path, released_state):
    src, dst = tmp_path / 'released.pth.tar', tmp_path / 'out' / 'ce_r50.pth'
    missing = _cli(tmp_path / 'nope.pth', dst)
    assert missing.returncode == 1
    assert 'source checkpoint not found' in missing.stderr
    assert not dst.exists()
    torch.save(released_checkpoint(released_state, module_prefix=True), src)
    ok = _cli(src, dst)
    assert ok.returncode == 0, ok.stderr
    assert 'CE keys mapped: 112 (14 CE blocks)' in ok.stdout
    assert f'saved to {dst}' in ok.stdout
    assert dst.exists()


def test_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert 'usage: cenet2mmdet.py' in capsys.readouterr().err



# ------------------------------------------- cls2backbone: what it refuses
def _classifier_state(ce: bool = True):
    torch.manual_seed(0)
    backbone = CEResNet(depth=50, ce_cfg=dict(type='CE') if ce else None)
    state = OrderedDict((f'backbone.{k}', v) for k, v in backbone.state_dict().items())
    state['head.fc.weight'] = torch.randn(10, 2048)
    state['head.fc.bias'] = torch.zeros(10)
    return state


def _cls2backbone(tmp_path, capsys, checkpoint, *args):
    from cenet_mmdet.classification.checkpoints import cls2backbone_main
    src = tmp_path / 'src.pth'
    if checkpoint is not None:
        torch.save(checkpoint, src)
    dst = tmp_path / 'out' / 'backbone.pth'
    capsys.readouterr()
    rc = cls2backbone_main([str(src), str(dst), *args])
    out, err = capsys.readouterr()
    return rc, out, err, dst


def _assert_cls_refused(rc, err, dst, *fragments):
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith('cls2backbone.py: error:'), err
    assert lines[-1] == f'cls2backbone.py: nothing written to {dst}'
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not dst.exists()


def test_cls2backbone_refuses_a_detector_checkpoint(tmp_path, capsys):
    state = _classifier_state()
    del state['head.fc.weight'], state['head.fc.bias']
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 256, 1, 1)
    state['rpn_head.rpn_conv.weight'] = torch.zeros(256, 256, 3, 3)
    state['roi_head.bbox_head.fc_cls.weight'] = torch.zeros(81, 1024)
    rc, _, err, dst = _cls2backbone(tmp_path, capsys, dict(state_dict=state, meta={}))
    _assert_cls_refused(rc, err, dst, 'not an ImageClassifier checkpoint',
                        'roi_head.*, rpn_head.* (a detector?)', 'load_from=')


def test_cls2backbone_refuses_a_bn_classifier_unless_asked(tmp_path, capsys):
    checkpoint = dict(state_dict=_classifier_state(ce=False), meta={})
    rc, _, err, dst = _cls2backbone(tmp_path, capsys, checkpoint)
    _assert_cls_refused(rc, err, dst, 'the backbone has no CE layers',
                        '--allow-no-ce')
    rc, out, err, dst = _cls2backbone(tmp_path, capsys, checkpoint, '--allow-no-ce')
    assert rc == 0, err
    assert 'cls2backbone.py: warning:' in err and 'no CE layers' in err
    assert 'stem_ce=False, stage_with_ce=(False, False, False, False)' in out
    assert dst.exists()


def test_cls2backbone_keeps_accepting_a_ce_classifier(tmp_path, capsys):
    rc, out, err, dst = _cls2backbone(
        tmp_path, capsys, dict(state_dict=_classifier_state(), meta={}))
    assert rc == 0, err
    assert err == ''
    saved = torch.load(dst, map_location='cpu', weights_only=True)['state_dict']
    assert sum(k.endswith('.ce.running_whitening') for k in saved) == 14


def test_cls2backbone_says_a_directory_is_a_directory(tmp_path, capsys):
    from cenet_mmdet.classification.checkpoints import cls2backbone_main
    folder = tmp_path / 'work_dirs' / 'ce-resnet50_8xb32_in1k'
    folder.mkdir(parents=True)
    dst = tmp_path / 'out.pth'
    for convert in (lambda: cls2backbone_main([str(folder), str(dst)]),
                    lambda: main([str(folder), str(dst)])):
        capsys.readouterr()
        assert convert() == 1
        err = capsys.readouterr().err
        assert f'the source {folder} is a directory' in err, err
        assert 'not found' not in err


@pytest.mark.parametrize('damage', ['truncated', 'flipped'])
def test_cls2backbone_damaged_file_message_is_about_converting(tmp_path, capsys,
                                                               damage):
    src = tmp_path / 'src.pth'
    torch.save(dict(state_dict=_classifier_state(), meta={}), src)
    data = bytearray(src.read_bytes())
    if damage == 'truncated':
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    src.write_bytes(bytes(data))
    rc, _, err, dst = _cls2backbone(tmp_path, capsys, None)
    _assert_cls_refused(rc, err, dst, f'cannot read {src}')
    assert '--resume' not in err and 'Resume' not in err
