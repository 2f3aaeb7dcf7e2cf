"""DeepLab-v2 ResNet backbone (docs/method.md §2).

Differences from the classification ResNet, as in DeepLab-v2 / ADVENT:
- bottleneck blocks put the stride on the first 1x1 conv; the 3x3 conv has
  stride 1 and padding = dilation;
- the stem max-pool uses ``ceil_mode=True``;
- layer3 runs at dilation 2 and layer4 at dilation 4, both with stride 1, so
  the output stride is 8;
- every BatchNorm is frozen (:class:`FrozenBatchNorm2d`).

Depths 18/34 (basic blocks) and 50/101/152 (bottlenecks) and a width
multiplier are available for tests and the built-in demo; ResNet-101 at width
1 is the default. Parameter names match torchvision's ResNet and, under
``backbone.``, the DeepLab ImageNet init used by ADVENT (see ``weights.py``).
"""

from typing import List, NamedTuple, Type, Union

import torch.utils.checkpoint
from torch import Tensor, nn

from .frozen_bn import FrozenBatchNorm2d

LAYER_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
LAYER_STRIDES = (1, 2, 1, 1)
LAYER_DILATIONS = (1, 1, 2, 4)
OUTPUT_STRIDE = 8


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); stride on the first, dilation on the second."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 (carries the stride) -> 3x3 (stride 1, padding = dilation) -> 1x1."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BackboneFeatures(NamedTuple):
    """layer3 output (input of the auxiliary classifier) and layer4 output (base features)."""

    layer3: Tensor
    layer4: Tensor


class DeepLabResNet(nn.Module):
    """ResNet trunk of DeepLab-v2 (docs/method.md §2), output stride 8.

    Args:
        depth: 18, 34, 50, 101 (default) or 152.
        width: channel multiplier (1.0 is the standard network).
        checkpointing: recompute each residual stage in backward instead of
            storing its activations (gradient checkpointing); only active
            when gradients are being computed.
    """

    def __init__(self, depth: int = 101, width: float = 1.0, checkpointing: bool = False):
        super().__init__()
        if depth not in LAYER_BLOCKS:
            raise ValueError(f"DeepLabResNet: depth must be one of {sorted(LAYER_BLOCKS)}, got {depth}")
        if not width > 0:
            raise ValueError(f"DeepLabResNet: width must be > 0, got {width}")
        block = BasicBlock if depth < 50 else Bottleneck
        self.depth = depth
        self.checkpointing = checkpointing
        stem_channels = max(1, round(64 * width))
        self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self._in_channels = stem_channels
        stage_channels = []
        for index, (planes, blocks, stride, dilation) in enumerate(
            zip((64, 128, 256, 512), LAYER_BLOCKS[depth], LAYER_STRIDES, LAYER_DILATIONS), start=1
        ):
            stage = self._make_layer(block, max(1, round(planes * width)), blocks, stride, dilation)
            self.add_module(f"layer{index}", stage)
            stage_channels.append(self._in_channels)
        del self._in_channels
        self.layer3_channels, self.out_channels = stage_channels[2], stage_channels[3]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int, dilation: int
    ) -> nn.Sequential:
        """As DeepLab-v2: the first block of a stage gets a 1x1 projection when
        the stride or channel count changes or the stage is dilated."""
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels or dilation > 1:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride, bias=False), FrozenBatchNorm2d(out_channels)
            )
        layers: List[nn.Module] = [block(self._in_channels, planes, stride, dilation, downsample)]
        self._in_channels = out_channels
        layers += [block(out_channels, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _run(self, stage: nn.Module, x: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward(self, x: Tensor) -> BackboneFeatures:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self._run(self.layer1, x)
        x = self._run(self.layer2, x)
        layer3 = self._run(self.layer3, x)
        return BackboneFeatures(layer3, self._run(self.layer4, layer3))
