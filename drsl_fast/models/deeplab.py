"""DeepLab-v2 segmentation network (docs/method.md §2)."""

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import DeepLabResNet
from .tap_gemm import summed_dilated_convs_as_gemm

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


def shared_input_convs(blocks: Sequence[SummedDilatedConvs], x: Tensor, as_gemm: bool = False) -> List[Tensor]:
    """Each block's output on the same input ``x``, as one convolution per
    dilation: the blocks' weights and biases at that dilation concatenated
    along the output channels, the sum over the dilations split back into the
    blocks' outputs (channel slices of one tensor). The same function as
    ``[block(x) for block in blocks]``; the input is read, converted to the
    kernels' layout and differentiated once per dilation instead of once per
    block and dilation, and each convolution is one call (a GPU's library
    spends a host-side plan lookup on every call). ``as_gemm``: every
    dilation's taps as one matrix product and a shifted sum of the taps instead
    (:func:`~drsl_fast.models.tap_gemm.summed_dilated_convs_as_gemm`), the
    same function again."""
    if len(blocks) == 1 and not as_gemm:
        return [blocks[0](x)]
    if len({len(block.conv2d_list) for block in blocks}) != 1:
        raise ValueError("shared_input_convs: the blocks have different numbers of dilations")
    sizes = [block.conv2d_list[0].out_channels for block in blocks]
    per_dilation = list(zip(*(block.conv2d_list for block in blocks)))
    for convs in per_dilation:
        if any(conv_shape(c) != conv_shape(convs[0]) for c in convs):
            raise ValueError("shared_input_convs: the blocks' convolutions differ in shape or dilation")
    if as_gemm and any(c.padding != c.dilation or c.dilation[0] != c.dilation[1] or c.stride != (1, 1)
                       or c.kernel_size != (3, 3) or c.groups != 1 or c.padding_mode != "zeros" or c.bias is None
                       for c, *_ in per_dilation):
        raise ValueError("shared_input_convs: as_gemm needs 3x3 convolutions with bias, zero padding = "
                         "dilation (the same in both directions), stride 1")
    # each dilation's filters and biases, the blocks' concatenated (one block's as they are)
    weights = [torch.cat([c.weight for c in convs]) if len(convs) > 1 else convs[0].weight for convs in per_dilation]
    biases = [torch.cat([c.bias for c in convs]) if len(convs) > 1 else convs[0].bias for convs in per_dilation]
    if as_gemm:
        out = summed_dilated_convs_as_gemm(x, weights, biases, [convs[0].dilation[0] for convs in per_dilation])
    else:
        out = None
        for (first, *_), weight, bias in zip(per_dilation, weights, biases):
            y = F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation)
            out = y if out is None else out + y
    return list(out.split(sizes, dim=1))


def conv_shape(conv: nn.Conv2d) -> tuple:
    """What two convolutions must share to run as one (their output channels aside)."""
    return (conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.padding_mode, conv.bias is not None)


class DeepLabOutput(NamedTuple):
    """logits (B, C, h, w) at stride 8; features: layer4 base features (B, 2048w, h, w)
    shared with the MMDL-FR head; aux_logits from layer3, or None without the
    auxiliary classifier; beside: the outputs of the blocks run with the
    classifier (:meth:`DeepLabV2.forward`)."""

    logits: Tensor
    features: Tensor
    aux_logits: Optional[Tensor]
    beside: Tuple[Tensor, ...] = ()


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
        head_as_gemm: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = DeepLabResNet(depth, width, checkpointing)
        self.classifier = SummedDilatedConvs(self.backbone.out_channels, num_classes)
        self.aux_classifier = SummedDilatedConvs(self.backbone.layer3_channels, num_classes) if aux_classifier else None
        self.head_as_gemm = head_as_gemm  # the classifiers (and blocks beside the layer4 one) as matrix products

    @property
    def feature_channels(self) -> int:
        """Channels of the base features (input of the MMDL-FR head)."""
        return self.backbone.out_channels

    def forward(self, images: Tensor, beside: Sequence[SummedDilatedConvs] = ()) -> DeepLabOutput:
        """``beside``: blocks on the layer4 features with the classifier's
        dilations (the MMDL-FR embedding block), run with it by
        :func:`shared_input_convs` (as one matrix product with
        ``self.head_as_gemm``); their outputs are ``out.beside``."""
        features = self.backbone(images)
        aux = (shared_input_convs([self.aux_classifier], features.layer3, self.head_as_gemm)[0]
               if self.aux_classifier is not None else None)
        logits, *others = shared_input_convs([self.classifier, *beside], features.layer4, self.head_as_gemm)
        return DeepLabOutput(logits, features.layer4, aux, tuple(others))

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
