from .whitening import (apply_maps, fold_channel_equilibrium,
                        inverse_sqrt_newton, resolve_group_size, sample_moments,
                        shifted_moments)

__all__ = [
    'apply_maps', 'fold_channel_equilibrium', 'inverse_sqrt_newton',
    'resolve_group_size', 'sample_moments', 'shifted_moments'
]
