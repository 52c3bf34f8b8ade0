#!/usr/bin/env python
"""Cumulative random channel ablation of detectors (the paper's Fig. 3a/b).

    python tools/analysis_tools/channel_ablation.py \\
        CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] [--labels bn ce] \\
        [--ratios 0 0.1 0.2 0.3 0.4 0.5 0.6] [--layers bn1 layer1.0.bn3 ...] \\
        [--seed 0] [--out-dir work_dirs/channel_analysis] \\
        [--launcher pytorch] [--cfg-options KEY=VALUE ...]

    # several GPUs (or CPU processes on gloo):
    python -m torch.distributed.run --nproc_per_node=8 \\
        tools/analysis_tools/channel_ablation.py ... --launcher pytorch

The method of Morcos et al. (2018) as used in the paper: for each ratio, the
same random fraction of the output channels of each chosen norm layer is set
to zero (forward hooks; a CE layer's output is BN followed by CE) and
MMDetection's test loop runs: the ``Runner`` that ``tools/test.py`` builds,
with the config's test dataloader and evaluator. Box and mask AP are recorded
per ratio. The zeroed channels of a layer are the first ``round(ratio * C)``
of a random permutation from a ``torch.Generator`` seeded with
``seed + crc32(layer name)``: cumulative (the set at 0.2 contains the set at
0.1) and the same for every model. At ratio 0 no hook is registered, so the
result is that of ``tools/test.py`` on the same config and checkpoint.

Default layers: the stem norm and the block-output norm of the first block
of each stage (``bn1 layer1.0.bn3 layer2.0.bn3 layer3.0.bn3 layer4.0.bn3`` for
ResNet-50: where CE-ResNet has CE, and the paper's "first normalization
layers").

Writes ``OUT_DIR/ablation.json`` and ``OUT_DIR/ablation.png`` (AP against
ratio, box solid and mask dashed, per model; the title names the ablated
layers and the number of test images) and prints a markdown table. Every
CONFIG and CHECKPOINT path is checked before the first model is loaded.
"""
import argparse
import os
import os.path as osp
import sys
from typing import Dict, List, Optional

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))
import cenet_mmdet  # noqa: E402,F401
from cenet_mmdet import analysis  # noqa: E402
from cenet_mmdet.engine import setup_cpu_distributed  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    analysis.add_model_arguments(parser, 'work_dirs/channel_analysis')
    parser.add_argument('--ratios', nargs='+', type=float,
                        default=list(analysis.DEFAULT_RATIOS),
                        help='fractions of channels to zero (default: 0 to '
                        '0.6 by 0.1)')
    parser.add_argument('--layers', nargs='+',
                        help='norm layers to ablate, named in the backbone '
                        '(default: stem norm and the first block\'s last norm '
                        'of each stage)')
    parser.add_argument('--seed', type=int, default=0,
                        help='base seed of the channel subsets (default: 0)')
    parser.add_argument('--dump-predictions', action='store_true',
                        help='also write each ratio\'s predictions, as '
                        'tools/test.py --out does, to OUT_DIR/predictions/'
                        'LABEL_ratio<R>.pkl')
    parser.add_argument('--work-dir',
                        help='runner work dir (default: '
                        'OUT_DIR/work_dirs/LABEL)')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm', 'mpi'])
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    for ratio in args.ratios:
        analysis.num_ablated(1, ratio)  # range check
    args.ratios = sorted(set(args.ratios))
    return args


