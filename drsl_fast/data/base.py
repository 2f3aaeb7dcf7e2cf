"""Common dataset machinery for docs/method.md §8: file pairing, label mapping with
counted out-of-map values, size-mismatch handling, clear errors."""

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import read_rgb
from .labels import LabelMap, remap_classes
from .transforms import CAFFE_BGR, ImageNormalization, TrainTransform, reduce_label, resize_label

SIZE_MISMATCH_POLICIES = ("resize", "error")


class DatasetLayoutError(FileNotFoundError):
    """A dataset root or one of its expected files is missing."""


class LabelValueWarning(UserWarning):
    """A label map holds values outside the dataset's label map (set to 255)."""


class LabelSizeWarning(UserWarning):
    """A label map differs in size from its image (resized with nearest)."""


@dataclass(frozen=True)
class Item:
    """One dataset entry; ``label`` is None for unlabelled images."""

    name: str
    image: str
    label: Optional[str]


def require_dir(path: str, what: str, layout: str) -> None:
    if not os.path.isdir(path):
        raise DatasetLayoutError(f"{what}: directory {path!r} not found; expected layout: {layout}")


def read_name_list(list_file: str) -> List[str]:
    """Non-empty, stripped lines of a list file (e.g. ADVENT's train.txt)."""
    if not os.path.isfile(list_file):
        raise DatasetLayoutError(f"list file {list_file!r} not found")
    with open(list_file, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def check_items(items: Sequence[Item], what: str) -> None:
    """Raises when the list is empty or any listed file is missing (naming them)."""
    if not items:
        raise ValueError(f"{what}: the image list is empty")
    missing = [p for item in items for p in (item.image, item.label) if p is not None and not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise DatasetLayoutError(f"{what}: {len(missing)} listed files are missing: {shown}")


def with_translated(items: List[Item], translated_root: Optional[str], image_root: str) -> List[Item]:
    """Adds, beside each original, the translated image (docs/method.md §6 ISA, e.g.
    CycleGAN outputs) found at the same relative path under ``translated_root``;
    it shares the original's label."""
    if translated_root is None:
        return items
    require_dir(translated_root, "translated source images", "same file names as the original images")
    translated = [
        Item(
            "translated/" + item.name,
            os.path.join(translated_root, os.path.relpath(item.image, image_root)),
            item.label,
        )
        for item in items
    ]
    return items + translated


class SegmentationDataset(Dataset):
    """Image/label pairs mapped to train ids.

    Each sample is a dict: ``image`` (3, H, W) float, ``name``; with labels
    also ``label`` (H, W) int64 (255 = ignore) and ``unmapped_pixels`` (count
    of out-of-map label values set to 255, each such file also warned about
    with :class:`LabelValueWarning`); with ``embedding_labels`` also
    ``embedding_label``, the label reduced by 2 (nearest) for the MMDL-FR
    branch (docs/method.md §2).

    Args:
        items: the entries (see :func:`check_items`).
        read_label: reads a label file into an integer array of raw ids.
        label_map: raw ids -> train ids.
        class_map: optional train-id subset map applied afterwards (e.g. 19 -> 16).
        normalization: uint8 RGB -> network input (default Caffe BGR, docs/method.md §2).
        transform: joint image/label transform (e.g. :class:`TrainTransform`).
        on_size_mismatch: 'resize' the label to the image (nearest, warned) or 'error'.
    """

    def __init__(
        self,
        items: List[Item],
        read_label: Callable[[str], np.ndarray],
        label_map: LabelMap,
        class_map: Optional[Dict[int, int]] = None,
        normalization: ImageNormalization = CAFFE_BGR,
        transform: Optional[TrainTransform] = None,
        embedding_labels: bool = False,
        on_size_mismatch: str = "resize",
    ):
        if on_size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ValueError(f"on_size_mismatch must be one of {SIZE_MISMATCH_POLICIES}, got {on_size_mismatch!r}")
        self.items = items
        self.read_label = read_label
        self.label_map = label_map
        self.class_map = class_map
        self.normalization = normalization
        self.transform = transform
        self.embedding_labels = embedding_labels
        self.on_size_mismatch = on_size_mismatch

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> List[str]:
        return [item.name for item in self.items]

    def load_label(self, item: Item, image_size: Iterable[int]) -> Dict:
        """Train-id label of ``item`` at ``image_size`` plus its out-of-map count."""
        train_ids, unmapped, values = self.label_map.apply(self.read_label(item.label))
        if unmapped:
            warnings.warn(
                f"{item.label}: {unmapped} pixels with values {list(values)} outside the "
                f"{self.label_map.name} label map were set to 255",
                LabelValueWarning,
                stacklevel=3,
            )
        if self.class_map is not None:
            train_ids = remap_classes(train_ids, self.class_map)
        label = torch.from_numpy(train_ids.astype(np.int64))
        image_size = tuple(image_size)
        if tuple(label.shape) != image_size:
            message = f"label {item.label} is {tuple(label.shape)} but image {item.image} is {image_size} (H, W)"
            if self.on_size_mismatch == "error":
                raise ValueError(message)
            warnings.warn(message + "; label resized with nearest", LabelSizeWarning, stacklevel=3)
            label = resize_label(label, image_size)
        return {"label": label, "unmapped_pixels": unmapped}

    def __getitem__(self, index: int) -> Dict:
        item = self.items[index]
        image = self.normalization(read_rgb(item.image))
        sample = {"name": item.name}
        label = None
        if item.label is not None:
            sample.update(self.load_label(item, image.shape[-2:]))
            label = sample["label"]
        if self.transform is not None:
            image, label = self.transform(image, label)
        sample["image"] = image
        if label is not None:
            sample["label"] = label
            if self.embedding_labels:
                sample["embedding_label"] = reduce_label(label)
        return sample
