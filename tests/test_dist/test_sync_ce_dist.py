"""SyncCE in real 2-process gloo groups against single-process references.

One spawn for the whole module (``dist_run``): the workers run every scenario
below in order and save each result as soon as it is ready; the tests in this
(parent) process recompute the expected values with

* :class:`PooledCE`, an independent float64 plain-autograd transcription of the
  released BN + CE function that takes a LIST of inputs of different sizes and
  pools their statistics over all positions and instances (written here; no
  plugin code), and
* the single-process :class:`CE` on ``torch.cat`` of the ranks' inputs, where
  all ranks share ``H, W``.

Each rank's loss is ``sum(out * g)``; the total loss is the sum over ranks, so
input gradients must equal the slices of the single-process ones and parameter
gradients summed over ranks the single-process ones. The workers sum their
parameter gradients with ``all_reduce`` (as DDP would, without the averaging)
before identical SGD steps.
"""
import copy
from typing import Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cenet_mmdet.models.layers import (CE, GroupNormCE, SyncCE,
                                       SyncGroupNormCE)
from cenet_mmdet.testing import ReleasedNormCE
from cenet_mmdet.testing.dist import run_process_group

C = 32
GROUP = 16
LR, SGD_MOMENTUM = 2e-3, 0.9

# name -> per-rank training shapes, per-rank eval shapes, steps, dtype, options
SCENARIOS = {
    # different N per rank, same H, W: also checked against CE on torch.cat
    'uneven_n_f64': dict(shapes=[(2, C, 4, 6), (3, C, 4, 6)],
                         eval_shapes=[(2, C, 3, 5), (1, C, 3, 5)], steps=3,
                         dtype=torch.float64, frozen_gate=False, build='init'),
    # different N, H and W per rank: only the pooled list reference applies
    'uneven_hw_f64': dict(shapes=[(2, C, 4, 6), (3, C, 5, 3)],
                          eval_shapes=[(1, C, 2, 7), (2, C, 6, 4)], steps=3,
                          dtype=torch.float64, frozen_gate=False, build='from_ce'),
    'uneven_n_f32': dict(shapes=[(3, C, 4, 6), (1, C, 4, 6)],
                         eval_shapes=[(2, C, 4, 6), (2, C, 4, 6)], steps=2,
                         dtype=torch.float32, frozen_gate=False, build='init'),
    # the same, differentiated by autograd op by op (the path of the options
    # without a hand-written backward, and of compiled runs): the gradient
    # goes through the differentiable all-reduce
    'uneven_n_f64_autograd': dict(shapes=[(2, C, 4, 6), (3, C, 4, 6)],
                                  eval_shapes=[(2, C, 3, 5), (1, C, 3, 5)], steps=2,
                                  dtype=torch.float64, frozen_gate=False, build='init',
                                  autograd=True),
    'frozen_gate_f64': dict(shapes=[(1, C, 5, 5), (3, C, 5, 5)],
                            eval_shapes=[(2, C, 3, 3), (2, C, 3, 3)], steps=2,
                            dtype=torch.float64, frozen_gate=True, build='init'),
    # mean/std ~ 700, far from the running mean (and from 0), float32: the
    # ranks' sums must be taken about one shared reference to stay accurate
    'large_mean_f32': dict(shapes=[(2, C, 4, 6), (3, C, 5, 3)],
                           eval_shapes=[(1, C, 4, 6), (2, C, 3, 5)], steps=2,
                           dtype=torch.float32, frozen_gate=False, build='init',
                           offset=1000.0),
    # rank 0 holds no image: it must join the collectives and count 0
    'empty_rank_f64': dict(shapes=[(0, C, 4, 6), (3, C, 4, 6)],
                           eval_shapes=[(0, C, 4, 6), (2, C, 4, 6)], steps=2,
                           dtype=torch.float64, frozen_gate=False, build='init'),
}
BN_SCENARIOS = list(SCENARIOS)
EQUAL_HW = [name for name, spec in SCENARIOS.items()
            if len({shape[2:] for shape in spec['shapes']}) == 1]
