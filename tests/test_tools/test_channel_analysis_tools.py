"""The three channel analysis tools end to end on tiny Mask R-CNNs (8 base
channels) with planted weights, on 3 synthetic images:

* ``channel_sparsity.py``: the JSON reports exactly the planted k/C gamma
  zeros per layer (and gamma_hat for CE layers), activation maps, a PNG;
* ``channel_ablation.py``: ratio 0 gives exactly the AP and the predictions
  of ``tools/test.py`` (and a higher ratio changes the predictions), also
  with ``--launcher pytorch`` (2 gloo processes);
* ``aii_spectrum.py``: PCA of the AII inputs of CE layers and of the BN
  output variances of the BN model;
* command-line errors: odd CONFIG CHECKPOINT count, labels, layer names,
  a backbone that is not a ResNet.
"""
import glob
import importlib.util
import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys
from typing import Dict, List

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')
from tiny_detector import write_tiny_config  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HERE = osp.dirname(osp.abspath(__file__))
TOOLS = osp.join(REPO, 'tools', 'analysis_tools')
TIMEOUT = 300


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(
        f'cenet_tool_{name}', osp.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cmd: List[str], cwd: str, env: Dict[str, str]) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f'timed out after {TIMEOUT}s: {" ".join(cmd)}\n{err}')
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f'exit code {proc.returncode}: {" ".join(cmd)}\n'
                    f'{output[-5000:]}')
    return output


def assert_png(path: str) -> None:
    import matplotlib.image as mpimg
    assert osp.isfile(path), path
    assert osp.getsize(path) > 10_000, osp.getsize(path)
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 400
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


