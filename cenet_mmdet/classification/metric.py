"""Top-k accuracy (MMPretrain's ``Accuracy`` name, prefix and keys)."""
from typing import Dict, List, Optional, Sequence, Union

import torch
from mmengine.evaluator import BaseMetric
from mmdet.registry import METRICS


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor,
                  topk: Sequence[int]) -> List[float]:
    """Percentage of samples whose label is among the ``k`` best scores.

    Args:
        scores: ``(N, K)`` class scores.
        labels: ``(N,)`` class indices.
        topk: the ``k`` values; ``k > K`` counts as ``K``.

    Returns:
        one percentage (0-100) per ``k``.
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f'expected scores (N, K) and labels (N,), got '
                         f'{tuple(scores.shape)} and {tuple(labels.shape)}')
    max_k = min(max(topk), scores.size(1))
    ranked = scores.topk(max_k, dim=1).indices  # (N, max_k)
    hits = ranked == labels.view(-1, 1)
    return [hits[:, :min(k, max_k)].any(dim=1).float().mean().item() * 100
            for k in topk]


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-k accuracy in percent: ``accuracy/top1``, ``accuracy/top5``, ...

    Reads ``pred_score`` (``(K,)``) and ``gt_label`` of each predicted data
    sample.

    Args:
        topk: the ``k`` values. Default: (1,).
        collect_device: ``'cpu'`` or ``'gpu'``. Default: 'cpu'.
        prefix: key prefix. Default: 'accuracy'.
    """

    default_prefix: Optional[str] = 'accuracy'

    def __init__(self, topk: Union[int, Sequence[int]] = (1, ),
                 collect_device: str = 'cpu',
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = (topk, ) if isinstance(topk, int) else tuple(topk)
        if not self.topk or not all(isinstance(k, int) and k > 0 for k in self.topk):
            raise ValueError(f'topk must hold positive ints, got {topk!r}')

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if not isinstance(sample, dict):
                sample = sample.to_dict()
            self.results.append(dict(
                pred_score=sample['pred_score'].detach().cpu().float(),
                gt_label=sample['gt_label'].detach().cpu().reshape(-1)[:1]))

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        scores = torch.stack([r['pred_score'] for r in results])
        labels = torch.cat([r['gt_label'] for r in results]).long()
        values = topk_accuracy(scores, labels, self.topk)
        return {f'top{k}': value for k, value in zip(self.topk, values)}
