from .whitening import (fold_channel_equilibrium, inverse_sqrt_newton,
                        resolve_group_size, sample_moments, shifted_moments)

__all__ = [
    'fold_channel_equilibrium', 'inverse_sqrt_newton', 'resolve_group_size',
    'sample_moments', 'shifted_moments'
]