# SyncGroupNormCE (GN + CE, CE statistics synchronized): unequal batches,
# against the naive GN + released block on the concatenated batch
GN_GROUPS = 4
SCENARIOS.update({
    'gn_uneven_n_f64': dict(shapes=[(1, C, 4, 6), (3, C, 4, 6)],
                            eval_shapes=[(2, C, 3, 5), (1, C, 3, 5)], steps=3,
                            dtype=torch.float64, frozen_gate=False, build='init',
                            norm='GN'),
    'gn_large_mean_f32': dict(shapes=[(3, C, 4, 6), (2, C, 4, 6)],
                              eval_shapes=[(1, C, 4, 6), (2, C, 4, 6)], steps=2,
                              dtype=torch.float32, frozen_gate=False,
                              build='from_ce', offset=1000.0, norm='GN'),
    'gn_empty_rank_f64': dict(shapes=[(0, C, 4, 6), (2, C, 4, 6)],
                              eval_shapes=[(0, C, 4, 6), (2, C, 4, 6)], steps=2,
                              dtype=torch.float64, frozen_gate=False, build='init',
                              norm='GN'),
})
GN_SCENARIOS = [name for name in SCENARIOS if name not in BN_SCENARIOS]
COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_into_tensor',
               'reduce_scatter', 'reduce_scatter_tensor', 'broadcast', 'reduce',
               'all_to_all', 'all_to_all_single', 'barrier', 'gather', 'scatter')


# --------------------------------------------------------------- shared data
def make_ce(dtype: torch.dtype, frozen_gate: bool = False, seed: int = 0,
            norm: str = 'BN') -> nn.Module:
    """A CE layer (over BN, or GN with ``norm='GN'``) with non-trivial
    parameters and running statistics."""
    if norm == 'GN':
        layer = GroupNormCE(C, GN_GROUPS, group_size=GROUP, frozen_gate=frozen_gate)
    else:
        layer = CE(C, group_size=GROUP, frozen_gate=frozen_gate)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in layer.state_dict().items():
            if key == 'num_batches_tracked':
                continue
            value.copy_(torch.randn(value.shape, generator=gen) * 0.3)
            if key in ('weight', 'ce.aii.gate.1.weight'):
                value.add_(1.0)
            elif key in ('running_var', 'ce.aii.running_scale'):
                value.abs_().add_(0.5)
            elif key == 'ce.running_whitening':
                value.mul_(0.2).add_(torch.eye(GROUP))
    return layer.to(dtype)


