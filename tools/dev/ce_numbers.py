"""Save, or compare against a saved file, every number a CE layer produces.

For a refactor that must not change the numbers: run ``save`` before it and
``compare`` after it.

    python tools/dev/ce_numbers.py save /tmp/ce_before.pt
    python tools/dev/ce_numbers.py compare /tmp/ce_before.pt

For every layer (CE, SyncCE, GroupNormCE over GN/IN/LN, SyncGroupNormCE, with
every block variant, both whitening modes, ``pool_stats``, frozen gate, no
affine), in float32 and float64, on a plain and a large-mean input, and for
each mode (train; eval with grad; eval with frozen parameters, the paper's
setting (1); eval without grad) it saves
the output, the input gradient, the parameter gradients and the buffers after
the step. SyncCE and SyncGroupNormCE also run in two gloo processes on halves
of the batch. ``compare`` prints, per quantity kind, how many are equal bit for
bit and the largest relative difference of the others, and exits 1 when a
float64 quantity differs by more than ``--rtol64`` (default 1e-12) or a
float32 one by more than ``--rtol32`` (default 1e-5).
"""
import argparse
import sys
import tempfile
from typing import Dict, Iterator, Tuple

import torch

import cenet_mmdet  # noqa: F401 (registers the layers)
from cenet_mmdet.models.layers import CE, GroupNormCE, SyncCE, SyncGroupNormCE
from cenet_mmdet.testing.dist import run_process_group

SHAPE = (4, 32, 5, 6)


def _variants() -> Iterator[Tuple[str, type, dict]]:
    block = [
        ('ce', {}),
        ('bd', dict(variant='bd')),
        ('aii', dict(variant='aii')),
        ('paper', dict(whitening='paper')),
        ('frozen', dict(frozen_gate=True)),
        ('noaffine', dict(affine=False)),
    ]
    for name, options in block:
        yield f'CE-{name}', CE, dict(group_size=8, **options)
        yield f'SyncCE-{name}', SyncCE, dict(group_size=8, **options)
        yield f'GN-{name}', GroupNormCE, dict(group_size=8, num_groups=4, **options)
        yield f'SyncGN-{name}', SyncGroupNormCE, dict(group_size=8, num_groups=4,
                                                      **options)
    yield 'CE-pool', CE, dict(group_size=8, pool_stats=True)
    yield 'IN-ce', GroupNormCE, dict(group_size=8, num_groups=32, norm='IN')
    yield 'LN-ce', GroupNormCE, dict(group_size=8, num_groups=1, norm='LN')


