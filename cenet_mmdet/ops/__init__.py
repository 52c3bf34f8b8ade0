"""CE's ops, in three modules: :mod:`.functional` (pure tensor math),
:mod:`.autograd` (the fused Functions and the gradient link) and
:mod:`.modes` (every execution-mode predicate and workaround)."""
from .autograd import (GradientLink, apply_maps, constant_maps, sample_moments,
                       small_graph)
from .functional import (FoldConstants, GateTrace, batch_moments,
                         batch_moments_backward, centred_sums,
                         fold_channel_equilibrium, fold_constants, gate_backward,
                         gate_forward, instance_variance, inverse_sqrt_newton,
                         inverse_sqrt_newton_backward, mean_and_covariance,
                         resolve_group_size)

__all__ = [
    'FoldConstants', 'GateTrace', 'GradientLink', 'apply_maps', 'batch_moments',
    'batch_moments_backward', 'centred_sums', 'constant_maps',
    'fold_channel_equilibrium', 'fold_constants', 'gate_backward',
    'gate_forward', 'instance_variance', 'inverse_sqrt_newton',
    'inverse_sqrt_newton_backward', 'mean_and_covariance', 'resolve_group_size',
    'sample_moments', 'small_graph'
]
