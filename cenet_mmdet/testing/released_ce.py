"""A plain-autograd transcription of the released CE block.

Written independently of :mod:`cenet_mmdet.models.layers` (no shared code): it
follows the released code step by step (transpose to ``(C, N*H*W)``, centred
covariance with ``baddbmm``, trace normalization, Newton iteration, ``torch.var``)
and keeps the released parameter and buffer names, so that it also serves as
the source of "released" checkpoints in the tests.
"""
import torch
import torch.nn.functional as F
from torch import nn

# Key names only; none of the computation is shared with the plugin.
from ..models.layers.block import RELEASED_CE_KEYS


class ReleasedAII(nn.Module):
    """The released ``AR`` module (names kept: ``fc.0``, ``fc.1``, ``fc.3``)."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.LayerNorm(channels // reduction), nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False))
        # Released: zeros. Started at 1 here so untrained eval is defined.
        self.register_buffer('running_scale', torch.ones(1))


class ReleasedCE(nn.Module):
    """The released CE block, applied to an already normalized input.

    ``variant='bd'`` or ``'aii'`` keeps one branch of the released output
    (paper Table 4): ``p = bd`` or ``p = aii`` instead of
    ``lam * bd + (1 - lam) * aii``; the other branch's tensors stay unused.
    """

    def __init__(self, channels, group_size=16, num_iters=3, eps=1e-5,
                 momentum=0.1, reduction=4, pool_stats=False, variant='ce'):
        super().__init__()
        self.variant = variant
        while channels % group_size != 0:
            group_size //= 2
        self.groups = channels // group_size
        self.group_size = group_size
        self.num_iters = num_iters
        self.eps = eps
        self.momentum = momentum
        self.pool_stats = pool_stats
        self.x_weight = nn.Parameter(torch.zeros(1))
        self.AR = ReleasedAII(channels, reduction)
        self.register_buffer('running_mean',
                             torch.zeros(self.groups, group_size, 1))
        self.register_buffer('running_wm',
                             torch.eye(group_size).repeat(self.groups, 1, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        g, d = self.groups, self.group_size
        x1 = x.transpose(0, 1).contiguous().view(g, d, -1)  # (G, d, N*H*W)
        if self.training:
            m = x1.size(-1)
            stats = x1
            if self.pool_stats:
                pooled = F.max_pool2d(x, 2, 2)
                stats = pooled.transpose(0, 1).contiguous().view(g, d, -1)
            mean = stats.mean(-1, keepdim=True)
            xc = stats - mean
            eye = torch.eye(d, dtype=x.dtype).expand(g, d, d)
            sigma = torch.baddbmm(eye * self.eps, xc, xc.transpose(1, 2),
                                  beta=1.0, alpha=1.0 / m)
            trace_inv = (sigma * eye).sum((1, 2), keepdim=True).reciprocal()
            sigma_n = sigma * trace_inv
            p = eye
            for _ in range(self.num_iters):
                p3 = torch.bmm(torch.bmm(p, p), p)
                p = torch.baddbmm(p, p3, sigma_n, beta=1.5, alpha=-0.5)
            wm = p
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_wm.mul_(1 - self.momentum).add_(self.momentum * wm)
        else:
            wm = self.running_wm
        bd = wm.matmul(x1).view(c, n, h, w).transpose(0, 1)

        var = x.view(n, c, -1).var(-1)  # unbiased, (N, C)
        gate = torch.sigmoid(self.AR.fc(var))
        if self.training:
            scale = var.mean().sqrt()
            with torch.no_grad():
                self.AR.running_scale.mul_(1 - self.momentum).add_(
                    self.momentum * scale)
        else:
            scale = self.AR.running_scale
        aii = x * gate[:, :, None, None] / scale
        if self.variant == 'bd':
            return bd
        if self.variant == 'aii':
            return aii
        lam = torch.sigmoid(self.x_weight)
        return lam * bd + (1 - lam) * aii


class ReleasedBNCE(nn.Module):
    """``bn`` (``nn.BatchNorm2d``) followed by ``ce`` (:class:`ReleasedCE`)."""

    def __init__(self, channels, **ce_kwargs):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.ce = ReleasedCE(channels, **ce_kwargs)

    def forward(self, x):
        return self.ce(self.bn(x))


class ChannelLayerNorm(nn.Module):
    """LN over ``(C, H, W)`` of each sample with a per-channel affine (the LN
    of LN-ResNets): ``F.layer_norm`` without affine, then ``gamma_c, beta_c``."""

    def __init__(self, channels, eps=1e-5, affine=True):
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        y = F.layer_norm(x, x.shape[1:], eps=self.eps)
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y


def reference_norm(norm, channels, num_groups=32, eps=1e-5, affine=True):
    """The torch normalizer ``norm`` (``'BN'``, ``'GN'``, ``'IN'``, ``'LN'``)
    for an ``(N, C, H, W)`` input: ``nn.BatchNorm2d``, ``nn.GroupNorm``,
    ``nn.InstanceNorm2d`` (no running statistics) or :class:`ChannelLayerNorm`."""
    if norm == 'BN':
        return nn.BatchNorm2d(channels, eps=eps, affine=affine)
    if norm == 'GN':
        return nn.GroupNorm(num_groups, channels, eps=eps, affine=affine)
    if norm == 'IN':
        return nn.InstanceNorm2d(channels, eps=eps, affine=affine)
    if norm == 'LN':
        return ChannelLayerNorm(channels, eps=eps, affine=affine)
    raise ValueError(norm)


class ReleasedNormCE(nn.Module):
    """``norm`` (a torch normalizer, :func:`reference_norm`) followed by
    ``ce`` (:class:`ReleasedCE`): the naive ``CE_block(norm(x))``."""

    def __init__(self, norm, channels, num_groups=32, eps=1e-5, affine=True,
                 **ce_kwargs):
        super().__init__()
        self.norm = reference_norm(norm, channels, num_groups, eps, affine)
        self.ce = ReleasedCE(channels, **ce_kwargs)

    def forward(self, x):
        return self.ce(self.norm(x))


def released_to_plugin_keys(state_dict):
    """Map a :class:`ReleasedBNCE` (or :class:`ReleasedNormCE`) state dict
    onto a plugin CE layer's (``CE`` or ``GroupNormCE``)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith('bn.'):
            out[key[3:]] = value
        elif key.startswith('norm.'):
            out[key[5:]] = value
        elif key.startswith('ce.'):
            out['ce.' + RELEASED_CE_KEYS[key[3:]]] = value
        else:
            raise KeyError(key)
    return out


def plugin_to_released_keys(state_dict):
    """Inverse of :func:`released_to_plugin_keys`."""
    inverse = {v: k for k, v in RELEASED_CE_KEYS.items()}
    out = {}
    for key, value in state_dict.items():
        if key.startswith('ce.'):
            out['ce.' + inverse[key[3:]]] = value
        else:
            out['bn.' + key] = value
    return out


def swap_in_released_ce(model):
    """Replace every plugin CE layer in ``model`` by an equivalent
    :class:`ReleasedBNCE` (same tensors), e.g. to benchmark the transcription."""
    from ..models.layers import CE
    for name, child in list(model.named_children()):
        if isinstance(child, CE):
            released = ReleasedBNCE(
                child.num_features, group_size=child.ce.group_size,
                num_iters=child.ce.num_iters, eps=child.ce.eps,
                momentum=child.momentum, pool_stats=child.pool_stats)
            released.load_state_dict(plugin_to_released_keys(child.state_dict()))
            released.train(child.training)
            setattr(model, name, released.to(child.weight.device))
        else:
            swap_in_released_ce(child)
    return model
