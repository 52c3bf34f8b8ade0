"""An independent reference of the released CE-ResNet classifier.

Plain PyTorch with the released (torchvision-style) module names, built from
:class:`~cenet_mmdet.testing.released_ce.ReleasedCE` (the plain-autograd
transcription of the released CE function); nothing is shared with MMDetection
or with :mod:`cenet_mmdet.models`. It serves as the ground truth in the
backbone-equivalence tests and as the source of "released" checkpoints::

    stem:        conv1 -> bn1 -> ce1 (CE, one group of 64) -> relu -> maxpool
    Bottleneck:  conv1 -> bn1 -> relu -> conv2 (3x3, stride) -> bn2 -> relu
                 -> conv3 -> bn3 -> ce -> (+ identity / downsample) -> relu
    head:        avgpool -> fc

ResNet-50 has CE in every block of layer1-3 (the released ``resnetv1ce50``);
the ResNet-101 variant (never released) follows CEResNet's reading of the
paper: stem + layer1 + layer2 (the first seven residual blocks).
"""
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .released_ce import ReleasedCE

RELEASED_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
RELEASED_CE_STAGES = {50: (True, True, True, False),
                      101: (True, True, False, False)}


def _conv(inplanes: int, planes: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel, stride=stride,
                     padding=kernel // 2, bias=False)


class ReleasedBottleneck(nn.Module):
    """torchvision "v1" bottleneck (stride in the 3x3 conv) + CE after bn3."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 with_ce: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.ce = ReleasedCE(planes * 4, group_size=16) if with_ce else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.ce is not None:
            out = self.ce(out)
        return self.relu(out + identity)


class ReleasedCEResNet(nn.Module):
    """The released CE-ResNet classifier (``resnetv1ce50`` for depth 50).

    Args:
        depth: 50 or 101.
        num_classes: width of ``fc``. Default: 1000.
        stage_with_ce: CE flag per stage. Default: by depth (50: stages 1-3;
            101: stages 1-2).
        stem_ce: CE after the stem BN. Default: True.
    """

    def __init__(self, depth: int = 50, num_classes: int = 1000,
                 stage_with_ce: Optional[Sequence[bool]] = None,
                 stem_ce: bool = True) -> None:
        super().__init__()
        layers = RELEASED_LAYERS[depth]
        if stage_with_ce is None:
            stage_with_ce = RELEASED_CE_STAGES[depth]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.ce1 = ReleasedCE(64, group_size=64) if stem_ce else None
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (blocks, with_ce) in enumerate(zip(layers, stage_with_ce)):
            planes = 64 * 2**i
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                _conv(inplanes, planes * 4, 1, stride),
                nn.BatchNorm2d(planes * 4))
            stage = [ReleasedBottleneck(inplanes, planes, stride, downsample,
                                        with_ce)]
            stage += [ReleasedBottleneck(planes * 4, planes, 1, None, with_ce)
                      for _ in range(1, blocks)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*stage))
            inplanes = planes * 4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward_stages(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The outputs of layer1..layer4 for an input ``(N, 3, H, W)``."""
        x = self.bn1(self.conv1(x))
        if self.ce1 is not None:
            x = self.ce1(x)
        x = self.maxpool(self.relu(x))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
            outs.append(x)
        return tuple(outs)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.fc(torch.flatten(self.avgpool(self.forward_stages(x)[-1]), 1))


@torch.no_grad()
def perturb_released_resnet_(model: ReleasedCEResNet,
                             generator: torch.Generator) -> ReleasedCEResNet:
    """Give every BN/CE tensor a non-trivial value (in place).

    BN affine and running statistics, the CE lambda logits, the AII gate's
    LayerNorm, ``running_scale`` and ``running_wm`` (identity + a symmetric
    perturbation) are all moved away from their initial values.
    """
    def rand(t: Tensor, low: float, high: float) -> Tensor:
        sample = torch.rand(t.shape, generator=generator, dtype=t.dtype)
        return sample * (high - low) + low

    def randn(t: Tensor, std: float) -> Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) * std

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(rand(module.weight, 0.5, 1.5))
            module.bias.copy_(randn(module.bias, 0.1))
            module.running_mean.copy_(randn(module.running_mean, 0.1))
            module.running_var.copy_(rand(module.running_var, 0.5, 2.0))
        elif isinstance(module, ReleasedCE):
            module.x_weight.copy_(randn(module.x_weight, 1.0))
            norm = module.AR.fc[1]
            norm.weight.copy_(rand(norm.weight, 0.5, 1.5))
            norm.bias.copy_(randn(norm.bias, 0.1))
            module.AR.running_scale.copy_(rand(module.AR.running_scale, 0.5, 2.0))
            noise = randn(module.running_wm, 0.05)
            module.running_wm.add_(noise + noise.transpose(1, 2))
            module.running_mean.copy_(randn(module.running_mean, 0.1))
    return model


@torch.no_grad()
def calibrate_released_resnet_(model: ReleasedCEResNet, images: Tensor) -> None:
    """Set every running statistic to the batch statistics of ``images`` (one
    training-mode forward with momentum 1), so that eval-mode activations keep
    a realistic scale instead of growing through mismatched statistics."""
    layers = [m for m in model.modules()
              if isinstance(m, (nn.BatchNorm2d, ReleasedCE))]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 1.0
    model.train()
    model(images)
    for m, momentum in zip(layers, saved):
        m.momentum = momentum


def train_released_resnet_(model: ReleasedCEResNet, generator: torch.Generator,
                           steps: int = 2, batch: int = 2, size: int = 64,
                           lr: float = 0.01) -> ReleasedCEResNet:
    """Calibrate the running statistics on a random batch
    (:func:`calibrate_released_resnet_`), then run ``steps`` training-mode
    forward/backward + SGD steps (gradient norm clipped at 1) on random data:
    parameters change and every running statistic moves by batch statistics."""
    calibrate_released_resnet_(
        model, torch.randn(4, 3, size, size, generator=generator))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    num_classes = model.fc.out_features
    for _ in range(steps):
        images = torch.randn(batch, 3, size, size, generator=generator)
        labels = torch.randint(num_classes, (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        # CE gradients are large with tiny batches: keep each step small.
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
    return model


def released_checkpoint(model: Union[nn.Module, Mapping[str, Tensor]],
                        module_prefix: bool = False,
                        depth: int = 50) -> Dict[str, object]:
    """``model`` (a module or its state dict) saved as the released training
    script saves it: a dict with ``epoch``, ``model`` (``'resnetv1ce50'``),
    ``state_dict``, ``best_prec1`` and ``optimizer``; keys prefixed with
    ``module.`` for a DataParallel model when ``module_prefix``."""
    prefix = 'module.' if module_prefix else ''
    source = model.state_dict() if isinstance(model, nn.Module) else model
    state = OrderedDict((prefix + k, v.detach().clone())
                        for k, v in source.items())
    return dict(epoch=100, model=f'resnetv1ce{depth}', state_dict=state,
                best_prec1=78.2, optimizer=dict(state={}, param_groups=[]))
