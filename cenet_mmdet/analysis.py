"""Channel analysis of ResNet / CE-ResNet detectors: shared, testable parts.

Used by the three tools in ``tools/analysis_tools/`` (``channel_sparsity.py``,
``channel_ablation.py``, ``aii_spectrum.py``), which reproduce the paper's
collapse and ablation measurements (Fig. 1, 3a/b, 3d and 4) on any MMDetection
config + checkpoint whose backbone is mmdet's ``ResNet`` or a subclass
(``CEResNet``), with BN, frozen BN, SyncBN, CE or SyncCE norm layers.

Definitions (also in docs/channel_analysis.md):

* **Norm layer**: every ``_BatchNorm`` module of the backbone (BN, SyncBN, CE,
  SyncCE), named relative to the backbone (``bn1``, ``layer1.0.bn3``,
  ``layer1.0.downsample.1``). The *output* of a CE layer is the output of the
  whole layer, BN followed by the CE block.
* **Gamma sparsity** of a layer: the fraction of its BN weights ``gamma`` with
  ``|gamma| < threshold``.
* **Equivalent gamma** of a CE layer (the paper's Proposition 1,
  ``gamma_hat = Sigma_T^(-1/2) gamma``): per whitening group ``g`` of ``d``
  contiguous channels, ``gamma_hat[g] = W[g] @ gamma[g]`` with
  ``W = layer.ce.running_whitening`` ``(G, d, d)``, the matrix that the BD
  branch applies in eval mode. One value per output channel: the BD branch's
  output channel ``i`` is ``sum_j W_ij (gamma_j xhat_j + beta_j)``, and
  ``gamma_hat_i`` is its coefficient when every standardized input channel
  ``xhat_j`` moves together, which is the vector the proposition bounds
  (``|gamma_hat_i| > |gamma_i|``; counted per layer as ``prop1_holds``). With the default ``whitening='released'``
  ``W`` is the Newton inverse square root of the trace-normalized covariance
  ``Sigma / tr(Sigma)``, as in the proposition's proof; with
  ``whitening='paper'`` it also carries the ``1 / sqrt(tr Sigma)`` factor. The
  mixing weight ``lambda`` is not included (as in the paper).
* **Activation sparsity** (the paper's footnote): the fraction of values below
  the threshold in each of the first ``N`` norm+ReLU feature maps of the
  backbone, i.e. the outputs of the backbone's ReLU calls in forward order
  (stem ``bn1+relu``; in a bottleneck ``bn1+relu``, ``bn2+relu`` and
  ``bn3+add+relu``, the block output), over ``M`` test images, and their mean.
* **Ablation**: the output channels of chosen norm layers are multiplied by a
  0/1 mask; the zeroed channels of a layer are the first ``round(ratio * C)``
  entries of a random permutation drawn from a ``torch.Generator`` seeded with
  ``seed + crc32(layer name)``, so the subsets are cumulative in the ratio and
  identical across models (BN and CE lose the same channels) and processes.
* **AII input**: the per-image, per-channel unbiased variance over ``H*W`` of
  the BN output, ``(N, C)``. For a CE layer it is recorded from the argument
  of ``layer.ce.aii`` (exact); for a plain BN layer it is computed from the
  layer output, which is the same quantity (what an AII gate would receive).
"""
import math
import os
import os.path as osp
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .models.layers import CE, is_ce_layer

DEFAULT_THRESHOLD = 1e-3
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


class AnalysisError(ValueError):
    """A user error (arguments, model, layer names): the tools print its
    message and exit with status 1, without a traceback."""


# --------------------------------------------------------------------------
# command-line inputs
# --------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """One model to analyse: a label, an MMDetection config and a checkpoint."""
    label: str
    config: str
    checkpoint: str


