"""Deliberate breaks (mutations) of the package, and whether the tests catch
each one.

Each mutation replaces one piece of text in one file of the package (the
original text must be found exactly once), runs the narrowest tests that
should catch it, and puts the file back (always). A mutation is *caught* when
that pytest run fails (exit status 1). The table at the end gives, per
mutation and test selection, whether it was caught and how long the run took;
the exit status is 1 when any mutation was not caught.

The mutations are applied in a scratch copy of the working tree (tracked and
untracked, not ignored, files), never in the checkout itself, so that the
checkout stays intact even when the run is killed; the copy comes first on
``PYTHONPATH``, for the tests and for the tools they start.

    python tools/dev/mutations.py                 # every mutation
    python tools/dev/mutations.py --list          # names, files, selections
    python tools/dev/mutations.py newton sync_bn  # some of them
    python tools/dev/mutations.py --baseline      # first: the selections pass unmutated
    python tools/dev/mutations.py --ref HEAD      # the committed tree, not the work tree

Use it around a change of the test suite (a cut, a merge of tests, a shared
fixture): every mutation must still be caught after it.
"""
import argparse
import os
import os.path as osp
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class Mutation(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    why: str
    #: test selections (each one pytest run); the first is the narrowest
    selections: Tuple[Tuple[str, ...], ...]


T = 'tests/'
MUTATIONS: List[Mutation] = [
    # --------------------------------------------------------------- layers
    Mutation(
        'newton', 'cenet_mmdet/ops/functional.py',
        'whitening, cube, normalized, beta=1.5, alpha=-0.5)',
        'whitening, cube, normalized, beta=1.5, alpha=-0.45)',
        "Newton-Schulz step P <- 1.5 P - 0.45 P^3 S (not 0.5)",
        ((T + 'test_ops/test_whitening.py', ),)),
    Mutation(
        'shift_cross_term', 'cenet_mmdet/ops/functional.py',
        'total_gram = total_gram.baddbmm_(offset.permute(1, 2, 0), half.transpose(0, 1))',
        'total_gram = total_gram + 0',
        'batch_moments drops the transposed cross term',
        ((T + 'test_layers/test_ce_precision.py', ),)),
    Mutation(
        'instance_variance_biased', 'cenet_mmdet/ops/functional.py',
        'return (deviations / (positions - 1)).clamp_min(0).flatten(1)',
        'return (deviations / positions).clamp_min(0).flatten(1)',
        'per-instance variance divided by L (biased), not L - 1',
        ((T + 'test_layers/test_ce.py', ),)),
    Mutation(
        'train_backward_scale', 'cenet_mmdet/models/layers/ce.py',
        'grad_scale.addcmul_(scale, grad_square.view(groups, size), value=2)',
        'grad_scale.addcmul_(scale, grad_square.view(groups, size), value=1)',
        "the hand-written train backward drops half of d a through a^2",
        ((T + 'test_layers/test_ce_train_backward.py', ),)),
    Mutation(
        'group_norm_train_backward', 'cenet_mmdet/models/layers/group_norm_ce.py',
        "grad_mean_k = grad_centre - grad_centre.mean(-1, keepdim=True)",
        "grad_mean_k = grad_centre.clone()",
        "GN + CE's train backward forgets that the group mean depends on each channel",
        ((T + 'test_layers/test_ce_train_backward.py', ),)),
    Mutation(
        'nonfinite_guard', 'cenet_mmdet/models/layers/ce_layer.py',
        'accept, skipped = finite, ~finite\n',
        'accept, skipped = finite | True, ~finite\n',
        'a non-finite batch still updates the running statistics',
        ((T + 'test_layers/test_ce_nonfinite.py', ),)),
    Mutation(
        'ce_requires_grad', 'cenet_mmdet/models/backbones/ce_resnet.py',
        "ce_cfg.setdefault('requires_grad',\n"
        "                              norm_cfg.get('requires_grad', True))",
        "ce_cfg.setdefault('requires_grad', True)",
        "CE parameters train although norm_cfg has requires_grad=False",
        ((T + 'test_backbones/test_ce_resnet.py', ),
         (T + 'test_tools/test_e2e_cpu.py::test_ce_statistics_stay_frozen', ))),
    # ----------------------------------------------------------------- sync
    Mutation(
        'sync_common_shift', 'cenet_mmdet/models/layers/sync_ce.py',
        '        dist.all_reduce(local, op=dist.ReduceOp.SUM, '
        'group=self.process_group)\n        reference = local[:-1]',
        '        reference = local[:-1]',
        "SyncCE's common shift is not all-reduced (each worker its own)",
        ((T + 'test_dist/test_sync_ce_dist.py', ),)),
    Mutation(
        'sync_backward', 'cenet_mmdet/models/layers/sync_ce.py',
        '        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)\n',
        '',
        "_AllReduceSum.backward returns the local gradient (not reduced)",
        ((T + 'test_dist/test_sync_ce_dist.py', ),)),
    Mutation(
        'sync_backward_fused', 'cenet_mmdet/models/layers/ce_layer.py',
        'packed = self._reduce(torch.cat([grad.reshape(-1) for grad in grads]))',
        'packed = torch.cat([grad.reshape(-1) for grad in grads])',
        "the hand-written backward does not sum the sums' gradients over the workers",
        ((T + 'test_dist/test_sync_ce_dist.py', ),)),
    Mutation(
        'cpu_sync_bn_local', 'cenet_mmdet/engine/cpu_dist.py',
        'total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)',
        'total = torch.cat([x.sum(dims), count])',
        "CPUSyncBatchNorm's mean over the local batch only",
        ((T + 'test_engine/test_cpu_dist.py', ),
         (T + 'test_tools/test_e2e_cpu.py::'
          'test_syncce_statistics_identical_on_both_ranks', ))),
    # --------------------------------------------------------------- resume
    # (not restoring numpy's or Python's generator is caught by no test: the
    # resumed run re-seeds them and replays the skipped batches' draws, so
    # they are already where the uninterrupted run had them)
    Mutation(
        'resume_torch_state', 'cenet_mmdet/engine/random_state.py',
        "    torch.set_rng_state(states['torch'])\n",
        '',
        "a resume does not restore torch's generator",
        ((T + 'test_tools/test_exact_resume.py::'
          'test_hook_makes_a_single_process_resume_exact', ),
         (T + 'test_tools/test_exact_resume.py::'
          'test_killed_run_resumes_bit_for_bit', ))),
    Mutation(
        'resume_rank_states', 'cenet_mmdet/engine/random_state.py',
        'states = self._loaded[get_rank()]',
        'states = self._loaded[0]',
        "every rank resumes with rank 0's random states",
        ((T + 'test_tools/test_exact_resume.py::'
          'test_killed_run_resumes_bit_for_bit', ),)),
    # ----------------------------------------------------------- converters
    Mutation(
        'sync_bn_drops_ce', 'cenet_mmdet/engine/sync_bn.py',
        '    if isinstance(module, CELayer):  # synchronized ones are left as '
        'they are\n        return SyncCE.convert_sync_ce(module)\n',
        '',
        "sync_bn='torch' turns CE layers into plain SyncBN (CE block dropped)",
        ((T + 'test_dist/test_sync_bn_convert.py', ),
         (T + 'test_dist/test_converters_keep_ce.py', ))),
    Mutation(
        'converter_drops_whitening', 'cenet_mmdet/converters.py',
        '            mapped.append((key, new_key))\n'
        '            out[new_key] = value\n',
        '            mapped.append((key, new_key))\n'
        "            if not new_key.endswith('running_whitening'):\n"
        '                out[new_key] = value\n',
        'cenet2mmdet loses the running whitening matrices',
        ((T + 'test_tools/test_converter.py', ),)),
    # ---------------------------------------------------- checkpoint checks
    Mutation(
        'ce_weights_check_accepts_all', 'cenet_mmdet/models/backbones/ce_weights.py',
        'unloaded = [name for name, layer in layers.items() if not layer.ce.loaded]',
        'unloaded = []',
        'check_ce_weights (CEResNet and every CE backbone) accepts a checkpoint without CE',
        ((T + 'test_backbones/test_ce_weights_check.py', ),)),
    # (a checkpoint that lacks tensors of the model is refused by
    # check_checkpoint_covers, but no test gives tools/test.py one: dropping
    # the missing-key check is caught by no test; the shape check is tested)
    Mutation(
        'test_checkpoint_shapes_unchecked', 'cenet_mmdet/engine/checkpoint_check.py',
        "and tuple(state_dict[key].shape) != tuple(value.shape)]",
        "and False]",
        'tools/test.py accepts a checkpoint whose tensors have other shapes',
        ((T + 'test_tools/test_user_edges.py::'
          'test_test_script_refuses_a_checkpoint_of_another_head', ),)),
    Mutation(
        'ce_weights_hook_skipped', 'cenet_mmdet/engine/checkpoint_check.py',
        '            if isinstance(module, CEResNet):\n'
        '                module.check_ce_weights(source)\n',
        '            pass\n',
        'CEWeightsCheckHook lets a load_from without CE train',
        ((T + 'test_backbones/test_ce_weights_check.py', ),
         (T + 'test_tools/test_user_edges.py::'
          'test_train_script_refuses_load_from_without_ce', ))),
    # ------------------------------------------------------------- analysis
    Mutation(
        'equivalent_gamma_diagonal', 'cenet_mmdet/analysis.py',
        'return torch.bmm(whitening, gamma).view(-1)',
        'return (whitening.diagonal(dim1=1, dim2=2).unsqueeze(-1) '
        '* gamma).view(-1)',
        'gamma_hat = diag(W) gamma instead of W gamma',
        ((T + 'test_tools/test_channel_analysis.py', ),)),
    Mutation(
        'imagenet_topk_smallest', 'cenet_mmdet/classification/metric.py',
        'ranked = scores.topk(max_k, dim=1).indices',
        'ranked = scores.topk(max_k, dim=1, largest=False).indices',
        'top-k accuracy ranks the smallest scores',
        ((T + 'test_tools/test_imagenet_dist_train.py::'
          'test_dist_train_reports_topk', ),)),
]


def working_tree_files(root: str) -> List[str]:
    """Tracked and untracked (not ignored) files, as git lists them."""
    out = subprocess.run(
        ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
        cwd=root, check=True, capture_output=True).stdout
    return [f for f in out.decode().split('\0') if f]


def make_copy(root: str, dest: str) -> None:
    for rel in working_tree_files(root):
        src = osp.join(root, rel)
        if not osp.isfile(src):  # deleted in the work tree
            continue
        target = osp.join(dest, rel)
        os.makedirs(osp.dirname(target), exist_ok=True)
        shutil.copy2(src, target)


def copy_env(copy: str) -> Dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = copy + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    return env


def check_imports_from(copy: str, env: Dict[str, str]) -> None:
    """The copy's package is the one imported (not the editable install)."""
    found = subprocess.run(
        [sys.executable, '-c', 'import cenet_mmdet; print(cenet_mmdet.__file__)'],
        cwd=copy, env=env, check=True, capture_output=True, text=True).stdout
    if not osp.realpath(found.strip()).startswith(osp.realpath(copy) + os.sep):
        raise SystemExit(f'cenet_mmdet imported from {found.strip()}, '
                         f'not from the copy {copy}')


def pytest(copy: str, env: Dict[str, str], selection: Sequence[str],
           extra: Sequence[str]) -> Tuple[int, float, str]:
    start = time.time()
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
         *extra, *selection], cwd=copy, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = lines[-1] if lines else ''
    # the first assertion or error of a failed test: what caught the break
    first_error = next((line for line in lines if line.startswith('E ')), '')
    if first_error:
        summary += ' | ' + ' '.join(first_error[1:].split())[:160]
    return proc.returncode, time.time() - start, summary