def make_input(shape: Sequence[int], seed: int, dtype: torch.dtype) -> Tensor:
    """Correlated channels with non-zero means (exercises every statistic)."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    mix = torch.eye(c) + 0.4 * torch.randn(c, c, generator=gen)
    offset = torch.randn(c, generator=gen).view(1, c, 1, 1)
    z = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    x = torch.einsum('ij,njhw->nihw', mix.double(), z) * 1.5 + offset.double()
    return x.to(dtype)


class MomentumSGD:
    """``torch.optim.SGD(lr, momentum)`` (same update rule), without the
    seconds that constructing a torch optimizer costs on first use."""

    def __init__(self, params, lr: float = LR, momentum: float = SGD_MOMENTUM):
        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.buffers = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            if self.buffers[i] is None:
                self.buffers[i] = param.grad.clone()
            else:
                self.buffers[i].mul_(self.momentum).add_(param.grad)
            param.add_(self.buffers[i], alpha=-self.lr)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


def _seed(name: str, kind: str, step: int, rank: int) -> int:
    base = sorted(SCENARIOS).index(name) * 10_000
    return base + {'x': 0, 'g': 1_000, 'eval': 2_000}[kind] + 10 * step + rank


def rank_inputs(name: str, step: int, rank: int) -> Tuple[Tensor, Tensor]:
    spec = SCENARIOS[name]
    shape, dtype = spec['shapes'][rank], spec['dtype']
    x = make_input(shape, _seed(name, 'x', step, rank), dtype)
    return (x + spec.get('offset', 0.0),
            make_input(shape, _seed(name, 'g', step, rank), dtype))


def eval_input(name: str, rank: int) -> Tensor:
    spec = SCENARIOS[name]
    return make_input(spec['eval_shapes'][rank], _seed(name, 'eval', 0, rank),
                      spec['dtype']) + spec.get('offset', 0.0)


# ----------------------------------------------------- worker side (spawned)
def _train_in_group(name: str, rank: int) -> dict:
    spec = SCENARIOS[name]
    norm = spec.get('norm', 'BN')
    ce = make_ce(spec['dtype'], spec['frozen_gate'], norm=norm)
    sync_cls = SyncGroupNormCE if norm == 'GN' else SyncCE
    if spec['build'] == 'from_ce':
        layer = SyncCE.convert_sync_ce(ce)
    else:
        extra = dict(num_groups=GN_GROUPS) if norm == 'GN' else {}
        layer = sync_cls(C, group_size=GROUP, frozen_gate=spec['frozen_gate'],
                         **extra)
        layer = layer.to(spec['dtype'])
        layer.load_state_dict(ce.state_dict())
    assert type(layer) is sync_cls
    if spec.get('autograd'):
        layer._fused_backward_supported = lambda dtype: False
    layer.train()
    optimizer = MomentumSGD(layer.parameters())
    steps = []
    for step in range(spec['steps']):
        x, g = rank_inputs(name, step, rank)
        x.requires_grad_()
        out = layer(x)
        (out * g).sum().backward()
        grads = {}
        for pname, param in layer.named_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads[pname] = param.grad.clone()
            dist.all_reduce(param.grad)  # DDP-like, summed instead of averaged
        optimizer.step()
        optimizer.zero_grad()
        steps.append(dict(out=out.detach(), grad_x=x.grad.clone(), grads=grads))
    layer.eval()
    with torch.no_grad():
        eval_out = layer(eval_input(name, rank))
    return dict(steps=steps, eval=eval_out,
                state={k: v.clone() for k, v in layer.state_dict().items()},
                param_names=[n for n, _ in layer.named_parameters()])


class _CollectiveCounter:
    """Wraps every collective of ``torch.distributed`` and records
    ``(name, bytes, dtype)`` of each call while active."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, int, str]] = []
        self._saved: Dict[str, object] = {}

    def __enter__(self) -> '_CollectiveCounter':
        for fname in COLLECTIVES:
            original = getattr(dist, fname, None)
            if original is None:
                continue
            self._saved[fname] = original

            def wrapper(*args, _f=original, _n=fname, **kwargs):
                tensor = args[0] if args and isinstance(args[0], Tensor) else None
                size = tensor.numel() * tensor.element_size() if tensor is not None else 0
                self.calls.append((_n, size, str(getattr(tensor, 'dtype', None))))
                return _f(*args, **kwargs)

            setattr(dist, fname, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for fname, original in self._saved.items():
            setattr(dist, fname, original)

    def take(self) -> List[Tuple[str, int, str]]:
        calls, self.calls = self.calls, []
        return calls


def _count_collectives(rank: int) -> dict:
    torch.manual_seed(0)  # same modules on both ranks
    net = nn.Sequential(SyncCE(256), nn.Conv2d(256, 64, 1, bias=False),
                        SyncCE(64, group_size=64))
    wide = SyncCE(1024)
    wide64 = SyncCE(256).double()
    group_norm = SyncGroupNormCE(256, 32)
    x = torch.randn(1 + rank, 256, 2, 3, requires_grad=True)
    with _CollectiveCounter() as counter:
        out = net(x)
        forward = counter.take()
        out.square().sum().backward()
        backward = counter.take()
        wide(torch.randn(1, 1024, 2, 2))
        wide64(torch.randn(1, 256, 2, 2, dtype=torch.float64))
        half = net[0](torch.randn(1, 256, 2, 2, dtype=torch.bfloat16))
        assert half.dtype == torch.bfloat16
        others = counter.take()
        group_norm(torch.randn(1, 256, 2, 2, requires_grad=True)).sum().backward()
        group_norm_calls = counter.take()
        net.eval()
        with torch.no_grad():
            net(x)
        eval_calls = counter.take()
    return dict(forward=forward, backward=backward, others=others,
                eval=eval_calls, group_norm=group_norm_calls)


def _all_empty(rank: int) -> dict:
    layer = SyncCE(C, group_size=GROUP).double()
    layer.load_state_dict(make_ce(torch.float64).state_dict())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(0, C, 4, 6, dtype=torch.float64, requires_grad=True)
    with _CollectiveCounter() as counter:
        out = layer(x)
        out.sum().backward()
        calls = counter.take()
    return dict(before=before, after=layer.state_dict(), out_shape=list(out.shape),
                finite_grads=all(p.grad is None or bool(torch.isfinite(p.grad).all())
                                 for p in layer.parameters()),
                calls=calls)


def scenarios(rank: int, world_size: int) -> Iterator[Tuple[str, object]]:
    """Run in every worker (same order on every rank)."""
    assert world_size == 2
    for name in SCENARIOS:
        yield name, _train_in_group(name, rank)
    yield 'collectives', _count_collectives(rank)
    yield 'all_empty', _all_empty(rank)


# -------------------------------------------------- parent side (reference)
PARAM_KEYS = ('weight', 'bias', 'ce.lambda_logit', 'ce.aii.gate.0.weight',
              'ce.aii.gate.1.weight', 'ce.aii.gate.1.bias', 'ce.aii.gate.3.weight')


class PooledCE:
    """BN + released CE over a LIST of inputs ``(N_i, C, H_i, W_i)`` whose
    batch statistics are pooled over all their positions and instances, in
    float64 plain autograd, with the plugin's state-dict names.

    Training: BN mean/variance over all positions of all inputs; CE group mean
    and covariance of the BN output over the same positions; trace
    normalization and ``num_iters`` Newton steps; ``BD(y) = P_T y``; AII scale
    ``sqrt(mean over all instances of the unbiased per-instance variance)``.
    Eval: running statistics. ``trainable`` names the leaf tensors.
    """

    def __init__(self, state: Dict[str, Tensor], trainable: Sequence[str],
                 momentum: float = 0.1, eps: float = 1e-5, ce_eps: float = 1e-5,
                 num_iters: int = 3, group_size: int = GROUP) -> None:
        self.t = {k: v.detach().clone().double() for k, v in state.items()}
        self.trainable = list(trainable)
        for key in self.trainable:
            self.t[key].requires_grad_()
        self.momentum, self.eps, self.ce_eps = momentum, eps, ce_eps
        self.num_iters, self.d = num_iters, group_size

    def params(self) -> List[Tensor]:
        return [self.t[k] for k in self.trainable]

    def _gate(self, var: Tensor) -> Tensor:
        t = self.t
        hidden = F.linear(var, t['ce.aii.gate.0.weight'])
        hidden = F.layer_norm(hidden, hidden.shape[-1:], t['ce.aii.gate.1.weight'],
                              t['ce.aii.gate.1.bias'], 1e-5)
        return torch.sigmoid(F.linear(hidden.relu(), t['ce.aii.gate.3.weight']))

    def __call__(self, xs: Sequence[Tensor], training: bool) -> List[Tensor]:
        t, d = self.t, self.d
        c = xs[0].shape[1]
        g = c // d

        def positions(x: Tensor) -> int:  # explicit: reshape(-1) fails for N=0
            return x.shape[0] * x.shape[2] * x.shape[3]

        if training:
            cols = torch.cat([x.transpose(0, 1).reshape(c, positions(x))
                              for x in xs], 1)
            m = cols.shape[1]
            mean, var = cols.mean(1), cols.var(1, unbiased=False)
        else:
            mean, var = t['running_mean'], t['running_var']
        a = (var + self.eps).rsqrt() * t['weight']
        ys = [(x - mean.view(1, c, 1, 1)) * a.view(1, c, 1, 1)
              + t['bias'].view(1, c, 1, 1) for x in xs]
        variances = [y.reshape(y.shape[0], c, y.shape[2] * y.shape[3]).var(-1)
                     if y.shape[0] else y.new_zeros(0, c) for y in ys]
        if training:
            ycols = torch.cat([y.transpose(0, 1).reshape(g, d, positions(y))
                               for y in ys], -1)
            mu = ycols.mean(-1, keepdim=True)
            centred = ycols - mu
            eye = torch.eye(d, dtype=torch.float64).expand(g, d, d)
            sigma = self.ce_eps * eye + centred @ centred.transpose(1, 2) / m
            sigma_n = sigma / sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
            wm = eye
            for _ in range(self.num_iters):
                wm = 1.5 * wm - 0.5 * wm @ wm @ wm @ sigma_n
            scale = torch.cat(variances).mean().sqrt()
            with torch.no_grad():
                k = self.momentum
                t['running_mean'].lerp_(mean, k)
                t['running_var'].lerp_(var * m / (m - 1), k)
                t['ce.running_mean'].lerp_(mu, k)
                t['ce.running_whitening'].lerp_(wm, k)
                t['ce.aii.running_scale'].lerp_(scale.reshape(1), k)
                t['num_batches_tracked'] += 1
        else:
            wm, scale = t['ce.running_whitening'], t['ce.aii.running_scale']
        lam = torch.sigmoid(t['ce.lambda_logit'])
        outs = []
        for y, v in zip(ys, variances):
            n, _, h, w = y.shape
            bd = (wm @ y.transpose(0, 1).reshape(g, d, n * h * w)).reshape(c, n, h, w)
            aii = y * self._gate(v)[:, :, None, None] / scale
            outs.append(lam * bd.transpose(0, 1) + (1 - lam) * aii)
        return outs


def _tol(dtype: torch.dtype) -> dict:
    return (dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else
            dict(rtol=2e-4, atol=2e-5))


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected.double().detach(),
                               **_tol(dtype), msg=lambda m: f'{what}: {m}')