def _make_layer(cls: type, options: dict, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = cls(SHAPE[1], **options).to(dtype)
    with torch.no_grad():  # non-trivial parameters and buffers
        for param in layer.parameters():
            param.add_(torch.randn_like(param) * 0.3)
        if hasattr(layer, 'running_var') and layer.running_var is not None:
            layer.running_mean.normal_(0, 1)
            layer.running_var.uniform_(0.5, 2)
        if hasattr(layer.ce, 'lambda_logit') and not layer.frozen_gate:
            layer.ce.lambda_logit.fill_(0.4)
    return layer


def _input(kind: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    if kind == 'largemean':
        x = x + 1000.0 * torch.randn(1, SHAPE[1], 1, 1, generator=generator,
                                     dtype=torch.float64)
    return x.to(dtype)


def _weights(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(SHAPE, generator=generator, dtype=torch.float64).to(dtype)


def _step(layer, x: torch.Tensor, weights: torch.Tensor, mode: str) -> Dict:
    """One step in ``mode``: 'train', 'frozen' (eval with grad), 'frozen1'
    (eval, parameters frozen: the paper's setting (1)), 'eval' (no grad)."""
    layer.train(mode == 'train')
    if mode == 'frozen1':
        layer.requires_grad_(False)
    x = x.clone().requires_grad_(mode != 'eval')
    layer.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(mode != 'eval'):
        out = layer(x)
        if mode != 'eval':
            (out * weights).sum().backward()
    result = {'output': out.detach().clone()}
    if mode != 'eval':
        result['grad_input'] = x.grad.clone()
        for name, param in layer.named_parameters():
            if param.grad is not None:
                result[f'grad.{name}'] = param.grad.clone()
    saved = layer.state_dict()  # the persistent buffers (not e.g. ce.identity)
    for name, buffer in layer.named_buffers():
        if buffer.is_floating_point() and name in saved:
            result[f'buffer.{name}'] = buffer.detach().clone()
    return result


def local_numbers() -> Dict[str, torch.Tensor]:
    numbers = {}
    for dtype in (torch.float32, torch.float64):
        for kind in ('plain', 'largemean'):
            x, weights = _input(kind, dtype), _weights(dtype)
            for name, cls, options in _variants():
                for mode in ('train', 'frozen', 'frozen1', 'eval'):
                    layer = _make_layer(cls, options, dtype)
                    step = _step(layer, x, weights, mode)
                    key = f'{name}/{str(dtype)[6:]}/{kind}/{mode}'
                    numbers.update({f'{key}/{q}': v for q, v in step.items()})
    return numbers


def _dist_numbers(rank: int, world_size: int):
    for dtype in (torch.float32, torch.float64):
        for kind in ('plain', 'largemean'):
            x, weights = _input(kind, dtype), _weights(dtype)
            half = SHAPE[0] // world_size
            part = slice(rank * half, (rank + 1) * half)
            for name, cls, options in _variants():
                if not name.startswith('Sync'):
                    continue
                layer = _make_layer(cls, options, dtype)
                step = _step(layer, x[part], weights[part], 'train')
                key = f'dist-{name}.{str(dtype)[6:]}.{kind}.train'
                yield key, step


def dist_numbers() -> Dict[str, torch.Tensor]:
    numbers = {}
    with tempfile.TemporaryDirectory() as workdir:
        run = run_process_group(_dist_numbers, workdir, timeout=300)
        run.check_clean_exit()
        for key in run.results:
            for rank, step in enumerate(run.get(key)):
                prefix = key.replace('.', '/')
                numbers.update({f'{prefix}/rank{rank}/{q}': v for q, v in step.items()})
    return numbers


def compare(saved: Dict[str, torch.Tensor], now: Dict[str, torch.Tensor],
            rtol64: float, rtol32: float) -> int:
    missing = sorted(set(saved) ^ set(now))
    if missing:
        print(f'{len(missing)} quantities saved or computed only once, e.g. {missing[:5]}')
        return 1
    summary: Dict[Tuple[str, str], list] = {}
    failures = []
    for key in sorted(saved):
        before, after = saved[key], now[key]
        dtype = str(before.dtype)[6:]
        quantity = key.rsplit('/', 1)[1].split('.')[0]
        entry = summary.setdefault((dtype, quantity), [0, 0, 0.0])
        entry[0] += 1
        if torch.equal(before, after):
            entry[1] += 1
            continue
        scale = before.abs().max().clamp_min(1e-30)
        rel = float((after - before).abs().max() / scale)
        if not rel == rel:  # NaN where there was none
            rel = float('inf') if not torch.equal(before.isnan(), after.isnan()) else 0.0
        entry[2] = max(entry[2], rel)
        limit = rtol64 if before.dtype == torch.float64 else rtol32
        if rel > limit:
            failures.append((key, rel))
    print(f'{"dtype":8} {"quantity":12} {"count":>6} {"bit-equal":>9} {"max rel diff":>13}')
    for (dtype, quantity), (count, equal, rel) in sorted(summary.items()):
        print(f'{dtype:8} {quantity:12} {count:6d} {equal:9d} {rel:13.2e}')
    # the largest difference per case (layer/dtype/input/mode) with failures
    cases: Dict[str, float] = {}
    for key, rel in failures:
        case = key.rsplit('/', 1)[0]
        cases[case] = max(cases.get(case, 0.0), rel)
    for case, rel in sorted(cases.items()):
        print(f'FAIL {case}: largest relative difference {rel:.2e}')
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('action', choices=('save', 'compare'))
    parser.add_argument('file')
    parser.add_argument('--rtol64', type=float, default=1e-12)
    parser.add_argument('--rtol32', type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    numbers = {**local_numbers(), **dist_numbers()}
    if args.action == 'save':
        torch.save(numbers, args.file)
        print(f'saved {len(numbers)} tensors to {args.file}')
        return 0
    return compare(torch.load(args.file, weights_only=True), numbers,
                   args.rtol64, args.rtol32)


if __name__ == '__main__':
    sys.exit(main())
