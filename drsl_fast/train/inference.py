"""Whole-image prediction shared by the pseudo-label pass, evaluation and
``drsl predict``: logits upsampled bilinearly to the label resolution before
softmax/argmax (docs/method.md §9), optionally averaged over test-time
augmentation views and computed in sliding windows (settings ``inference.*``),
and the target images sharded over DDP ranks."""
from functools import partial
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from drsl_fast.data.base import SegmentationDataset
from drsl_fast.sliding_window import sliding_window_logits
from drsl_fast.tta import tta_probabilities

from .data import ResizedImages
from .network import DRSLNetwork
from .runtime import Runtime
from .settings import Data, Inference


def shard(count: int, runtime: Runtime, limit: Optional[int] = None):
    """Indices of this rank: r, r + world, ... (of the first ``limit``)."""
    count = count if limit is None else min(count, limit)
    return list(range(runtime.rank, count, runtime.world))


def batches(dataset: SegmentationDataset, size: Optional[Sequence[int]], runtime: Runtime, data: Data,
            limit: Optional[int] = None) -> Iterator[Dict]:
    """This rank's images of ``dataset`` scaled to ``size``, in batches of
    data.eval_batch_size loaded by data.workers workers."""
    images = ResizedImages(dataset, size, shard(len(dataset), runtime, limit))
    yield from DataLoader(images, batch_size=data.eval_batch_size, num_workers=data.workers,
                          pin_memory=runtime.device.type == "cuda")


def views(settings: Inference, tta: bool) -> Dict:
    """Keyword arguments of :func:`~drsl_fast.tta.tta_probabilities`: the views
    of ``inference.scales`` and ``inference.flip`` with ``tta``, else one view
    (lists, as the JSON files that record them read back)."""
    return {"scales": list(settings.scales), "flip": settings.flip} if tta else {"scales": [1.0], "flip": False}


@torch.no_grad()
def class_probabilities(network: DRSLNetwork, images: torch.Tensor, size: Sequence[int], runtime: Runtime,
                        settings: Inference, tta: bool = False):
    """Softmax (B, C, H, W) fp32 at ``size`` (the original image size), over the
    TTA views with ``tta``, in windows of ``inference.window`` where it is set
    (docs/method.md §9)."""
    def forward(batch: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            return network.segmenter(batch).logits

    if settings.window is not None:
        forward = partial(sliding_window_logits, forward, window=settings.window, overlap=settings.overlap)
    return tta_probabilities(forward, images, [int(n) for n in size], **views(settings, tta))
