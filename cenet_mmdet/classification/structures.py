"""The data sample of the classification path (MMPretrain's field names)."""
from typing import Union

import numpy as np
import torch
from mmengine.structures import BaseDataElement


class ClsDataSample(BaseDataElement):
    """One image's label and prediction.

    Fields: ``gt_label`` (``(1,)`` long tensor), ``pred_score`` (``(K,)``
    float tensor of class probabilities), ``pred_label`` (``(1,)`` long
    tensor), as in MMPretrain's ``DataSample``.
    """

    def set_gt_label(self, value: Union[int, np.integer, torch.Tensor]
                     ) -> 'ClsDataSample':
        """Set ``gt_label`` from an int or a one-element tensor."""
        label = torch.as_tensor(value, dtype=torch.long).reshape(-1)
        if label.numel() != 1:
            raise ValueError(f'gt_label must be one class index, got {value!r}')
        self.set_field(label, 'gt_label', dtype=torch.Tensor)
        return self

    def set_pred_score(self, value: torch.Tensor) -> 'ClsDataSample':
        """Set ``pred_score`` ``(K,)`` and ``pred_label`` (its argmax)."""
        if value.dim() != 1:
            raise ValueError(f'pred_score must be (num_classes,), got shape '
                             f'{tuple(value.shape)}')
        self.set_field(value, 'pred_score', dtype=torch.Tensor)
        self.set_field(value.argmax().reshape(1), 'pred_label',
                       dtype=torch.Tensor)
        return self
