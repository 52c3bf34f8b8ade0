"""The three channel analysis tools end to end on tiny Mask R-CNNs (8 base
channels) with planted weights, on 3 synthetic images:

* ``channel_sparsity.py``: the JSON reports exactly the planted k/C gamma
  zeros per layer and the planted gamma_hat zeros of a CE layer with a
  non-identity ``running_whitening``; the activation counts equal a hand
  count; the plot puts every point at its layer name on one shared axis of
  readable names;
* ``channel_ablation.py``: ratio 0 gives exactly the AP and the predictions
  of ``tools/test.py`` (and a higher ratio changes the predictions), and
  ``--launcher pytorch`` (2 gloo processes) the same predictions; the plot
  names the ablated layers and the image count, and equal curves stay
  visible;
* ``aii_spectrum.py``: default layers and the first M images against a
  recomputation, PCA of the AII inputs of CE layers and of the BN output
  variances of the BN model, panels on a grid;
* command-line errors: odd CONFIG CHECKPOINT count, labels, layer names,
  a backbone that is not a ResNet, a missing checkpoint (one line, before
  any model is loaded, nothing written).
"""
import glob
import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('mmdet')
from tiny_detector import write_tiny_config  # noqa: E402

from cenet_mmdet.testing.scripts import load_script  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HERE = osp.dirname(osp.abspath(__file__))
TOOLS = osp.join(REPO, 'tools', 'analysis_tools')
TIMEOUT = 300


def load_tool(name: str):
    return load_script(osp.join(TOOLS, f'{name}.py'), f'cenet_tool_{name}')


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


def plant_whitening(layer) -> None:
    """A non-identity ``running_whitening`` for the CE layer ``layer1.0.bn3``
    (2 groups of 16): in group 0, rows 0-4 pick channel 0 (a planted zero
    gamma) and rows 5-15 are 2 x identity; group 1 keeps the identity. So
    gamma_hat = W gamma has 5 zeros (channels 0-4) where gamma has 3."""
    whitening = layer.ce.running_whitening
    assert whitening.shape == (2, 16, 16)
    whitening[0] = 2 * torch.eye(16)
    whitening[0, :5] = 0
    whitening[0, :5, 0] = 1


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
            if kind == 'ce':
                plant_whitening(backbone.layer1[0].bn3)
        checkpoint = osp.join(root, f'tiny_{kind}.pth')
        save_checkpoint(dict(state_dict=model.state_dict(), meta=dict()),
                        checkpoint)
        paths[kind] = (config, checkpoint)
    return dict(root=root, env=env, **paths)


@pytest.fixture
def figures(monkeypatch) -> List:
    """The ``(figure, path)`` of every plot the tools save in this test (the
    figure stays inspectable after it is written and closed)."""
    from cenet_mmdet import analysis
    saved = []
    original = analysis.save_figure

    def save_figure(fig, path: str) -> None:
        original(fig, path)
        saved.append((fig, path))

    monkeypatch.setattr(analysis, 'save_figure', save_figure)
    return saved


def reference_model(config: str, checkpoint: str):
    """The detector of ``config`` with ``checkpoint``, in eval mode, built
    here without the tools' code."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(config).model)
    load_checkpoint(model, checkpoint, map_location='cpu')
    return model.eval()


def first_test_inputs(config: str, model, count: int) -> List[torch.Tensor]:
    """The preprocessed inputs of dataset items ``0 .. count-1`` of the
    config's test set, one image each."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmdet.registry import DATASETS
    dataset = DATASETS.build(Config.fromfile(config).test_dataloader.dataset)
    assert len(dataset) == 3
    return [model.data_preprocessor(pseudo_collate([dataset[i]]), False)[
        'inputs'] for i in range(count)]


def hand_counted_maps(backbone, inputs: List[torch.Tensor],
                      threshold: float) -> List[List[int]]:
    """``[below, numel]`` of the first four norm+ReLU maps (stem, then the
    first bottleneck's bn1, bn2 and its output), computed layer by layer."""
    counts = [[0, 0] for _ in range(4)]
    with torch.no_grad():
        for x in inputs:
            stem = F.relu(backbone.bn1(backbone.conv1(x)))
            pooled = backbone.maxpool(stem)
            block = backbone.layer1[0]
            h1 = F.relu(block.bn1(block.conv1(pooled)))
            h2 = F.relu(block.bn2(block.conv2(h1)))
            out = F.relu(block.bn3(block.conv3(h2)) + block.downsample(pooled))
            assert torch.equal(out, block(pooled))
            for count, y in zip(counts, (stem, h1, h2, out)):
                count[0] += int((y < threshold).sum())
                count[1] += y.numel()
    return counts


