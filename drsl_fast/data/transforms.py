"""Input normalisation and the joint image/label training transforms
(docs/method.md §6: random scale 0.5-1.5, random crop, horizontal flip; §2: labels
reduced by 2 for the MMDL-FR embedding branch).

Images are (3, H, W) float tensors, labels (H, W) int64 with 255 = ignore.
Randomness comes from torch's global generator (seeded per DataLoader worker)
or from an explicit ``torch.Generator``.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .labels import IGNORE_LABEL


@dataclass(frozen=True)
class ImageNormalization:
    """Maps uint8 RGB to the network's input: optional RGB->BGR, x * scale, minus mean, divided by std."""

    bgr: bool
    scale: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    def __call__(self, rgb: np.ndarray) -> Tensor:
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
        if self.bgr:
            image = image.flip(0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (image * self.scale - mean) / std


# Caffe-converted DeepLab ImageNet init (ADVENT): BGR, 0-255, mean subtracted (docs/method.md §2).
CAFFE_BGR = ImageNormalization(True, 1.0, (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0))
# torchvision ResNet weights: RGB in [0, 1], ImageNet mean and std.
TORCHVISION_RGB = ImageNormalization(False, 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def resize_pair(image: Tensor, label: Optional[Tensor], size: Tuple[int, int]) -> Tuple[Tensor, Optional[Tensor]]:
    """Resizes to ``size`` = (H, W): image bilinear, label nearest."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if label is not None and tuple(label.shape[-2:]) != tuple(size):
        label = resize_label(label, size)
    return image, label


def resize_label(label: Tensor, size: Tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of an integer label map (pixel centres)."""
    return F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(label.dtype)


def reduce_label(label: Tensor, factor: int = 2) -> Tensor:
    """Labels for the embedding branch: nearest reduction by ``factor``
    (docs/method.md §2; ceil size, the stride-2 grid of the input)."""
    height, width = label.shape[-2:]
    return resize_label(label, (-(-height // factor), -(-width // factor)))


@dataclass
class TrainTransform:
    """Random scale in ``scale_range`` (relative to the image, or to
    ``base_size`` = (H, W) when given), random crop of ``crop_size`` = (H, W)
    (padding with 0 -- the mean after normalisation -- and label 255 when the
    scaled image is smaller), and horizontal flip with probability 0.5.
    ``label`` may be None (unlabelled target images)."""

    crop_size: Tuple[int, int] = (512, 512)
    scale_range: Tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    base_size: Optional[Sequence[int]] = None
    colour_jitter: float = 0.0  # see colour_jitter(); 0 = off (the documented setting)

    def __call__(
        self, image: Tensor, label: Optional[Tensor], generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        def uniform() -> float:
            return float(torch.rand((), generator=generator))

        low, high = self.scale_range
        scale = low + (high - low) * uniform()
        base_h, base_w = self.base_size if self.base_size is not None else image.shape[-2:]
        image, label = resize_pair(image, label, (max(1, round(base_h * scale)), max(1, round(base_w * scale))))

        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(0, crop_h - image.shape[-2]), max(0, crop_w - image.shape[-1])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            if label is not None:
                label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_LABEL)
        top = int(uniform() * (image.shape[-2] - crop_h + 1))
        left = int(uniform() * (image.shape[-1] - crop_w + 1))
        image = image[:, top : top + crop_h, left : left + crop_w].contiguous()
        if label is not None:
            label = label[top : top + crop_h, left : left + crop_w].contiguous()

        if self.flip and uniform() < 0.5:
            image = image.flip(-1)
            label = label.flip(-1) if label is not None else None
        if self.colour_jitter > 0:
            image = colour_jitter(image, self.colour_jitter, generator)
        return image, label


def colour_jitter(image: Tensor, strength: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random affine colour transform of a normalised image (3, H, W):
    ``x' = (I + strength * U) x + strength * u`` with U (3, 3) and u (3,) drawn
    uniformly in [-1, 1]. It mixes channels and shifts colours, so a network
    cannot rely on a domain's exact palette (not part of docs/method.md §6; off by
    default)."""
    mix = torch.eye(3) + strength * (2 * torch.rand(3, 3, generator=generator) - 1)
    shift = strength * (2 * torch.rand(3, generator=generator) - 1)
    return torch.einsum("ij,jhw->ihw", mix.to(image.dtype), image) + shift.to(image.dtype)[:, None, None]
