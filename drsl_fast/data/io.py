"""Image and label file reading with errors that name the file (docs/method.md §8).

RGB images and 8-bit label maps (GTA5 palette PNGs, whose palette indices are
the ids; Cityscapes labelId PNGs) are read with Pillow. SYNTHIA's GT/LABELS are
16-bit multi-channel PNGs that Pillow reduces to 8 bits per channel, so they
are read with OpenCV, which keeps all 16 bits (and returns channels in BGR
order: the class id, PNG channel 0, is OpenCV's channel 2).
"""

import cv2
import numpy as np
from PIL import Image


class UnreadableFileError(OSError):
    """A dataset file exists but cannot be decoded."""


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise UnreadableFileError(f"cannot read image {path}: {exc}") from exc


def read_label_ids(path: str) -> np.ndarray:
    """(H, W) integer ids of an 8-bit single-channel or palette label PNG.

    Palette images give their indices (GTA5 stores ids as palette indices).
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise UnreadableFileError(
                    f"label {path} has mode {image.mode}; expected a single-channel or palette image of ids"
                )
            return np.array(image)
    except UnreadableFileError:
        raise
    except (OSError, ValueError) as exc:
        raise UnreadableFileError(f"cannot read label {path}: {exc}") from exc


def read_first_channel_16bit(path: str) -> np.ndarray:
    """(H, W) uint16 first PNG channel of a 16-bit multi-channel PNG (SYNTHIA
    GT/LABELS: the class id). A single-channel file is returned as is."""
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise UnreadableFileError(f"cannot read label {path}: not a decodable image")
    if array.ndim == 2:
        return array
    return array[..., 2]  # OpenCV order is BGR(A): PNG channel 0 (R) is index 2