def parse_model_specs(items: Sequence[str],
                      labels: Optional[Sequence[str]] = None) -> List[ModelSpec]:
    """Pair ``CONFIG CHECKPOINT [CONFIG CHECKPOINT ...]`` with labels.

    Args:
        items: the positional arguments, an even number of paths.
        labels: one label per pair, or None for the config file names (made
            unique with ``#k`` when two pairs share a config).

    Returns:
        One :class:`ModelSpec` per pair, in order.

    Raises:
        AnalysisError: an odd number of items, a label count that differs from
            the number of pairs, or repeated labels.
    """
    if not items or len(items) % 2:
        raise AnalysisError(
            f'expected CONFIG CHECKPOINT pairs, got {len(items)} path(s): '
            f'{list(items)}; give each config followed by its checkpoint')
    configs, checkpoints = list(items[0::2]), list(items[1::2])
    if labels is None:
        stems = [osp.splitext(osp.basename(c))[0] for c in configs]
        labels = [s if stems.count(s) == 1 else f'{s}#{i + 1}'
                  for i, s in enumerate(stems)]
    elif len(labels) != len(configs):
        raise AnalysisError(
            f'{len(labels)} label(s) {list(labels)} for {len(configs)} '
            f'CONFIG CHECKPOINT pair(s): give one label per pair')
    if len(set(labels)) != len(labels):
        raise AnalysisError(f'labels must be unique, got {list(labels)}')
    return [ModelSpec(label, config, ckpt)
            for label, config, ckpt in zip(labels, configs, checkpoints)]


def _path_problem(kind: str, label: str, path: str) -> Optional[str]:
    """Why ``path`` (the ``kind`` of model ``label``) cannot be read, or None.

    Remote checkpoints (``scheme://...``) and package configs
    (``mmdet::...``) are left to MMEngine.
    """
    if '://' in path or (kind == 'config' and '::' in path):
        return None
    if osp.isdir(path):
        return f'{kind} of {label!r} is a directory, not a file: {path}'
    if not osp.isfile(path):
        return f'{kind} of {label!r} not found: {path}'
    return None


def check_model_files(specs: Sequence[ModelSpec]) -> None:
    """Check every CONFIG and CHECKPOINT path before any model is analysed.

    Raises:
        AnalysisError: one line naming every missing path (or directory).
    """
    problems = [_path_problem(kind, spec.label, path) for spec in specs
                for kind, path in (('config', spec.config),
                                   ('checkpoint', spec.checkpoint))]
    problems = [p for p in problems if p is not None]
    if problems:
        raise AnalysisError('; '.join(problems))


def model_specs(args) -> List[ModelSpec]:
    """The tools' :class:`ModelSpec` list from parsed arguments (``models``,
    ``labels``), every path checked first (:func:`check_model_files`)."""
    specs = parse_model_specs(args.models, args.labels)
    check_model_files(specs)
    return specs


# --------------------------------------------------------------------------
# backbone layers
# --------------------------------------------------------------------------
def get_resnet_backbone(model: nn.Module) -> nn.Module:
    """The ``backbone`` of a detector, checked to be an mmdet ``ResNet``.

    Args:
        model: a detector (possibly wrapped, e.g. in DDP) or a backbone.

    Raises:
        AnalysisError: the backbone is not a ``ResNet`` (or subclass, such as
            ``CEResNet``).
    """
    from mmdet.models.backbones import ResNet
    model = getattr(model, 'module', model)  # model wrappers
    backbone = model if isinstance(model, ResNet) else getattr(
        model, 'backbone', None)
    if not isinstance(backbone, ResNet):
        found = model if backbone is None else backbone
        raise AnalysisError(
            f'the channel analysis tools need a ResNet or CEResNet backbone; '
            f'this model\'s backbone is {type(found).__name__} (ResNet '
            f'subclasses are covered: ResNeXt, RegNet, CEResNeXt, CERegNet)')
    # (not LayerNorm: the AII gate of every CE layer holds one)
    other_norms = sorted({type(m).__name__ for m in backbone.modules()
                          if isinstance(m, (nn.GroupNorm, _InstanceNorm))})
    if other_norms:
        raise AnalysisError(
            f'the channel analysis tools read BN-type norm layers (BN, SyncBN, '
            f'CE, SyncCE: gamma and running statistics); this backbone has '
            f'{", ".join(other_norms)} layers (norm_cfg GN, IN or LN), which '
            f'they do not cover')
    return backbone


