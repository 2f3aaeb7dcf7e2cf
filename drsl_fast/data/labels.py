"""Label maps of docs/method.md §8, as lookup tables from raw ids to train ids.

Facts used:
- Cityscapes ids -> train ids: the official definitions (``cityscapesscripts``
  ``labels.py``); ids 0-33 plus 255 (license plate, id -1, stored as 255 in
  8-bit labelId maps), all non-evaluated ids -> 255.
- GTA5 labels use the Cityscapes ids, hence the same map (docs/method.md §8 lists it).
- SYNTHIA-RAND-CITYSCAPES ids 0-22 -> the 16 SYNTHIA classes of docs/method.md §8.
- 19 -> 16 classes drops terrain, truck, train; 16 -> 13 (mIoU*) drops wall,
  fence, pole.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

IGNORE_LABEL = 255

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# Official Cityscapes labelIds (cityscapesscripts/helpers/labels.py) -> trainIds.
CITYSCAPES_ID_TO_TRAIN_ID: Dict[int, int] = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3,
    13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18, 255: 255,
}  # fmt: skip

# Cityscapes label names by id (used to build the synthetic pair's labelId maps).
CITYSCAPES_ID = {
    "unlabeled": 0, "ego vehicle": 1, "road": 7, "sidewalk": 8, "building": 11, "wall": 12, "fence": 13,
    "pole": 17, "traffic light": 19, "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23,
    "person": 24, "rider": 25, "car": 26, "truck": 27, "bus": 28, "train": 31, "motorcycle": 32, "bicycle": 33,
}  # fmt: skip

GTA5_ID_TO_TRAIN_ID: Dict[int, int] = {raw: CITYSCAPES_ID_TO_TRAIN_ID.get(raw, 255) for raw in range(34)}

SYNTHIA_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
)  # fmt: skip

# SYNTHIA-RAND-CITYSCAPES class ids (first channel of GT/LABELS) -> 16-class ids.
SYNTHIA_ID_TO_TRAIN_ID: Dict[int, int] = {
    0: 255, 1: 9, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 12, 9: 7, 10: 10, 11: 15, 12: 14, 13: 255,
    14: 255, 15: 6, 16: 255, 17: 11, 18: 255, 19: 13, 20: 255, 21: 3, 22: 255,
}  # fmt: skip

DROPPED_19_TO_16 = (9, 14, 16)  # terrain, truck, train
DROPPED_16_TO_13 = (3, 4, 5)  # wall, fence, pole


def subset_map(num_classes: int, dropped: Tuple[int, ...]) -> Dict[int, int]:
    """Train id -> index among the kept classes (dropped classes -> 255)."""
    kept = [c for c in range(num_classes) if c not in dropped]
    return {c: (kept.index(c) if c in kept else IGNORE_LABEL) for c in range(num_classes)}


TRAIN_19_TO_16 = subset_map(19, DROPPED_19_TO_16)
TRAIN_16_TO_13 = subset_map(16, DROPPED_16_TO_13)
SYNTHIA_13_CLASSES = tuple(name for c, name in enumerate(SYNTHIA_CLASSES) if c not in DROPPED_16_TO_13)


@dataclass(frozen=True)
class LabelMap:
    """Lookup table from raw label values to train ids.

    Values listed in ``mapping`` are defined (possibly mapping to 255); any
    other value is out of the map: it becomes 255 and is counted by
    :meth:`apply`.
    """

    name: str
    mapping: Dict[int, int]

    def tables(self, max_value: int) -> Tuple[np.ndarray, np.ndarray]:
        """(lookup table, defined mask) over 0..max_value."""
        lut = np.full(max_value + 1, IGNORE_LABEL, dtype=np.uint8)
        defined = np.zeros(max_value + 1, dtype=bool)
        for raw, train in self.mapping.items():
            if raw <= max_value:
                lut[raw], defined[raw] = train, True
        return lut, defined

    def apply(self, raw: np.ndarray) -> Tuple[np.ndarray, int, Tuple[int, ...]]:
        """Maps an integer label array. Returns (uint8 train ids, number of
        out-of-map pixels, their distinct values)."""
        if raw.dtype.kind not in "ui":
            raise TypeError(f"{self.name} labels must be integers, got {raw.dtype}")
        top = int(raw.max()) if raw.size else 0
        if raw.dtype.kind == "i" and raw.size and int(raw.min()) < 0:
            raise ValueError(f"{self.name} labels must be non-negative, got {int(raw.min())}")
        lut, defined = self.tables(top)
        index = raw.astype(np.int64, copy=False)
        outside = ~defined[index]
        count = int(outside.sum())
        values = tuple(int(v) for v in np.unique(raw[outside])) if count else ()
        return lut[index], count, values


CITYSCAPES_LABELS = LabelMap("Cityscapes", CITYSCAPES_ID_TO_TRAIN_ID)
GTA5_LABELS = LabelMap("GTA5", GTA5_ID_TO_TRAIN_ID)
SYNTHIA_LABELS = LabelMap("SYNTHIA", SYNTHIA_ID_TO_TRAIN_ID)


def remap_classes(train_ids: np.ndarray, mapping: Dict[int, int]) -> np.ndarray:
    """Applies a class-subset map (e.g. :data:`TRAIN_19_TO_16`); 255 stays 255."""
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[train_ids]
