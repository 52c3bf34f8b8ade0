#!/usr/bin/env python
"""Channel sparsity of ResNet / CE-ResNet detectors (the paper's Fig. 1, 3d).

    python tools/analysis_tools/channel_sparsity.py \\
        CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] [--labels bn ce] \\
        [--threshold 1e-3] [--num-maps 6] [--num-images 8] \\
        [--out-dir work_dirs/channel_analysis] [--device cpu] \\
        [--cfg-options KEY=VALUE ...]

For each model (see ``cenet_mmdet/analysis.py`` for the exact definitions):

* per norm layer of the backbone (BN, CE, SyncCE, downsample BN; named as in
  the backbone, e.g. ``layer1.0.bn3``), the fraction of BN gammas with
  ``|gamma| < threshold``; for CE layers also the fraction of the BD branch's
  equivalent gammas ``gamma_hat = W @ gamma`` per whitening group
  (``W = layer.ce.running_whitening``, the paper's Proposition 1) below it;
* the activation sparsity ratio (the paper's footnote): the fraction of
  values below the threshold in each of the first ``--num-maps`` norm+ReLU
  feature maps of the backbone (ReLU outputs in forward order), over the
  first ``--num-images`` images of the config's test set, and their mean.

Writes ``OUT_DIR/sparsity.json`` and ``OUT_DIR/sparsity.png`` (gamma and
gamma_hat sparsity per layer, on one axis of layer names shared by the models;
activation sparsity per feature map) and prints a markdown table. Every
CONFIG and CHECKPOINT path is checked before the first model is loaded.
"""
import argparse
import os.path as osp
import sys
from typing import Dict, List, Optional

import torch

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..'))
import cenet_mmdet  # noqa: E402,F401
from cenet_mmdet import analysis  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    analysis.add_model_arguments(parser, 'work_dirs/channel_analysis')
    parser.add_argument('--threshold', type=float,
                        default=analysis.DEFAULT_THRESHOLD,
                        help='sparsity threshold (default: 1e-3)')
    parser.add_argument('--num-maps', type=int, default=6,
                        help='N: first norm+ReLU feature maps (default: 6)')
    parser.add_argument('--num-images', type=int, default=8,
                        help='M: test images for activation sparsity '
                        '(default: 8)')
    parser.add_argument('--device', default=analysis.default_device())
    return parser.parse_args(argv)


def analyse_model(spec: analysis.ModelSpec, args: argparse.Namespace) -> Dict:
    """Gamma, gamma_hat and activation sparsity of one model."""
    cfg = analysis.load_config(spec.config, args.cfg_options)
    model = analysis.build_detector(cfg, spec.checkpoint, args.device)
    backbone = analysis.get_resnet_backbone(model)
    result = dict(label=spec.label, config=spec.config,
                  checkpoint=spec.checkpoint, backbone=type(backbone).__name__)
    result.update(analysis.backbone_gamma_sparsity(backbone, args.threshold))
    meter = analysis.ActivationSparsityMeter(backbone, args.num_maps,
                                             args.threshold)
    images = 0
    with torch.no_grad(), meter:
        for inputs in analysis.test_images(cfg, model, args.num_images):
            backbone(inputs)
            images += inputs.size(0)
    result['activation'] = dict(meter.result(), num_images=images)
    return result


