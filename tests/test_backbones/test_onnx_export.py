"""CEResNet in eval exports to ONNX with both exporters and runs in onnxruntime.

The TorchScript-based exporter (``dynamo=False``, the one MMDeploy uses) and
the dynamo exporter are both checked against the PyTorch eval output.
"""
import warnings

import numpy as np
import onnxruntime
import pytest
import torch

import cenet_mmdet  # noqa: F401
from cenet_mmdet.models.backbones import CEResNet
from cenet_mmdet.models.layers import CELayer


@pytest.fixture(scope='module', params=['BN', 'GN'])
def backbone(request):
    """A narrow CE-ResNet-50 with trained-looking statistics: over BN all 14
    CE layers; over GN the stem and stages 1-2 (8 CE layers: the same layer
    kinds, half the export time)."""
    torch.manual_seed(0)
    if request.param == 'GN':
        model = CEResNet(depth=50, base_channels=8, num_stages=2, strides=(1, 2),
                         dilations=(1, 1), out_indices=(0, 1),
                         stage_with_ce=(True, True),
                         norm_cfg=dict(type='GN', num_groups=4))
    else:
        model = CEResNet(depth=50, base_channels=8, out_indices=(1, 3))
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 2 + 1)
        for layer in model.modules():
            if isinstance(layer, CELayer):
                layer.ce.lambda_logit.fill_(-0.4)
    return model.eval()


def assert_matches(session: onnxruntime.InferenceSession, model, x: torch.Tensor,
                   what: str) -> None:
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert len(outputs) == len(expected) == 2
    for actual, wanted in zip(outputs, expected):
        assert actual.shape == tuple(wanted.shape), what
        scale = wanted.abs().max().item()
        np.testing.assert_allclose(actual, wanted.numpy(), rtol=0,
                                   atol=1e-5 * max(scale, 1.0), err_msg=what)


@pytest.mark.parametrize('dynamo', [False, True])
def test_export_matches_pytorch(backbone, dynamo, tmp_path):
    """Exported with a dynamic batch size on one input, the graph is run on
    that input and on another with other statistics (+50 offset, 4x the
    spread) and another batch size: a statistic of the tracing input baked
    into the graph as a constant, or a branch fixed by it, shows there."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=gen) + 3
    other = torch.randn(3, 3, 64, 64, generator=gen) * 4 + 50
    path = str(tmp_path / f'ce_resnet_dynamo{dynamo}.onnx')
    batch = {0: 'batch'}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(backbone, (x,), path, dynamo=dynamo,
                          input_names=['image'], output_names=['c3', 'c5'],
                          dynamic_axes=dict(image=batch, c3=batch, c5=batch))
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    assert_matches(session, backbone, x, 'tracing input')
    assert_matches(session, backbone, other, 'other input (+50, batch 3)')
