"""tools/experiments/multi_seed_ap.py: its statistics on known answers, and a
2-seed run at a tiny budget (issue #21)."""
import json
import math
import os.path as osp
import random

import pytest

from cenet_mmdet.testing.scripts import load_script

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(ROOT, 'tools', 'experiments', 'multi_seed_ap.py')


def load_driver():
    return load_script(SCRIPT, '_multi_seed_ap')


driver = load_driver()

#: t_{0.975, 4} from a printed table of Student's t (not from scipy).
T_975_4 = 2.776445


def test_t_quantile_matches_the_table():
    assert driver.t_quantile(0.975, 4) == pytest.approx(T_975_4, abs=1e-6)
    assert driver.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-5)
    assert driver.t_quantile(0.975, 10**6) == pytest.approx(1.959964, abs=1e-5)


def test_paired_difference_known_answer():
    baseline = [10.0, 12.0, 11.0, 13.0, 9.0]
    candidate = [b + d for b, d in zip(baseline, [1, 2, 3, 4, 5])]
    result = driver.paired_difference(baseline, candidate)
    # differences 1..5: mean 3, sd sqrt(2.5), se sqrt(2.5 / 5)
    half_width = T_975_4 * math.sqrt(0.5)
    assert result['n'] == 5
    assert result['mean'] == pytest.approx(3.0)
    assert result['std'] == pytest.approx(math.sqrt(2.5))
    assert result['ci_low'] == pytest.approx(3.0 - half_width, abs=1e-5)
    assert result['ci_high'] == pytest.approx(3.0 + half_width, abs=1e-5)
    assert result['ci_low'] == pytest.approx(1.036757, abs=1e-5)
    assert result['candidate_ahead'] == 5
    assert result['ci_includes_zero'] is False
    assert result['differences'] == [1, 2, 3, 4, 5]


def test_paired_difference_includes_zero_and_uses_the_pairing():
    # arms far apart in level but the differences straddle zero
    baseline = [5.0, 20.0, 8.0, 30.0]
    candidate = [6.0, 19.0, 8.5, 29.0]
    result = driver.paired_difference(baseline, candidate)
    assert result['mean'] == pytest.approx(-0.125)
    assert result['candidate_ahead'] == 2
    assert result['ci_includes_zero'] is True
    # paired: 2 * t(3) * sd / 2 = 3.28 points wide; an unpaired interval of
    # these arms would be about 15 times wider
    assert result['ci_high'] - result['ci_low'] == pytest.approx(3.280, abs=1e-3)


def test_summaries_of_one_seed_have_no_interval():
    result = driver.paired_difference([1.0], [2.0])
    assert result['mean'] == 1.0
    assert result['std'] is None and result['ci_low'] is None
    assert result['ci_includes_zero'] is None
    with pytest.raises(ValueError, match='equal counts'):
        driver.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match='no values'):
        driver.mean_ci([])


def test_paired_t_interval_covers_the_true_difference_95_percent():
    """Simulated seeds with a known mean difference of 1.5 AP points and a
    shared per-seed effect: the 95% interval covers 1.5 in 95% of 4000
    experiments of 5 seeds (binomial se 0.34%)."""
    rng = random.Random(0)
    covered = 0
    trials = 4000
    for _ in range(trials):
        seed_effects = [rng.gauss(0, 3) for _ in range(5)]
        baseline = [20 + e + rng.gauss(0, 1) for e in seed_effects]
        candidate = [21.5 + e + rng.gauss(0, 1) for e in seed_effects]
        result = driver.paired_difference(baseline, candidate)
        covered += result['ci_low'] <= 1.5 <= result['ci_high']
    assert abs(covered / trials - 0.95) < 0.012


def test_summarize_reads_points_and_arms():
    per_seed = {
        'bn': {0: {'coco/bbox_mAP': 0.10, 'coco/segm_mAP': 0.08},
               1: {'coco/bbox_mAP': 0.12, 'coco/segm_mAP': 0.09}},
        'ce': {0: {'coco/bbox_mAP': 0.11, 'coco/segm_mAP': 0.10},
               1: {'coco/bbox_mAP': 0.15, 'coco/segm_mAP': 0.09}},
    }
    summary = driver.summarize(per_seed, ('bn', 'ce'))
    assert summary['seeds'] == [0, 1]
    box = summary['box AP']
    assert box['per_arm']['bn']['mean'] == pytest.approx(11.0)
    assert box['per_arm']['ce']['std'] == pytest.approx(math.sqrt(8.0))  # 11, 15
    assert box['difference']['differences'] == pytest.approx([1.0, 3.0])
    assert summary['mask AP']['difference']['mean'] == pytest.approx(1.0)


