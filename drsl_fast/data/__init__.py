"""Datasets of docs/method.md §8 (GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes), their
label maps, the joint training transforms, and the built-in synthetic pair."""

from .base import DatasetLayoutError, Item, LabelSizeWarning, LabelValueWarning, SegmentationDataset
from .cityscapes import Cityscapes
from .gta5 import GTA5
from .io import UnreadableFileError
from .labels import CITYSCAPES_CLASSES, IGNORE_LABEL, SYNTHIA_13_CLASSES, SYNTHIA_CLASSES
from .synthetic import SyntheticPairConfig, make_synthetic_pair
from .synthia import SYNTHIA
from .transforms import CAFFE_BGR, TORCHVISION_RGB, ImageNormalization, TrainTransform, reduce_label

__all__ = [
    "CAFFE_BGR",
    "CITYSCAPES_CLASSES",
    "Cityscapes",
    "DatasetLayoutError",
    "GTA5",
    "IGNORE_LABEL",
    "ImageNormalization",
    "Item",
    "LabelSizeWarning",
    "LabelValueWarning",
    "SYNTHIA",
    "SYNTHIA_13_CLASSES",
    "SYNTHIA_CLASSES",
    "SegmentationDataset",
    "SyntheticPairConfig",
    "TORCHVISION_RGB",
    "TrainTransform",
    "UnreadableFileError",
    "make_synthetic_pair",
    "reduce_label",
]
