"""What Python costs in CE-ResNet-50's eval: CE's eval path written again
with exactly CE's ATen ops, as one Python function and in C++ (issue 20).

    python tools/benchmarks/bench_native.py [--depth 50] [--batch 4]
        [--size 224] [--repeat 15] [--runs 3] [--threads 2]

A measurement, not a feature of the package. CE's eval path with running
statistics (the per-sample moments and their accuracy check, the BN scale,
the AII gate, the fold into per-sample maps and their application; the
released layer's defaults: released whitening, variant ``'ce'``, affine BN)
is run three ways: by CE itself (``CE``), by one flat Python function that
calls the same ATen ops in the same order (``flat``: no helper function,
module call, mode check or dtype conversion), and by a C++ function that
calls them (``native``, ``native/ce_eval_maps.cpp``, built by
``torch.utils.cpp_extension.load`` at the first run, about 25 s; a C++
compiler and ninja are needed). All three give CE-ResNet-50's eval outputs
bit for bit (checked before timing), so the differences in time are what
Python and CE's code structure cost, not arithmetic: ``flat`` against
``CE`` is what a leaner Python eval path could save, ``native`` against
``CE`` what a C++ extension calling the same ops could save. An input that
fails CE's accuracy check of the unshifted moments goes through CE itself.

Prints, for ``--runs`` runs of ``--repeat`` interleaved rounds each, the
whole-network eval time and ratio to ResNet (BN) with its min-max spread;
then, from rounds of their own with forward hooks (see
``bench_backbones.py --per-layer``), the time of the CE positions inside the
network, summed.
"""
import argparse
import functools
import os.path as osp
import types

import torch
import torch.nn.functional as F
from torch import nn

from bench_backbones import build, eval_fn, label, per_layer_rows
from common import (interleaved_times, machine_line, markdown_table, median_ms,
                    pin_threads, ratio)

from cenet_mmdet.models.layers import CE

SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'native', 'ce_eval_maps.cpp')
#: the kinds of the table: ``bench_backbones`` kinds, then the two rewrites
KINDS = {'BN': None, 'CE': None, 'flat': 'CE, eval path as one Python function',
         'native': 'CE, eval path in C++ (same ATen ops)'}


def flat_eval_maps(x_grouped, running_var, running_mean, weight, bias, whitening,
                   running_scale, lambda_logit, reduce_weight, norm_weight, norm_bias,
                   expand_weight, eps, norm_eps, mean_ratio):
    """CE's eval path in one Python function (the arguments and results of
    ``eval_maps`` in ``native/ce_eval_maps.cpp``, whose ops it runs)."""
    n, groups, size, positions = x_grouped.shape
    sums = x_grouped.sum(-1)
    squares = torch.linalg.vector_norm(x_grouped, dim=-1).square()
    deviations = squares - sums.square() / positions
    if not bool((squares <= deviations * (1 + mean_ratio)).all()):
        return []
    bn_scale = torch.rsqrt(running_var + eps) * weight
    scale_g = bn_scale.view(groups, size)
    bn_shift = torch.addcmul(bias.view(groups, size), scale_g,
                             running_mean.view(groups, size), value=-1)
    instance_var_y = ((deviations / (positions - 1)).clamp_min(0).flatten(1)
                      * bn_scale.square())
    lam = torch.sigmoid(lambda_logit)
    hidden = F.layer_norm(F.linear(instance_var_y, reduce_weight),
                          [reduce_weight.size(0)], norm_weight, norm_bias, norm_eps)
    gate = torch.sigmoid(F.linear(hidden.relu_(), expand_weight))
    instance_scale = ((1 - lam) * gate / running_scale).view(-1, groups, size)
    scaled_whitening = lam * whitening
    eye = torch.eye(size, dtype=whitening.dtype, device=whitening.device)
    matrix = (torch.addcmul(scaled_whitening, instance_scale.unsqueeze(-1), eye)
              * scale_g.unsqueeze(-2))
    map_bias = torch.addcmul(torch.matmul(scaled_whitening, bn_shift.unsqueeze(-1)),
                             instance_scale.unsqueeze(-1), bn_shift.unsqueeze(-1))
    out = x_grouped.new_empty(n, groups * size, positions)
    # (N*G, d, 1) + (N*G, d, d) @ (N*G, d, L) -> (N*G, d, L), written into out
    torch.baddbmm(map_bias.reshape(n * groups, size, 1),
                  matrix.reshape(n * groups, size, size),
                  x_grouped.reshape(n * groups, size, positions),
                  out=out.view(n * groups, size, positions))
    return [matrix, map_bias, out]


def native_eval_maps():
    """``eval_maps`` of the C++ prototype (built, or loaded from torch's
    extension cache)."""
    from torch.utils.cpp_extension import load
    return load('cenet_bench_ce_eval_maps', [SOURCE], extra_cflags=['-O2']).eval_maps


