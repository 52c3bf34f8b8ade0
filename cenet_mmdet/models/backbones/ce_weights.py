"""What every CE backbone shares: finding its CE layers, keeping their blocks
out of the backbone's own init, checking that a pretrained checkpoint brought
CE weights, and ``norm_eval`` for CE layers over any normalizer."""
from typing import List, Tuple

import torch
from mmengine.model import initialize

from ..layers import CELayer

CE_CONVERTER = 'tools/model_converters/cenet2mmdet.py'
CLS_CONVERTER = 'tools/model_converters/cls2backbone.py'


class CEWeightsError(RuntimeError):
    """A checkpoint was loaded into a CE backbone but left CE layers untrained."""


def _pretrained_cfgs(init_cfg) -> List[dict]:
    """The ``Pretrained`` entries of an ``init_cfg`` (a dict, a list or None)."""
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return [cfg for cfg in cfgs if isinstance(cfg, dict)
            and cfg.get('type') in ('Pretrained', 'PretrainedInit')]


class CEWeightsMixin:
    """Mixin for a backbone class holding CE layers (``class
    CEResNet(CEWeightsMixin, ResNet)``); the backbone sets
    ``self.ce_from_scratch``."""

    ce_from_scratch = False

    @property
    def num_ce_layers(self) -> int:
        """How many CE layers the backbone holds."""
        return len(self.ce_layers())

    def ce_layers(self) -> List[Tuple[str, CELayer]]:
        """``(name, layer)`` of every CE layer, in module order."""
        return [(name, m) for name, m in self.named_modules()
                if isinstance(m, CELayer)]

    def unloaded_ce_layers(self) -> List[str]:
        """Names of the CE layers whose CE block never came from a state dict
        (``CEBlock.loaded``): they hold their construction-time values."""
        return [name for name, layer in self.ce_layers() if not layer.ce.loaded]

    def _frozen_reasons(self, layer: CELayer) -> List[str]:
        """Why an untrained CE layer would never change (empty: it trains)."""
        reasons = []
        if getattr(self, 'norm_eval', False):
            reasons.append('norm_eval=True')
        if layer.frozen_gate:
            reasons.append('frozen_gate=True')
        elif not all(p.requires_grad for p in layer.parameters()):
            reasons.append('requires_grad=False or a frozen stage')
        return reasons

    def check_ce_weights(self, source: str) -> None:
        """Raise :class:`CEWeightsError` if, after loading ``source`` (a
        description of the checkpoint), CE layers are left at their initial
        values and that was not asked for (``ce_from_scratch``), or cannot
        train."""
        layers = dict(self.ce_layers())
        unloaded = [name for name, layer in layers.items() if not layer.ce.loaded]
        if not unloaded:
            return
        names = ', '.join(unloaded[:3]) + (', ...' if len(unloaded) > 3 else '')
        what = (f'{type(self).__name__}: {len(unloaded)} of {len(layers)} CE '
                f'layers ({names}) got no CE weights from {source}')
        if not self.ce_from_scratch:
            raise CEWeightsError(
                f'{what}; it looks like a checkpoint without CE (a BN ResNet). '
                f'Use a CE checkpoint: convert the released CE-ResNet-50 with '
                f'`python {CE_CONVERTER} <released.pth> <out.pth>`, or extract '
                f'an ImageNet CE classifier\'s backbone with `python '
                f'{CLS_CONVERTER} <epoch_N.pth> <out.pth>`. To train CE from its '
                f'initial values on this backbone instead, set '
                f'model.backbone.ce_from_scratch=True (with trainable CE: '
                f'norm_eval=False, requires_grad=True, no frozen_gate).')
        frozen = {name: self._frozen_reasons(layers[name]) for name in unloaded}
        frozen = {name: why for name, why in frozen.items() if why}
        if frozen:
            name, why = next(iter(frozen.items()))
            raise CEWeightsError(
                f'{what}, and ce_from_scratch=True, but {len(frozen)} of them '
                f'cannot train ({name}: {", ".join(why)}): a frozen untrained '
                f'CE block keeps its initial values for the whole run. Set '
                f'norm_eval=False, requires_grad=True in norm_cfg, no '
                f'frozen_gate and frozen_stages below the CE stages, or load '
                f'CE weights.')

    def init_weights(self) -> None:
        """The backbone's init, with every CE block kept at its
        construction-time values (an ``override=dict(name='norm3')`` init,
        e.g. ``zero_init_residual``, reaches every submodule of ``norm3``:
        on a CE layer it would zero the AII gate, which then never trains);
        then the ``Pretrained`` load and :meth:`check_ce_weights`."""
        pretrained = _pretrained_cfgs(self.init_cfg)
        original = self.init_cfg
        cfgs = original if isinstance(original, (list, tuple)) else [original]
        others = [cfg for cfg in cfgs if cfg is not None and cfg not in pretrained]
        blocks = [layer.ce for _, layer in self.ce_layers()]
        saved = [{key: value.detach().clone() for key, value in
                  block.state_dict(keep_vars=True).items()} for block in blocks]
        self.init_cfg = others or None
        try:
            super().init_weights()
        finally:
            self.init_cfg = original
        with torch.no_grad():  # in place: not a load (CEBlock.loaded unchanged)
            for block, values in zip(blocks, saved):
                for key, tensor in block.state_dict(keep_vars=True).items():
                    tensor.copy_(values[key])
        if pretrained:
            initialize(self, pretrained)
            checkpoint = pretrained[-1].get('checkpoint')
            self.check_ce_weights(f'checkpoint {checkpoint!r} (Pretrained '
                                  f'init_cfg)')

    def train(self, mode: bool = True):
        """The backbone's ``train`` (norm_eval, frozen stages), with
        ``norm_eval`` reaching CE layers over GN, IN or LN too, returning
        ``self`` as ``nn.Module.train`` does (mmdet's ``ResNet.train``
        returns None, which breaks ``model = CEResNet(...).eval()``)."""
        super().train(mode)
        if mode and getattr(self, 'norm_eval', False):
            # The backbone puts _BatchNorm layers in eval; a CE layer over GN,
            # IN or LN is not one, but its CE block has running statistics.
            for _, layer in self.ce_layers():
                layer.eval()
        return self
