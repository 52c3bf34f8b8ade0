"""cenet_mmdet/analysis.py: the measurements of the channel analysis tools on
layers and backbones with planted weights (known answers), against direct
computations, and their error messages."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip('mmdet')
from mmdet.models.backbones import ResNet  # noqa: E402

from cenet_mmdet import analysis  # noqa: E402
from cenet_mmdet.models import CEResNet  # noqa: E402
from cenet_mmdet.models.layers import CE  # noqa: E402


def tiny_backbone(ce: bool = True) -> nn.Module:
    """ResNet-50 layout with 8 base channels (stage widths 32..256)."""
    torch.manual_seed(0)
    if ce:
        backbone = CEResNet(depth=50, base_channels=8)
    else:
        backbone = ResNet(depth=50, base_channels=8)
    backbone.init_weights()
    backbone.eval()  # mmdet's ResNet.train returns None
    return backbone


def trained_ce_layer(channels: int = 32, group_size: int = 16) -> CE:
    """A CE layer whose running statistics come from a few training batches
    of correlated data (so that running_whitening is not the identity)."""
    torch.manual_seed(0)
    layer = CE(channels, group_size=group_size, momentum=0.5)
    mix = torch.randn(channels, channels) / channels ** 0.5 + torch.eye(channels)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        for _ in range(4):
            x = torch.einsum('dc,nchw->ndhw', mix, torch.randn(4, channels, 5, 5))
            layer(x + 0.5)
    return layer.eval()


# -------------------------------------------------------------- arguments
def test_parse_model_specs_pairs_and_labels():
    specs = analysis.parse_model_specs(['a/bn.py', 'bn.pth', 'b/ce.py',
                                        'ce.pth'])
    assert [(s.label, s.config, s.checkpoint) for s in specs] == [
        ('bn', 'a/bn.py', 'bn.pth'), ('ce', 'b/ce.py', 'ce.pth')]
    specs = analysis.parse_model_specs(['x.py', '1.pth', 'x.py', '2.pth'])
    assert [s.label for s in specs] == ['x#1', 'x#2']
    specs = analysis.parse_model_specs(['x.py', '1.pth'], ['BN'])
    assert specs[0].label == 'BN'


@pytest.mark.parametrize('items, labels, message', [
    (['a.py', 'a.pth', 'b.py'], None, 'CONFIG CHECKPOINT pairs, got 3'),
    ([], None, 'got 0 path'),
    (['a.py', 'a.pth', 'b.py', 'b.pth'], ['bn'], r'1 label\(s\)'),
    (['a.py', 'a.pth', 'b.py', 'b.pth'], ['x', 'x'], 'labels must be unique'),
])
def test_parse_model_specs_errors(items, labels, message):
    with pytest.raises(ValueError, match=message):
        analysis.parse_model_specs(items, labels)


def test_check_model_files_names_every_bad_path_in_one_line(tmp_path):
    config, checkpoint = tmp_path / 'a.py', tmp_path / 'a.pth'
    config.write_text('')
    checkpoint.write_bytes(b'')
    good = analysis.ModelSpec('A', str(config), str(checkpoint))
    analysis.check_model_files([good])
    # remote checkpoints and package configs are left to MMEngine
    analysis.check_model_files([analysis.ModelSpec(
        'R', 'mmdet::faster_rcnn/x.py', 'https://host/x.pth')])
    missing = str(tmp_path / 'b.pth')
    bad = [good, analysis.ModelSpec('B', str(tmp_path), missing),
           analysis.ModelSpec('C', str(config), 's3://bucket/c.pth')]
    with pytest.raises(analysis.AnalysisError) as info:
        analysis.check_model_files(bad)
    assert str(info.value) == (
        f"config of 'B' is a directory, not a file: {tmp_path}; "
        f"checkpoint of 'B' not found: {missing}")
    with pytest.raises(analysis.AnalysisError, match="config of 'D' not "
                       'found: nowhere.py$'):
        analysis.check_model_files([analysis.ModelSpec('D', 'nowhere.py',
                                                       str(checkpoint))])


# -------------------------------------------------------------- layers
def test_shared_layer_order():
    bn = [n for n, _ in analysis.norm_layers(tiny_backbone(ce=False))]
    ce = [n for n, _ in analysis.norm_layers(tiny_backbone(ce=True))]
    # CE-ResNet registers bn3 after the downsample norm; ResNet before it
    assert ce.index('layer1.0.downsample.1') < ce.index('layer1.0.bn3')
    assert bn.index('layer1.0.bn3') < bn.index('layer1.0.downsample.1')
    assert analysis.shared_layer_order([bn, ce]) == bn
    assert analysis.shared_layer_order([ce, bn]) == ce
    # names only in later lists go right after their predecessor there
    assert analysis.shared_layer_order(
        [['a', 'b', 'd'], ['a', 'c', 'd', 'e'], ['x', 'a'], []]) == [
            'x', 'a', 'c', 'b', 'd', 'e']
    assert analysis.shared_layer_order([]) == []


def test_backbone_check_and_layer_names():
    backbone = tiny_backbone()
    detector = nn.Module()
    detector.backbone = backbone
    assert analysis.get_resnet_backbone(detector) is backbone
    wrapped = nn.Module()
    wrapped.module = detector  # as DDP holds it
    assert analysis.get_resnet_backbone(wrapped) is backbone
    other = nn.Module()
    other.backbone = nn.Conv2d(3, 8, 3)
    with pytest.raises(analysis.AnalysisError, match='ResNet or CEResNet backbone; this '
                       "model's backbone is Conv2d"):
        analysis.get_resnet_backbone(other)
    from cenet_mmdet.models.backbones import CEResNet
    group_norm = CEResNet(depth=50, base_channels=8, num_stages=1,
                          out_indices=(0,), strides=(1,), dilations=(1,),
                          norm_cfg=dict(type='GN', num_groups=2))
    with pytest.raises(analysis.AnalysisError, match='this backbone has '
                       r'GroupNorm, GroupNormCE layers \(norm_cfg GN, IN or LN\)'):
        analysis.get_resnet_backbone(group_norm)

    assert analysis.default_ablation_layers(backbone) == [
        'bn1', 'layer1.0.bn3', 'layer2.0.bn3', 'layer3.0.bn3', 'layer4.0.bn3']
    layers = analysis.resolve_norm_layers(backbone,
                                          ['backbone.bn1', 'layer1.0.bn3'])
    assert [n for n, _ in layers] == ['bn1', 'layer1.0.bn3']
    assert layers[1][1] is backbone.layer1[0].bn3
    assert isinstance(layers[1][1], CE)
    with pytest.raises(ValueError, match="'layer1.0.bn4' is not a norm layer "
                       'of the CEResNet backbone; available: bn1, '):
        analysis.resolve_norm_layers(backbone, ['layer1.0.bn4'])
    with pytest.raises(ValueError, match="'layer1.0.conv1' is not a norm"):
        analysis.resolve_norm_layers(backbone, ['layer1.0.conv1'])
    # 1 stem + 16 blocks x 3 + 4 downsample norms
    assert len(analysis.norm_layers(backbone)) == 53


# -------------------------------------------------------------- sparsity
def test_gamma_sparsity_counts_planted_zeros_exactly():
    layer = nn.BatchNorm2d(64)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[[3, 10, 11, 40, 63]] = 0.0
        layer.weight[20] = 0.9e-3    # below the threshold
        layer.weight[21] = -2e-3     # |gamma| above it
    result = analysis.gamma_sparsity(layer, threshold=1e-3)
    assert result['gamma_below'] == 6
    assert result['gamma_sparsity'] == 6 / 64
    assert result['gamma_hat_below'] is None  # not a CE layer
    assert analysis.gamma_sparsity(layer, threshold=1e-4)['gamma_below'] == 5
    assert analysis.gamma_sparsity(nn.BatchNorm2d(8, affine=False)) [
        'gamma_sparsity'] is None


def test_equivalent_gamma_is_whitening_times_gamma_per_group():
    layer = trained_ce_layer(channels=32, group_size=16)
    whitening = layer.ce.running_whitening
    assert whitening.shape == (2, 16, 16)
    assert not torch.allclose(whitening, torch.eye(16).expand(2, 16, 16))
    gamma = layer.weight.detach().double()
    expected = torch.empty(32, dtype=torch.float64)
    for channel in range(32):  # direct: row `channel` of its group's W
        group, i = divmod(channel, 16)
        expected[channel] = sum(float(whitening[group, i, j]) * gamma[group * 16 + j]
                                for j in range(16))
    assert torch.allclose(analysis.equivalent_gamma(layer), expected,
                          rtol=1e-12, atol=1e-12)


def test_ce_gamma_hat_sparsity_with_planted_whitening():
    layer = CE(32, group_size=16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[[0, 1, 17]] = 0.0
    # identity whitening: gamma_hat == gamma
    result = analysis.gamma_sparsity(layer)
    assert (result['gamma_below'], result['gamma_hat_below']) == (3, 3)
    assert result['gamma_hat_sparsity'] == 3 / 32
    assert result['prop1_holds'] == 0  # |gamma_hat| == |gamma|: not greater
    # a whitening that mixes every channel of group 0 with channel 2: the
    # zero gammas 0 and 1 get gamma_hat = 0.5 * gamma_2 = 0.5; group 1 keeps
    # the identity (gamma_hat_17 = 0)
    with torch.no_grad():
        layer.ce.running_whitening[0, :, 2] += 0.5
    result = analysis.gamma_sparsity(layer)
    assert (result['gamma_below'], result['gamma_hat_below']) == (3, 1)
    # Proposition 1 per channel, counted by hand: in group 0 every channel but
    # 2 has gamma_hat = gamma + 0.5 * gamma_2 (> |gamma|); channel 2 has
    # 1.5 > 1; group 1 is the identity (equal, not greater)
    assert result['prop1_holds'] == 16
    assert result['prop1_fraction'] == 16 / 32
    with torch.no_grad():  # a sign flip: gamma_hat_3 = -2 + 0.5 = -1.5
        layer.weight[3] = -2.0
    assert analysis.gamma_sparsity(layer)['prop1_holds'] == 15
    with torch.no_grad():
        layer.weight[3] = 1.0
    # and a group whose whitening is zero: every gamma_hat of it is 0
    with torch.no_grad():
        layer.ce.running_whitening[1].zero_()
    assert analysis.gamma_sparsity(layer)['gamma_hat_below'] == 16


def test_backbone_gamma_sparsity_per_layer_and_pooled():
    backbone = tiny_backbone()
    with torch.no_grad():
        for layer in backbone.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.fill_(1.0)
        backbone.layer1[0].bn3.weight[:5] = 0       # CE, 32 channels
        backbone.layer2[1].bn1.weight[:2] = 0       # BN, 16 channels
    result = analysis.backbone_gamma_sparsity(backbone)
    rows = {r['name']: r for r in result['layers']}
    assert rows['layer1.0.bn3']['gamma_sparsity'] == 5 / 32
    assert rows['layer1.0.bn3']['gamma_hat_sparsity'] == 5 / 32  # W = I
    assert rows['layer1.0.bn3']['type'] == 'CE'
    assert rows['layer2.1.bn1']['gamma_sparsity'] == 2 / 16
    assert rows['layer2.1.bn1']['gamma_hat_sparsity'] is None
    assert rows['bn1']['gamma_sparsity'] == 0
    total = sum(r['num_channels'] for r in result['layers'])
    ce_total = sum(r['num_channels'] for r in result['layers']
                   if r['type'] == 'CE')
    assert result['gamma_sparsity'] == 7 / total
    assert result['gamma_hat_sparsity'] == 5 / ce_total
    assert result['prop1_fraction'] == 0  # W = I everywhere: never greater
    assert rows['layer2.1.bn1']['prop1_holds'] is None


def test_activation_sparsity_skips_relus_inside_ce_layers():
    backbone = tiny_backbone(ce=True)
    meter = analysis.ActivationSparsityMeter(backbone, num_maps=3)
    with torch.no_grad(), meter:
        backbone(torch.randn(1, 3, 64, 64))
    # the AII gate's ReLU (bn1.ce.aii.gate.2) is not a feature map
    assert meter.names == ['bn1+relu', 'layer1.0.bn1+relu', 'layer1.0.bn2+relu']


def test_activation_sparsity_labels_and_direct_values():
    backbone = tiny_backbone(ce=False)
    with torch.no_grad():  # layer1.0.bn2+relu: every value below threshold
        backbone.layer1[0].bn2.weight.zero_()
        backbone.layer1[0].bn2.bias.fill_(-1.0)
    torch.manual_seed(1)
    images = [torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 32)]
    meter = analysis.ActivationSparsityMeter(backbone, num_maps=5)
    with torch.no_grad(), meter:
        for x in images:
            backbone(x)
    result = meter.result()
    maps = result['feature_maps']
    assert [m['name'] for m in maps] == [
        'bn1+relu', 'layer1.0.bn1+relu', 'layer1.0.bn2+relu',
        'layer1.0.bn3+add+relu', 'layer1.1.bn1+relu']
    assert maps[2]['sparsity'] == 1.0
    # direct: the stem, layer1.0's conv1 -> bn1 -> relu and its block output
    below = numel = below_out = numel_out = below_stem = 0
    with torch.no_grad():
        for x in images:
            stem = backbone.relu(backbone.bn1(backbone.conv1(x)))
            below_stem += int((stem < 1e-3).sum())
            stem = backbone.maxpool(stem)
            block = backbone.layer1[0]
            y = F.relu(block.bn1(block.conv1(stem)))
            out = block(stem)
            below += int((y < 1e-3).sum())
            numel += y.numel()
            below_out += int((out < 1e-3).sum())
            numel_out += out.numel()
    assert maps[0]['below'] == below_stem
    assert (maps[1]['below'], maps[1]['numel']) == (below, numel)
    assert 0 < maps[0]['sparsity'] < 1
    assert maps[3]['sparsity'] == below_out / numel_out
    assert 0 < maps[1]['sparsity'] < 1
    assert result['mean_sparsity'] == pytest.approx(
        sum(m['sparsity'] for m in maps) / 5, rel=1e-12)
    # the hooks are gone after the context
    backbone(images[0])
    assert meter.numel[0] == maps[0]['numel']


# -------------------------------------------------------------- ablation
def test_ablation_masks_exact_cumulative_deterministic():
    for channels in (8, 32, 64, 2048):
        previous = torch.ones(channels)
        for ratio in analysis.DEFAULT_RATIOS:
            mask = analysis.ablation_mask(channels, ratio, seed=7)
            zeros = int((mask == 0).sum())
            assert zeros == math.floor(ratio * channels + 0.5)
            # cumulative: what was zeroed stays zeroed
            assert bool((mask <= previous).all())
            previous = mask
    assert analysis.num_ablated(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004
    assert analysis.num_ablated(64, 0.1) == 6  # 6.4
    a = analysis.ablation_mask(64, 0.5, analysis.layer_seed('bn1', 0))
    assert torch.equal(a, analysis.ablation_mask(
        64, 0.5, analysis.layer_seed('bn1', 0)))
    assert not torch.equal(a, analysis.ablation_mask(
        64, 0.5, analysis.layer_seed('layer1.0.bn3', 0)))
    assert not torch.equal(a, analysis.ablation_mask(
        64, 0.5, analysis.layer_seed('bn1', 1)))
    with pytest.raises(ValueError, match=r'ratio must be in \[0, 1\]'):
        analysis.ablation_mask(8, 1.5, 0)


def test_channel_ablation_on_a_backbone_against_a_direct_forward():
    backbone = tiny_backbone()
    layers = analysis.resolve_norm_layers(backbone, ['bn1', 'layer1.0.bn3'])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = backbone(x)
        with analysis.ChannelAblation(layers, 0.0, seed=0) as ablation:
            assert not ablation._handles  # nothing to zero: no hook at all
            same = backbone(x)
        ablation = analysis.ChannelAblation(layers[:1], 0.5, seed=0)
        with ablation:
            ablated = backbone(x)
        after = backbone(x)
        # direct: the stem with bn1's output masked, then the stages
        mask = ablation.masks['bn1']
        assert int((mask == 0).sum()) == 4  # of 8 channels
        h = backbone.bn1(backbone.conv1(x)) * mask.view(1, -1, 1, 1)
        h = backbone.maxpool(backbone.relu(h))
        direct = []
        for name in backbone.res_layers:
            h = getattr(backbone, name)(h)
            direct.append(h)
    # ratio 0 computes exactly the model; hooks are removed afterwards
    assert all(torch.equal(a, b) for a, b in zip(reference, same))
    assert all(torch.equal(a, b) for a, b in zip(reference, after))
    for a, b, r in zip(ablated, direct, reference):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(a, r, rtol=1e-3, atol=1e-3)
    # the same layer names and seed give the same masks for any model
    other = analysis.ChannelAblation(
        analysis.resolve_norm_layers(tiny_backbone(ce=False), ['bn1']), 0.5, 0)
    assert torch.equal(other.masks['bn1'], mask)


def test_channel_ablation_output_of_a_layer():
    layer = nn.BatchNorm2d(10).eval()
    x = torch.randn(3, 10, 4, 4)
    with torch.no_grad(), analysis.ChannelAblation([('bn', layer)], 0.3,
                                                   seed=5) as ablation:
        out = layer(x)
    mask = ablation.masks['bn']
    assert int((mask == 0).sum()) == 3
    expected = layer(x) * mask.view(1, -1, 1, 1)
    assert torch.equal(out, expected)
    assert bool((out[:, mask == 0] == 0).all())
    assert bool((out[:, mask == 1] != 0).all())


# -------------------------------------------------------------- AII
def test_aii_input_of_ce_layer_is_bn_output_variance():
    layer = trained_ce_layer()
    bn = nn.BatchNorm2d(32).eval()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items()
                        if not k.startswith('ce.')})
    x = torch.randn(3, 32, 6, 7) * 2 + 1
    recorder = analysis.AIIInputRecorder([('ce', layer), ('bn', bn)])
    with torch.no_grad(), recorder:
        layer(x)
        layer(x[:1])
        bn(x)
    inputs = recorder.inputs()
    assert recorder.sources == {'ce': 'aii_input', 'bn': 'bn_output'}
    assert inputs['ce'].shape == (4, 32)
    bn_output = F.batch_norm(x, layer.running_mean, layer.running_var,
                             layer.weight, layer.bias, False, 0.0, layer.eps)
    direct = bn_output.double().flatten(2).var(dim=2, unbiased=True)
    assert torch.allclose(inputs['ce'][:3], direct, rtol=1e-4, atol=1e-6)
    assert torch.allclose(inputs['ce'][3], direct[0], rtol=1e-4, atol=1e-6)
    # for a BN layer the same quantity, from its output
    assert torch.allclose(inputs['bn'], direct, rtol=1e-5, atol=1e-7)
    assert torch.allclose(analysis.instance_variance(bn_output), direct)


def test_principal_components_against_eigendecomposition():
    torch.manual_seed(0)
    samples = torch.randn(40, 6, dtype=torch.float64) @ torch.randn(
        6, 6, dtype=torch.float64) + 3
    pca = analysis.principal_components(samples, 4)
    covariance = torch.cov(samples.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    assert torch.allclose(pca['explained_variance'],
                          eigenvalues.flip(0)[:4], rtol=1e-10)
    assert torch.allclose(pca['explained_variance_ratio'],
                          eigenvalues.flip(0)[:4] / eigenvalues.sum(),
                          rtol=1e-10)
    for k in range(4):  # same axis up to sign; uncentred projections
        axis = eigenvectors[:, -1 - k]
        assert abs(float(pca['axes'][k] @ axis)) == pytest.approx(1, abs=1e-9)
        assert torch.allclose(pca['projections'][:, k].abs(),
                              (samples @ axis).abs(), rtol=1e-9)
        assert float(pca['projections'][:, k].mean()) >= 0
    # samples on a line: one component holds all the variance
    line = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None] * torch.tensor(
        [[1.0, 2.0, 0.0]], dtype=torch.float64)
    ratio = analysis.principal_components(line, 3)['explained_variance_ratio']
    assert float(ratio[0]) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match='M >= 2'):
        analysis.principal_components(torch.randn(1, 4), 2)
    summary = analysis.summarize_projections(pca['projections'])
    first = pca['projections'][:, 0]
    assert summary[0]['median'] == pytest.approx(
        float(torch.quantile(first, 0.5)), rel=1e-12)
    assert summary[0]['mean'] == pytest.approx(float(first.mean()), rel=1e-12)
    assert summary[0]['min'] <= summary[0]['q1'] <= summary[0]['q3'] <= \
        summary[0]['max']


# -------------------------------------------------------------- plots
@pytest.mark.parametrize('panels, shape', [
    (1, (1, 1)), (3, (1, 3)), (4, (1, 4)), (5, (2, 4)), (14, (4, 4)),
    (16, (4, 4)), (17, (5, 4))])
def test_panel_grid(panels, shape):
    assert analysis.grid_shape(panels, max_cols=4) == shape
    fig, axes = analysis.new_panel_grid(panels, 4, width=4.5, height=4.0)
    assert len(axes) == len(fig.axes) == panels
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in axes] == [
        shape] * panels
    # row by row: panel k in row k // cols, column k % cols
    for k, ax in enumerate(axes):
        spec = ax.get_subplotspec()
        assert (spec.rowspan.start, spec.colspan.start) == divmod(k, shape[1])
    assert tuple(fig.get_size_inches()) == (4.5 * shape[1], 4.0 * shape[0])
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_curve_style_keeps_equal_curves_visible():
    styles = [analysis.curve_style(i) for i in range(8)]
    assert len({s['marker'] for s in styles}) == 8
    assert [s['fillstyle'] for s in styles] == ['full'] + ['none'] * 7
    for below, above in zip(styles, styles[1:]):
        assert below['zorder'] < above['zorder']
        assert below['linewidth'] > above['linewidth'] > 1
        assert below['markersize'] > above['markersize'] > 4


def test_markdown_table():
    assert analysis.markdown_table(['a', 'b'], [[1, None]]) == \
        '| a | b |\n|---|---|\n| 1 | - |'
    assert analysis.percent(0.1234) == '12.3%'
    assert analysis.percent(None) == '-'