def assert_apart(fig, labels) -> None:
    """Rotated (90 degree) tick labels: each inside the figure and left of
    the next one, so that none overlaps another (the closed figure redrawn
    at its saved size and layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    for box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0, box
        assert box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, box
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, (left, right)


def check_sparsity_plot(fig, models: List[Dict]) -> None:
    """The gamma panel: one x axis of layer names (the first model's order,
    every name once) and every point at its own layer's position with its
    layer's value; names readable (not overlapping)."""
    ax = next(ax for ax in fig.axes
              if any(line.get_label() == 'BN: |gamma|' for line in ax.lines))
    names = [label.get_text() for label in ax.get_xticklabels()]
    assert names == [r['name'] for r in models[0]['layers']]
    assert sorted(names) == sorted(r['name'] for r in models[1]['layers'])
    assert list(ax.get_xticks()) == list(range(len(names)))
    # the premise: CE-ResNet's module order differs from ResNet's
    ce_names = [r['name'] for r in models[1]['layers']]
    assert ce_names.index('layer1.0.downsample.1') < ce_names.index(
        'layer1.0.bn3') and names.index('layer1.0.bn3') < names.index(
            'layer1.0.downsample.1')
    lines = {line.get_label(): line for line in ax.lines}
    assert sorted(lines) == ['BN: |gamma|', 'CE: |gamma_hat| (CE layers)',
                             'CE: |gamma|']
    for model in models:
        for key, what in (('gamma_sparsity', '|gamma|'),
                          ('gamma_hat_sparsity', '|gamma_hat| (CE layers)')):
            expected = {r['name']: 100 * r[key] for r in model['layers']
                        if r[key] is not None}
            if not expected:
                continue
            line = lines[f'{model["label"]}: {what}']
            xs, ys = line.get_xdata(), line.get_ydata()
            assert len(xs) == len(expected)
            assert {names[int(x)]: y for x, y in zip(xs, ys)} == expected
    assert_apart(fig, ax.get_xticklabels())


def test_sparsity_tool(workspace, capsys, figures):
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
        reference = reference_model(*workspace[kind])
        inputs = first_test_inputs(workspace[kind][0], reference, 2)
        counts = hand_counted_maps(reference.backbone, inputs, 1e-3)
        for feature_map, (below, numel) in zip(activation['feature_maps'],
                                               counts):
            assert (feature_map['below'], feature_map['numel']) == (
                below, numel)
            assert feature_map['sparsity'] == below / numel
            assert 0 < below < numel
        assert activation['mean_sparsity'] == pytest.approx(
            sum(b / n for b, n in counts) / 4, rel=1e-12)
    bn, ce = report['models']
    assert bn['backbone'] == 'ResNet' and ce['backbone'] == 'CEResNet'
    assert bn['gamma_hat_sparsity'] is None
    ce_rows = {r['name']: r for r in ce['layers']}
    # the planted whitening: 5 zero gamma_hat where gamma has 3 zeros
    assert (ce_rows['layer1.0.bn3']['gamma_below'],
            ce_rows['layer1.0.bn3']['gamma_hat_below']) == (3, 5)
    assert ce_rows['layer1.0.bn3']['gamma_hat_sparsity'] == 5 / 32
    assert ce_rows['layer2.0.bn1']['gamma_hat_below'] is None  # plain BN
    assert ce['gamma_hat_sparsity'] == 5 / sum(
        r['num_channels'] for r in ce['layers'] if r['type'] == 'CE')
    assert_png(osp.join(out_dir, 'sparsity.png'))
    (fig, path), = figures
    assert path == osp.join(out_dir, 'sparsity.png')
    check_sparsity_plot(fig, report['models'])


