#!/usr/bin/env python
"""BN vs CE Mask R-CNN from scratch over several seeds, with confidence intervals.

Usage::

    python tools/experiments/multi_seed_ap.py [--work-dir work_dirs/multi_seed_ap]
        [--pairs bn-ce gn-gnce] [--seeds 0 1 2 3 4] [--iters 300]
        [--num-train 800] [--num-val 300] [--jobs 2] [--threads 1]

For every pair (``bn-ce``: BN-R50 vs CE-R50; ``gn-gnce``: GN-R50 vs GN+CE-R50,
every norm GN with 32 groups and CE after GN at the CE positions) and every
seed, both arms are trained from scratch with ``tools/train.py`` on the same
generated shapes set (``configs/cenet/synthetic/*-bench.py``: same schedule,
batch and budget; the arms differ only in the backbone) and evaluated once, at
the end, on the held-out ``val`` split. The seed (``randomness.seed``) sets the
initialisation and the data order; the data set is fixed (generator seed 0).
The two arms of a pair share the seed.

Statistics (:func:`summarize`): per arm, the mean, sample standard deviation
(``ddof=1``) and a t-based 95% CI of the mean; per pair, the paired differences
``candidate - baseline`` over seeds with their mean and a **paired t** 95% CI
(``mean +- t_{0.975, n-1} * sd / sqrt(n)``), and the number of seeds in which
the candidate is ahead. With one seed no interval exists (reported as None).

For the first seed, the AP of each arm is also recomputed with each validation
image left out (:func:`one_image_influence`): how far one image moves AP.

Writes into ``--work-dir``: ``<pair>/<arm>/seed<k>/`` (the runs; a finished run
is reused when the driver is started again with the same settings and config
text, so a killed driver loses at most the runs in flight), ``results.json``
(settings, per-seed AP, summary), ``results.md`` (the tables, also printed) and
``results.png`` (per-seed points with the mean and its CI, and the paired
differences).

Runs ``--jobs`` trainings at a time with ``--threads`` torch threads each (the
default, 2 x 1, uses 2 cores; both arms of a seed run side by side, so a drift of
the machine's speed hits both).
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import os.path as osp
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SYNTHETIC = osp.join(ROOT, 'configs', 'cenet', 'synthetic')
BN_CONFIG = osp.join(SYNTHETIC, 'mask-rcnn_r50_fpn_shapes-bench.py')
CE_CONFIG = osp.join(SYNTHETIC, 'mask-rcnn_ce-r50_fpn_shapes-bench.py')
GN_OPTIONS = ('model.backbone.norm_cfg.type=GN',
              'model.backbone.norm_cfg.num_groups=32')
#: The metrics kept per run (COCO AP of the final evaluation, fractions).
METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
           'coco/segm_mAP_50')
#: The metrics the summary and the plot report.
SUMMARY_METRICS = {'box AP': 'coco/bbox_mAP', 'mask AP': 'coco/segm_mAP'}
#: Generator settings of the data set (those of the earlier synthetic_ap.sh:
#: its 800 training images are the same), sizes apart.
GENERATOR_OPTIONS = (
    '--size', '128', '--seed', '0', '--classes',
    'circle,square,triangle,hexagon,star,cross', '--min-objects', '2',
    '--max-objects', '5', '--min-radius', '0.07', '--max-radius', '0.22',
    '--max-occlusion', '0.4', '--noise', '10', '--min-contrast', '40')


class Arm(NamedTuple):
    name: str
    config: str
    options: Tuple[str, ...]


#: pair name -> (baseline, candidate)
PAIRS: Dict[str, Tuple[Arm, Arm]] = {
    'bn-ce': (Arm('bn', BN_CONFIG, ()), Arm('ce', CE_CONFIG, ())),
    'gn-gnce': (Arm('gn', BN_CONFIG, GN_OPTIONS),
                Arm('gnce', CE_CONFIG, GN_OPTIONS)),
}


# ---------------------------------------------------------------- statistics
def t_quantile(probability: float, dof: int) -> float:
    """Quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(probability, dof))


def mean_ci(values: Sequence[float], level: float = 0.95) -> Dict:
    """Mean, sample std (ddof=1) and the t-based CI of the mean of ``values``.

    ``std``, ``ci_low`` and ``ci_high`` are None for fewer than two values.
    """
    n = len(values)
    if n == 0:
        raise ValueError('no values to summarize')
    mean = sum(values) / n
    if n < 2:
        return dict(n=n, mean=mean, std=None, ci_low=None, ci_high=None)
    std = math.sqrt(sum((v - mean)**2 for v in values) / (n - 1))
    half_width = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci_low=mean - half_width,
                ci_high=mean + half_width)