def _pooled_expectation(name: str) -> dict:
    """Replay a scenario with :class:`PooledCE` (float64, list of rank inputs)."""
    spec = SCENARIOS[name]
    ce = make_ce(spec['dtype'], spec['frozen_gate'])
    trainable = [n for n, _ in ce.named_parameters()]
    ref = PooledCE(ce.state_dict(), trainable)
    optimizer = MomentumSGD(ref.params())
    steps = []
    for step in range(spec['steps']):
        pairs = [rank_inputs(name, step, rank) for rank in range(2)]
        xs = [x.double().requires_grad_() for x, _ in pairs]
        outs = ref(xs, training=True)
        sum((o * g.double()).sum() for o, (_, g) in zip(outs, pairs)).backward()
        steps.append(dict(outs=[o.detach() for o in outs],
                          grad_x=[x.grad for x in xs],
                          grads={k: ref.t[k].grad.clone() for k in trainable}))
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        evals = [ref([eval_input(name, rank).double()], training=False)[0]
                 for rank in range(2)]
    return dict(steps=steps, eval=evals, state=ref.t, trainable=trainable)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids contention on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    return run_process_group(scenarios, tmp_path_factory.mktemp('sync_ce'),
                             world_size=2, timeout=50, collective_timeout=20)


def test_workers_finish_cleanly(dist_run):
    dist_run.check_clean_exit()


