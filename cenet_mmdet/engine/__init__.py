from .sync_bn import (convert_sync_batchnorm, patch_mmengine_sync_bn,
                      patch_torch_sync_bn)

__all__ = ['convert_sync_batchnorm', 'patch_mmengine_sync_bn',
           'patch_torch_sync_bn']

from .cpu_dist import (CPUDistributedDataParallel, CPUSyncBatchNorm,  # noqa: E402
                       finish_distributed_run, init_cpu_dist,
                       setup_cpu_distributed)

__all__ += ['CPUDistributedDataParallel', 'CPUSyncBatchNorm',
            'finish_distributed_run', 'init_cpu_dist', 'setup_cpu_distributed']

from .random_state import RandomStateHook  # noqa: E402

__all__ += ['RandomStateHook']

from .checkpoint_check import (CEWeightsCheckHook,  # noqa: E402
                               CEWeightsError, CheckpointMismatchError,
                               check_checkpoint_covers, checkpoint_mismatch)

__all__ += ['CEWeightsCheckHook', 'CEWeightsError', 'CheckpointMismatchError',
            'check_checkpoint_covers', 'checkpoint_mismatch']

from .data_root import move_data_root  # noqa: E402

__all__ += ['move_data_root']

from .evaluation_check import (EvaluationSubsetCheckHook,  # noqa: E402
                               EvaluationSubsetError,
                               check_evaluator_covers_dataset)

__all__ += ['EvaluationSubsetCheckHook', 'EvaluationSubsetError',
            'check_evaluator_covers_dataset']