def reference_aii_inputs(backbone, names: List[str],
                         inputs: List[torch.Tensor]
                         ) -> Dict[str, torch.Tensor]:
    """Per layer, the unbiased per-image variance over H*W of the BN output
    ``(M, C)``, the BN output recomputed from the layer's input."""
    rows = {name: [] for name in names}

    def make_hook(found: List[torch.Tensor]):
        def hook(module, args):
            y = F.batch_norm(args[0], module.running_mean, module.running_var,
                             module.weight, module.bias, False, 0.0,
                             module.eps)
            found.append(y.double().flatten(2).var(dim=2))
        return hook

    handles = [backbone.get_submodule(name).register_forward_pre_hook(
        make_hook(rows[name])) for name in names]
    with torch.no_grad():
        for x in inputs:
            backbone(x)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(found) for name, found in rows.items()}


def check_two_image_pca(layer: Dict, samples: torch.Tensor) -> None:
    """The tool's PCA of 2 samples against its closed form: one axis
    ``d / |d|`` (``d = x1 - x2``), variance ``|d|^2 / 2``, projections
    ``x_i . axis`` with a non-negative mean."""
    assert samples.shape == (2, layer['num_channels'])
    assert layer['mean_input'] == pytest.approx(float(samples.mean()),
                                                rel=1e-4)
    diff = samples[0] - samples[1]
    assert layer['explained_variance'][0] == pytest.approx(
        float(diff @ diff) / 2, rel=1e-3)
    assert layer['explained_variance_ratio'][0] == pytest.approx(1, abs=1e-6)
    projections = samples @ (diff / diff.norm())
    projections = projections * (1 if float(projections.mean()) >= 0 else -1)
    first = layer['projections'][0]
    for key, value in (('mean', projections.mean()),
                       ('min', projections.min()),
                       ('max', projections.max())):
        assert first[key] == pytest.approx(float(value), rel=1e-3), key


def check_grid(fig, names: List[str], shape) -> None:
    """One panel per layer, in order, on a ``shape`` grid, at most 4 panels
    (18 inches) wide."""
    assert [ax.get_title() for ax in fig.axes] == [
        f'AII input PCA: {name}' for name in names]
    for ax in fig.axes:
        assert ax.get_subplotspec().get_geometry()[:2] == shape
    assert fig.get_size_inches()[0] <= 18


def test_aii_spectrum_default_layers_and_images(workspace, capsys, figures):
    """CE first: the default layers are the CE model's 14 CE layers, read at
    the same names in the BN model; the first 2 of the 3 test images."""
    from cenet_mmdet.models.layers import CE
    out_dir = osp.join(workspace['root'], 'aii')
    tool = load_tool('aii_spectrum')
    tool.main([*workspace['ce'], *workspace['bn'], '--labels', 'CE', 'BN',
               '--out-dir', out_dir, '--num-images', '2',
               '--num-components', '2', '--device', 'cpu'])
    assert '| CE | layer1.0.bn3 | aii_input | 32 | 2 |' in \
        capsys.readouterr().out
    with open(osp.join(out_dir, 'aii_spectrum.json')) as f:
        report = json.load(f)
    ce_model = reference_model(*workspace['ce'])
    expected = [name for name, module in ce_model.backbone.named_modules()
                if isinstance(module, CE)]
    assert len(expected) == 14
    ce, bn = report['models']
    assert [(r['name'], r['source']) for r in ce['layers']] == [
        (name, 'aii_input') for name in expected]
    assert [(r['name'], r['source']) for r in bn['layers']] == [
        (name, 'bn_output') for name in expected]
    for model, kind in ((ce, 'ce'), (bn, 'bn')):
        reference = ce_model if kind == 'ce' else reference_model(
            *workspace[kind])
        inputs = first_test_inputs(workspace[kind][0], reference, 2)
        samples = reference_aii_inputs(reference.backbone, expected, inputs)
        for layer in model['layers']:
            assert layer['num_images'] == 2
            check_two_image_pca(layer, samples[layer['name']])
    png = osp.join(out_dir, 'aii_spectrum.png')
    assert_png(png)
    import matplotlib.image as mpimg
    assert mpimg.imread(png).shape[1] <= 1800
    (fig, _), = figures
    check_grid(fig, expected, (4, 4))