def test_bad_arguments_stop_in_one_line(capsys):
    with pytest.raises(SystemExit):
        driver.parse_args(['--seeds', '0', '0'])
    assert 'repeats a seed' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        driver.parse_args(['--pairs', 'bn-xx'])
    with pytest.raises(SystemExit):
        driver.parse_args(['--iters', '0'])
    assert '--iters must be >= 1' in capsys.readouterr().err


def _first_loss(run_dir):
    stamp, = [d for d in sorted(__import__('os').listdir(run_dir))
              if osp.isdir(osp.join(run_dir, d, 'vis_data'))]
    with open(osp.join(run_dir, stamp, 'vis_data', 'scalars.json')) as f:
        return json.loads(f.readline())['loss']


def test_tiny_two_seed_run(tmp_path, capsys):
    """Two seeds x BN/CE at 1 iteration on 4 images: every run evaluated, the
    summary equal to a recomputation from the runs' own logs, the seed changes
    the run and a second start reuses the finished runs."""
    work_dir = str(tmp_path / 'work')
    argv = ['--work-dir', work_dir, '--data', str(tmp_path / 'data'),
            '--seeds', '0', '1', '--iters', '1', '--num-train', '4',
            '--num-val', '3', '--cfg-options', 'train_dataloader.batch_size=2',
            'default_hooks.logger.interval=1']
    assert driver.main(argv) == 0
    with open(osp.join(work_dir, 'results.json')) as f:
        results = json.load(f)
    pair = results['pairs']['bn-ce']
    assert pair['arms'] == ['bn', 'ce']
    per_seed = {arm: {} for arm in pair['arms']}
    for arm in pair['arms']:
        for seed in (0, 1):
            run_dir = osp.join(work_dir, 'bn-ce', arm, f'seed{seed}')
            logged = driver.read_final_evaluation(run_dir, 1)
            assert logged == pair['per_seed'][arm][str(seed)]
            per_seed[arm][seed] = logged
            assert osp.isfile(osp.join(run_dir, 'iter_1.pth'))
    assert pair['summary'] == json.loads(json.dumps(
        driver.summarize(per_seed, ('bn', 'ce'))))
    # the seed changes initialisation and data order: another first loss
    for arm in pair['arms']:
        assert _first_loss(osp.join(work_dir, 'bn-ce', arm, 'seed0')) != \
            _first_loss(osp.join(work_dir, 'bn-ce', arm, 'seed1'))
    with open(osp.join(work_dir, 'results.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    table = open(osp.join(work_dir, 'results.md')).read()
    assert '| box AP |' in table and 'paired t 95% CI' in table
    capsys.readouterr()
    assert driver.main(argv) == 0  # finished runs are reused, not retrained
    assert capsys.readouterr().out.count('reusing') == 4
    # ... but not when the config's text (or the command) changed
    run_dir = osp.join(work_dir, 'bn-ce', 'ce', 'seed0')
    with open(osp.join(run_dir, 'command.json')) as f:
        record = json.load(f)
    assert record['config_sha256'] == driver.config_digest(driver.CE_CONFIG)
    assert driver.finished_run(run_dir, record, 1) == per_seed['ce'][0]
    assert driver.finished_run(run_dir, dict(record, config_sha256='0' * 64),
                               1) is None
    assert driver.finished_run(run_dir, dict(
        record, command=record['command'][:-1]), 1) is None
    assert driver.finished_run(run_dir, record, 2) is None  # other budget


def test_config_digest_follows_base_files(tmp_path):
    """The digest is that of the resolved config: an edit in a ``_base_``
    file changes it, a comment does not."""
    base, child = tmp_path / 'base.py', tmp_path / 'child.py'
    base.write_text('model = dict(depth=50, width=64)\n')
    child.write_text("_base_ = './base.py'\nmodel = dict(width=32)\n")
    digest = driver.config_digest(str(child))
    assert digest == driver.config_digest(str(child))
    base.write_text('# a comment\nmodel = dict(depth=50, width=64)\n')
    assert driver.config_digest(str(child)) == digest
    base.write_text('model = dict(depth=101, width=64)\n')
    assert driver.config_digest(str(child)) != digest


def _coco_files(tmp_path, wrong_image):
    """Three images with one box each; predictions exact except on
    ``wrong_image`` (None: all exact), whose prediction misses its box."""
    images = [dict(id=i, width=64, height=64, file_name=f'{i}.png')
              for i in (1, 2, 3)]
    annotations = [dict(id=i, image_id=i, category_id=1, bbox=[10, 10, 20, 20],
                        area=400, iscrowd=0) for i in (1, 2, 3)]
    gt = dict(images=images, annotations=annotations,
              categories=[dict(id=1, name='a')])
    predictions = [dict(image_id=i, category_id=1, score=0.9,
                        bbox=[40, 40, 20, 20] if i == wrong_image else
                        [10, 10, 20, 20]) for i in (1, 2, 3)]
    ann_file, result_file = tmp_path / 'gt.json', tmp_path / 'dt.json'
    ann_file.write_text(json.dumps(gt))
    result_file.write_text(json.dumps(predictions))
    return str(ann_file), str(result_file)


def test_one_image_influence_finds_the_image_that_moves_ap(tmp_path):
    exact = driver.one_image_influence(*_coco_files(tmp_path, None), 'bbox')
    assert exact['ap'] == pytest.approx(100.0)
    assert exact['max_abs_change'] == pytest.approx(0.0)
    assert (exact['images'], exact['left_out']) == (3, 3)
    one_wrong = driver.one_image_influence(*_coco_files(tmp_path, 2), 'bbox')
    # without image 2 every box is found (AP 100): that removal moves AP
    # most, by exactly 100 - AP; leaving out image 1 or 3 moves it less
    assert one_wrong['ap'] < 70
    assert one_wrong['max_image'] == 2
    assert one_wrong['max_abs_change'] == pytest.approx(100 - one_wrong['ap'])
    assert one_wrong['mean_abs_change'] < one_wrong['max_abs_change']
    # the shortcut (one matching, accumulation per subset) equals a full
    # COCOeval of the subset
    assert one_wrong['ap'] == pytest.approx(_full_coco_ap(tmp_path, [1, 2, 3]))
    for image in (1, 2, 3):
        others = [i for i in (1, 2, 3) if i != image]
        assert one_wrong['ap'] + one_wrong['changes'][image] == pytest.approx(
            _full_coco_ap(tmp_path, others))


def _full_coco_ap(tmp_path, image_ids):
    """COCO AP x100 over ``image_ids`` by pycocotools' own summarize."""
    import contextlib
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / 'gt.json'))
        evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / 'dt.json')), 'bbox')
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return 100 * evaluator.stats[0]


