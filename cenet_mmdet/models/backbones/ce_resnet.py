"""CE-ResNet: MMDetection's ResNet with Channel Equilibrium after chosen norms.

The released CE-ResNet-50 ("ResNet50v1+CE") is a torchvision ResNet-50 (stride
in the 3x3 conv, i.e. ``style='pytorch'``) with a CE block

* after the stem BN (``conv1 -> bn1 -> CE -> relu -> maxpool``, one group of
  64 channels), and
* after ``bn3`` of every bottleneck of stages 1-3, before the residual add
  (``conv3 -> bn3 -> CE -> (+ identity) -> relu``); never in the downsample
  branch, none in stage 4.

Here a CE layer is "normalizer + CE block" in one module, so CE placement
means *replacing* the stem ``norm1`` and the ``norm3`` of the chosen blocks by
a CE layer over the backbone's ``norm_cfg`` normalizer
(:func:`~cenet_mmdet.models.layers.build_ce_layer`): :class:`CE` (BN + CE,
a ``nn.BatchNorm2d`` subclass) for BN, SyncCE for SyncBN, and
:class:`~cenet_mmdet.models.layers.GroupNormCE` for GN, IN and LN. The module names are the normalizer's
(``bn1``/``bn3`` over BN, ``gn1``/``gn3`` over GN; the CE block is the child
``ce``), hence torchvision-style checkpoints keep their names: released
``ce1.*`` becomes ``bn1.ce.*`` and ``layerA.B.ce.*`` becomes
``layerA.B.bn3.ce.*`` (see ``tools/model_converters/cenet2mmdet.py``). A
``norm_cfg`` type that cannot carry CE is refused by name.

Everything else is MMDetection's ``ResNet``: the subclass only swaps the block
class of the CE stages (:class:`CEBottleneck`, the ResNeXt pattern) and the
stem norm, so ``num_stages``, ``out_indices``, ``frozen_stages``,
``norm_cfg``, ``norm_eval``, ``dcn``, ``plugins``, ``with_cp``,
``zero_init_residual`` and ``init_cfg`` behave as for ``type='ResNet'``.
``norm_eval=True`` and ``frozen_stages`` reach CE layers over any normalizer
(their BN statistics, if any, and CE buffers stop updating, their parameters
including lambda and the AII gate stop receiving gradients).
"""
import copy
import re
from typing import Optional, Sequence

from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmdet.models.layers import ResLayer
from mmdet.registry import MODELS

from ..layers import build_ce_layer, check_ce_cfg
from .ce_placement import place_ce
from .ce_weights import CEWeightsMixin

#: CE stages used when ``stage_with_ce`` is not given, by depth (see CEResNet).
DEFAULT_STAGE_WITH_CE = {
    18: (True, True, True, True),
    34: (True, True, True, True),
    50: (True, True, True, False),
    101: (True, True, False, False),
    152: (True, True, True, False),
}


def _located_error(err: ValueError, where: str, switch_off: str) -> ValueError:
    """``err`` from building a CE layer, saying which layer and what to set."""
    return ValueError(
        f'CEResNet: cannot build the CE layer of {where}: {err}. Set the CE '
        f'options for this width in ce_cfg (e.g. reduction, group_size; '
        f'stem_group_size for the stem), use more channels (base_channels, '
        f'stem_channels), or leave CE out there ({switch_off}).')


