"""DeepLab-v2 segmentation network (docs/method.md §2)."""

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

from torch import Tensor, nn

from .resnet import DeepLabResNet

CLASSIFIER_DILATIONS = (6, 12, 18, 24)
AUX_LOSS_WEIGHT = 0.1
HEAD_LR_MULTIPLIER = 10.0


class SummedDilatedConvs(nn.Module):
    """Parallel 3x3 convs with bias at dilation = padding d, outputs summed.

    This is DeepLab-v2's "ASPP" classifier (docs/method.md §2) and, with D output
    channels, the MMDL-FR embedding block. Weights are drawn from N(0, 0.01),
    biases start at 0.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = CLASSIFIER_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DeepLabOutput(NamedTuple):
    """logits (B, C, h, w) at stride 8; features: layer4 base features (B, 2048w, h, w)
    shared with the MMDL-FR head; aux_logits from layer3, or None without the
    auxiliary classifier."""

    logits: Tensor
    features: Tensor
    aux_logits: Optional[Tensor]


class DeepLabV2(nn.Module):
    """DeepLab-v2 (docs/method.md §2): :class:`DeepLabResNet` trunk plus the summed
    4-branch classifier on layer4 and an optional auxiliary classifier on
    layer3 (ADVENT/IntraDA multi-level output; weight ``AUX_LOSS_WEIGHT`` on
    its segmentation loss).

    Logits are returned at stride 8; callers upsample them to the label size.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 101,
        width: float = 1.0,
        aux_classifier: bool = False,
        checkpointing: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = DeepLabResNet(depth, width, checkpointing)
        self.classifier = SummedDilatedConvs(self.backbone.out_channels, num_classes)
        self.aux_classifier = SummedDilatedConvs(self.backbone.layer3_channels, num_classes) if aux_classifier else None

    @property
    def feature_channels(self) -> int:
        """Channels of the base features (input of the MMDL-FR head)."""
        return self.backbone.out_channels

    def forward(self, images: Tensor) -> DeepLabOutput:
        features = self.backbone(images)
        aux = self.aux_classifier(features.layer3) if self.aux_classifier is not None else None
        return DeepLabOutput(self.classifier(features.layer4), features.layer4, aux)

    def head_modules(self) -> List[nn.Module]:
        return [m for m in (self.classifier, self.aux_classifier) if m is not None]

    def parameter_groups(self, lr: float, extra_heads: Iterable[nn.Module] = ()) -> List[Dict]:
        """SGD parameter groups (docs/method.md §2): backbone at ``lr``; the
        classifiers and ``extra_heads`` (e.g. the MMDL-FR head) at 10 x lr.
        Frozen parameters (BatchNorm) are left out."""
        heads = self.head_modules() + list(extra_heads)
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head_params = [p for module in heads for p in module.parameters() if p.requires_grad]
        return [
            {"params": backbone, "lr": lr},
            {"params": head_params, "lr": HEAD_LR_MULTIPLIER * lr},
        ]
