"""The fully-convolutional domain discriminator of ADVENT/IntraDA (docs/method.md §7).

Input: a C-channel entropy map (:func:`drsl_fast.ops.entropy_map`); output: one
logit per cell of a grid 32 times coarser than the input (five stride-2 convs).
The logit is the domain: 0 for the source (or easy) split, 1 for the target
(or hard) split, read through BCE-with-logits.
"""
from typing import Sequence

from torch import Tensor, nn

DISCRIMINATOR_CHANNELS = (64, 128, 256, 512)
LEAKY_SLOPE = 0.2


class FCDiscriminator(nn.Module):
    """Five 4x4 convs, stride 2, padding 1, channels C -> 64 -> 128 -> 256 ->
    512 -> 1, LeakyReLU(0.2) after the first four, no normalisation (docs/method.md §7).
    Narrower ``channels`` (see :func:`discriminator_channels`) are for tests
    and the CPU demo, as the width multiplier of the segmentation network."""

    def __init__(self, num_classes: int, channels: Sequence[int] = DISCRIMINATOR_CHANNELS):
        super().__init__()
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"FCDiscriminator: four hidden widths >= 1, got {tuple(channels)}")
        layers = []
        previous = num_classes
        for width in channels:
            layers += [nn.Conv2d(previous, width, kernel_size=4, stride=2, padding=1),
                       nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
            previous = width
        layers.append(nn.Conv2d(previous, 1, kernel_size=4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, entropy_map: Tensor) -> Tensor:
        return self.layers(entropy_map)


def discriminator_channels(width: float = 1.0) -> Sequence[int]:
    """docs/method.md §7's hidden widths 64, 128, 256, 512 scaled by ``width`` (1.0: the documented widths)."""
    if width <= 0:
        raise ValueError(f"discriminator width must be > 0, got {width}")
    return tuple(max(1, round(c * width)) for c in DISCRIMINATOR_CHANNELS)
