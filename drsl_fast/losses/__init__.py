"""DRSL losses (docs/method.md §4): per-class sampling, the fused MMDL losses
(Eq. 4, 5), cross-domain mode consistency (Eq. 6), in-mode variance (Eq. 7)
and the combined objectives (Eq. 8-10)."""
from ..ops.class_sampling import ClassSamples, sample_per_class
from ..ops.mmdl_losses import MMDLLosses, label_mode, mmdl_losses
from .consistency import (ConsistencyLoss, ConsistencyTriplets, consistency_hinge, consistency_loss,
                          consistency_triplets)
from .drsl_loss import DRSLLoss, DRSLLossOutput, in_mode_variance, labels_at, segmentation_loss

__all__ = [
    "ClassSamples", "ConsistencyLoss", "ConsistencyTriplets", "DRSLLoss", "DRSLLossOutput", "MMDLLosses",
    "consistency_hinge", "consistency_loss", "consistency_triplets", "in_mode_variance", "label_mode", "labels_at",
    "mmdl_losses", "sample_per_class", "segmentation_loss",
]