def build_runner(spec: analysis.ModelSpec, args: argparse.Namespace):
    """The Runner of ``tools/test.py`` for one CONFIG CHECKPOINT pair."""
    from mmengine.runner import Runner
    from mmdet.registry import RUNNERS
    cfg = analysis.load_config(spec.config, args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or osp.join(args.out_dir, 'work_dirs',
                                             spec.label)
    cfg.load_from = spec.checkpoint
    setup_cpu_distributed(cfg, args.launcher)
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def prediction_path(out_dir: str, label: str, ratio: float) -> str:
    """Where ``--dump-predictions`` writes one model's predictions at one
    ratio."""
    return osp.join(out_dir, 'predictions', f'{label}_ratio{ratio:g}.pkl')


def _ap(metrics: Dict, suffix: str) -> Optional[float]:
    keys = [k for k in metrics if k.endswith(suffix)]
    return float(metrics[keys[0]]) if keys else None


def ablate_model(spec: analysis.ModelSpec,
                 args: argparse.Namespace) -> Dict:
    """Run the test loop once per ratio with the chosen channels zeroed."""
    runner = build_runner(spec, args)
    from cenet_mmdet.engine import (EvaluationSubsetError,
                                    check_evaluator_covers_dataset)
    try:
        check_evaluator_covers_dataset(runner.test_loop.dataloader.dataset,
                                       runner.test_loop.evaluator)
    except EvaluationSubsetError as error:
        raise analysis.AnalysisError(str(error)) from None
    backbone = analysis.get_resnet_backbone(runner.model)
    names = args.layers or analysis.default_ablation_layers(backbone)
    layers = analysis.resolve_norm_layers(backbone, names)
    dump = None
    if args.dump_predictions:
        from mmdet.evaluation import DumpDetResults
        dump = DumpDetResults(out_file_path='predictions.pkl')
        runner.test_evaluator.metrics.append(dump)
    points = []
    for ratio in args.ratios:
        if dump is not None:
            dump.out_file_path = prediction_path(args.out_dir, spec.label,
                                                 ratio)
        ablation = analysis.ChannelAblation(layers, ratio, args.seed)
        with ablation:
            metrics = runner.test()
        zeroed = {name: int((mask == 0).sum())
                  for name, mask in ablation.masks.items()}
        points.append(dict(
            ratio=ratio, box_ap=_ap(metrics, 'bbox_mAP'),
            mask_ap=_ap(metrics, 'segm_mAP'), zeroed_channels=zeroed,
            metrics={k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float))}))
    return dict(label=spec.label, config=spec.config,
                checkpoint=spec.checkpoint, backbone=type(backbone).__name__,
                num_images=len(runner.test_loop.dataloader.dataset),
                layers=[dict(name=n, type=type(m).__name__,
                             num_channels=m.num_features) for n, m in layers],
                points=points)


def _per_model(results: List[Dict], values: List[str]) -> str:
    """``values[0]`` when every model has it, else ``LABEL: value; ...``."""
    if len(set(values)) == 1:
        return values[0]
    return '; '.join(f'{r["label"]}: {v}' for r, v in zip(results, values))


def describe(results: List[Dict]) -> str:
    """The plot's title: what was ablated, and on how many test images."""
    import textwrap
    images = _per_model(results, [f'{r["num_images"]} test images'
                                  for r in results])
    layers = _per_model(results, [', '.join(layer['name']
                                            for layer in r['layers'])
                                  for r in results])
    lines = [f'cumulative random channel ablation, {images}']
    lines += textwrap.wrap(f'zeroed in: {layers}', 80)
    return '\n'.join(lines)


def plot(results: List[Dict], path: str) -> None:
    """AP (x100) against ablation ratio: box solid, mask dashed; each curve
    with its own marker, later ones thinner so that equal curves stay
    visible; the title names the ablated layers and the image count."""
    fig, (ax,) = analysis.new_figure(1, width=8.0, height=5.0)
    curve = 0
    for index, result in enumerate(results):
        ratios = [p['ratio'] for p in result['points']]
        for key, linestyle, name in (('box_ap', '-', 'box'),
                                     ('mask_ap', '--', 'mask')):
            values = [p[key] for p in result['points']]
            if any(v is None for v in values):
                continue
            ax.plot(ratios, [100 * v for v in values], linestyle=linestyle,
                    color=f'C{index}', label=f'{result["label"]} {name} AP',
                    **analysis.curve_style(curve))
            curve += 1
    ax.set_xlabel('fraction of channels zeroed in each ablated norm layer')
    ax.set_ylabel('COCO AP (x100)')
    ax.set_title(describe(results), fontsize=9)
    ax.legend(fontsize=8)
    analysis.save_figure(fig, path)


def table(results: List[Dict]) -> str:
    """One row per ratio, box and mask AP (x100) per model."""
    header = ['ratio']
    for result in results:
        header += [f'{result["label"]} box AP', f'{result["label"]} mask AP']
    rows = []
    for i, ratio in enumerate(p['ratio'] for p in results[0]['points']):
        row = [f'{ratio:g}']
        for result in results:
            point = result['points'][i]
            row += ['-' if point[k] is None else f'{100 * point[k]:.1f}'
                    for k in ('box_ap', 'mask_ap')]
        rows.append(row)
    return analysis.markdown_table(header, rows)


def main(argv: Optional[List[str]] = None) -> Dict:
    from mmengine.dist import is_main_process
    args = parse_args(argv)
    specs = analysis.model_specs(args)
    results = [ablate_model(spec, args) for spec in specs]
    report = dict(tool='channel_ablation', ratios=args.ratios, seed=args.seed,
                  models=results)
    if is_main_process():
        json_path = osp.join(args.out_dir, 'ablation.json')
        png_path = osp.join(args.out_dir, 'ablation.png')
        analysis.write_json(report, json_path)
        plot(results, png_path)
        print(table(results))
        print(f'\nwrote {json_path} and {png_path}')
    return report


if __name__ == '__main__':
    analysis.run_tool(main)
