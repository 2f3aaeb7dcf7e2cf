"""Whole-image prediction shared by the pseudo-label pass and evaluation:
logits upsampled bilinearly to the label resolution before softmax/argmax
(docs/method.md §9), and the target images sharded over DDP ranks."""
from typing import Dict, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from drsl_fast.data.base import SegmentationDataset

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


@torch.no_grad()
def class_probabilities(network: DRSLNetwork, images: torch.Tensor, size: Sequence[int], runtime: Runtime):
    """Softmax (B, C, H, W) fp32 at ``size`` (the original image size)."""
    with runtime.autocast():
        logits = network.segmenter(images).logits
    logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)
