#!/usr/bin/env python
"""Print the box/mask AP curves of synthetic_ap.sh runs.

Usage::

    python tools/benchmarks/synthetic_ap_report.py bn=WORK_DIR_BN ce=WORK_DIR_CE

Reads ``<work_dir>/<timestamp>/vis_data/scalars.json`` of the latest run in each
work dir (the validation records, written with ``log_metric_by_epoch=False``,
hold ``coco/bbox_mAP``, ``coco/segm_mAP`` and the iteration as ``step``) and
prints one table row per evaluation point, then the final AP of each model.
Exits with status 1 if a run has no evaluation record.
"""
import argparse
import glob
import json
import math
import os.path as osp
import sys
from typing import Dict, List, Tuple

KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50')


def read_evaluations(work_dir: str) -> Dict[int, Dict[str, float]]:
    """``{iteration: {metric: value}}`` of the latest run in ``work_dir``."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not files:
        raise FileNotFoundError(f'no */vis_data/scalars.json in {work_dir}')
    evaluations: Dict[int, Dict[str, float]] = {}
    with open(files[-1]) as f:
        for line in f:
            record = json.loads(line)
            if 'coco/bbox_mAP' in record:
                evaluations[int(record['step'])] = {
                    key: float(record[key]) for key in KEYS if key in record}
    return evaluations


def parse(argv: List[str]) -> List[Tuple[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', help='NAME=WORK_DIR')
    runs = []
    for item in parser.parse_args(argv).runs:
        name, sep, work_dir = item.partition('=')
        if not sep:
            parser.error(f'expected NAME=WORK_DIR, got {item!r}')
        runs.append((name, work_dir))
    return runs


def fmt(value) -> str:
    return '  n/a' if value is None or math.isnan(value) else f'{100 * value:5.1f}'


def main(argv=None) -> int:
    runs = parse(sys.argv[1:] if argv is None else argv)
    curves = {name: read_evaluations(work_dir) for name, work_dir in runs}
    steps = sorted({step for curve in curves.values() for step in curve})
    header = ['iter'] + [f'{name} {what}' for name, _ in runs
                         for what in ('box AP', 'mask AP')]
    print('AP curve (COCO AP x 100 on the validation set)')
    print(' | '.join(f'{h:>11}' for h in header))
    for step in steps:
        row = [f'{step:>11}']
        for name, _ in runs:
            ev = curves[name].get(step, {})
            row += [f'{fmt(ev.get("coco/bbox_mAP")):>11}',
                    f'{fmt(ev.get("coco/segm_mAP")):>11}']
        print(' | '.join(row))
    status = 0
    for name, work_dir in runs:
        if not curves[name]:
            print(f'{name}: no evaluation record in {work_dir}')
            status = 1
            continue
        last = max(curves[name])
        ev = curves[name][last]
        print(f'{name} ({work_dir}) at iteration {last}: '
              f'box AP {fmt(ev.get("coco/bbox_mAP")).strip()} '
              f'(AP50 {fmt(ev.get("coco/bbox_mAP_50")).strip()}), '
              f'mask AP {fmt(ev.get("coco/segm_mAP")).strip()} '
              f'(AP50 {fmt(ev.get("coco/segm_mAP_50")).strip()})')
    return status


if __name__ == '__main__':
    sys.exit(main())
