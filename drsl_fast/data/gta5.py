"""GTA5 (docs/method.md §8): ``images/*.png`` with ``labels/*.png`` of the same name,
labels in Cityscapes ids (palette PNGs). Some label maps differ in size from
their images by a few pixels: they are resized with nearest and warned about
(or raise with ``on_size_mismatch='error'``); known bad files (e.g. the blank
images) are skipped by listing their names in ``exclude``."""

import os
from typing import Iterable, Optional

from .base import Item, SegmentationDataset, check_items, read_name_list, require_dir, with_translated
from .io import read_label_ids
from .labels import GTA5_LABELS

LAYOUT = "ROOT/images/<name>.png and ROOT/labels/<name>.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class GTA5(SegmentationDataset):
    """GTA5 with 19 train ids.

    Args:
        root: dataset root.
        list_file: optional file of image names, one per line (e.g. ADVENT's
            ``gta5_list/train.txt``); default: every image in ``images/``.
        exclude: image names to skip.
        translated_root: optional directory of translated images (ISA) with the
            same names, used beside the originals.
        **kwargs: see :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        root: str,
        list_file: Optional[str] = None,
        exclude: Iterable[str] = (),
        translated_root: Optional[str] = None,
        **kwargs,
    ):
        image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
        require_dir(root, "GTA5 root", LAYOUT)
        require_dir(image_dir, "GTA5 images", LAYOUT)
        require_dir(label_dir, "GTA5 labels", LAYOUT)
        if list_file is not None:
            names = read_name_list(list_file)
        else:
            names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
        skipped = set(exclude)
        items = [
            Item(name, os.path.join(image_dir, name), os.path.join(label_dir, os.path.splitext(name)[0] + ".png"))
            for name in names
            if name not in skipped
        ]
        check_items(items, f"GTA5 at {root}")
        items = with_translated(items, translated_root, image_dir)
        check_items(items, f"GTA5 translated images at {translated_root}")
        super().__init__(items, read_label_ids, GTA5_LABELS, **kwargs)