@pytest.mark.parametrize('name', BN_SCENARIOS)
def test_training_matches_pooled_reference(dist_run, name):
    """Outputs, input grads, summed parameter grads per step, buffers and
    parameters after the steps, then eval outputs, for every rank."""
    ranks = dist_run.get(name)
    spec, dtype = SCENARIOS[name], SCENARIOS[name]['dtype']
    expected = _pooled_expectation(name)
    assert ranks[0]['param_names'] == expected['trainable']
    for step, exp in enumerate(expected['steps']):
        got = [r['steps'][step] for r in ranks]
        for rank in range(2):
            assert got[rank]['out'].dtype == dtype
            assert tuple(got[rank]['out'].shape) == spec['shapes'][rank]
            _close(got[rank]['out'], exp['outs'][rank], dtype,
                   f'{name} step {step} rank {rank} output')
            _close(got[rank]['grad_x'], exp['grad_x'][rank], dtype,
                   f'{name} step {step} rank {rank} input grad')
        for key, grad in exp['grads'].items():
            summed = sum(g['grads'][key].double() for g in got)
            _close(summed, grad, dtype, f'{name} step {step} summed grad of {key}')
    for key, value in expected['state'].items():
        for rank in range(2):
            _close(ranks[rank]['state'][key], value, dtype,
                   f'{name} rank {rank} {key} after {spec["steps"]} steps')
        # every rank computes from the same reduced sums: identical, not close
        assert torch.equal(ranks[0]['state'][key], ranks[1]['state'][key]), key
    for rank in range(2):
        _close(ranks[rank]['eval'], expected['eval'][rank], dtype,
               f'{name} rank {rank} eval output')