#: planted gamma zeros: layer -> number of zeroed channels (of C)
PLANTED = {
    'ce': {'layer1.0.bn3': (3, 32), 'layer2.0.bn1': (5, 16), 'bn1': (0, 8)},
    'bn': {'layer1.0.bn3': (7, 32), 'bn1': (2, 8)},
}


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """Data, tiny CE and BN configs and checkpoints with planted gammas."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import save_checkpoint

    import cenet_mmdet  # noqa: F401
    from mmdet.registry import MODELS

    root = str(tmp_path_factory.mktemp('channel_analysis'))
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=HERE + os.pathsep + os.environ.get('PYTHONPATH', ''))
    env.pop('MASTER_PORT', None)
    data = osp.join(root, 'data')
    run([sys.executable, osp.join(REPO, 'tools', 'misc', 'make_synthetic_coco.py'),
         data, '--train', '1', '--val', '3', '--size', '128', '--seed', '0'],
        root, env)
    init_default_scope('mmdet')
    paths = {}
    for kind, seed in (('ce', 0), ('bn', 1)):
        config = write_tiny_config(osp.join(root, f'tiny_{kind}.py'), data, kind)
        torch.manual_seed(seed)
        model = MODELS.build(Config.fromfile(config).model)
        model.init_weights()
        backbone = model.backbone
        with torch.no_grad():
            for name, module in backbone.named_modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
            for name, (zeros, _) in PLANTED[kind].items():
                backbone.get_submodule(name).weight[:zeros] = 0
        checkpoint = osp.join(root, f'tiny_{kind}.pth')
        save_checkpoint(dict(state_dict=model.state_dict(), meta=dict()),
                        checkpoint)
        paths[kind] = (config, checkpoint)
    return dict(root=root, env=env, **paths)


def test_sparsity_tool(workspace, capsys):
    out_dir = osp.join(workspace['root'], 'sparsity')
    tool = load_tool('channel_sparsity')
    tool.main([*workspace['bn'], *workspace['ce'], '--labels', 'BN', 'CE',
               '--out-dir', out_dir, '--num-images', '2', '--num-maps', '4',
               '--device', 'cpu'])
    printed = capsys.readouterr().out
    assert '| model | norm layers |' in printed and '| CE | 53 | 14 |' in printed
    with open(osp.join(out_dir, 'sparsity.json')) as f:
        report = json.load(f)
    assert [m['label'] for m in report['models']] == ['BN', 'CE']
    for model in report['models']:
        kind = model['label'].lower()
        rows = {r['name']: r for r in model['layers']}
        for name, (zeros, channels) in PLANTED[kind].items():
            assert rows[name]['num_channels'] == channels
            assert rows[name]['gamma_below'] == zeros
            assert rows[name]['gamma_sparsity'] == zeros / channels
        total = sum(r['num_channels'] for r in model['layers'])
        planted = sum(z for z, _ in PLANTED[kind].values())
        assert model['gamma_sparsity'] == planted / total
        activation = model['activation']
        assert activation['num_images'] == 2
        assert [m['name'] for m in activation['feature_maps']] == [
            'bn1+relu', 'layer1.0.bn1+relu', 'layer1.0.bn2+relu',
            'layer1.0.bn3+add+relu']
        for feature_map in activation['feature_maps']:
            assert 0 <= feature_map['sparsity'] <= 1
    bn, ce = report['models']
    assert bn['backbone'] == 'ResNet' and ce['backbone'] == 'CEResNet'
    assert bn['gamma_hat_sparsity'] is None
    ce_rows = {r['name']: r for r in ce['layers']}
    # untrained CE layers: running_whitening is the identity, gamma_hat == gamma
    assert ce_rows['layer1.0.bn3']['gamma_hat_below'] == 3
    assert ce_rows['layer2.0.bn1']['gamma_hat_below'] is None  # plain BN
    assert ce['gamma_hat_sparsity'] == 3 / sum(
        r['num_channels'] for r in ce['layers'] if r['type'] == 'CE')
    assert_png(osp.join(out_dir, 'sparsity.png'))


def test_aii_spectrum_tool(workspace, capsys):
    out_dir = osp.join(workspace['root'], 'aii')
    tool = load_tool('aii_spectrum')
    tool.main([*workspace['ce'], *workspace['bn'], '--labels', 'CE', 'BN',
               '--out-dir', out_dir, '--num-images', '3',
               '--num-components', '2', '--layers', 'bn1', 'layer1.0.bn3',
               '--device', 'cpu'])
    printed = capsys.readouterr().out
    assert '| CE | layer1.0.bn3 | aii_input | 32 | 3 |' in printed
    with open(osp.join(out_dir, 'aii_spectrum.json')) as f:
        report = json.load(f)
    ce, bn = report['models']
    assert [(r['name'], r['source']) for r in ce['layers']] == [
        ('bn1', 'aii_input'), ('layer1.0.bn3', 'aii_input')]
    assert [(r['name'], r['source']) for r in bn['layers']] == [
        ('bn1', 'bn_output'), ('layer1.0.bn3', 'bn_output')]
    for layer in ce['layers'] + bn['layers']:
        assert layer['num_images'] == 3
        ratios = layer['explained_variance_ratio']
        assert len(ratios) == 2 and ratios[0] >= ratios[1] >= 0
        assert sum(ratios) <= 1 + 1e-9
        assert layer['explained_variance'][0] > 0
        first = layer['projections'][0]
        assert first['mean'] >= 0 and first['min'] <= first['median'] <= first['max']
    assert_png(osp.join(out_dir, 'aii_spectrum.png'))


def ablation_cmd(workspace, out_dir: str, *extra: str) -> List[str]:
    return [sys.executable, osp.join(TOOLS, 'channel_ablation.py'),
            *workspace['ce'], *workspace['bn'], '--labels', 'CE', 'BN',
            '--out-dir', out_dir, '--ratios', '0', '0.5', '--dump-predictions',
            *extra]


@pytest.fixture(scope='module')
def ablation(workspace):
    out_dir = osp.join(workspace['root'], 'ablation')
    output = run(ablation_cmd(workspace, out_dir), workspace['root'],
                 workspace['env'])
    with open(osp.join(out_dir, 'ablation.json')) as f:
        report = json.load(f)
    return dict(out_dir=out_dir, output=output, report=report)


def run_test_py(workspace, kind: str):
    """tools/test.py on a model: its metrics record and predictions."""
    work_dir = osp.join(workspace['root'], f'test_py_{kind}')
    out = osp.join(work_dir, 'predictions.pkl')
    run([sys.executable, osp.join(REPO, 'tools', 'test.py'), *workspace[kind],
         '--work-dir', work_dir, '--out', out], workspace['root'],
        workspace['env'])
    records = []
    for path in glob.glob(osp.join(work_dir, '**', '*.json'), recursive=True):
        with open(path) as f:
            records += [json.loads(line) for line in f
                        if 'coco/bbox_mAP' in line]
    assert len(records) == 1
    with open(out, 'rb') as f:
        return records[0], pickle.load(f)


def same_predictions(a: List[Dict], b: List[Dict]) -> bool:
    """Whether two prediction dumps hold identical instances."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x['img_id'] == y['img_id']
        px, py = x['pred_instances'], y['pred_instances']
        for key in ('bboxes', 'scores', 'labels'):
            if not torch.equal(torch.as_tensor(px[key]),
                               torch.as_tensor(py[key])):
                return False
    return True


