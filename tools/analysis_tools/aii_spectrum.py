#!/usr/bin/env python
"""PCA of the AII gate's input in CE layers (the paper's Fig. 4).

    python tools/analysis_tools/aii_spectrum.py \\
        CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] [--labels bn ce] \\
        [--layers bn1 layer1.0.bn3 ...] [--num-images 32] \\
        [--num-components 8] [--out-dir work_dirs/channel_analysis] \\
        [--device cpu] [--cfg-options KEY=VALUE ...]

The AII gate of a CE layer receives, per image, the unbiased variance over
``H*W`` of each channel of the BN output, ``(N, C)``. Over the first
``--num-images`` images of the config's test set (batch size 1) the tool
records it for each chosen layer (for a CE layer from the argument of
``layer.ce.aii``, exactly what the gate receives; for a plain BN layer, e.g.
in a BN baseline, the same variance computed from the BN output, so that BN
and CE models can be compared), runs a PCA (principal axes of the centred
``(M, C)`` samples) and projects the samples, uncentred, onto the first
``--num-components`` axes (signs chosen so that mean projections are >= 0).

Default layers: the CE layers of the first model (for a model without CE:
the stem norm and the first block's last norm of stages 1-3, where
CE-ResNet-50 has CE).

Writes ``OUT_DIR/aii_spectrum.json`` (per model and layer: explained variance
and ratio per component, and mean, std and quartiles of the projections) and
``OUT_DIR/aii_spectrum.png`` (one box plot per layer, four per row:
projections per component, one box per model) and prints a markdown table.
Every CONFIG and CHECKPOINT path is checked before the first model is
loaded.
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
    parser.add_argument('--layers', nargs='+',
                        help='norm layers, named in the backbone (default: '
                        'the CE layers of the first model)')
    parser.add_argument('--num-images', type=int, default=32,
                        help='M: test images (default: 32)')
    parser.add_argument('--num-components', type=int, default=8,
                        help='principal components to keep (default: 8)')
    parser.add_argument('--device', default=analysis.default_device())
    args = parser.parse_args(argv)
    if args.num_images < 2:
        parser.error('--num-images must be >= 2 for a PCA')
    return args


def default_layers(backbone) -> List[str]:
    """The CE layers of ``backbone``; without any, the stem norm and the
    first-block norms of stages 1-3."""
    names = [n for n, m in analysis.norm_layers(backbone)
             if analysis.is_ce_layer(m)]
    return names or analysis.default_ablation_layers(backbone)[:4]


def analyse_model(spec: analysis.ModelSpec, args: argparse.Namespace,
                  layer_names: Optional[List[str]]) -> Dict:
    """AII inputs of the chosen layers over M images, and their PCA."""
    cfg = analysis.load_config(spec.config, args.cfg_options)
    model = analysis.build_detector(cfg, spec.checkpoint, args.device)
    backbone = analysis.get_resnet_backbone(model)
    names = layer_names or default_layers(backbone)
    layers = analysis.resolve_norm_layers(backbone, names)
    recorder = analysis.AIIInputRecorder(layers)
    with torch.no_grad(), recorder:
        for inputs in analysis.test_images(cfg, model, args.num_images):
            backbone(inputs)
    results = []
    for (name, module), samples in zip(layers, recorder.inputs().values()):
        if samples.size(0) < 2:
            raise analysis.AnalysisError(
                f'{spec.label}: {samples.size(0)} image(s) in the '
                'test set; a PCA needs at least 2')
        pca = analysis.principal_components(samples, args.num_components)
        results.append(dict(
            name=name, type=type(module).__name__,
            source=recorder.sources[name], num_channels=samples.size(1),
            num_images=samples.size(0),
            mean_input=float(samples.mean()),
            explained_variance=pca['explained_variance'].tolist(),
            explained_variance_ratio=pca['explained_variance_ratio'].tolist(),
            projections=analysis.summarize_projections(pca['projections']),
            _projections=pca['projections']))
    return dict(label=spec.label, config=spec.config,
                checkpoint=spec.checkpoint, backbone=type(backbone).__name__,
                layers=results)


#: panels per row of the figure (14 CE layers: 4 rows, 18 inches wide)
MAX_COLUMNS = 4


def plot(results: List[Dict], path: str) -> None:
    """One panel per layer, ``MAX_COLUMNS`` per row: box plots of the
    projections on each principal component, one box per model."""
    names = [layer['name'] for layer in results[0]['layers']]
    fig, axes = analysis.new_panel_grid(len(names), MAX_COLUMNS, width=4.5)
    for ax, layer_index in zip(axes, range(len(names))):
        width = 0.8 / len(results)
        for index, result in enumerate(results):
            layer = result['layers'][layer_index]
            data = layer['_projections'].numpy()
            positions = [k + 1 + (index - (len(results) - 1) / 2) * width
                         for k in range(data.shape[1])]
            parts = ax.boxplot(list(data.T), positions=positions,
                               widths=width * 0.9, patch_artist=True,
                               showfliers=False, manage_ticks=False)
            for box in parts['boxes']:
                box.set_facecolor(f'C{index}')
                box.set_alpha(0.6)
            ax.plot([], [], 's', color=f'C{index}', label=result['label'])
        ax.set_xticks(range(1, data.shape[1] + 1))
        ax.set_xlabel('principal component')
        ax.set_ylabel('projection of per-image channel variances',
                      fontsize=8)
        ax.set_title(f'AII input PCA: {names[layer_index]}', fontsize=9)
        ax.legend(fontsize=8)
    analysis.save_figure(fig, path)


def table(results: List[Dict]) -> str:
    """Per model and layer: variance ratio of PC1-3, and PC1's mean and std."""
    rows = []
    for result in results:
        for layer in result['layers']:
            ratios = layer['explained_variance_ratio'][:3]
            first = layer['projections'][0]
            rows.append([result['label'], layer['name'], layer['source'],
                         layer['num_channels'], layer['num_images'],
                         ' / '.join(analysis.percent(r) for r in ratios),
                         f'{first["mean"]:.3g}', f'{first["std"]:.3g}'])
    return analysis.markdown_table(
        ['model', 'layer', 'source', 'C', 'images', 'variance ratio PC1/2/3',
         'PC1 mean', 'PC1 std'], rows)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    specs = analysis.model_specs(args)
    results = []
    layer_names = args.layers
    for spec in specs:
        result = analyse_model(spec, args, layer_names)
        # the following models are read at the first model's layers
        layer_names = [layer['name'] for layer in result['layers']]
        results.append(result)
    json_path = osp.join(args.out_dir, 'aii_spectrum.json')
    png_path = osp.join(args.out_dir, 'aii_spectrum.png')
    plot(results, png_path)
    for result in results:
        for layer in result['layers']:
            layer.pop('_projections')
    report = dict(tool='aii_spectrum', num_images=args.num_images,
                  num_components=args.num_components, models=results)
    analysis.write_json(report, json_path)
    print(table(results))
    print(f'\nwrote {json_path} and {png_path}')
    return report


if __name__ == '__main__':
    analysis.run_tool(main)
