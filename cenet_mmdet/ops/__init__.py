from .whitening import (GradientLink, apply_maps, fold_channel_equilibrium,
                        inverse_sqrt_newton, resolve_group_size, sample_moments,
                        shifted_moments)

__all__ = [
    'GradientLink', 'apply_maps', 'fold_channel_equilibrium', 'inverse_sqrt_newton',
    'resolve_group_size', 'sample_moments', 'shifted_moments'
]