def apply(copy: str, mutation: Mutation) -> str:
    """Mutate the copy's file; return its original text."""
    path = osp.join(copy, mutation.path)
    with open(path) as f:
        original = f.read()
    count = original.count(mutation.old)
    if count != 1:
        raise SystemExit(f'{mutation.name}: the original text is found {count} '
                         f'times in {mutation.path} (expected once):\n'
                         f'{mutation.old}')
    with open(path, 'w') as f:
        f.write(original.replace(mutation.old, mutation.new))
    return original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', help='mutations to run (default: all)')
    parser.add_argument('--list', action='store_true', help='list and exit')
    parser.add_argument('--baseline', action='store_true',
                        help='first run every selection unmutated (must pass)')
    parser.add_argument('--narrowest', action='store_true',
                        help='only the first (narrowest) selection of each')
    parser.add_argument('--ref', default=None,
                        help='test a commit (git archive REF) instead of the '
                        'working tree, e.g. HEAD before a change of the tests')
    parser.add_argument('--pytest-args', default='',
                        help='extra pytest arguments, one string')
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f'unknown mutation(s) {unknown}; known: {sorted(known)}')
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in chosen:
            print(f'{m.name:30} {m.path}: {m.why}')
            for selection in m.selections:
                print(f'{"":30}   {" ".join(selection)}')
        return 0
    extra = args.pytest_args.split()
    rows = []
    with tempfile.TemporaryDirectory(prefix='cenet_mutations_') as copy:
        if args.ref:
            archive = subprocess.run(['git', 'archive', args.ref], cwd=ROOT,
                                     check=True, capture_output=True).stdout
            subprocess.run(['tar', '-x', '-C', copy], input=archive, check=True)
        else:
            make_copy(ROOT, copy)
        env = copy_env(copy)
        check_imports_from(copy, env)
        for m in chosen:  # every original text is there before any run
            with open(osp.join(copy, m.path)) as f:
                if f.read().count(m.old) != 1:
                    raise SystemExit(f'{m.name}: original text not found once '
                                     f'in {m.path}')
        if args.baseline:
            selections = sorted({s for m in chosen for sel in
                                 (m.selections[:1] if args.narrowest
                                  else m.selections) for s in sel})
            rc, seconds, last = pytest(copy, env, selections, extra)
            print(f'[baseline] rc={rc} {seconds:.0f}s {last}', flush=True)
            if rc != 0:
                print('[baseline] the selections fail unmutated: stopping')
                return 2
        for m in chosen:
            for selection in (m.selections[:1] if args.narrowest
                              else m.selections):
                original = apply(copy, m)
                try:
                    rc, seconds, last = pytest(copy, env, selection, extra)
                finally:
                    with open(osp.join(copy, m.path), 'w') as f:
                        f.write(original)
                caught = {1: 'yes', 0: 'NO'}.get(rc, f'error (rc {rc})')
                rows.append((m.name, m.path, ' '.join(selection), caught,
                             seconds, last))
                print(f'[{m.name}] {caught} {seconds:.0f}s '
                      f'{" ".join(selection)}: {last}', flush=True)
    print()
    print('| mutation | file | tests | caught | seconds |')
    print('| --- | --- | --- | --- | --- |')
    for name, path, selection, caught, seconds, _ in rows:
        print(f'| {name} | {path} | {selection} | {caught} | {seconds:.0f} |')
    return 0 if all(row[3] == 'yes' for row in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
