"""tools/analysis_tools/first_step_grad_norms.py: per-part gradient norms
against a direct computation, and its refusal of unknown part names."""
import os.path as osp

import pytest
import torch
from torch import nn

from cenet_mmdet.testing.scripts import load_script

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _tool():
    return load_script(
        osp.join(REPO, 'tools', 'analysis_tools', 'first_step_grad_norms.py'),
        'cenet_first_step_grad_norms')


class _Detector(nn.Module):
    """A backbone, a neck and an roi_head with only a bbox head (no mask
    head, no rpn_head), as the part names of a two-stage detector."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
        self.neck = nn.Linear(4, 2)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = nn.Linear(2, 1)
        self.unused = nn.Linear(5, 5)  # no gradient


def test_gradient_norms_match_a_direct_computation():
    tool = _tool()
    torch.manual_seed(0)
    model = _Detector()
    x = torch.randn(6, 3)
    model.roi_head.bbox_head(model.neck(model.backbone(x))).pow(2).sum().backward()
    norms = tool.gradient_norms(model)

    def direct(params):
        return sum(float((p.grad.double() ** 2).sum()) for p in params
                   if p.grad is not None) ** 0.5

    # parts the model lacks (rpn_head, roi_head.mask_head) are skipped
    assert set(norms) == {'backbone', 'neck', 'roi_head.bbox_head', 'all'}
    for name in ('backbone', 'neck', 'roi_head.bbox_head'):
        expected = direct(model.get_submodule(name).parameters())
        assert expected > 0
        assert norms[name] == pytest.approx(expected, rel=1e-12)
    parts = [norms[name] for name in ('backbone', 'neck', 'roi_head.bbox_head')]
    assert norms['all'] == pytest.approx(sum(v * v for v in parts) ** 0.5,
                                         rel=1e-12)
    # scaling the loss scales every norm
    model.zero_grad()
    (3 * model.roi_head.bbox_head(model.neck(model.backbone(x))).pow(2).sum()
     ).backward()
    assert tool.gradient_norms(model)['all'] == pytest.approx(
        3 * norms['all'], rel=1e-6)


def test_gradient_norms_without_gradients_and_unknown_parts():
    tool = _tool()
    model = _Detector()
    assert tool.gradient_norms(model, ['neck']) == {'neck': 0.0, 'all': 0.0}
    with pytest.raises(ValueError, match="no submodule 'nek'"):
        tool.gradient_norms(model, ['nek'])