def norm_layers(backbone: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """Every BN-type layer of ``backbone`` (BN, SyncBN, CE, SyncCE), named
    relative to the backbone, in module order."""
    return [(name, module) for name, module in backbone.named_modules()
            if isinstance(module, _BatchNorm)]


def default_ablation_layers(backbone: nn.Module) -> List[str]:
    """The stem norm and the last norm of the first block of each stage.

    As in the paper's ablation ("the first normalization layers"): ``bn1``
    (``stem.7`` or the last stem norm with ``deep_stem``) and, for each stage,
    the block-output norm of its first block (``layerK.0.bn3`` in a
    bottleneck, where CE-ResNet puts CE; ``bn2`` in a basic block).
    """
    if getattr(backbone, 'deep_stem', False):
        stem = [f'stem.{name}' for name, m in backbone.stem.named_children()
                if isinstance(m, _BatchNorm)][-1]
    else:
        stem = backbone.norm1_name
    names = [stem]
    for layer_name in backbone.res_layers:
        block = getattr(backbone, layer_name)[0]
        norm = getattr(block, 'norm3_name', None) or block.norm2_name
        names.append(f'{layer_name}.0.{norm}')
    return names


def shared_layer_order(name_lists: Sequence[Sequence[str]]) -> List[str]:
    """One axis of layer names for several models.

    The first list's order; a name that only a later list has is inserted
    right after the nearest name preceding it in that list (at the start
    when there is none). Models whose modules are registered in different
    orders (CE-ResNet registers ``layerK.0.bn3`` after
    ``layerK.0.downsample.1``) thus share one position per name.
    """
    order: List[str] = []
    for names in name_lists:
        for index, name in enumerate(names):
            if name in order:
                continue
            before = [n for n in names[:index] if n in order]
            position = order.index(before[-1]) + 1 if before else 0
            order.insert(position, name)
    return order


def resolve_norm_layers(backbone: nn.Module,
                        names: Sequence[str]) -> List[Tuple[str, _BatchNorm]]:
    """Look up norm layers of ``backbone`` by name (``backbone.`` prefix
    optional).

    Raises:
        AnalysisError: a name that is not a BN-type layer of the backbone (the
            message lists the available names).
    """
    available = dict(norm_layers(backbone))
    resolved = []
    for name in names:
        key = name[len('backbone.'):] if name.startswith('backbone.') else name
        if key not in available:
            listing = ', '.join(available)
            raise AnalysisError(
                f'{name!r} is not a norm layer of the {type(backbone).__name__} '
                f'backbone; available: {listing}')
        resolved.append((key, available[key]))
    return resolved


# --------------------------------------------------------------------------
# 1. sparsity
# --------------------------------------------------------------------------
def equivalent_gamma(layer: CE) -> Tensor:
    """The BD branch's equivalent gamma ``(C,)`` of a CE layer.

    ``gamma_hat[g] = W[g] @ gamma[g]`` per whitening group ``g`` of ``d``
    contiguous channels, ``W = layer.ce.running_whitening`` ``(G, d, d)``
    (the paper's ``Sigma_T^(-1/2) gamma``, Proposition 1; see the module
    docstring for why this vector).
    """
    whitening = layer.ce.running_whitening.detach().double()
    groups, size, _ = whitening.shape
    gamma = layer.weight.detach().double().view(groups, size, 1)
    return torch.bmm(whitening, gamma).view(-1)


def gamma_sparsity(layer: _BatchNorm,
                   threshold: float = DEFAULT_THRESHOLD) -> Dict:
    """Counts of ``|gamma| < threshold`` (and ``|gamma_hat|`` for CE layers).

    Args:
        layer: a BN-type layer; without affine weights the counts are None.
        threshold: the sparsity threshold.

    Returns:
        ``type``, ``num_channels``, ``gamma_below``, ``gamma_sparsity``
        (fraction), ``gamma_hat_below``, ``gamma_hat_sparsity``,
        ``prop1_holds`` (channels with ``|gamma_hat| > |gamma|``, the
        inequality of Proposition 1) and ``prop1_fraction`` (the last four
        None for non-CE layers).
    """
    channels = layer.num_features
    result = dict(type=type(layer).__name__, num_channels=channels,
                  gamma_below=None, gamma_sparsity=None,
                  gamma_hat_below=None, gamma_hat_sparsity=None,
                  prop1_holds=None, prop1_fraction=None)
    if layer.weight is None:
        return result
    gamma = layer.weight.detach().double().abs()
    below = int((gamma < threshold).sum())
    result.update(gamma_below=below, gamma_sparsity=below / channels)
    if is_ce_layer(layer):
        gamma_hat = equivalent_gamma(layer).abs()
        below_hat = int((gamma_hat < threshold).sum())
        holds = int((gamma_hat > gamma).sum())
        result.update(gamma_hat_below=below_hat,
                      gamma_hat_sparsity=below_hat / channels,
                      prop1_holds=holds, prop1_fraction=holds / channels)
    return result


def backbone_gamma_sparsity(backbone: nn.Module,
                            threshold: float = DEFAULT_THRESHOLD) -> Dict:
    """Per-layer :func:`gamma_sparsity` of every norm layer, plus totals.

    Returns:
        ``layers`` (a list of per-layer dicts with ``name``),
        ``gamma_sparsity`` over all channels of all affine layers and
        ``gamma_hat_sparsity`` and ``prop1_fraction`` over all channels of
        the CE layers (None when there are none).
    """
    layers = []
    for name, layer in norm_layers(backbone):
        layers.append(dict(name=name, **gamma_sparsity(layer, threshold)))

    def pooled(below_key: str) -> Optional[float]:
        rows = [r for r in layers if r[below_key] is not None]
        if not rows:
            return None
        return sum(r[below_key] for r in rows) / sum(r['num_channels']
                                                     for r in rows)

    return dict(layers=layers, gamma_sparsity=pooled('gamma_below'),
                gamma_hat_sparsity=pooled('gamma_hat_below'),
                prop1_fraction=pooled('prop1_holds'))


def _relu_labels(backbone: nn.Module) -> Dict[str, List[str]]:
    """For each ReLU module of the backbone's feature path, the label of each
    of its calls in a forward pass (the norm it follows). ReLUs inside norm
    layers (the AII gate of a CE layer) are not feature maps and are left
    out."""
    norm_prefixes = [name + '.' for name, _ in norm_layers(backbone)]
    labels = {}
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.ReLU) or any(
                name.startswith(prefix) for prefix in norm_prefixes):
            continue
        parent_name, _, attr = name.rpartition('.')
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        if parent is backbone and attr == 'relu':
            labels[name] = [f'{backbone.norm1_name}+relu']
        elif hasattr(parent, 'norm1_name') and attr == 'relu':  # res block
            norms = [parent.norm1_name, parent.norm2_name]
            if hasattr(parent, 'norm3_name'):
                norms.append(parent.norm3_name)
            prefix = f'{parent_name}.'
            labels[name] = ([f'{prefix}{n}+relu' for n in norms[:-1]]
                            + [f'{prefix}{norms[-1]}+add+relu'])
        elif parent_name == 'stem' and attr.isdigit():  # deep stem
            labels[name] = [f'stem.{int(attr) - 1}+relu']
        else:
            labels[name] = [name]
    return labels


