from .sync_bn import convert_sync_batchnorm, patch_mmengine_sync_bn

__all__ = ['convert_sync_batchnorm', 'patch_mmengine_sync_bn']