def test_aii_spectrum_tool(workspace, capsys, figures):
    """BN first: the default layers are the stem norm and the first block's
    last norm of stages 1-3; PCA of 3 images."""
    out_dir = osp.join(workspace['root'], 'aii_bn')
    tool = load_tool('aii_spectrum')
    tool.main([*workspace['bn'], *workspace['ce'], '--labels', 'BN', 'CE',
               '--out-dir', out_dir, '--num-images', '3',
               '--num-components', '2', '--device', 'cpu'])
    printed = capsys.readouterr().out
    assert '| CE | layer1.0.bn3 | aii_input | 32 | 3 |' in printed
    with open(osp.join(out_dir, 'aii_spectrum.json')) as f:
        report = json.load(f)
    bn, ce = report['models']
    names = ['bn1', 'layer1.0.bn3', 'layer2.0.bn3', 'layer3.0.bn3']
    assert [(r['name'], r['source']) for r in bn['layers']] == [
        (name, 'bn_output') for name in names]
    assert [(r['name'], r['source']) for r in ce['layers']] == [
        (name, 'aii_input') for name in names]
    for layer in ce['layers'] + bn['layers']:
        assert layer['num_images'] == 3
        ratios = layer['explained_variance_ratio']
        assert len(ratios) == 2 and ratios[0] >= ratios[1] >= 0
        assert sum(ratios) <= 1 + 1e-9
        assert layer['explained_variance'][0] > 0
        first = layer['projections'][0]
        assert first['mean'] >= 0 and first['min'] <= first['median'] <= first['max']
    assert_png(osp.join(out_dir, 'aii_spectrum.png'))
    (fig, _), = figures
    check_grid(fig, names, (1, 4))


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


def load_predictions(out_dir: str, label: str, ratio: float) -> List[Dict]:
    """The predictions ``--dump-predictions`` wrote for one model and ratio."""
    path = osp.join(out_dir, 'predictions', f'{label}_ratio{ratio:g}.pkl')
    with open(path, 'rb') as f:
        return pickle.load(f)


def test_ablation_with_launcher_pytorch(workspace, ablation):
    """2 gloo processes predict exactly what one process predicts, at every
    ratio (so also the same AP and zeroed channels)."""
    out_dir = osp.join(workspace['root'], 'ablation_dist')
    cmd = ablation_cmd(workspace, out_dir, '--launcher', 'pytorch')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           f'--master_port={free_port()}', *cmd[1:]]
    run(cmd, workspace['root'], workspace['env'])
    with open(osp.join(out_dir, 'ablation.json')) as f:
        report = json.load(f)
    assert [m['label'] for m in report['models']] == ['CE', 'BN']
    for dist_model, model in zip(report['models'],
                                 ablation['report']['models']):
        assert dist_model['num_images'] == model['num_images'] == 3
        for dist_point, point in zip(dist_model['points'], model['points']):
            assert dist_point['zeroed_channels'] == point['zeroed_channels']
            for key in ('box_ap', 'mask_ap'):
                assert dist_point[key] == point[key]
            ratio, label = point['ratio'], model['label']
            single = load_predictions(ablation['out_dir'], label, ratio)
            dist = load_predictions(out_dir, label, ratio)
            assert [p['img_id'] for p in dist] == [p['img_id'] for p in single]
            assert same_predictions(dist, single), (label, ratio)


def check_ablation_curves(ax, models: List[Dict]) -> None:
    """One curve per model and metric with that model's AP (x100) per ratio;
    each curve its own (colour, marker, line style), and every curve drawn
    above another thinner, with smaller markers, so that curves with equal
    values both stay visible."""
    lines = sorted(ax.lines, key=lambda line: line.get_zorder())
    assert [line.get_label() for line in lines] == [
        f'{m["label"]} {what} AP' for m in models for what in ('box', 'mask')]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        line.get_label() for line in lines]
    for line in lines:
        label, what, _ = line.get_label().split()
        model = next(m for m in models if m['label'] == label)
        assert list(line.get_xdata()) == [p['ratio'] for p in model['points']]
        assert list(line.get_ydata()) == [100 * p[f'{what}_ap']
                                          for p in model['points']]
    styles = {(line.get_color(), line.get_marker(), line.get_linestyle())
              for line in lines}
    assert len(styles) == len(lines)
    assert len({line.get_marker() for line in lines}) == len(lines)
    assert [line.get_fillstyle() for line in lines] == ['full'] + [
        'none'] * (len(lines) - 1)
    for below, above in zip(lines, lines[1:]):
        assert below.get_zorder() < above.get_zorder()
        assert below.get_linewidth() > above.get_linewidth()
        assert below.get_markersize() > above.get_markersize()
        assert above.get_markersize() >= 4 and above.get_linewidth() >= 1


