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
gamma_hat sparsity per layer; activation sparsity per feature map) and prints
a markdown table.
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


def plot(results: List[Dict], path: str, threshold: float) -> None:
    """Left: gamma (solid) and gamma_hat (dashed, CE layers) sparsity per
    layer; right: activation sparsity per feature map, one bar per model."""
    fig, (ax_gamma, ax_act) = analysis.new_figure(2, width=7.0)
    for index, result in enumerate(results):
        color = f'C{index}'
        layers = result['layers']
        x = list(range(len(layers)))
        ax_gamma.plot(x, [100 * (r['gamma_sparsity'] or 0) for r in layers],
                      '-o', ms=3, color=color,
                      label=f'{result["label"]}: |gamma|')
        ce_rows = [(i, r) for i, r in enumerate(layers)
                   if r['gamma_hat_sparsity'] is not None]
        if ce_rows:
            ax_gamma.plot([i for i, _ in ce_rows],
                          [100 * r['gamma_hat_sparsity'] for _, r in ce_rows],
                          '--s', ms=4, color=color, fillstyle='none',
                          label=f'{result["label"]}: |gamma_hat| (CE layers)')
    ax_gamma.set_xlabel('norm layer (backbone order)')
    ax_gamma.set_ylabel(f'% of channels below {threshold:g}')
    ax_gamma.set_title('gamma sparsity per layer')
    ax_gamma.legend(fontsize=8)

    maps = results[0]['activation']['feature_maps']
    width = 0.8 / len(results)
    for index, result in enumerate(results):
        values = [100 * m['sparsity']
                  for m in result['activation']['feature_maps']]
        ax_act.bar([i + (index - (len(results) - 1) / 2) * width
                    for i in range(len(values))], values, width,
                   color=f'C{index}', label=result['label'])
    ax_act.set_xticks(range(len(maps)))
    ax_act.set_xticklabels([m['name'] for m in maps], rotation=30,
                           ha='right', fontsize=7)
    ax_act.set_ylabel(f'% of values below {threshold:g}')
    ax_act.set_title('activation sparsity, first norm+ReLU maps '
                     f'({results[0]["activation"]["num_images"]} images)')
    ax_act.legend(fontsize=8)
    analysis.save_figure(fig, path)


def table(results: List[Dict], threshold: float) -> str:
    """One row per model: pooled gamma / gamma_hat sparsity and the mean
    activation sparsity."""
    rows = []
    for result in results:
        ce_layers = sum(r['gamma_hat_sparsity'] is not None
                        for r in result['layers'])
        act = result['activation']
        rows.append([result['label'], len(result['layers']), ce_layers,
                     analysis.percent(result['gamma_sparsity'], 2),
                     analysis.percent(result['gamma_hat_sparsity'], 2),
                     analysis.percent(act['mean_sparsity'], 2),
                     len(act['feature_maps']), act['num_images']])
    return analysis.markdown_table(
        ['model', 'norm layers', 'CE layers', f'abs(gamma) < {threshold:g}',
         f'abs(gamma_hat) < {threshold:g} (CE)', 'activation sparsity',
         'maps', 'images'], rows)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    specs = analysis.parse_model_specs(args.models, args.labels)
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
