"""ImageNet pretraining of CE-ResNet-101 on CPU, as a user runs it, and its
checkpoint in the R-101 Mask R-CNN configs.

1. A generated ImageNet-layout folder (11 classes, one training and one
   validation image each; ``train/<wnid>/``, flat ``val/``,
   ``meta/{train,val}.txt``). 11 images do not split evenly over 2 processes:
   the distributed sampler pads rank 1 with a repeated image, which the
   evaluation must drop; and top-5 of 11 classes is far from 100%.
2. ``bash tools/dist_train.sh configs/cenet/imagenet/ce-resnet101_8xb32_in1k.py 2``
   (two gloo processes) with ``--auto-scale-lr``, shortened by
   ``--cfg-options`` to one epoch of 3 iterations at 64 px; validation reports ``accuracy/top1`` and
   ``accuracy/top5``, which must equal a top-k computed here from the saved
   checkpoint on the same images. ``bash tools/dist_test.sh`` with ``--out``
   on that checkpoint: the per-image predictions (label, scores, ground
   truth, image, in data-set order, each image once) equal those computed
   here, and so do its top-1/top-5.
3. ``tools/model_converters/cls2backbone.py`` writes
   ``checkpoints/cenet_r101_imagenet_mmdet.pth``; ``mask-rcnn_ce-r101_fpn_2x_coco.py``
   is built with its own ``init_cfg`` (run from the data directory): every
   backbone tensor equals the classifier's, none missing or unexpected.
4. The same with ``prefix='backbone.'`` on the classifier checkpoint itself,
   in ``mask-rcnn_syncce-r101_fpn_2x_coco.py``.
5. docs/imagenet.md's evaluation of the released CE-ResNet-50: ``cenet2cls.py`` on
   a released-format checkpoint (independent reference network), then
   ``tools/test.py`` with the R-50 ImageNet config: the reported top-1/top-5
   equal the reference network's on the same images.

About 1-2 minutes on 2 cores; every subprocess has a timeout.
"""
import glob
import json
import os
import os.path as osp
import pickle
import socket
import subprocess
import sys
from typing import Dict, List

import pytest
import torch

pytest.importorskip('mmdet')
import cenet_mmdet  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.runner.checkpoint import CheckpointLoader  # noqa: E402

from cenet_mmdet.testing.imagenet_folder import make_imagenet_folder  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs', 'cenet', 'imagenet',
                  'ce-resnet101_8xb32_in1k.py')
DET_CFG = osp.join(REPO, 'configs', 'cenet')
NUM_CLASSES = 11  # one validation image each: 6 + 5 over 2 ranks
TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run(cmd: List[str], cwd: str, env: Dict[str, str]) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        out = err.stdout or b''
        out = out.decode() if isinstance(out, bytes) else out
        pytest.fail(f'timed out after {TIMEOUT}s: {" ".join(cmd)}\n{out[-4000:]}')
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f'exit code {proc.returncode}: {" ".join(cmd)}\n{output[-6000:]}')
    return output