def _plot_gamma(ax, results: List[Dict], threshold: float) -> None:
    """gamma (solid) and gamma_hat (dashed, CE layers) sparsity per layer, on
    one axis of layer names shared by the models."""
    order = analysis.shared_layer_order(
        [[r['name'] for r in result['layers']] for result in results])
    position = {name: i for i, name in enumerate(order)}
    curve = 0
    for index, result in enumerate(results):
        for key, style, what in (('gamma_sparsity', '-', '|gamma|'),
                                 ('gamma_hat_sparsity', '--',
                                  '|gamma_hat| (CE layers)')):
            rows = [r for r in result['layers'] if r[key] is not None]
            if not rows:
                continue
            points = sorted((position[r['name']], 100 * r[key]) for r in rows)
            ax.plot([x for x, _ in points], [y for _, y in points],
                    linestyle=style, color=f'C{index}',
                    label=f'{result["label"]}: {what}',
                    **analysis.curve_style(curve))
            curve += 1
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=90, fontsize=8)
    ax.set_xlim(-0.7, len(order) - 0.3)
    ax.grid(axis='x', alpha=0.3)
    ax.set_xlabel('norm layer')
    ax.set_ylabel(f'% of channels below {threshold:g}')
    ax.set_title('gamma sparsity per layer')
    ax.legend(fontsize=8)


def _plot_activation(ax, results: List[Dict], threshold: float) -> None:
    """Activation sparsity per feature map, one bar per model."""
    maps = results[0]['activation']['feature_maps']
    width = 0.8 / len(results)
    for index, result in enumerate(results):
        values = [100 * m['sparsity']
                  for m in result['activation']['feature_maps']]
        ax.bar([i + (index - (len(results) - 1) / 2) * width
                for i in range(len(values))], values, width,
               color=f'C{index}', label=result['label'])
    ax.set_xticks(range(len(maps)))
    ax.set_xticklabels([m['name'] for m in maps], rotation=20, ha='right',
                       fontsize=8)
    ax.set_ylabel(f'% of values below {threshold:g}')
    ax.set_title('activation sparsity, first norm+ReLU maps '
                 f'({results[0]["activation"]["num_images"]} images)')
    ax.legend(fontsize=8)


def plot(results: List[Dict], path: str, threshold: float) -> None:
    """Top: gamma and gamma_hat sparsity per layer name (the figure widens
    with the number of layers, so that the names stay readable); bottom:
    activation sparsity per feature map."""
    num_layers = max(len(result['layers']) for result in results)
    fig, (ax_gamma, ax_act) = analysis.new_figure(
        1, width=max(10.0, 0.17 * num_layers + 1.5), height=4.5, nrows=2)
    _plot_gamma(ax_gamma, results, threshold)
    _plot_activation(ax_act, results, threshold)
    analysis.save_figure(fig, path)


def table(results: List[Dict], threshold: float) -> str:
    """One row per model: pooled gamma / gamma_hat sparsity, the fraction of
    CE channels where Proposition 1's inequality holds and the mean
    activation sparsity."""
    rows = []
    for result in results:
        ce_layers = sum(r['gamma_hat_sparsity'] is not None
                        for r in result['layers'])
        act = result['activation']
        rows.append([result['label'], len(result['layers']), ce_layers,
                     analysis.percent(result['gamma_sparsity'], 2),
                     analysis.percent(result['gamma_hat_sparsity'], 2),
                     analysis.percent(result['prop1_fraction'], 2),
                     analysis.percent(act['mean_sparsity'], 2),
                     len(act['feature_maps']), act['num_images']])
    return analysis.markdown_table(
        ['model', 'norm layers', 'CE layers', f'abs(gamma) < {threshold:g}',
         f'abs(gamma_hat) < {threshold:g} (CE)',
         'abs(gamma_hat) > abs(gamma) (CE, Prop. 1)', 'activation sparsity',
         'maps', 'images'], rows)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    specs = analysis.model_specs(args)
    results = [analyse_model(spec, args) for spec in specs]
    report = dict(tool='channel_sparsity', threshold=args.threshold,
                  num_maps=args.num_maps, num_images=args.num_images,
                  models=results)
    json_path = osp.join(args.out_dir, 'sparsity.json')
    png_path = osp.join(args.out_dir, 'sparsity.png')
    analysis.write_json(report, json_path)
    plot(results, png_path, args.threshold)
    print(table(results, args.threshold))
    print(f'\nwrote {json_path} and {png_path}')
    return report


if __name__ == '__main__':
    analysis.run_tool(main)