@pytest.mark.parametrize('name', EQUAL_HW)
def test_training_matches_ce_on_concatenated_batch(dist_run, name):
    """Same scenarios against the single-process CE (its dtype) on torch.cat."""
    ranks = dist_run.get(name)
    spec, dtype = SCENARIOS[name], SCENARIOS[name]['dtype']
    layer = make_ce(dtype, spec['frozen_gate']).train()
    optimizer = MomentumSGD(layer.parameters())
    sizes = [shape[0] for shape in spec['shapes']]
    for step in range(spec['steps']):
        pairs = [rank_inputs(name, step, rank) for rank in range(2)]
        x = torch.cat([p[0] for p in pairs]).requires_grad_()
        g = torch.cat([p[1] for p in pairs])
        out = layer(x)
        (out * g).sum().backward()
        for rank, (out_r, grad_r) in enumerate(zip(out.split(sizes),
                                                   x.grad.split(sizes))):
            got = ranks[rank]['steps'][step]
            _close(got['out'], out_r, dtype, f'{name} step {step} rank {rank} output')
            _close(got['grad_x'], grad_r, dtype,
                   f'{name} step {step} rank {rank} input grad')
        for key, param in layer.named_parameters():
            summed = sum(r['steps'][step]['grads'][key] for r in ranks)
            _close(summed, param.grad, dtype, f'{name} step {step} grad of {key}')
        optimizer.step()
        optimizer.zero_grad()
    for key, value in layer.state_dict().items():
        _close(ranks[0]['state'][key], value, dtype, f'{name} {key}')
    layer.eval()
    with torch.no_grad():
        for rank in range(2):
            _close(ranks[rank]['eval'], layer(eval_input(name, rank)), dtype,
                   f'{name} rank {rank} eval output')


def _naive_group_norm_ce(dtype: torch.dtype) -> ReleasedNormCE:
    """GN (``nn.GroupNorm``) then the released block, float64, holding the
    scenario's initial tensors (no plugin computation)."""
    ref = ReleasedNormCE('GN', C, num_groups=GN_GROUPS, group_size=GROUP).double()
    ref_state = ref.state_dict()
    with torch.no_grad():
        for key, value in make_ce(dtype, norm='GN').state_dict().items():
            ref_state[inverse_key(key)].copy_(value.double())
    return ref


def inverse_key(plugin_key: str) -> str:
    """Plugin GroupNormCE key -> :class:`ReleasedNormCE` key."""
    from cenet_mmdet.models.layers import RELEASED_CE_KEYS
    if plugin_key.startswith('ce.'):
        released = {v: k for k, v in RELEASED_CE_KEYS.items()}
        return 'ce.' + released[plugin_key[3:]]
    return 'norm.' + plugin_key