def test_ablation_ratio_zero_equals_test_py(workspace, ablation):
    assert '| ratio | CE box AP | CE mask AP | BN box AP | BN mask AP |' in \
        ablation['output']
    models = {m['label']: m for m in ablation['report']['models']}
    for label, kind in (('CE', 'ce'), ('BN', 'bn')):
        metrics, predictions = run_test_py(workspace, kind)
        points = models[label]['points']
        assert [p['ratio'] for p in points] == [0.0, 0.5]
        zero = points[0]
        assert zero['zeroed_channels'] == {n: 0 for n in zero['zeroed_channels']}
        assert zero['box_ap'] == metrics['coco/bbox_mAP']
        assert zero['mask_ap'] == metrics['coco/segm_mAP']
        for key, value in metrics.items():
            if key.startswith('coco/'):
                assert zero['metrics'][key] == value, key
        dumped = osp.join(ablation['out_dir'], 'predictions')
        with open(osp.join(dumped, f'{label}_ratio0.pkl'), 'rb') as f:
            ratio0 = pickle.load(f)
        with open(osp.join(dumped, f'{label}_ratio0.5.pkl'), 'rb') as f:
            ratio05 = pickle.load(f)
        assert sum(len(p['pred_instances']['scores']) for p in ratio0) > 0
        assert same_predictions(ratio0, predictions)
        # zeroing half of the channels changes what the detector predicts
        assert not same_predictions(ratio05, predictions)
        # half of the channels of each default layer (stem: 8, stages: 32..256)
        assert points[1]['zeroed_channels'] == {
            'bn1': 4, 'layer1.0.bn3': 16, 'layer2.0.bn3': 32,
            'layer3.0.bn3': 64, 'layer4.0.bn3': 128}
    assert models['CE']['layers'][1] == dict(name='layer1.0.bn3', type='CE',
                                             num_channels=32)
    assert_png(osp.join(ablation['out_dir'], 'ablation.png'))


def test_ablation_with_launcher_pytorch(workspace, ablation):
    out_dir = osp.join(workspace['root'], 'ablation_dist')
    cmd = ablation_cmd(workspace, out_dir, '--launcher', 'pytorch')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           f'--master_port={free_port()}', *cmd[1:]]
    run(cmd, workspace['root'], workspace['env'])
    with open(osp.join(out_dir, 'ablation.json')) as f:
        report = json.load(f)
    for dist_model, model in zip(report['models'],
                                 ablation['report']['models']):
        for dist_point, point in zip(dist_model['points'], model['points']):
            assert dist_point['zeroed_channels'] == point['zeroed_channels']
            for key in ('box_ap', 'mask_ap'):
                assert dist_point[key] == pytest.approx(point[key], abs=1e-3)


def test_command_line_errors(workspace, capsys):
    tool = load_tool('channel_sparsity')
    ce_config, ce_checkpoint = workspace['ce']
    cases = [
        ([ce_config], 'CONFIG CHECKPOINT pairs, got 1 path'),
        ([ce_config, ce_checkpoint, '--labels', 'a', 'b'],
         r"2 label\(s\) \['a', 'b'\] for 1 CONFIG CHECKPOINT pair"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            from cenet_mmdet import analysis
            analysis.run_tool(tool.main, argv + ['--out-dir', workspace['root']])
        assert exit_info.value.code == 1
        import re
        assert re.search(message, capsys.readouterr().err)
    aii = load_tool('aii_spectrum')
    with pytest.raises(SystemExit):
        from cenet_mmdet import analysis
        analysis.run_tool(aii.main, [ce_config, ce_checkpoint, '--layers',
                                     'layer9.0.bn3', '--device', 'cpu',
                                     '--out-dir', workspace['root']])
    assert "'layer9.0.bn3' is not a norm layer of the CEResNet backbone" in \
        capsys.readouterr().err
    # a detector whose backbone is not a ResNet
    other = osp.join(workspace['root'], 'mobilenet.py')
    with open(other, 'w') as f:
        f.write(f"_base_ = {ce_config!r}\nmodel = dict(backbone=dict("
                "_delete_=True, type='MobileNetV2', out_indices=(2, 4, 6)))\n")
    with pytest.raises(SystemExit):
        analysis.run_tool(tool.main, [other, ce_checkpoint, '--device', 'cpu',
                                      '--out-dir', workspace['root']])
    assert ('need a ResNet or CEResNet backbone; this model\'s backbone is '
            'MobileNetV2') in capsys.readouterr().err
