"""The published BN-vs-CE and GN-vs-GN+CE numbers (README, docs/evidence.md)
are those of the driver's saved outputs, docs/figures/evidence/results.json and
docs/figures/evidence-gn/results.json, and each output is consistent with
itself (every number comes from a command)."""
import json
import os.path as osp

import pytest

from cenet_mmdet.testing.scripts import load_script

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
#: pair -> (folder under docs/figures, its two arms: baseline, candidate)
SAVED_RUNS = {'bn-ce': ('evidence', ('bn', 'ce')),
              'gn-gnce': ('evidence-gn', ('gn', 'gnce'))}


def _driver():
    return load_script(osp.join(ROOT, 'tools', 'experiments', 'multi_seed_ap.py'),
                       '_multi_seed_ap_docs')


driver = _driver()


@pytest.fixture(scope='module', params=list(SAVED_RUNS))
def saved(request):
    """``(pair, arms, folder, results)`` of one saved run."""
    folder, arms = SAVED_RUNS[request.param]
    with open(osp.join(ROOT, 'docs', 'figures', folder, 'results.json')) as f:
        return request.param, arms, folder, json.load(f)


def _read(*parts):
    with open(osp.join(ROOT, *parts)) as f:
        return f.read()


def _summary_row(label, stats, arms):
    """A summary row as README.md and the evidence summary print it."""
    baseline, candidate = (stats['per_arm'][arm] for arm in arms)
    diff = stats['difference']
    return (f'| {label} | {baseline["mean"]:.1f} ± {baseline["std"]:.1f} | '
            f'{candidate["mean"]:.1f} ± {candidate["std"]:.1f} | '
            f'{diff["mean"]:+.2f} [{diff["ci_low"]:+.2f}, {diff["ci_high"]:+.2f}] | '
            f'{diff["candidate_ahead"]} of {diff["n"]} seeds |')


def test_saved_summary_is_recomputed_from_the_saved_runs(saved):
    name, arms, folder, results = saved
    assert results['settings']['pairs'] == [name]
    pair = results['pairs'][name]
    per_seed = {arm: {int(seed): metrics for seed, metrics in runs.items()}
                for arm, runs in pair['per_seed'].items()}
    assert results['settings']['seeds'] == [0, 1, 2, 3, 4]  # the default
    recomputed = json.loads(json.dumps(driver.summarize(per_seed, arms)))
    assert pair['summary'] == recomputed
    assert _read('docs', 'figures', folder, 'results.md') == driver.markdown(results)


@pytest.mark.parametrize('document', ['README.md', 'docs/evidence.md'])
def test_published_summary_rows_match_the_saved_run(saved, document):
    name, arms, _, results = saved
    text = _read(document)
    for label, stats in results['pairs'][name]['summary'].items():
        if label == 'seeds':
            continue
        assert _summary_row(label, stats, arms) in text, (document, name, label)
    if document == 'docs/evidence.md':   # the cost is on the evidence page
        minutes = round(results['total_wall_s'] / 60)
        assert f'{minutes} minutes' in text


def test_evidence_per_seed_table_matches_the_saved_run(saved):
    name, arms, _, results = saved
    text = _read('docs', 'evidence.md')
    per_seed = results['pairs'][name]['per_seed']
    for seed in results['settings']['seeds']:
        cells = [f'{100 * per_seed[arm][str(seed)][metric]:.1f}'
                 for metric in ('coco/bbox_mAP', 'coco/segm_mAP')
                 for arm in arms]
        assert f'| {seed} | ' + ' | '.join(cells) + ' |' in text