@pytest.mark.parametrize('pair', sorted(driver.PAIRS))
def test_pair_arms_differ_only_in_ce(pair):
    """The arms of a pair, as the driver passes them to tools/train.py: the
    same detector, the candidate's backbone with CE at the 14 CE positions
    after the pair's normalizer, the baseline's without CE."""
    from mmengine.config import Config, DictAction
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from torch import nn

    import cenet_mmdet  # noqa: F401
    from cenet_mmdet.models.layers import CE, GroupNormCE
    register_all_modules()
    configs = []
    for arm in driver.PAIRS[pair]:
        cfg = Config.fromfile(arm.config)
        options = {}
        for item in arm.options:  # as --cfg-options parses them
            key, value = item.split('=', 1)
            options[key] = DictAction._parse_iterable(value)
        cfg.merge_from_dict(options)
        configs.append(cfg)
    baseline, candidate = (cfg.to_dict() for cfg in configs)
    norm = candidate['model']['backbone']['norm_cfg']
    assert baseline['model']['backbone']['norm_cfg'] == norm
    assert norm['type'] == ('GN' if pair == 'gn-gnce' else 'BN')
    baseline['model'].pop('backbone')
    candidate['model'].pop('backbone')
    assert baseline == candidate
    backbones = [MODELS.build(cfg.model.backbone) for cfg in configs]
    ce_type = GroupNormCE if pair == 'gn-gnce' else CE
    assert not any(isinstance(m, (CE, GroupNormCE)) for m in backbones[0].modules())
    assert sum(isinstance(m, ce_type) for m in backbones[1].modules()) == 14
    if pair == 'gn-gnce':
        assert not any(isinstance(m, nn.BatchNorm2d)
                       for backbone in backbones for m in backbone.modules())
