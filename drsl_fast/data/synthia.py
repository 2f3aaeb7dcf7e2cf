"""SYNTHIA-RAND-CITYSCAPES (docs/method.md §8): ``RGB/*.png`` with ``GT/LABELS/*.png``
of the same name; labels are 16-bit multi-channel PNGs whose first channel is
the class id, mapped to the 16 SYNTHIA classes."""

import os
from typing import Iterable, Optional

from .base import Item, SegmentationDataset, check_items, read_name_list, require_dir, with_translated
from .io import read_first_channel_16bit
from .labels import SYNTHIA_LABELS, TRAIN_16_TO_13

LAYOUT = "ROOT/RGB/<name>.png and ROOT/GT/LABELS/<name>.png"


class SYNTHIA(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES with 16 classes (or 13 with ``num_classes=13``).

    Args: as :class:`~drsl_fast.data.gta5.GTA5`, plus ``num_classes`` (16 or 13).
    """

    def __init__(
        self,
        root: str,
        list_file: Optional[str] = None,
        exclude: Iterable[str] = (),
        translated_root: Optional[str] = None,
        num_classes: int = 16,
        **kwargs,
    ):
        if num_classes not in (16, 13):
            raise ValueError(f"SYNTHIA: num_classes must be 16 or 13, got {num_classes}")
        image_dir, label_dir = os.path.join(root, "RGB"), os.path.join(root, "GT", "LABELS")
        require_dir(root, "SYNTHIA root", LAYOUT)
        require_dir(image_dir, "SYNTHIA images", LAYOUT)
        require_dir(label_dir, "SYNTHIA labels", LAYOUT)
        names = (
            read_name_list(list_file) if list_file else sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))
        )
        skipped = set(exclude)
        items = [
            Item(name, os.path.join(image_dir, name), os.path.join(label_dir, name))
            for name in names
            if name not in skipped
        ]
        check_items(items, f"SYNTHIA at {root}")
        items = with_translated(items, translated_root, image_dir)
        check_items(items, f"SYNTHIA translated images at {translated_root}")
        class_map = TRAIN_16_TO_13 if num_classes == 13 else None
        super().__init__(items, read_first_channel_16bit, SYNTHIA_LABELS, class_map=class_map, **kwargs)
