"""configs/cenet/metafile.yml (OpenMMLab format) and the root model-index.yml
are true and standard.

* Only the model index's standard keys (``STANDARD_KEYS``, those of the
  ``model-index`` package that ``mim`` reads, plus MMDetection's metadata
  keys): a made-up key would be ignored by every reader.
* model-index.yml imports the metafile.
* The metafile lists every top-level COCO config of configs/cenet once, each
  with its Config path, Metadata and Results (empty: no COCO run of ours
  exists); the collection names the paper and the code.
* Every config it names builds: ``Config.fromfile`` and MMDetection's
  ``MODELS.build`` with every ``init_cfg`` removed, so no checkpoint is needed.

About 10 s on 2 cores (eight detector builds, no forward; the forwards are
tests/test_tools/test_configs.py's).
"""
import os.path as osp
from glob import glob
from typing import List

import pytest
import yaml

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METAFILE = osp.join(REPO, 'configs', 'cenet', 'metafile.yml')


def load_metafile() -> dict:
    with open(METAFILE) as f:
        return yaml.safe_load(f)


#: the keys a reader of the model index knows, per level (model-index's
#: ModelIndex, Collection, Model, Metadata and Result fields; MMDetection's
#: metafiles add Iterations, Training Memory (GB) and inference time (ms/im))
STANDARD_KEYS = {
    'index': {'Import', 'Collections', 'Models'},
    'collection': {'Name', 'Metadata', 'Paper', 'README', 'Code'},
    'model': {'Name', 'In Collection', 'Config', 'Metadata', 'Results',
              'Weights', 'Paper', 'Code', 'README', 'Image'},
    'metadata': {'FLOPs', 'Parameters', 'Epochs', 'Iterations', 'Batch Size',
                 'Training Data', 'Training Techniques', 'Training Resources',
                 'Architecture', 'Training Memory (GB)', 'inference time (ms/im)'},
    'result': {'Task', 'Dataset', 'Metrics'},
    'link': {'URL', 'Title', 'Version'},
}


def unknown_keys(index: dict) -> List[str]:
    """'where: key' for every key of ``index`` outside ``STANDARD_KEYS``."""
    problems = []

    def check(mapping, level: str, where: str) -> None:
        for key in sorted(set(mapping) - STANDARD_KEYS[level]):
            problems.append(f'{where}: {key}')

    check(index, 'index', 'top level')
    for collection in index.get('Collections') or []:
        where = f'collection {collection.get("Name")}'
        check(collection, 'collection', where)
        check(collection.get('Metadata') or {}, 'metadata', f'{where} Metadata')
        for link in ('Paper', 'Code'):
            if isinstance(collection.get(link), dict):
                check(collection[link], 'link', f'{where} {link}')
    for model in index.get('Models') or []:
        where = f'model {model.get("Name")}'
        check(model, 'model', where)
        check(model.get('Metadata') or {}, 'metadata', f'{where} Metadata')
        for result in model.get('Results') or []:
            check(result, 'result', f'{where} Results')
    return problems


def _drop_init_cfg(cfg) -> None:
    """Remove every init_cfg (Pretrained checkpoints) from a model config."""
    if isinstance(cfg, dict):
        cfg.pop('init_cfg', None)
        for value in cfg.values():
            _drop_init_cfg(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            _drop_init_cfg(value)


def test_metafile_lists_every_coco_config():
    meta = load_metafile()
    (collection, ) = meta['Collections']
    assert collection['Paper']['Title'] == \
        'Channel Equilibrium Networks for Learning Deep Representation'
    assert collection['Paper']['URL'].startswith('https://')
    assert collection['Code']['URL'].startswith('https://')
    assert osp.isfile(osp.join(REPO, collection['README']))
    names = [m['Name'] for m in meta['Models']]
    assert len(names) == len(set(names))
    configs = {osp.basename(p) for p in glob(osp.join(REPO, 'configs', 'cenet',
                                                      '*.py'))}
    assert {osp.basename(m['Config']) for m in meta['Models']} == configs
    for model in meta['Models']:
        assert model['In Collection'] == collection['Name']
        assert model['Config'] == f'configs/cenet/{model["Name"]}.py'
        assert osp.isfile(osp.join(REPO, model['Config']))
        from mmengine.config import Config
        cfg = Config.fromfile(osp.join(REPO, model['Config']))
        dataset = cfg.train_dataloader.dataset  # SSDLite: 120 epochs x 5 repeats
        repeats = dataset.times if dataset.type == 'RepeatDataset' else 1
        assert model['Metadata']['Epochs'] == cfg.train_cfg.max_epochs * repeats
        assert model['Results'] == [], 'ours: empty until a COCO run exists'


def test_only_standard_keys():
    assert unknown_keys(load_metafile()) == []
    with open(osp.join(REPO, 'model-index.yml')) as f:
        index = yaml.safe_load(f)
    assert unknown_keys(index) == []
    assert index['Import'] == ['configs/cenet/metafile.yml']


def test_unknown_keys_are_found():
    """A made-up key at any level is reported (the check can fail)."""
    meta = load_metafile()
    meta['Paper Results'] = []
    meta['Collections'][0]['Metadata']['Backbone Setting'] = 'CE'
    meta['Models'][0]['Paper Results'] = []
    meta['Models'][1]['Metadata']['Backbone Setting'] = 'CE frozen'
    meta['Models'][2]['Results'] = [dict(Task='Object Detection', Dataset='COCO',
                                         Metrics={'box AP': 40.8}, Source='paper')]
    assert unknown_keys(meta) == [
        'top level: Paper Results',
        'collection CE Metadata: Backbone Setting',
        'model mask-rcnn_ce-r50_fpn_2x_coco: Paper Results',
        'model mask-rcnn_syncce-r50_fpn_2x_coco Metadata: Backbone Setting',
        'model mask-rcnn_ce-r101_fpn_2x_coco Results: Source']


@pytest.mark.parametrize('model', load_metafile()['Models'],
                         ids=lambda m: m['Name'])
def test_metafile_config_builds(model):
    import cenet_mmdet  # noqa: F401  (registers CE, SyncCE, CEResNet)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(osp.join(REPO, model['Config']))
    model_cfg = cfg.model   # a ConfigDict: the detectors read train_cfg.rpn
    _drop_init_cfg(model_cfg)
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = MODELS.build(model_cfg)
    assert type(detector).__name__ in ('MaskRCNN', 'FasterRCNN', 'CascadeRCNN',
                                       'RetinaNet', 'SingleStageDetector')
    kind = {'x101': 'CEResNeXt', 'regnetx': 'CERegNet', 'mobilenetv2': 'CEMobileNetV2'}
    expected = next((v for k, v in kind.items() if k in model['Name']), 'CEResNet')
    assert type(detector.backbone).__name__ == expected
    if expected == 'CEResNet':
        depth = 101 if 'r101' in model['Name'] else 50
        assert detector.backbone.depth == depth
    assert detector.backbone.num_ce_layers > 0