def paired_difference(baseline: Sequence[float], candidate: Sequence[float],
                      level: float = 0.95) -> Dict:
    """Paired t summary of ``candidate - baseline`` (one value per seed).

    Returns :func:`mean_ci` of the differences plus ``differences``,
    ``candidate_ahead`` (seeds with a positive difference) and
    ``ci_includes_zero`` (None without an interval).
    """
    if len(baseline) != len(candidate):
        raise ValueError(f'paired values need equal counts, got '
                         f'{len(baseline)} and {len(candidate)}')
    differences = [c - b for b, c in zip(baseline, candidate)]
    summary = mean_ci(differences, level)
    summary['differences'] = differences
    summary['candidate_ahead'] = sum(d > 0 for d in differences)
    summary['ci_includes_zero'] = (
        None if summary['ci_low'] is None else
        summary['ci_low'] <= 0 <= summary['ci_high'])
    return summary


def summarize(per_seed: Dict[str, Dict[int, Dict[str, float]]],
              pair: Tuple[str, str]) -> Dict:
    """Per-arm and paired summaries of one pair, metric by metric.

    Args:
        per_seed: ``{arm: {seed: {metric: AP}}}`` (AP as a fraction; the
            summary is in AP points, x100).
        pair: ``(baseline, candidate)`` arm names.
    """
    baseline, candidate = pair
    seeds = sorted(set(per_seed[baseline]) & set(per_seed[candidate]))
    summary = dict(seeds=seeds)
    for label, metric in SUMMARY_METRICS.items():
        values = {arm: [100 * per_seed[arm][s][metric] for s in seeds]
                  for arm in pair}
        summary[label] = dict(
            per_arm={arm: mean_ci(values[arm]) for arm in pair},
            difference=paired_difference(values[baseline], values[candidate]))
    return summary


def one_image_influence(ann_file: str, result_file: str, iou_type: str,
                        image_ids: Optional[Sequence[int]] = None) -> Dict:
    """How far leaving out one validation image moves COCO AP (x100).

    For each image of ``image_ids`` (default: all), COCO AP of ``result_file``
    (a COCO results json) is recomputed over the other images. The per-image
    matching does not depend on the other images, so it is computed once
    (``COCOeval.evaluate``) and only the accumulation is repeated per subset.
    Returns ``ap`` (all images), ``changes`` (``{image id: AP without it -
    ap}``), ``max_abs_change``, ``mean_abs_change`` and ``max_image`` (the
    image whose removal moves AP most).
    """
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        detections = gt.loadRes(result_file)
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.evaluate()
    all_ids = [int(i) for i in evaluator.params.imgIds]
    matched = list(evaluator.evalImgs)  # (category, area range, image), flat

    def ap_over(ids: Sequence[int]) -> float:
        # drop the per-image matches of the other images (accumulate skips a
        # None entry, as for an image without ground truth or detections),
        # then COCO AP as COCOeval.summarize's stats[0]: area 'all', 100
        # detections
        keep = set(ids)
        evaluator.evalImgs = [
            entry if all_ids[n % len(all_ids)] in keep else None
            for n, entry in enumerate(matched)]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.accumulate()
        precision = evaluator.eval['precision'][:, :, :, 0, -1]
        valid = precision[precision > -1]
        return 100 * float(np.mean(valid)) if valid.size else -100.0

    full = ap_over(all_ids)
    changes = {i: ap_over([j for j in all_ids if j != i]) - full
               for i in (all_ids if image_ids is None else image_ids)}
    worst = max(changes, key=lambda i: abs(changes[i]))
    return dict(ap=full, images=len(all_ids), left_out=len(changes),
                max_abs_change=abs(changes[worst]), max_image=worst,
                mean_abs_change=sum(map(abs, changes.values())) / len(changes),
                changes=changes)


