"""Datasets of a run (docs/method.md §6, §8) and the sample order of training.

Every random choice of a training step (which image, its scale, crop and flip)
is a function of (seed, stage, iteration, rank), not of a running generator,
so a run resumed from a checkpoint at iteration i sees exactly the samples the
uninterrupted run saw, whatever the number of loader workers.
"""
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from drsl_fast.data import CAFFE_BGR, GTA5, SYNTHIA, TORCHVISION_RGB, Cityscapes, TrainTransform
from drsl_fast.data.base import Item, SegmentationDataset
from drsl_fast.data.io import read_label_ids
from drsl_fast.data.labels import LabelMap
from drsl_fast.data.transforms import reduce_label, resize_pair

from .checkpoint import atomic_write
from .settings import Data

PSEUDO_LABEL_SUFFIX = ".png"
DRY_RUN_IMAGES = 2  # images per pass in a dry run


def stream_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across runs and machines)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


NORMALIZATIONS = {"caffe_bgr": CAFFE_BGR, "torchvision_rgb": TORCHVISION_RGB}


def normalization(data: Data):
    """data.normalization: 'caffe_bgr' for the DeepLab ImageNet init (docs/method.md §2),
    'torchvision_rgb' for torchvision weights or training from scratch."""
    name = data.normalization
    if name not in NORMALIZATIONS:
        raise ValueError(f"data.normalization must be one of {sorted(NORMALIZATIONS)}, got {name!r}")
    return NORMALIZATIONS[name]


def source_dataset(data: Data, translated: bool = False) -> SegmentationDataset:
    """The source training set; with ``translated``, plus the images of
    data.source.translated_root beside the originals (docs/method.md §6)."""
    source = data.source
    options = dict(list_file=source.list_file, translated_root=source.translated_root if translated else None,
                   normalization=normalization(data))
    if source.kind == "gta5":
        if data.num_classes != 19:
            raise ValueError(f"GTA5 has 19 classes; data.num_classes is {data.num_classes}")
        return GTA5(source.root, **options)
    if source.kind == "synthia":
        if data.num_classes != 16:
            raise ValueError(f"SYNTHIA -> Cityscapes uses 16 classes; data.num_classes is {data.num_classes}")
        return SYNTHIA(source.root, **options)
    raise ValueError(f"data.source.kind must be 'gta5' or 'synthia', got {source.kind!r}")


def target_dataset(data: Data, split: str, with_labels: bool) -> Cityscapes:
    """Target images of ``split`` ('train' or 'val' key of data.target), with
    ground truth when asked and present (pseudo-label accuracy, evaluation)."""
    return Cityscapes(data.target.root, data.target.split(split), with_labels=with_labels,
                      num_classes=data.num_classes, normalization=normalization(data))


def has_labels(root: str, split: str) -> bool:
    return os.path.isdir(os.path.join(root, "gtFine", split))


def pseudo_label_path(directory: str, name: str) -> str:
    """``<city>/<stem>_leftImg8bit.png`` -> ``directory/<city>__<stem>_leftImg8bit.png``."""
    return os.path.join(directory, os.path.splitext(name.replace("/", "__"))[0] + PSEUDO_LABEL_SUFFIX)


def pseudo_labelled_target(data: Data, directory: str, dry_run: bool) -> SegmentationDataset:
    """Target training images paired with the uint8 pseudo-label PNGs of a
    round (the first two images in a dry run, which labels only those)."""
    images = target_dataset(data, "train", with_labels=False)
    items = [Item(item.name, item.image, pseudo_label_path(directory, item.name)) for item in images.items]
    if dry_run:
        items = items[:DRY_RUN_IMAGES]
    identity = LabelMap("pseudo-label", {**{c: c for c in range(data.num_classes)}, 255: 255})
    return SegmentationDataset(items, read_label_ids, identity, normalization=images.normalization)


def missing_files(paths: List[str]) -> int:
    """How many of ``paths`` are not files."""
    return sum(not os.path.isfile(path) for path in paths)


def write_label_png(path: str, label: np.ndarray) -> None:
    """uint8 PNG, written to a temporary name and renamed (no half-written file)."""
    with atomic_write(path) as temporary:
        Image.fromarray(label.astype(np.uint8)).save(temporary, format="PNG")


class StepSampler(Sampler):
    """Yields (dataset index, augmentation seed) for training iterations
    ``start`` .. ``stop``-1: iteration i of rank r uses position
    ``(i * world + r) * batch + j`` of a per-epoch permutation seeded by
    (seed, stream, epoch)."""

    def __init__(self, size: int, batch_size: int, start: int, stop: int, seed: int, stream: str,
                 rank: int = 0, world: int = 1):
        if size == 0:
            raise ValueError(f"{stream}: no training images")
        self.size, self.batch_size, self.start, self.stop = size, batch_size, start, stop
        self.seed, self.stream, self.rank, self.world = seed, stream, rank, world
        self._epoch, self._order = -1, None

    def position(self, iteration: int, j: int) -> int:
        return (iteration * self.world + self.rank) * self.batch_size + j

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.stream, "order", epoch))
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._order[offset]

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            for j in range(self.batch_size):
                position = self.position(iteration, j)
                yield self.index(position), stream_seed(self.seed, self.stream, "augment", position)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch_size


class AugmentedSamples(Dataset):
    """``dataset[index]`` under :class:`TrainTransform` driven by the seed the
    :class:`StepSampler` gives, plus the label reduced by 2 for the MMDL-FR
    branch (docs/method.md §2)."""

    def __init__(self, dataset: SegmentationDataset, transform: TrainTransform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Dict:
        index, seed = key
        sample = self.dataset[index]
        image, label = self.transform(sample["image"], sample["label"], torch.Generator().manual_seed(seed))
        return {"image": image, "label": label, "embedding_label": reduce_label(label)}


class ResizedImages(Dataset):
    """Whole images scaled to ``size`` (H, W) for inference, with the original
    size and, where present, the label at full resolution (docs/method.md §9)."""

    def __init__(self, dataset: SegmentationDataset, size: Optional[Sequence[int]], indices: Optional[List[int]] = None):
        self.dataset, self.size = dataset, tuple(size) if size else None
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Dict:
        index = self.indices[position]
        sample = self.dataset[index]
        image = sample["image"]
        out = {"index": index, "name": sample["name"], "size": torch.tensor(image.shape[-2:])}
        if self.size is not None and tuple(image.shape[-2:]) != self.size:
            image, _ = resize_pair(image, None, self.size)
        out["image"] = image
        if "label" in sample:
            out["label"] = sample["label"]
        return out


def train_transform(data: Data, domain: str) -> TrainTransform:
    """The augmentation of training images of ``domain`` ('source' or 'target'), docs/method.md §6."""
    return TrainTransform(tuple(data.crop), tuple(data.scale_range), data.flip,
                          base_size=tuple(data.size(domain)), colour_jitter=data.colour_jitter)