class ActivationSparsityMeter:
    """Counts values below a threshold in the first ``N`` ReLU outputs of a
    backbone forward (the norm+ReLU feature maps), accumulated over calls.

    Use as a context manager around backbone forwards; ``result()`` gives
    per-map counts and fractions. A ReLU module called several times per
    forward (mmdet's blocks reuse one ``relu``) counts each call as its own
    feature map, labelled with the norm it follows.

    Args:
        backbone: an mmdet ``ResNet``.
        num_maps: ``N``, how many feature maps, in forward order.
        threshold: count values ``< threshold``.
    """

    def __init__(self, backbone: nn.Module, num_maps: int,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        if num_maps < 1:
            raise AnalysisError(f'num_maps must be >= 1, got {num_maps}')
        self.backbone = backbone
        self.num_maps = num_maps
        self.threshold = threshold
        self.labels = _relu_labels(backbone)
        self.names: List[str] = []
        self.below: List[int] = []
        self.numel: List[int] = []
        self._calls: Dict[str, int] = {}
        self._position = 0
        self._handles = []

    def __enter__(self) -> 'ActivationSparsityMeter':
        self._handles.append(self.backbone.register_forward_pre_hook(
            self._start_forward))
        for name, module in self.backbone.named_modules():
            if name in self.labels:
                self._handles.append(module.register_forward_hook(
                    self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _start_forward(self, module, args) -> None:
        self._calls = {}
        self._position = 0

    def _make_hook(self, name: str) -> Callable:
        def hook(module, args, output: Tensor) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            position = self._position
            self._position += 1
            if position >= self.num_maps:
                return
            labels = self.labels[name]
            label = labels[call] if call < len(labels) else f'{name}:{call + 1}'
            below = int((output.detach() < self.threshold).sum())
            if position == len(self.names):
                self.names.append(label)
                self.below.append(0)
                self.numel.append(0)
            self.below[position] += below
            self.numel[position] += output.numel()
        return hook

    def result(self) -> Dict:
        """``feature_maps`` (name, below, numel, sparsity) and their mean
        ``mean_sparsity``."""
        maps = [dict(name=n, below=b, numel=e, sparsity=b / e)
                for n, b, e in zip(self.names, self.below, self.numel)]
        mean = (sum(m['sparsity'] for m in maps) / len(maps)) if maps else None
        return dict(feature_maps=maps, mean_sparsity=mean)


# --------------------------------------------------------------------------
# 2. cumulative random channel ablation
# --------------------------------------------------------------------------
def layer_seed(name: str, seed: int) -> int:
    """The generator seed of a layer: ``seed + crc32(name)`` (stable across
    processes and Python versions)."""
    return seed + zlib.crc32(name.encode())


def num_ablated(num_channels: int, ratio: float) -> int:
    """``round(ratio * C)`` (halves up), for ``0 <= ratio <= 1``."""
    if not 0.0 <= ratio <= 1.0:
        raise AnalysisError(f'ablation ratio must be in [0, 1], got {ratio}')
    return int(math.floor(ratio * num_channels + 0.5 + 1e-9))


def ablation_mask(num_channels: int, ratio: float, seed: int) -> Tensor:
    """0/1 float mask ``(C,)`` with ``round(ratio * C)`` zeros.

    The zeros are the first entries of ``torch.randperm(C)`` drawn from a
    ``torch.Generator`` seeded with ``seed``: for a fixed seed the zeroed set
    at a larger ratio contains the set at a smaller one.
    """
    order = torch.randperm(num_channels,
                           generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(num_channels)
    mask[order[:num_ablated(num_channels, ratio)]] = 0
    return mask


class ChannelAblation:
    """Zero a random fraction of the output channels of chosen layers.

    A context manager: forward hooks multiply each layer's output
    ``(N, C, H, W)`` by :func:`ablation_mask` (seed :func:`layer_seed`).
    Layers with nothing to zero (ratio 0) get no hook, so the model computes
    exactly what it computes without the manager.

    Args:
        layers: ``(name, module)`` pairs, e.g. from :func:`resolve_norm_layers`.
        ratio: the fraction of channels to zero in each layer.
        seed: the base seed.
    """

    def __init__(self, layers: Sequence[Tuple[str, nn.Module]], ratio: float,
                 seed: int = 0) -> None:
        self.layers = list(layers)
        self.ratio = ratio
        self.seed = seed
        self.masks = {name: ablation_mask(module.num_features, ratio,
                                          layer_seed(name, seed))
                      for name, module in self.layers}
        self._handles = []

    def __enter__(self) -> 'ChannelAblation':
        for name, module in self.layers:
            mask = self.masks[name]
            if bool((mask == 0).any()):
                self._handles.append(module.register_forward_hook(
                    self._make_hook(mask)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _make_hook(mask: Tensor) -> Callable:
        def hook(module, args, output: Tensor) -> Tensor:
            scale = mask.to(device=output.device, dtype=output.dtype)
            return output * scale.view(1, -1, *([1] * (output.dim() - 2)))
        return hook


# --------------------------------------------------------------------------
# 3. AII input spectrum
# --------------------------------------------------------------------------
def instance_variance(feature: Tensor) -> Tensor:
    """Unbiased variance over ``H*W`` of each image and channel.

    Args:
        feature: ``(N, C, H, W)``.

    Returns:
        ``(N, C)`` (float64).
    """
    return feature.detach().double().flatten(2).var(dim=2, unbiased=True)


class AIIInputRecorder:
    """Record the AII gate input ``(N, C)`` of chosen layers.

    For a CE layer: the argument of ``layer.ce.aii`` (a forward pre-hook),
    exactly what the gate receives. For another BN-type layer: the
    :func:`instance_variance` of its output (the BN output). A context
    manager; ``inputs()`` gives ``{name: (M, C) float64}``.

    Args:
        layers: ``(name, module)`` pairs.
    """

    def __init__(self, layers: Sequence[Tuple[str, nn.Module]]) -> None:
        self.layers = list(layers)
        self.sources = {name: 'aii_input' if is_ce_layer(m) else 'bn_output'
                        for name, m in self.layers}
        self._rows: Dict[str, List[Tensor]] = {n: [] for n, _ in self.layers}
        self._handles = []

    def __enter__(self) -> 'AIIInputRecorder':
        for name, module in self.layers:
            rows = self._rows[name]
            if is_ce_layer(module):
                def pre_hook(m, args, rows=rows):
                    rows.append(args[0].detach().double().cpu())
                self._handles.append(
                    module.ce.aii.register_forward_pre_hook(pre_hook))
            else:
                def hook(m, args, output, rows=rows):
                    rows.append(instance_variance(output).cpu())
                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def inputs(self) -> Dict[str, Tensor]:
        return {name: torch.cat(rows) if rows else torch.empty(0)
                for name, rows in self._rows.items()}


def principal_components(samples: Tensor, num_components: int) -> Dict:
    """PCA of ``samples`` ``(M, C)``.

    The principal axes are the right singular vectors of the centred
    samples; each sample is then projected *without centring* onto the first
    ``K`` axes, so that a box plot of the projections shows both the location
    and the spread of the inputs along each axis. Signs are fixed so that the
    mean projection is >= 0.

    Args:
        samples: ``(M, C)``, ``M >= 2``.
        num_components: ``K`` (capped at ``min(M, C)``).

    Returns:
        ``axes`` ``(K, C)``, ``explained_variance`` ``(K,)`` (the sample
        variance along each axis), ``explained_variance_ratio`` ``(K,)`` and
        ``projections`` ``(M, K)``, all float64.
    """
    if samples.dim() != 2 or samples.size(0) < 2:
        raise AnalysisError(f'PCA needs (M, C) samples with M >= 2, got shape '
                         f'{tuple(samples.shape)}')
    x = samples.double()
    centred = x - x.mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(num_components, vh.size(0))
    variance = singular.square() / (x.size(0) - 1)
    axes = vh[:k]
    projections = x @ axes.T
    sign = torch.where(projections.mean(0) < 0, -1.0, 1.0).to(x.dtype)
    axes, projections = axes * sign[:, None], projections * sign
    total = variance.sum()
    ratio = variance[:k] / total if total > 0 else torch.zeros(k, dtype=x.dtype)
    return dict(axes=axes, explained_variance=variance[:k],
                explained_variance_ratio=ratio, projections=projections)


def summarize_projections(projections: Tensor) -> List[Dict]:
    """Per component: mean, std, min, q1, median, q3, max of ``(M, K)``."""
    rows = []
    for column in projections.T:
        q = torch.quantile(column, torch.tensor([0, .25, .5, .75, 1.],
                                                dtype=column.dtype))
        rows.append(dict(mean=float(column.mean()), std=float(column.std()),
                         min=float(q[0]), q1=float(q[1]), median=float(q[2]),
                         q3=float(q[3]), max=float(q[4])))
    return rows


# --------------------------------------------------------------------------
# models and data from config + checkpoint
# --------------------------------------------------------------------------
def load_config(path: str, cfg_options: Optional[Dict] = None):
    """``Config.fromfile`` plus ``--cfg-options`` (imports ``custom_imports``)."""
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_detector(cfg, checkpoint: str, device: str = 'cpu') -> nn.Module:
    """The config's model with the checkpoint's weights, in eval mode.

    SyncBN layers become BN (``revert_sync_batchnorm``, as MMEngine does for
    non-distributed runs); CE/SyncCE layers are kept (SyncCE computes CE
    without a process group).
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmdet.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    get_resnet_backbone(model)  # refuse other backbones before loading
    model = revert_sync_batchnorm(model)
    load_checkpoint(model, checkpoint, map_location='cpu')
    return model.to(device).eval()


def test_images(cfg, model: nn.Module, max_images: int) -> Iterator[Tensor]:
    """Preprocessed inputs ``(1, 3, H, W)`` of the first ``max_images`` images
    of the config's test dataloader (batch size 1: no padding between images;
    the data preprocessor's ``pad_size_divisor`` still applies)."""
    import copy
    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg['batch_size'] = 1
    loader_cfg['num_workers'] = 0
    loader_cfg['persistent_workers'] = False
    loader = Runner.build_dataloader(loader_cfg)
    seen = 0
    for batch in loader:
        if seen >= max_images:
            break
        data = model.data_preprocessor(batch, False)
        seen += data['inputs'].size(0)
        yield data['inputs']


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats as given (format them beforehand)."""
    lines = ['| ' + ' | '.join(str(h) for h in header) + ' |',
             '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join('-' if c is None else str(c) for c in row)
              + ' |' for row in rows]
    return '\n'.join(lines)


def percent(value: Optional[float], digits: int = 1) -> str:
    """``0.123`` -> ``'12.3%'``; None -> ``'-'``."""
    return '-' if value is None else f'{100 * value:.{digits}f}%'


def write_json(data: Dict, path: str) -> None:
    """Write ``data`` as indented JSON (creating the folder)."""
    import json
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(data, f, indent=2)
        f.write('\n')


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0,
               nrows: int = 1):
    """A matplotlib figure with ``nrows x ncols`` axes (each ``width x
    height`` inches, listed row by row) on the non-interactive backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols,
                             figsize=(width * ncols, height * nrows),
                             squeeze=False)
    return fig, list(axes.flat)


def grid_shape(num_panels: int, max_cols: int = 4) -> Tuple[int, int]:
    """``(rows, cols)`` of a grid for ``num_panels`` panels, at most
    ``max_cols`` per row."""
    cols = max(1, min(num_panels, max_cols))
    return math.ceil(num_panels / cols), cols


def new_panel_grid(num_panels: int, max_cols: int = 4, width: float = 4.5,
                   height: float = 4.0):
    """A figure with ``num_panels`` axes on a :func:`grid_shape` grid (the
    unused cells of the last row removed); returns ``(fig, axes)``."""
    rows, cols = grid_shape(num_panels, max_cols)
    fig, axes = new_figure(cols, width, height, nrows=rows)
    for ax in axes[num_panels:]:
        fig.delaxes(ax)
    return fig, axes[:num_panels]


MARKERS = ('o', 's', 'D', '^', 'v', 'P', 'X', '*')


def curve_style(index: int) -> Dict:
    """Line2D properties of the ``index``-th curve drawn on one axes.

    Each curve gets its own marker, and later curves are drawn above
    earlier ones with thinner lines and smaller, hollow markers: where two
    curves coincide, the lower one still shows around (and inside) the
    upper one.
    """
    return dict(marker=MARKERS[index % len(MARKERS)],
                linewidth=1.0 + 2.0 * 0.6 ** index,
                markersize=4.0 + 6.0 * 0.6 ** index,
                fillstyle='full' if index == 0 else 'none',
                markeredgewidth=1.5, zorder=2.0 + index / 100)


def save_figure(fig, path: str) -> None:
    """Save ``fig`` as PNG (100 dpi) and close it."""
    import matplotlib.pyplot as plt
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------
# command line shared by the tools
# --------------------------------------------------------------------------
def add_model_arguments(parser, out_dir: str) -> None:
    """``models`` (CONFIG CHECKPOINT pairs), ``--labels``, ``--out-dir`` and
    ``--cfg-options`` (applied to every config)."""
    from mmengine.config import DictAction
    parser.add_argument(
        'models', nargs='+', metavar='CONFIG CHECKPOINT',
        help='one or more pairs: an MMDetection config and its checkpoint')
    parser.add_argument(
        '--labels', nargs='+',
        help='one label per pair (default: the config file names)')
    parser.add_argument('--out-dir', default=out_dir,
                        help=f'where the JSON and PNG go (default: {out_dir})')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of every config, as in tools/test.py '
        '(put it last on the command line)')


def run_tool(main: Callable, argv: Optional[Sequence[str]] = None):
    """Run a tool's ``main``; an :class:`AnalysisError` becomes its message
    on stderr and exit status 1."""
    import sys
    try:
        return main(argv)
    except AnalysisError as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(1) from None


def default_device() -> str:
    """``'cuda'`` when available, else ``'cpu'``."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'