# ---------------------------------------------------------------- the runs
def read_final_evaluation(run_dir: str, iters: int) -> Optional[Dict[str, float]]:
    """The metrics of the evaluation at iteration ``iters`` of the latest run
    in ``run_dir`` (None if there is none)."""
    if not osp.isdir(run_dir):
        return None
    stamps = sorted(d for d in os.listdir(run_dir)
                    if osp.isfile(osp.join(run_dir, d, 'vis_data', 'scalars.json')))
    for stamp in reversed(stamps):
        with open(osp.join(run_dir, stamp, 'vis_data', 'scalars.json')) as f:
            for line in f:
                record = json.loads(line)
                if 'coco/bbox_mAP' in record and int(record['step']) == iters:
                    return {key: float(record[key]) for key in METRICS}
    return None


def ensure_data(data: str, num_train: int, num_val: int, python: str) -> None:
    """Generate the shapes set into ``data`` unless it holds these settings."""
    args = ['--train', str(num_train), '--val', str(num_val), *GENERATOR_OPTIONS]
    stamp = osp.join(data, 'generator_args.txt')
    if osp.isfile(stamp) and open(stamp).read().split() == args:
        return
    print(f'[multi_seed_ap] generating {data}', flush=True)
    subprocess.run([python, osp.join(ROOT, 'tools', 'misc', 'make_synthetic_coco.py'),
                    data, *args], check=True)
    with open(stamp, 'w') as f:
        f.write(' '.join(args) + '\n')


def run_options(data: str, iters: int, seed: int, run_dir: str,
                extra: Sequence[str]) -> List[str]:
    """``--cfg-options`` of one run: data, budget (the step of the schedule at
    5/6 of it, one evaluation at the end, its predictions kept as COCO json
    in ``run_dir/predictions.{bbox,segm}.json``) and seed."""
    data = data.rstrip('/') + '/'
    ann = data + 'annotations/instances_val.json'
    return [
        f'train_dataloader.dataset.data_root={data}',
        f'val_dataloader.dataset.data_root={data}',
        f'test_dataloader.dataset.data_root={data}',
        f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}',
        f'val_evaluator.outfile_prefix={osp.join(run_dir, "predictions")}',
        f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
        f'default_hooks.checkpoint.interval={iters}',
        f'param_scheduler.0.end={min(50, max(1, iters // 6))}',
        f'param_scheduler.1.end={iters}',
        f'param_scheduler.1.milestones=[{max(1, iters * 5 // 6)}]',
        f'randomness.seed={seed}', *extra]


def config_digest(config: str) -> str:
    """SHA-256 of ``config`` as MMEngine resolves it (its ``_base_`` files,
    ``mmdet::`` ones included, merged in)."""
    from mmengine.config import Config
    text = Config.fromfile(config).pretty_text
    return hashlib.sha256(text.encode()).hexdigest()


def finished_run(run_dir: str, record: Dict,
                 iters: int) -> Optional[Dict[str, float]]:
    """The final metrics of the run in ``run_dir`` if it finished and was made
    by ``record`` (the command and :func:`config_digest` of its config, as in
    its ``command.json``), else None: an edited config is retrained, not
    reused."""
    command_file = osp.join(run_dir, 'command.json')
    if not osp.isfile(command_file):
        return None
    with open(command_file) as f:
        if json.load(f) != record:
            return None
    return read_final_evaluation(run_dir, iters)


def train_one(pair: str, arm: Arm, seed: int, args, python: str,
              config_sha256: str) -> Tuple[Dict, float]:
    """Train (or reuse) one run; returns its final metrics and wall seconds.
    ``config_sha256`` is :func:`config_digest` of ``arm.config``, computed by
    the caller in the main thread (MMEngine's config parsing is not
    thread-safe)."""
    run_dir = osp.join(args.work_dir, pair, arm.name, f'seed{seed}')
    command = [python, osp.join(ROOT, 'tools', 'train.py'), arm.config,
               '--work-dir', run_dir, '--cfg-options',
               *run_options(args.data, args.iters, seed, run_dir,
                            (*arm.options, *args.cfg_options))]
    record = dict(command=command[1:], config_sha256=config_sha256)
    found = finished_run(run_dir, record, args.iters)
    if found is not None:
        print(f'[multi_seed_ap] reusing {run_dir}', flush=True)
        return found, 0.0
    if osp.isdir(run_dir):
        shutil.rmtree(run_dir)  # unfinished, or made with other settings
    os.makedirs(run_dir)
    with open(osp.join(run_dir, 'command.json'), 'w') as f:
        json.dump(record, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    start = time.time()
    with open(osp.join(run_dir, 'train.log'), 'w') as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env=env).returncode
    wall = time.time() - start
    found = read_final_evaluation(run_dir, args.iters)
    if code != 0 or found is None:
        raise RuntimeError(f'run {arm.name} seed {seed} failed (exit {code}); '
                           f'see {osp.join(run_dir, "train.log")}')
    print(f'[multi_seed_ap] {pair} {arm.name} seed {seed}: box AP '
          f'{100 * found["coco/bbox_mAP"]:.1f}, mask AP '
          f'{100 * found["coco/segm_mAP"]:.1f} ({wall:.0f} s)', flush=True)
    return found, wall