def test_ablation_plot_names_layers_and_images(workspace, ablation, figures):
    models = ablation['report']['models']
    assert [m['num_images'] for m in models] == [3, 3]  # --val 3
    tool = load_tool('channel_ablation')
    path = osp.join(workspace['root'], 'ablation_plot', 'ablation.png')
    tool.plot(models, path)
    assert_png(path)
    (fig, _), = figures
    ax, = fig.axes
    title = ax.get_title().replace('\n', ' ')
    assert title == ('cumulative random channel ablation, 3 test images '
                     'zeroed in: bn1, layer1.0.bn3, layer2.0.bn3, '
                     'layer3.0.bn3, layer4.0.bn3')
    check_ablation_curves(ax, models)
    # models with different layers and image counts: named per model
    other = [dict(models[0], num_images=2), dict(models[1], layers=[
        dict(name='bn1', type='BatchNorm2d', num_channels=8)])]
    assert load_tool('channel_ablation').describe(other).replace(
        '\n', ' ') == (
        'cumulative random channel ablation, CE: 2 test images; BN: 3 test '
        'images zeroed in: CE: bn1, layer1.0.bn3, layer2.0.bn3, '
        'layer3.0.bn3, layer4.0.bn3; BN: bn1')


@pytest.mark.parametrize('name', ['channel_sparsity', 'aii_spectrum',
                                  'channel_ablation'])
def test_missing_checkpoint_fails_first(workspace, name):
    """A missing second checkpoint: one line on stderr, exit status 1, no
    model loaded (nothing on stdout) and nothing written."""
    missing = osp.join(workspace['root'], 'no_such_dir', 'ce.pth')
    out_dir = osp.join(workspace['root'], f'missing_{name}')
    cmd = [sys.executable, osp.join(TOOLS, f'{name}.py'), *workspace['ce'],
           workspace['ce'][0], missing, '--labels', 'CE', 'CE2',
           '--out-dir', out_dir]
    # third-party import warnings are not the tool's output
    env = dict(workspace['env'], PYTHONWARNINGS='ignore')
    proc = subprocess.run(cmd, cwd=workspace['root'], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr == f"error: checkpoint of 'CE2' not found: {missing}\n"
    assert proc.stdout == ''
    assert not osp.exists(out_dir)


@pytest.mark.parametrize('name', ['test', 'channel_ablation', 'train'])
def test_subset_of_the_evaluated_images_is_refused(workspace, name):
    """``test_dataloader.dataset.indices`` (``val_dataloader`` in training)
    with the evaluator's whole ann_file would count the images not run as
    misses: one line, exit status 1, before any iteration."""
    out_dir = osp.join(workspace['root'], f'subset_{name}')
    loop = 'val' if name == 'train' else 'test'
    subset = ['--cfg-options', f'{loop}_dataloader.dataset.indices=2']
    if name == 'train':
        cmd = [sys.executable, osp.join(REPO, 'tools', 'train.py'),
               workspace['ce'][0], '--work-dir', out_dir, *subset]
        prefix = 'train.py: error: '
    elif name == 'test':
        cmd = [sys.executable, osp.join(REPO, 'tools', 'test.py'),
               *workspace['ce'], '--work-dir', out_dir, *subset]
        prefix = 'test.py: error: '
    else:
        cmd = [sys.executable, osp.join(TOOLS, 'channel_ablation.py'),
               *workspace['ce'], '--out-dir', out_dir, *subset]
        prefix = 'error: '
    env = dict(workspace['env'], PYTHONWARNINGS='ignore')
    proc = subprocess.run(cmd, cwd=workspace['root'], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(
        f'{prefix}{loop}_dataloader.dataset holds 2 of the 3 images of '
        f'{loop}_evaluator.ann_file: '), errors[0]
    assert 'count the other 1 as images with no detections' in errors[0]
    assert 'Iter(train)' not in proc.stdout + proc.stderr


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
