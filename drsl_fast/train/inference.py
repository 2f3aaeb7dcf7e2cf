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


def shard(count: int, runtime: Runtime, limit: Optional[int] = None):
    """Indices of this rank: r, r + world, ... (of the first ``limit``)."""
    count = count if limit is None else min(count, limit)
    return list(range(runtime.rank, count, runtime.world))


def batches(dataset: SegmentationDataset, size: Optional[Sequence[int]], runtime: Runtime, config: Dict,
            limit: Optional[int] = None) -> Iterator[Dict]:
    images = ResizedImages(dataset, size, shard(len(dataset), runtime, limit))
    workers = config["data"]["workers"]
    yield from DataLoader(images, batch_size=config["data"]["eval_batch_size"], num_workers=workers,
                          pin_memory=runtime.device.type == "cuda")


def views(config: Dict, tta: bool) -> Dict:
    """Keyword arguments of :func:`~drsl_fast.tta.tta_probabilities`: the views
    of ``inference.scales`` and ``inference.flip`` with ``tta``, else one view."""
    settings = config["inference"]
    return {"scales": settings["scales"], "flip": settings["flip"]} if tta else {"scales": [1.0], "flip": False}


@torch.no_grad()
def class_probabilities(network: DRSLNetwork, images: torch.Tensor, size: Sequence[int], runtime: Runtime,
                        config: Dict, tta: bool = False):
    """Softmax (B, C, H, W) fp32 at ``size`` (the original image size), over the
    TTA views with ``tta``, in windows of ``inference.window`` where it is set."""
    def forward(batch: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            return network.segmenter(batch).logits

    window = config["inference"]["window"]
    if window is not None:
        forward = partial(sliding_window_logits, forward, window=window, overlap=config["inference"]["overlap"])
    return tta_probabilities(forward, images, [int(n) for n in size], **views(config, tta))