def shortened(data_root: str) -> List[str]:
    """--cfg-options that shrink the paper's config to a CPU test."""
    options = [f'model.head.num_classes={NUM_CLASSES}',
               'train_cfg.max_epochs=1', 'default_hooks.logger.interval=1',
               'randomness.seed=0',
               'train_dataloader.dataset.pipeline.1.scale=64',
               'val_dataloader.dataset.pipeline.1.scale=72',
               'val_dataloader.dataset.pipeline.2.crop_size=64']
    for loader in ('train_dataloader', 'val_dataloader'):
        options += [f'{loader}.dataset.data_root={data_root}',
                    f'{loader}.batch_size=2', f'{loader}.num_workers=0',
                    f'{loader}.persistent_workers=False']
    return options


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('imagenet_e2e'))
    data_root = osp.join(root, 'data', 'imagenet')
    make_imagenet_folder(data_root, num_classes=NUM_CLASSES, train_per_class=1,
                         val_per_class=1, size=72, seed=0)
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()),
               OMP_NUM_THREADS='1',
               PATH=osp.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    env.pop('MASTER_PORT', None)
    work_dir = osp.join(root, 'work_dirs', 'ce-resnet101_8xb32_in1k')
    log = run(['bash', osp.join(REPO, 'tools', 'dist_train.sh'), CONFIG, '2',
               '--work-dir', work_dir, '--auto-scale-lr',
               '--cfg-options'] + shortened(data_root),
              root, env)
    ckpt_path = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt_path), log[-3000:]
    checkpoint = CheckpointLoader.load_checkpoint(ckpt_path, map_location='cpu')
    return dict(root=root, data_root=data_root, env=env, work_dir=work_dir,
                log=log, ckpt_path=ckpt_path, checkpoint=checkpoint)


def reported_accuracy(work_dir: str) -> Dict[str, float]:
    records = []
    # MMEngine's scalar log of the run (also copied to <timestamp>.json)
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')):
        with open(path) as f:
            records += [json.loads(line) for line in f
                        if line.startswith('{') and 'accuracy/top1' in line]
    assert len(records) == 1, records
    return records[0]


@pytest.fixture(scope='module')
def recomputed(trained):
    """The saved model's logits on the validation images, computed here in
    one process (independent of the metric class and the sampler)."""
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(dict(o.split('=', 1) for o in shortened(trained['data_root'])
                             if '=' in o and o.split('=', 1)[0] not in
                             ('model.head.num_classes',)), allow_list_keys=True)
    cfg.model.head.num_classes = NUM_CLASSES
    cfg.val_dataloader.dataset.pipeline[1].scale = 72
    cfg.val_dataloader.dataset.pipeline[2].crop_size = 64
    model = MODELS.build(cfg.model)
    model.load_state_dict(trained['checkpoint']['state_dict'])
    model.eval()
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    assert len(dataset) == NUM_CLASSES  # odd: the 2-rank split is uneven
    items = [dataset[i] for i in range(len(dataset))]
    batch = model.data_preprocessor(
        dict(inputs=[item['inputs'] for item in items],
             data_samples=[item['data_samples'] for item in items]), False)
    with torch.no_grad():
        logits = model(batch['inputs'], mode='tensor')
    labels = torch.tensor([s.gt_label.item() for s in batch['data_samples']])
    assert labels.tolist() == list(range(NUM_CLASSES))
    ranks = (logits > logits.gather(1, labels.view(-1, 1))).sum(1)  # 0 = best
    top = {k: 100 * (ranks < k).float().mean().item() for k in (1, 5)}
    # far from the degenerate values (all right / all wrong)
    assert 0 < top[5] < 100
    return dict(logits=logits, labels=labels, top=top,
                paths=[item['data_samples'].img_path for item in items])


def test_dist_train_reports_topk(trained, recomputed):
    log = trained['log']
    # 11 images, padded to 12 / (2 processes x 2)
    assert 'Epoch(train) [1][3/3]' in log
    # --auto-scale-lr: lr 0.1 for 256 images -> 0.1 * 4 / 256
    lrs = []
    for path in glob.glob(osp.join(trained['work_dir'], '*', 'vis_data',
                                   'scalars.json')):
        with open(path) as f:
            lrs += [json.loads(line)['lr'] for line in f if '"lr"' in line]
    assert lrs and all(lr == pytest.approx(0.1 * 4 / 256) for lr in lrs), lrs
    # the numbers are the top-k of the saved model on the val images
    record = reported_accuracy(trained['work_dir'])
    assert record['accuracy/top1'] == pytest.approx(recomputed['top'][1])
    assert record['accuracy/top5'] == pytest.approx(recomputed['top'][5])


