"""Frozen BatchNorm of the DeepLab-v2 backbone (docs/method.md §2: "Every BatchNorm is
frozen: eval mode, no gradient")."""

import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its stored statistics.

    Keeps the parameter and buffer names of ``nn.BatchNorm2d`` (so DeepLab and
    torchvision checkpoints load unchanged), but its affine parameters never
    require gradients, ``train()`` cannot switch it to batch statistics, and
    its running statistics are never updated.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=True)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.training = False

    def train(self, mode: bool = True) -> "FrozenBatchNorm2d":
        """Ignores ``mode``: the layer stays in eval mode."""
        self.training = False
        return self

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight.detach(), self.bias.detach(), False, 0.0, self.eps
        )