#: the rewritten layers' calls, and those that went through CE (its accuracy
#: check failed, so CE took its moments about a shift)
CALLS = {'all': 0, 'shifted': 0}


def _rewritten_forward(eval_maps, layer: CE, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s eval forward through ``eval_maps`` (CE's own forward when
    the accuracy check fails)."""
    n, c, h, w = x.shape
    ce = layer.ce
    reduce, norm, _, expand = ce.aii.gate
    maps = eval_maps(
        x.reshape(n, ce.num_groups, ce.group_size, h * w), layer.running_var,
        layer.running_mean, layer.weight, layer.bias, ce.running_whitening,
        ce.aii.running_scale, ce.lambda_logit, reduce.weight, norm.weight, norm.bias,
        expand.weight, layer.eps, norm.eps, CE.UNSHIFTED_MEAN_RATIO)
    CALLS['all'] += 1
    if not maps:
        CALLS['shifted'] += 1
        return CE.forward(layer, x)
    return maps[2].view(n, c, h, w)


def rewrite(model: nn.Module, eval_maps) -> int:
    """Route every CE layer's forward through ``eval_maps``; how many. Only
    the released defaults in eval without gradients qualify (else an error:
    the rewrites cover nothing else)."""
    layers = model.ce_layers()
    for name, layer in layers:
        ce = layer.ce
        if (type(layer) is not CE or ce.variant != 'ce' or ce.whitening != 'released'
                or not layer.affine or layer.pool_stats):
            raise ValueError(f'{name}: the rewrites cover the released CE only')
        layer.forward = types.MethodType(
            functools.partial(_checked_forward, eval_maps), layer)
    return len(layers)


def _checked_forward(eval_maps, layer: CE, x: torch.Tensor) -> torch.Tensor:
    if layer.training or torch.is_grad_enabled() or x.dtype != torch.float32:
        raise RuntimeError('the rewrites cover eval without gradients, float32')
    return _rewritten_forward(eval_maps, layer, x)


def build_models(depth: int, native) -> dict:
    """BN, CE and the two rewrites of the same CE weights, as
    ``bench_backbones.py`` builds them, in eval."""
    torch.manual_seed(0)
    models = {'BN': build('BN', depth), 'CE': build('CE', depth)}
    for kind, eval_maps in (('flat', flat_eval_maps), ('native', native)):
        models[kind] = build('CE', depth)
        models[kind].load_state_dict(models['CE'].state_dict())
        rewrite(models[kind], eval_maps)
    for model in models.values():
        model.eval()
    return models


def check_bitwise(models: dict, x: torch.Tensor) -> None:
    """The rewrites' outputs equal CE's bit for bit (else an error)."""
    with torch.no_grad():
        reference = models['CE'](x)
        for kind in ('flat', 'native'):
            for level, (expected, got) in enumerate(zip(reference, models[kind](x))):
                if not torch.equal(expected, got):
                    raise RuntimeError(f'{kind}: output {level} differs from CE by '
                                       f'{(expected - got).abs().max().item():.3g}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=15)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0,
                        help='torch intra-op threads (default: all cores)')
    args = parser.parse_args()
    args.device = 'cpu'
    pin_threads(args.threads)
    models = build_models(args.depth, native_eval_maps())
    x = torch.randn(args.batch, 3, args.size, args.size)
    check_bitwise(models, x)
    names = {kind: KINDS[kind] or label(kind) for kind in models}
    rows = []
    for run in range(1, args.runs + 1):
        times = interleaved_times({k: eval_fn(m, x) for k, m in models.items()},
                                  args.device, args.warmup, args.repeat)
        rows += [[str(run), names[kind], f'{median_ms(times[kind]):.1f}',
                  str(ratio(times, kind, 'BN'))] for kind in models]
    print(f'CE eval path rewritten, R-{args.depth}, batch {args.batch}, '
          f'{args.size}x{args.size}, eval, {args.runs} runs of {args.repeat} '
          f'interleaved repeats; {machine_line(args.device)}\n')
    print(f'Outputs of the rewrites equal CE\'s bit for bit. {CALLS["shifted"]} of '
          f'{CALLS["all"]} rewritten layer calls failed the accuracy check and went '
          'through CE (which then takes its moments about a shift).\n')
    print(markdown_table(['run', 'backbone', 'eval ms', 'eval / BN (min-max)'], rows))
    layers = per_layer_rows(args.depth, models, x, args)
    print(f'\nThe {len(layers) - 2} CE positions inside the network, eval forward ms '
          f'summed (median of {args.repeat} rounds with forward hooks)\n')
    print(markdown_table(['backbone', f'sum of the {len(layers) - 2} positions',
                          'whole network (with hooks)'],
                         [[names[kind], layers[-2][column], layers[-1][column]]
                          for column, kind in enumerate(models, start=3)]))


if __name__ == '__main__':
    main()
