"""CE's ops, in three modules: :mod:`.functional` (pure tensor math),
:mod:`.autograd` (the fused Functions and the gradient link) and
:mod:`.modes` (every execution-mode predicate and workaround)."""
from .autograd import GradientLink, apply_maps, constant_maps, sample_moments
from .functional import (FoldConstants, centred_sums, fold_channel_equilibrium,
                         fold_constants, instance_variance, inverse_sqrt_newton,
                         mean_and_covariance, resolve_group_size,
                         shifted_moments)

__all__ = [
    'FoldConstants', 'GradientLink', 'apply_maps', 'centred_sums',
    'constant_maps', 'fold_channel_equilibrium', 'fold_constants',
    'instance_variance', 'inverse_sqrt_newton', 'mean_and_covariance',
    'resolve_group_size', 'sample_moments', 'shifted_moments'
]
