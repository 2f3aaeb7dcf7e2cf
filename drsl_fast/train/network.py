"""The network a DRSL run trains: DeepLab-v2 plus the MMDL-FR head on its
base features (docs/method.md §2), as one module so DDP sees every parameter."""
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from drsl_fast.models import DeepLabV2, MMDLHead, load_init_weights

from .settings import Model, Settings


class NetworkOutput(NamedTuple):
    logits: Tensor                 # (B, C, h, w), stride 8
    aux_logits: Optional[Tensor]   # layer3 classifier, when configured
    embeddings: Optional[Tensor]   # (B, D, H/2, W/2), when the MMDL-FR head is on and asked for


class DRSLNetwork(nn.Module):
    """DeepLab-v2 and the optional MMDL-FR head. With ``shared_convs`` (the
    default) the head's embedding block runs with the classifier, one
    convolution per dilation (:func:`~drsl_fast.models.deeplab.shared_input_convs`);
    the same function as running them apart (bench/bench_training_step.py
    times both)."""

    def __init__(self, segmenter: DeepLabV2, head: Optional[MMDLHead], shared_convs: bool = True):
        super().__init__()
        self.segmenter = segmenter
        self.head = head
        self.shared_convs = shared_convs

    @property
    def num_classes(self) -> int:
        return self.segmenter.num_classes

    def forward(self, images: Tensor, embedding_size: Optional[Sequence[int]] = None) -> NetworkOutput:
        if self.head is None or embedding_size is None:
            out = self.segmenter(images)
            return NetworkOutput(out.logits, out.aux_logits, None)
        if self.shared_convs:
            out = self.segmenter(images, [self.head.embedding])
            embeddings = self.head.upsample(out.beside[0], tuple(embedding_size))
        else:
            out = self.segmenter(images)
            embeddings = self.head(out.features, tuple(embedding_size))
        return NetworkOutput(out.logits, out.aux_logits, embeddings)

    def parameter_groups(self, lr: float) -> List[Dict]:
        """Backbone at lr, classifiers and the MMDL-FR head at 10 x lr (docs/method.md §2)."""
        return self.segmenter.parameter_groups(lr, [self.head] if self.head is not None else [])


# the settings that build a run's network and feed it images, saved beside its weights
NETWORK_SETTINGS = {"data": ("num_classes", "normalization", "target_size"),
                    "model": ("depth", "width", "mmdl", "num_modes", "embedding_dim", "sigma")}


def network_settings(config: Dict) -> Dict:
    """The keys of :data:`NETWORK_SETTINGS` of ``config``, as a partial config."""
    return {section: {key: config[section][key] for key in keys} for section, keys in NETWORK_SETTINGS.items()}


def build_network(model: Model, num_classes: int, log=print) -> DRSLNetwork:
    """DeepLab-v2 and, with model.mmdl, the MMDL-FR head (docs/method.md §2)."""
    segmenter = DeepLabV2(num_classes, depth=model.depth, width=model.width, checkpointing=model.checkpointing,
                          head_as_gemm=model.head_as_gemm)
    if model.init_weights:
        report = load_init_weights(segmenter, model.init_weights)
        log(f"init weights {model.init_weights}: {report.summary()}")
    head = None
    if model.mmdl:
        head = MMDLHead(segmenter.feature_channels, num_classes, model.num_modes, model.embedding_dim, model.sigma)
    return DRSLNetwork(segmenter, head)


def seeded_network(settings: Settings, log=print) -> DRSLNetwork:
    """The network with weights drawn from the run's seed (same on every rank)."""
    state = torch.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        return build_network(settings.model, settings.data.num_classes, log)
    finally:
        torch.set_rng_state(state)