def influence_of_run(args, pair: str, arm: str, seed: int) -> Dict:
    """:func:`one_image_influence` of a run's box and mask predictions."""
    run_dir = osp.join(args.work_dir, pair, arm, f'seed{seed}')
    ann_file = osp.join(args.data, 'annotations', 'instances_val.json')
    return {f'seed{seed} {label}': one_image_influence(
        ann_file, osp.join(run_dir, f'predictions.{iou_type}.json'), iou_type)
            for label, iou_type in (('box AP', 'bbox'), ('mask AP', 'segm'))}


# ---------------------------------------------------------------- reports
def fmt(value: Optional[float], digits: int = 1) -> str:
    return 'n/a' if value is None else f'{value:.{digits}f}'


def markdown(results: Dict) -> str:
    """The per-seed and summary tables of every pair."""
    lines = []
    for pair, data in results['pairs'].items():
        baseline, candidate = data['arms']
        seeds = data['summary']['seeds']
        lines += [f'### {pair}: {candidate} vs {baseline}', '',
                  '| seed | ' + ' | '.join(
                      f'{arm} {label}' for label in SUMMARY_METRICS
                      for arm in (baseline, candidate)) + ' |',
                  '|---' * (1 + 2 * len(SUMMARY_METRICS)) + '|']
        for seed in seeds:
            cells = [f'{100 * data["per_seed"][arm][str(seed)][metric]:.1f}'
                     for metric in SUMMARY_METRICS.values()
                     for arm in (baseline, candidate)]
            lines.append(f'| {seed} | ' + ' | '.join(cells) + ' |')
        lines += ['', f'| metric | {baseline} mean ± std | {candidate} mean ± std '
                  f'| {candidate} − {baseline} (paired t 95% CI) '
                  f'| {candidate} ahead | CI includes 0 |', '|---' * 6 + '|']
        for label in SUMMARY_METRICS:
            stats = data['summary'][label]
            arm_cells = [f'{fmt(stats["per_arm"][arm]["mean"])} ± '
                         f'{fmt(stats["per_arm"][arm]["std"])}'
                         for arm in (baseline, candidate)]
            diff = stats['difference']
            lines.append(
                f'| {label} | ' + ' | '.join(arm_cells) +
                f' | {diff["mean"]:+.2f} [{fmt(diff["ci_low"], 2)}, '
                f'{fmt(diff["ci_high"], 2)}] | {diff["candidate_ahead"]}/'
                f'{diff["n"]} | {"n/a" if diff["ci_includes_zero"] is None else ("yes" if diff["ci_includes_zero"] else "no")} |')
        for arm, runs in data.get('one_image_influence', {}).items():
            for label, found in runs.items():
                lines.append(
                    f'- {arm} {label}: leaving out one of the {found["images"]} '
                    f'validation images moves AP by at most '
                    f'{found["max_abs_change"]:.2f} (mean {found["mean_abs_change"]:.2f})')
        lines.append('')
    return '\n'.join(lines)


