"""Cityscapes (docs/method.md §8): ``leftImg8bit/<split>/<city>/*_leftImg8bit.png``
with ``gtFine/<split>/<city>/*_gtFine_labelIds.png``, label ids mapped to train
ids by the official definitions; 19 classes, or the 16 / 13 SYNTHIA subsets."""

import os
from typing import Optional

from .base import Item, SegmentationDataset, check_items, read_name_list, require_dir
from .io import read_label_ids
from .labels import CITYSCAPES_LABELS, TRAIN_16_TO_13, TRAIN_19_TO_16

LAYOUT = "ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png and ROOT/gtFine/<split>/<city>/*_gtFine_labelIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val", "test")


def class_map_for(num_classes: int):
    if num_classes == 19:
        return None
    if num_classes == 16:
        return TRAIN_19_TO_16
    if num_classes == 13:
        return {c: TRAIN_16_TO_13.get(k, 255) for c, k in TRAIN_19_TO_16.items()}
    raise ValueError(f"Cityscapes: num_classes must be 19, 16 or 13, got {num_classes}")


class Cityscapes(SegmentationDataset):
    """Cityscapes split.

    Args:
        root: dataset root.
        split: 'train', 'val' or 'test'.
        with_labels: read gtFine labels (False for the unlabelled target images).
        list_file: optional list of ``<city>/<name>_leftImg8bit.png`` (ADVENT's
            format); default: every image of the split.
        num_classes: 19, or 16 / 13 for SYNTHIA->Cityscapes evaluation.
        **kwargs: see :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        with_labels: bool = True,
        list_file: Optional[str] = None,
        num_classes: int = 19,
        **kwargs,
    ):
        if split not in SPLITS:
            raise ValueError(f"Cityscapes: split must be one of {SPLITS}, got {split!r}")
        class_map = class_map_for(num_classes)
        image_dir = os.path.join(root, "leftImg8bit", split)
        label_dir = os.path.join(root, "gtFine", split)
        require_dir(root, "Cityscapes root", LAYOUT)
        require_dir(image_dir, f"Cityscapes {split} images", LAYOUT)
        if with_labels:
            require_dir(label_dir, f"Cityscapes {split} labels", LAYOUT)
        if list_file is not None:
            names = read_name_list(list_file)
        else:
            names = sorted(
                f"{city}/{n}"
                for city in os.listdir(image_dir)
                if os.path.isdir(os.path.join(image_dir, city))
                for n in os.listdir(os.path.join(image_dir, city))
                if n.endswith(IMAGE_SUFFIX)
            )
        wrong = [n for n in names if not n.endswith(IMAGE_SUFFIX)]
        if wrong:
            raise ValueError(f"Cityscapes: listed names must end with {IMAGE_SUFFIX!r}, got {wrong[:3]}")
        items = [
            Item(
                name,
                os.path.join(image_dir, name),
                os.path.join(label_dir, name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX) if with_labels else None,
            )
            for name in names
        ]
        check_items(items, f"Cityscapes {split} at {root}")
        super().__init__(items, read_label_ids, CITYSCAPES_LABELS, class_map=class_map, **kwargs)