class CEBottleneck(Bottleneck):
    """MMDetection's ``Bottleneck`` with a CE layer as ``norm3`` (``bn3``).

    ``conv3 -> bn3 (BN + CE) -> plugins after conv3 -> (+ identity) -> relu``;
    over GN the layer is ``gn3`` (GN + CE), and so on for IN, LN
    (:func:`~cenet_mmdet.models.layers.build_ce_layer`). The downsample
    branch is built by ``ResLayer`` with the plain ``norm_cfg``.

    Args:
        inplanes, planes, **kwargs: as for ``Bottleneck``.
        ce_cfg: config of the CE block that follows the block's ``norm_cfg``
            normalizer as ``norm3``, e.g. ``dict(type='CE')``; ``None`` gives
            a plain ``Bottleneck``. Default: None.
    """

    def __init__(self,
                 inplanes: int,
                 planes: int,
                 ce_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(inplanes, planes, **kwargs)
        self.ce_cfg = ce_cfg
        if ce_cfg is not None:
            name, layer = build_ce_layer(ce_cfg, self.norm_cfg,
                                         planes * self.expansion, 3)
            delattr(self, self.norm3_name)  # 'bn3', or e.g. 'gn3' for GN
            self.norm3_name = name
            self.add_module(name, layer)

    @property
    def with_ce(self) -> bool:
        return self.ce_cfg is not None


@MODELS.register_module()
class CEResNet(CEWeightsMixin, ResNet):
    """ResNet backbone with Channel Equilibrium (CE-ResNet).

    A subclass of MMDetection's ``ResNet``: every ``ResNet`` argument works
    unchanged (``depth``, ``num_stages``, ``strides``, ``dilations``,
    ``out_indices``, ``style``, ``deep_stem``, ``avg_down``,
    ``frozen_stages``, ``conv_cfg``, ``norm_cfg``, ``norm_eval``, ``dcn``,
    ``stage_with_dcn``, ``plugins``, ``with_cp``, ``zero_init_residual``,
    ``init_cfg``). Depths 18, 34, 50, 101 and 152.

    CE placement (as released): the CE layer *replaces* the stem ``norm1``
    (``bn1``, one whitening group of ``stem_group_size`` channels) and the
    last norm of every block of the stages flagged in ``stage_with_ce``
    (``norm3``, ``bn3``, of a bottleneck; ``norm2``, ``bn2``, of a basic
    block); it is never put in a downsample branch. With ``deep_stem=True``
    the last norm of the stem (``stem.7``) is replaced.

    Default stages (used when ``stage_with_ce`` is None):

    * depths 18 and 34: all four, the paper's CE-ResNet-18 ("the CE block in
      each residual block", Table 1; 34 the same).
    * depth 152: ``(True, True, True, False)``, as depth 50 (the paper gives
      no placement for 152).

    * depth 50: ``(True, True, True, False)``, the released CE-ResNet-50
      (stem + 3 + 4 + 6 = 14 CE layers).
    * depth 101: ``(True, True, False, False)``. The paper says that CE is used
      in "the first seven residual blocks" of ResNet-101 and no code was
      released; we read it as the stem plus all blocks of layer1 (3) and
      layer2 (4) = the first seven residual blocks, i.e. 1 + 3 + 4 = 8 CE
      layers. Pass ``stage_with_ce`` to choose otherwise.

    Args:
        depth: 18, 34, 50, 101 or 152.
        ce_cfg: config of the CE blocks, which follow the ``norm_cfg``
            normalizer at the CE positions (BN, SyncBN, GN, IN or LN; the
            layers are named after it: ``bn1``/``bn3``, ``gn1``/``gn3``, ...).
            ``dict(type='SyncCE')`` synchronizes the CE statistics (over
            SyncBN they always are); other keys go to the layer
            (``group_size``, ``momentum``, ``variant``, ``frozen_gate``, ...).
            ``requires_grad`` is taken from ``norm_cfg`` unless ``ce_cfg``
            sets it. ``None`` disables CE (a plain ResNet). Default:
            ``dict(type='CE')`` (group size 16 in the blocks).
        stage_with_ce: one flag per stage (length ``num_stages``): whether the
            blocks of that stage get CE. Default: None (by depth, see above).
        stem_ce: put CE after the stem norm. Default: True.
        stem_group_size: whitening group size of the stem CE (overrides
            ``ce_cfg['group_size']`` for the stem). Default: 64 (one group).
        ce_from_scratch: the opt-in for a pretrained checkpoint without CE
            tensors (a BN ResNet): CE starts from its initial values and
            trains. By default (False) a ``Pretrained`` ``init_cfg`` (or a
            runner's ``load_from``, checked by ``tools/train.py``) that leaves
            CE layers unloaded raises :class:`CEWeightsError`. Even with the
            opt-in, unloaded CE layers that cannot train (``norm_eval=True``,
            ``requires_grad=False``, ``frozen_gate=True`` or a frozen stage)
            are refused. Default: False.
        **kwargs: the arguments of ``mmdet.models.backbones.ResNet``.

    Shape:
        input ``(N, in_channels, H, W)``; output: a tuple with, for each index
        ``i`` in ``out_indices``, ``(N, 256 * 2**i, H / 2**(i + 2),
        W / 2**(i + 2))`` (default strides). CE needs at least 2 spatial
        positions at every CE stage in training and eval.

    Example:
        >>> backbone = dict(type='CEResNet', depth=50, out_indices=(0, 1, 2, 3),
        ...                 frozen_stages=1, norm_eval=True,
        ...                 init_cfg=dict(type='Pretrained',
        ...                               checkpoint='ce_resnet50_mmdet.pth'))
    """

    arch_settings = ResNet.arch_settings

    def __init__(self,
                 depth: int,
                 ce_cfg: Optional[dict] = dict(type='CE'),
                 stage_with_ce: Optional[Sequence[bool]] = None,
                 stem_ce: bool = True,
                 stem_group_size: int = 64,
                 ce_from_scratch: bool = False,
                 num_stages: int = 4,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 **kwargs) -> None:
        if depth not in self.arch_settings:
            raise ValueError(
                f'invalid depth {depth!r} for CEResNet: supported depths are '
                f'{sorted(self.arch_settings)}')
        if not isinstance(num_stages, int) or not 1 <= num_stages <= 4:
            raise ValueError(f'num_stages must be in 1..4, got {num_stages!r}')
        if stage_with_ce is None:
            stage_with_ce = DEFAULT_STAGE_WITH_CE[depth][:num_stages]
        elif (isinstance(stage_with_ce, (str, bytes))
              or not isinstance(stage_with_ce, Sequence)
              or len(stage_with_ce) != num_stages):
            raise ValueError(
                f'stage_with_ce must be a sequence of {num_stages} flags (one '
                f'per stage, num_stages={num_stages}), got {stage_with_ce!r}')
        if ce_cfg is not None:
            if not isinstance(ce_cfg, dict) or 'type' not in ce_cfg:
                raise TypeError(
                    f'ce_cfg must be a dict with a "type" key (e.g. '
                    f'dict(type="CE")) or None, got {ce_cfg!r}')
            try:
                check_ce_cfg(ce_cfg, norm_cfg)
            except ValueError as err:
                raise ValueError(f'CEResNet: {err}') from None
            ce_cfg = copy.deepcopy(dict(ce_cfg))
            ce_cfg.setdefault('requires_grad',
                              norm_cfg.get('requires_grad', True))
        # Read by _make_stem_layer and make_res_layer, which ResNet.__init__
        # calls (the ResNeXt pattern: set before super().__init__()).
        self.ce_cfg = ce_cfg
        self.stage_with_ce = tuple(bool(flag) for flag in stage_with_ce)
        self.stem_ce = bool(stem_ce)
        self.stem_group_size = stem_group_size
        self.ce_from_scratch = bool(ce_from_scratch)
        self._num_res_layers_made = 0
        super().__init__(depth, num_stages=num_stages, norm_cfg=norm_cfg,
                         **kwargs)

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        super()._make_stem_layer(in_channels, stem_channels)
        if self.ce_cfg is None or not self.stem_ce:
            return
        stem_cfg = dict(self.ce_cfg, group_size=self.stem_group_size)
        try:
            name, layer = build_ce_layer(stem_cfg, self.norm_cfg, stem_channels, 1)
        except ValueError as err:
            raise _located_error(err, f'the stem ({stem_channels} channels)',
                                 'stem_ce=False') from err
        if self.deep_stem:
            self.stem[7] = layer  # conv, norm, relu x 3: the last norm
        else:
            delattr(self, self.norm1_name)
            self.norm1_name = name
            self.add_module(name, layer)

    def make_res_layer(self, **kwargs) -> ResLayer:
        """Build stage ``i`` (called in order by ``ResNet.__init__``), with
        :class:`CEBottleneck` blocks when ``stage_with_ce[i]``."""
        stage = self._num_res_layers_made
        self._num_res_layers_made += 1
        if self.ce_cfg is None or not self.stage_with_ce[stage]:
            return ResLayer(**kwargs)
        basic = kwargs['block'] is BasicBlock
        if not basic:
            kwargs['block'] = CEBottleneck
            kwargs['ce_cfg'] = self.ce_cfg
        try:
            res_layer = ResLayer(**kwargs)
            if basic:  # the last norm of every block: norm2 (bn2, gn2, ...)
                norm_name = re.escape(res_layer[0].norm2_name)
                place_ce(res_layer, self.ce_cfg, [rf'\d+\.{norm_name}'])
            return res_layer
        except ValueError as err:
            channels = kwargs['planes'] * kwargs['block'].expansion
            flags = list(self.stage_with_ce)
            flags[stage] = False
            raise _located_error(
                err, f'stage {stage + 1} (layer{stage + 1}, {channels} channels '
                f'after {"bn2" if basic else "bn3"})',
                f'stage_with_ce={tuple(flags)}') from err