@pytest.mark.parametrize('name', GN_SCENARIOS)
def test_sync_group_norm_ce_matches_concatenated_batch(dist_run, name):
    """SyncGroupNormCE on 2 ranks of unequal N (one of them empty, and a
    float32 case at mean/std ~ 700) against GN + the released block in float64
    on the concatenated batch: outputs, input grads, summed parameter grads,
    buffers and parameters after the steps, eval outputs."""
    ranks = dist_run.get(name)
    spec, dtype = SCENARIOS[name], SCENARIOS[name]['dtype']
    ref = _naive_group_norm_ce(dtype).train()
    params = dict(ref.named_parameters())
    optimizer = MomentumSGD(
        [params[inverse_key(key)] for key in ranks[0]['param_names']])
    sizes = [shape[0] for shape in spec['shapes']]
    for step in range(spec['steps']):
        pairs = [rank_inputs(name, step, rank) for rank in range(2)]
        x = torch.cat([p[0] for p in pairs]).double().requires_grad_()
        g = torch.cat([p[1] for p in pairs]).double()
        out = ref(x)
        (out * g).sum().backward()
        for rank, (out_r, grad_r) in enumerate(zip(out.split(sizes),
                                                   x.grad.split(sizes))):
            got = ranks[rank]['steps'][step]
            _close(got['out'], out_r, dtype, f'{name} step {step} rank {rank} output')
            _close(got['grad_x'], grad_r, dtype,
                   f'{name} step {step} rank {rank} input grad')
        for key in ranks[0]['param_names']:
            summed = sum(r['steps'][step]['grads'][key].double() for r in ranks)
            _close(summed, params[inverse_key(key)].grad, dtype,
                   f'{name} step {step} grad of {key}')
        optimizer.step()
        optimizer.zero_grad()
    ref_state = ref.state_dict()
    for key in ranks[0]['state']:
        for rank in range(2):
            _close(ranks[rank]['state'][key], ref_state[inverse_key(key)], dtype,
                   f'{name} rank {rank} {key}')
        assert torch.equal(ranks[0]['state'][key], ranks[1]['state'][key]), key
    ref.eval()
    with torch.no_grad():
        for rank in range(2):
            x = eval_input(name, rank).double()
            if not x.numel():  # an empty rank: an empty output
                assert ranks[rank]['eval'].shape == x.shape
                continue
            _close(ranks[rank]['eval'], ref(x), dtype, f'{name} rank {rank} eval output')


def test_frozen_gate_keeps_gate_and_lambda_fixed(dist_run):
    ranks = dist_run.get('frozen_gate_f64')
    assert ranks[0]['param_names'] == ['weight', 'bias']
    initial = make_ce(torch.float64, frozen_gate=True).state_dict()
    for key in PARAM_KEYS[2:]:
        for rank in range(2):
            assert torch.equal(ranks[rank]['state'][key], initial[key]), key
    assert not torch.equal(ranks[0]['state']['weight'], initial['weight'])


def test_empty_rank_joins_and_counts_zero(dist_run):
    """Rank 0 has N=0: it finished (no hang), has empty outputs/grads, and
    rank 1's results are those of CE on rank 1's batch alone."""
    ranks = dist_run.get('empty_rank_f64')
    assert all(tuple(s['out'].shape) == (0, C, 4, 6) for s in ranks[0]['steps'])
    assert all(tuple(s['grad_x'].shape) == (0, C, 4, 6) for s in ranks[0]['steps'])
    layer = make_ce(torch.float64).train()
    x, _ = rank_inputs('empty_rank_f64', 0, 1)
    _close(ranks[1]['steps'][0]['out'], layer(x), torch.float64, 'rank 1 output')
    # rank 0's loss is empty: its parameter gradients are zero
    for key, grad in ranks[0]['steps'][0]['grads'].items():
        assert torch.count_nonzero(grad) == 0, key


