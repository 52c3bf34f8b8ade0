"""configs/cenet/metafile.yml (OpenMMLab format) is true.

* It lists every top-level COCO config of configs/cenet once, each with its
  Config path, Metadata and Results (empty: no COCO run of ours exists);
  the collection names the paper and the code.
* Every config it names builds: ``Config.fromfile`` and MMDetection's
  ``MODELS.build`` with every ``init_cfg`` removed, so no checkpoint is needed.
* Its "Paper Results" are the paper columns of the README's model-zoo table
  and of configs/cenet/README.md.

About 10 s on 2 cores (eight detector builds, no forward; the forwards are
tests/test_tools/test_configs.py's).
"""
import os.path as osp
import re
from glob import glob
from typing import Dict, List, Tuple

import pytest
import yaml

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METAFILE = osp.join(REPO, 'configs', 'cenet', 'metafile.yml')


def load_metafile() -> dict:
    with open(METAFILE) as f:
        return yaml.safe_load(f)


def paper_metrics(model: dict) -> Tuple[str, str]:
    """(box AP, mask AP) of the model's "Paper Results" as the README table
    writes them ('no paper result', 'n/a')."""
    metrics: Dict[str, float] = {}
    for result in model.get('Paper Results') or []:
        metrics.update(result['Metrics'])
    has_mask = 'mask' in model['Name']
    box = metrics.get('box AP')
    mask = metrics.get('mask AP')
    return (f'{box}' if box is not None else 'no paper result',
            'n/a' if not has_mask else
            (f'{mask}' if mask is not None else 'no paper result'))


def table(page: str, heading: str) -> List[List[str]]:
    """The cells of the first table under ``heading`` in ``page``."""
    with open(osp.join(REPO, page)) as f:
        text = f.read()
    text = text[text.index(f'\n{heading}\n'):]
    rows = [line for line in text.splitlines()[1:] if line.startswith('|')]
    return [[c.strip() for c in row.strip('|').split('|')] for row in rows[2:]]


def paper_columns() -> Dict[str, Dict[str, Tuple[str, str]]]:
    """config file name -> (paper box AP, paper mask AP), from the README's
    model zoo and from configs/cenet/README.md."""
    readme = {r[0].strip('`'): (r[3], r[4])
              for r in table('README.md', '## Model zoo (COCO)')
              if r[0].endswith('.py`')}
    folder = {}
    for row in table('configs/cenet/README.md', '## Results and Models'):
        link = re.search(r'\(([\w.-]+\.py)\)', row[-1])
        if link:
            folder[link.group(1)] = tuple(
                'no paper result' if v == '-' else v for v in row[4:6])
    return dict(readme=readme, folder=folder)


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
        assert model['Metadata']['Epochs'] in (20, 24)
        assert model['Results'] == [], 'ours: empty until a COCO run exists'


@pytest.mark.parametrize('where', ['readme', 'folder'])
def test_paper_results_match_the_tables(where):
    """The metafile's paper numbers are those of the README's model zoo and of
    configs/cenet/README.md."""
    zoo = paper_columns()[where]
    meta = load_metafile()
    assert {f'{m["Name"]}.py' for m in meta['Models']} == set(zoo)
    for model in meta['Models']:
        assert paper_metrics(model) == zoo[f'{model["Name"]}.py'], model['Name']


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
                                       'RetinaNet')
    assert type(detector.backbone).__name__ == 'CEResNet'
    depth = 101 if 'r101' in model['Name'] else 50
    assert detector.backbone.depth == depth
