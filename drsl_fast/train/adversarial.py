"""One ADVENT / IntraDA training step (docs/method.md §7): adversarial alignment of
entropy maps with the fully-convolutional discriminator, per output level.

Generator step (discriminators frozen, ``requires_grad`` off):

    L_G = seg(source) [+ 0.1 seg_aux(source)]
          + 0.001 BCE(D_main(I_t), 0) [+ 0.0002 BCE(D_aux(I_t^aux), 0)]

i.e. the target entropy maps I_t are pushed toward the source label 0.
Discriminator step (inputs detached, discriminators trainable):

    L_D = BCE(D(I_s), 0) / 2 + BCE(D(I_t), 1) / 2     per level

where ``I = entropy_map(upsampled logits).map`` (the fused op, docs/method.md §7, §10).
The intra-domain stage uses the same step with easy images (and their
pseudo-labels) as the source and hard images as the target.

Like ADVENT, logits are upsampled to the input size before the softmax of the
entropy map (bilinear; ``align_corners=False`` as everywhere in this package).
Source and target images go through the generator in one batch (BatchNorm is
frozen, so this equals two passes) and through each discriminator in one
batch in the discriminator step (it has no normalisation), so DDP sees one
forward per backward. Both optimisers step after both backward passes, as in
ADVENT, sharing one gradient scaler (the multi-optimiser pattern of
``torch.amp``).
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drsl_fast.losses import segmentation_loss
from drsl_fast.models import FCDiscriminator
from drsl_fast.models.discriminator import discriminator_channels
from drsl_fast.models.deeplab import AUX_LOSS_WEIGHT
from drsl_fast.ops.entropy import entropy_map

SOURCE_LABEL = 0.0   # source images (intra-domain stage: the easy split)
TARGET_LABEL = 1.0   # target images (intra-domain stage: the hard split)
LEVELS = ("main", "aux")


@dataclass(frozen=True)
class AdversarialWeights:
    """docs/method.md §7 / §2: adversarial weights per level and the aux segmentation weight."""

    adv_main: float = 0.001
    adv_aux: float = 0.0002
    seg_aux: float = AUX_LOSS_WEIGHT

    def adversarial(self, level: str) -> float:
        return self.adv_main if level == "main" else self.adv_aux


class Discriminators(nn.Module):
    """One :class:`FCDiscriminator` per output level (``main``, and ``aux``
    with the auxiliary classifier). ``forward`` takes {level: entropy map}
    and returns {level: domain logits}, so one call covers every level."""

    def __init__(self, num_classes: int, levels: Sequence[str] = LEVELS, width: float = 1.0):
        super().__init__()
        channels = discriminator_channels(width)
        self.levels = nn.ModuleDict({level: FCDiscriminator(num_classes, channels) for level in levels})

    def forward(self, maps: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {level: self.levels[level](value) for level, value in maps.items()}


def discriminator_optimizer(discriminators: nn.Module, lr: float = 1e-4,
                            betas: Tuple[float, float] = (0.9, 0.99)) -> torch.optim.Adam:
    """docs/method.md §7: Adam, lr 1e-4, betas (0.9, 0.99) (the poly schedule is the caller's)."""
    return torch.optim.Adam(discriminators.parameters(), lr=lr, betas=tuple(betas))


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def level_logits(out) -> Dict[str, Tensor]:
    """{'main': logits, 'aux': aux logits (when the auxiliary classifier is on)}."""
    levels = {"main": out.logits}
    if out.aux_logits is not None:
        levels["aux"] = out.aux_logits
    return levels


def entropy_maps(logits: Tensor, size: Sequence[int]) -> Tensor:
    """C-channel entropy map (docs/method.md §7) of ``logits`` upsampled to ``size``; fp32."""
    upsampled = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return entropy_map(upsampled).map


def domain_loss(domain_logits: Tensor, label: float) -> Tensor:
    """BCE-with-logits of every cell against the domain ``label`` (0 or 1), fp32."""
    domain_logits = domain_logits.float()
    return F.binary_cross_entropy_with_logits(domain_logits, torch.full_like(domain_logits, label))


@dataclass
class StepLosses:
    generator: Tensor                    # L_G (what the generator's backward sees)
    discriminator: Tensor                # L_D (summed over levels)
    terms: Dict[str, Tensor]             # detached, for logging


def generator_loss(model: nn.Module, discriminators: Discriminators, source_images: Tensor,
                   source_labels: Tensor, target_images: Tensor, weights: AdversarialWeights
                   ) -> Tuple[Tensor, Dict[str, Tensor], Dict[str, Tensor], Dict[str, Tensor]]:
    """L_G for one batch; also the per-level logits of the source and target
    halves (for the discriminator step) and the loss terms.
    ``discriminators`` must be frozen by the caller (see :func:`adversarial_step`)."""
    n = source_images.shape[0]
    out = model(torch.cat([source_images, target_images]))
    levels = level_logits(out)
    size = target_images.shape[-2:]
    terms: Dict[str, Tensor] = {}
    seg = segmentation_loss(levels["main"][:n].float(), source_labels)
    terms["seg_main"] = seg
    if "aux" in levels:
        terms["seg_aux"] = segmentation_loss(levels["aux"][:n].float(), source_labels)
        seg = seg + weights.seg_aux * terms["seg_aux"]
    target_maps = {level: entropy_maps(logits[n:], size) for level, logits in levels.items()}
    fooled = discriminators(target_maps)
    total = seg
    for level, domain_logits in fooled.items():
        terms[f"adv_{level}"] = domain_loss(domain_logits, SOURCE_LABEL)
        total = total + weights.adversarial(level) * terms[f"adv_{level}"]
    source_logits = {level: logits[:n] for level, logits in levels.items()}
    target_logits = {level: logits[n:] for level, logits in levels.items()}
    return total, source_logits, target_logits, terms


def discriminator_loss(discriminators: nn.Module, source_logits: Dict[str, Tensor],
                       target_logits: Dict[str, Tensor], size: Sequence[int]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L_D: source maps labelled 0, target maps labelled 1, each loss / 2,
    summed over levels; the generator's logits are detached."""
    maps = {}
    counts = {}
    for level in source_logits:
        source = entropy_maps(source_logits[level].detach(), size)
        target = entropy_maps(target_logits[level].detach(), size)
        maps[level] = torch.cat([source, target])
        counts[level] = source.shape[0]
    domains = discriminators(maps)
    total, terms = 0.0, {}
    for level, domain_logits in domains.items():
        n = counts[level]
        loss = domain_loss(domain_logits[:n], SOURCE_LABEL) / 2 + domain_loss(domain_logits[n:], TARGET_LABEL) / 2
        terms[f"d_{level}"] = loss
        total = total + loss
    return total, terms


def adversarial_step(model: nn.Module, discriminators: Discriminators, generator_optimizer: torch.optim.Optimizer,
                     discriminator_optimizer: torch.optim.Optimizer, source_images: Tensor, source_labels: Tensor,
                     target_images: Tensor, weights: AdversarialWeights, *, autocast=None,
                     scaler: Optional[torch.amp.GradScaler] = None,
                     discriminator_model: Optional[nn.Module] = None) -> StepLosses:
    """One iteration: generator step, discriminator step, then both optimisers
    step. ``model`` and ``discriminator_model`` may be DDP wrappers of the
    network and of ``discriminators``; the generator step calls the bare
    ``discriminators`` (frozen, so DDP expects no gradient of them there)."""
    autocast = autocast if autocast is not None else contextlib.nullcontext
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
    discriminator_model = discriminator_model if discriminator_model is not None else discriminators
    generator_optimizer.zero_grad(set_to_none=True)
    discriminator_optimizer.zero_grad(set_to_none=True)

    set_requires_grad(discriminators, False)
    with autocast():
        g_loss, source_logits, target_logits, terms = generator_loss(
            model, discriminators, source_images, source_labels, target_images, weights)
    scaler.scale(g_loss).backward()

    set_requires_grad(discriminators, True)
    with autocast():
        d_loss, d_terms = discriminator_loss(discriminator_model, source_logits, target_logits,
                                             target_images.shape[-2:])
    scaler.scale(d_loss).backward()
    scaler.step(generator_optimizer)
    scaler.step(discriminator_optimizer)
    scaler.update()
    terms.update(d_terms)
    return StepLosses(g_loss.detach(), d_loss.detach(), {k: v.detach() for k, v in terms.items()})
