"""MMDL-FR head (docs/method.md §2, §3): per-pixel embeddings and per-class mixtures
of M mode centres, sharing the DeepLab-v2 base features."""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import ModeDistance, mode_distance
from .deeplab import CLASSIFIER_DILATIONS, SummedDilatedConvs

EMBEDDING_UPSAMPLING = 4
LABEL_REDUCTION = 2


class MMDLHead(nn.Module):
    """Embedding block + mode centres (docs/method.md §2 "MMDL-FR head").

    Embedding block: four dilated 3x3 convs (6, 12, 18, 24) to D channels,
    summed, then bilinear upsampling x4 (stride 8 -> stride 2 of the input,
    matching labels reduced by 2, paper Table 6).

    Mode centres: a parameter ``R`` of shape (C*M, D) -- the weights of a fully
    connected layer -- viewed as (C, M, D) by :attr:`modes`. docs/method.md does not
    fix their initialisation; they are drawn from N(0, 1/D) so that centres
    have unit expected norm, on the scale of sigma = 0.5.

    Args:
        in_channels: base-feature channels (2048 for ResNet-101).
        num_classes: C. num_modes: M (default 3). embedding_dim: D (default 64).
        sigma: width of the mode posterior (docs/method.md §3: 0.5).
        backend: mode-distance backend (None = automatic).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_modes: int = 3,
        embedding_dim: int = 64,
        sigma: float = 0.5,
        dilations: Sequence[int] = CLASSIFIER_DILATIONS,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.num_classes, self.num_modes, self.embedding_dim = num_classes, num_modes, embedding_dim
        self.sigma = sigma
        self.backend = backend
        self.embedding = SummedDilatedConvs(in_channels, embedding_dim, dilations)
        self.R = nn.Parameter(torch.randn(num_classes * num_modes, embedding_dim) / embedding_dim**0.5)

    @property
    def modes(self) -> Tensor:
        """Mode centres R viewed as (C, M, D)."""
        return self.R.view(self.num_classes, self.num_modes, self.embedding_dim)

    def forward(self, features: Tensor, size: Optional[Tuple[int, int]] = None) -> Tensor:
        """Embeddings (B, D, H, W): bilinear x4 upsampling of the embedding
        block's output, or to ``size`` when given (e.g. the reduced label's
        size, since a stride-8 map of an odd-sized input is not exactly a
        quarter of the stride-2 grid). align_corners=True as in DeepLab."""
        return self.upsample(self.embedding(features), size)

    @staticmethod
    def upsample(emb: Tensor, size: Optional[Tuple[int, int]] = None) -> Tensor:
        """The embedding block's output (stride 8) upsampled as :meth:`forward` does."""
        if size is None:
            size = (emb.shape[-2] * EMBEDDING_UPSAMPLING, emb.shape[-1] * EMBEDDING_UPSAMPLING)
        return F.interpolate(emb, size=size, mode="bilinear", align_corners=True)

    def mode_distance(self, embeddings: Tensor) -> ModeDistance:
        """docs/method.md §3 per-class ``dmin``, ``mstar`` and class posterior ``P``
        for embeddings (B, D, H, W) or (N, D), via the fused op."""
        return mode_distance(embeddings, self.modes, self.sigma, backend=self.backend)