def test_dist_test_per_image_predictions(trained, recomputed, tmp_path):
    """``tools/dist_test.sh ... 2 --out``: every validation image once, in
    data-set order (rank 1's padding dropped), with the label and scores of
    the one-process computation; top-1/top-5 from them."""
    out = str(tmp_path / 'predictions.pkl')
    work_dir = str(tmp_path / 'dist_test')
    options = [f'model.head.num_classes={NUM_CLASSES}',
               f'test_dataloader.dataset.data_root={trained["data_root"]}',
               'test_dataloader.batch_size=2', 'test_dataloader.num_workers=0',
               'test_dataloader.persistent_workers=False',
               'test_dataloader.dataset.pipeline.1.scale=72',
               'test_dataloader.dataset.pipeline.2.crop_size=64']
    env = dict(trained['env'], PORT=str(free_port()))
    run(['bash', osp.join(REPO, 'tools', 'dist_test.sh'), CONFIG,
         trained['ckpt_path'], '2', '--work-dir', work_dir, '--out', out,
         '--cfg-options'] + options, trained['root'], env)
    with open(out, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == NUM_CLASSES  # the padded repeat is not there
    assert [p['img_path'] for p in predictions] == recomputed['paths']
    logits, labels = recomputed['logits'], recomputed['labels']
    for i, prediction in enumerate(predictions):
        assert int(prediction['gt_label']) == labels[i].item(), i
        assert int(prediction['pred_label']) == logits[i].argmax().item(), i
        torch.testing.assert_close(prediction['pred_score'], logits[i].softmax(0),
                                   rtol=0, atol=1e-5, msg=lambda m: f'image {i}: {m}')
    records = []
    for path in glob.glob(osp.join(work_dir, '*', '*.json')):
        with open(path) as f:
            records += [json.loads(line) for line in f if 'accuracy/top1' in line]
    assert len(records) == 1, records
    assert records[0]['accuracy/top1'] == pytest.approx(recomputed['top'][1])
    assert records[0]['accuracy/top5'] == pytest.approx(recomputed['top'][5])


def test_checkpoint_is_a_trained_ce_resnet101(trained):
    state = trained['checkpoint']['state_dict']
    assert trained['checkpoint']['meta']['epoch'] == 1
    assert state['head.fc.weight'].shape == (NUM_CLASSES, 2048)
    whitening = state['backbone.layer2.3.bn3.ce.running_whitening']
    assert not torch.allclose(whitening, torch.eye(16).expand_as(whitening))
    assert int(state['backbone.layer1.0.bn3.num_batches_tracked']) == 3
    assert not any('.ce.' in k for k in state if k.startswith('backbone.layer3.'))


def build_detector(name: str, **init_cfg):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(osp.join(DET_CFG, name))
    cfg.model.backbone.init_cfg.update(init_cfg)
    torch.manual_seed(0)
    detector = MODELS.build(cfg.model)
    return cfg, detector


def assert_backbone_equals_classifier(detector, classifier_state):
    expected = {k[len('backbone.'):]: v for k, v in classifier_state.items()
                if k.startswith('backbone.')}
    loaded = detector.backbone.state_dict()
    assert set(loaded) == set(expected)  # no missing or unexpected keys
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_checkpoint_into_r101_mask_rcnn_with_converter(trained, monkeypatch):
    root = trained['root']
    out = run([sys.executable, osp.join(REPO, 'tools', 'model_converters',
                                        'cls2backbone.py'), trained['ckpt_path'],
               'checkpoints/cenet_r101_imagenet_mmdet.pth'], root, trained['env'])
    assert 'CEResNet depth=101, stem_ce=True, stage_with_ce=(True, True, False, False)' in out
    monkeypatch.chdir(root)  # the config's relative checkpoint path, unchanged
    cfg, detector = build_detector('mask-rcnn_ce-r101_fpn_2x_coco.py')
    assert cfg.model.backbone.init_cfg.checkpoint == \
        'checkpoints/cenet_r101_imagenet_mmdet.pth'
    before = detector.backbone.state_dict()['layer3.22.conv2.weight'].clone()
    detector.init_weights()
    assert not torch.equal(before, detector.backbone.layer3[22].conv2.weight)
    assert_backbone_equals_classifier(detector, trained['checkpoint']['state_dict'])


def test_checkpoint_into_r101_mask_rcnn_with_prefix(trained):
    _, detector = build_detector('mask-rcnn_syncce-r101_fpn_2x_coco.py',
                                 checkpoint=trained['ckpt_path'],
                                 prefix='backbone.')
    detector.init_weights()
    assert_backbone_equals_classifier(detector, trained['checkpoint']['state_dict'])


def test_released_r50_evaluated_with_test_script(trained, tmp_path):
    """docs/imagenet.md's path: cenet2cls.py on the released checkpoint, then
    tools/test.py with the R-50 ImageNet config; the reported top-1/top-5
    equal the reference network's on the same preprocessed images."""
    from cenet_mmdet.testing.released_resnet import (ReleasedCEResNet,
                                                     perturb_released_resnet_,
                                                     released_checkpoint,
                                                     train_released_resnet_)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    reference = ReleasedCEResNet(50, num_classes=NUM_CLASSES)
    perturb_released_resnet_(reference, generator)
    train_released_resnet_(reference, generator, steps=1, size=64)
    with torch.no_grad():
        reference.fc.weight.normal_(0, 1.0, generator=generator)
    reference.eval()
    src, dst = tmp_path / 'resnetv1ce50.pth.tar', tmp_path / 'r50_cls.pth'
    torch.save(released_checkpoint(reference), src)
    env = trained['env']
    run([sys.executable, osp.join(REPO, 'tools', 'model_converters', 'cenet2cls.py'),
         str(src), str(dst)], trained['root'], env)
    config50 = osp.join(REPO, 'configs', 'cenet', 'imagenet',
                        'ce-resnet50_8xb32_in1k.py')
    work_dir = str(tmp_path / 'test_r50')
    options = [f'model.head.num_classes={NUM_CLASSES}',
               f'test_dataloader.dataset.data_root={trained["data_root"]}',
               'test_dataloader.batch_size=3', 'test_dataloader.num_workers=0',
               'test_dataloader.persistent_workers=False',
               'test_dataloader.dataset.pipeline.1.scale=72',
               'test_dataloader.dataset.pipeline.2.crop_size=64']
    run([sys.executable, osp.join(REPO, 'tools', 'test.py'), config50, str(dst),
         '--work-dir', work_dir, '--cfg-options'] + options, trained['root'], env)
    records = []
    for path in glob.glob(osp.join(work_dir, '*', '*.json')):
        with open(path) as f:
            records += [json.loads(line) for line in f if 'accuracy/top1' in line]
    assert len(records) == 1, records
    # reference: the released network on the same preprocessed images
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(config50)
    cfg.merge_from_dict(dict(o.split('=', 1) for o in options[1:]
                             if 'scale' not in o and 'crop_size' not in o))
    cfg.test_dataloader.dataset.pipeline[1].scale = 72
    cfg.test_dataloader.dataset.pipeline[2].crop_size = 64
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    batch = preprocessor(dict(inputs=[dataset[i]['inputs'] for i in range(len(dataset))],
                              data_samples=[dataset[i]['data_samples']
                                            for i in range(len(dataset))]), False)
    with torch.no_grad():
        logits = reference(batch['inputs'])
    labels = torch.tensor([s.gt_label.item() for s in batch['data_samples']])
    ranks = (logits > logits.gather(1, labels.view(-1, 1))).sum(1)
    assert records[0]['accuracy/top1'] == pytest.approx(100 * (ranks < 1).float().mean().item())
    assert records[0]['accuracy/top5'] == pytest.approx(100 * (ranks < 5).float().mean().item())
