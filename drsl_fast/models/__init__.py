"""Networks of docs/method.md §2: DeepLab-v2 (ResNet, frozen BN, summed 4-branch
classifier) and the MMDL-FR head, plus init-weight loading; the ADVENT/IntraDA
discriminator of §7."""

from .deeplab import DeepLabOutput, DeepLabV2, SummedDilatedConvs
from .discriminator import FCDiscriminator
from .frozen_bn import FrozenBatchNorm2d
from .mmdl_head import MMDLHead
from .resnet import DeepLabResNet
from .weights import InitWeightsWarning, LoadReport, load_init_weights

__all__ = [
    "DeepLabOutput",
    "DeepLabResNet",
    "DeepLabV2",
    "FCDiscriminator",
    "FrozenBatchNorm2d",
    "InitWeightsWarning",
    "LoadReport",
    "MMDLHead",
    "SummedDilatedConvs",
    "load_init_weights",
]