def test_collectives_per_layer_and_documented_bytes(dist_run):
    calls = dist_run.get('collectives')

    def forward(channels: int, size: int, dtype: str = 'torch.float32'):
        """The shared reference (C + 1 numbers), then the packed sums
        ``(2C + C*d + 2)``, both in the compute dtype."""
        width = 8 if dtype == 'torch.float64' else 4
        return [('all_reduce', width * (channels + 1), dtype),
                ('all_reduce', width * (2 * channels + channels * size + 2), dtype)]

    # C=256, d=16: 18,440 bytes packed; the stem C=64, d=64: 16,904
    expected = forward(256, 16) + forward(64, 64)
    assert [size for _, size, _ in expected] == [1028, 18440, 260, 16904]
    for rank in range(2):
        assert calls[rank]['forward'] == expected
        # backward: one all-reduce of the packed gradient per layer, reverse
        # order; the hand-written backward leaves out the two counts
        assert calls[rank]['backward'] == [
            ('all_reduce', 16904 - 8, 'torch.float32'),
            ('all_reduce', 18440 - 8, 'torch.float32')]
        assert calls[rank]['others'] == (
            forward(1024, 16)  # 73,736 bytes packed
            + forward(256, 16, 'torch.float64')
            + forward(256, 16))  # bfloat16 input: float32 sums
        assert calls[rank]['eval'] == []
        # GN + CE: no shared reference needed (y - beta): one collective of
        # the packed block sums forward (first moments, scatter, the total of
        # the instance variances, two counts), their gradient (no counts)
        assert calls[rank]['group_norm'] == [
            ('all_reduce', 4 * (256 + 256 * 16 + 1 + 2), 'torch.float32'),
            ('all_reduce', 4 * (256 + 256 * 16 + 1), 'torch.float32')]
    import cenet_mmdet.models.layers.sync_ce as sync_ce
    for number in ('18,440', '16,904', '73,736'):
        assert number in sync_ce.__doc__


def test_all_ranks_empty_keeps_running_statistics(dist_run):
    for result in dist_run.get('all_empty'):
        assert result['out_shape'] == [0, C, 4, 6]
        assert result['finite_grads']
        # forward: reference and packed sums; backward: the packed gradient
        assert [c[0] for c in result['calls']] == ['all_reduce'] * 3
        for key, value in result['before'].items():
            assert torch.equal(result['after'][key], value), key


# ------------------------------------------------ fallbacks (this process)
def _train_step(layer: nn.Module, x: Tensor, g: Tensor) -> Tuple[Tensor, ...]:
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * g).sum().backward()
    return (out.detach(), x.grad) + tuple(p.grad for p in layer.parameters())


def test_falls_back_to_ce_without_process_group():
    assert not dist.is_initialized()
    ce = make_ce(torch.float64)
    sync = SyncCE.from_ce(copy.deepcopy(ce))
    x, g = make_input((3, C, 4, 5), 1, torch.float64), make_input((3, C, 4, 5), 2,
                                                                   torch.float64)
    for got, exp in zip(_train_step(sync, x, g), _train_step(ce, x, g)):
        assert torch.equal(got, exp)
    expected_state = ce.state_dict()
    for key, got in sync.state_dict().items():
        assert torch.equal(got, expected_state[key]), key
    with pytest.raises(ValueError, match='empty batch'):
        sync(torch.zeros(0, C, 4, 5, dtype=torch.float64))


def test_falls_back_to_ce_with_world_size_one(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous',
                            rank=0, world_size=1)
    try:
        ce = make_ce(torch.float64)
        sync = SyncCE.from_ce(copy.deepcopy(ce))
        x = make_input((2, C, 3, 4), 3, torch.float64)
        g = make_input((2, C, 3, 4), 4, torch.float64)
        with _CollectiveCounter() as counter:
            got = _train_step(sync, x, g)
            assert counter.take() == []
        for a, b in zip(got, _train_step(ce, x, g)):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()


def test_pool_stats_is_refused():
    with pytest.raises(ValueError, match='pool_stats'):
        SyncCE(C, pool_stats=True)
    with pytest.raises(ValueError, match='pool_stats'):  # positional, too
        SyncCE(C, 1e-5, 0.1, True, True, GROUP, 3, 1e-5, 4, True)
    with pytest.raises(ValueError, match='pool_stats'):
        SyncCE.from_ce(CE(C, pool_stats=True))