def plot(results: Dict, path: str) -> None:
    """Per metric and pair: per-seed AP of both arms with mean and 95% CI,
    and the paired differences with theirs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    pairs = list(results['pairs'].items())
    fig, axes = plt.subplots(len(pairs), 2 * len(SUMMARY_METRICS),
                             figsize=(4 * 2 * len(SUMMARY_METRICS), 3.6 * len(pairs)),
                             squeeze=False)
    for row, (pair, data) in enumerate(pairs):
        arms = data['arms']
        for col, label in enumerate(SUMMARY_METRICS):
            stats = data['summary'][label]
            values = {arm: [100 * data['per_seed'][arm][str(s)][SUMMARY_METRICS[label]]
                            for s in data['summary']['seeds']] for arm in arms}
            ax = axes[row][2 * col]
            for x, arm in enumerate(arms):
                ax.plot([x] * len(values[arm]), values[arm], 'o', alpha=0.6,
                        label='per seed' if x == 0 else None)
                _mean_bar(ax, x + 0.2, stats['per_arm'][arm])
            for b, c in zip(values[arms[0]], values[arms[1]]):
                ax.plot([0, 1], [b, c], '-', color='grey', lw=0.6, alpha=0.5)
            ax.set_xticks(range(len(arms)), arms)
            ax.set_xlim(-0.5, len(arms) - 0.3)
            ax.set_ylabel(f'{label} (x100)')
            n = len(values[arms[0]])
            ax.set_title(f'{pair}: {label}, {n} seed{"s" if n != 1 else ""}')
            ax = axes[row][2 * col + 1]
            diff = stats['difference']
            ax.plot([0] * len(diff['differences']), diff['differences'], 'o',
                    alpha=0.6)
            _mean_bar(ax, 0.2, diff)
            ax.axhline(0, color='black', lw=0.8)
            ax.set_xticks([0], [f'{arms[1]} − {arms[0]}'])
            ax.set_xlim(-0.5, 0.7)
            ax.set_title(f'paired difference, {label}\n(mean, paired t 95% CI)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_bar(ax, x: float, stats: Dict) -> None:
    if stats['ci_low'] is None:
        ax.plot([x], [stats['mean']], 's', color='black')
    else:
        ax.errorbar([x], [stats['mean']],
                    yerr=[[stats['mean'] - stats['ci_low']],
                          [stats['ci_high'] - stats['mean']]],
                    fmt='s', color='black', capsize=4)


# ---------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir', default='work_dirs/multi_seed_ap')
    parser.add_argument('--data', default='data/synthetic_shapes_multi_seed',
                        help='generated if missing or made with other sizes')
    parser.add_argument('--pairs', nargs='+', default=['bn-ce'],
                        choices=sorted(PAIRS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument('--iters', type=int, default=300)
    parser.add_argument('--num-train', type=int, default=800)
    parser.add_argument('--num-val', type=int, default=300)
    parser.add_argument('--jobs', type=int, default=2,
                        help='trainings run at a time')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per training')
    parser.add_argument('--no-influence', dest='influence', action='store_false',
                        help='skip the leave-one-image-out AP check of the '
                        'first seed')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='more key=value options for every run')
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f'--seeds repeats a seed: {args.seeds}')
    for name in ('iters', 'num_train', 'num_val', 'jobs', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    python = sys.executable
    ensure_data(args.data, args.num_train, args.num_val, python)
    started = time.time()
    results = dict(
        settings=dict(pairs=args.pairs, seeds=args.seeds, iters=args.iters,
                      num_train=args.num_train, num_val=args.num_val,
                      jobs=args.jobs, threads=args.threads,
                      cfg_options=args.cfg_options,
                      generator=list(GENERATOR_OPTIONS),
                      statistics='paired t, 95% CI, sample std (ddof=1)'),
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        pairs={})
    for pair in args.pairs:
        arms = PAIRS[pair]
        jobs = [(arm, seed) for seed in args.seeds for arm in arms]
        digests = {arm.config: config_digest(arm.config) for arm in arms}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            outcomes = list(pool.map(
                lambda job: train_one(pair, *job, args, python,
                                      digests[job[0].config]), jobs))
        per_seed = {arm.name: {} for arm in arms}
        walls = {arm.name: {} for arm in arms}
        for (arm, seed), (metrics, wall) in zip(jobs, outcomes):
            per_seed[arm.name][seed] = metrics
            walls[arm.name][str(seed)] = round(wall, 1)
        results['pairs'][pair] = dict(
            arms=[arm.name for arm in arms],
            per_seed={arm: {str(s): m for s, m in runs.items()}
                      for arm, runs in per_seed.items()},
            wall_s=walls,
            summary=summarize(per_seed, tuple(arm.name for arm in arms)))
        if args.influence:
            results['pairs'][pair]['one_image_influence'] = {
                arm.name: influence_of_run(args, pair, arm.name, args.seeds[0])
                for arm in arms}
    results['total_wall_s'] = round(time.time() - started, 1)
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(osp.join(args.work_dir, 'results.md'), 'w') as f:
        f.write(table)
    plot(results, osp.join(args.work_dir, 'results.png'))
    print(table)
    print(f'[multi_seed_ap] {results["total_wall_s"]:.0f} s; results in '
          f'{args.work_dir}/results.json, results.md, results.png')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except RuntimeError as err:  # a failed training run: one line, its log named
        sys.exit(f'[multi_seed_ap] error: {err}')
