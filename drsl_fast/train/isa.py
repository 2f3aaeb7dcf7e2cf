"""Input-space adaptation (docs/method.md §6): source training images seen
in the target's look, in the stages of ``isa.stages``. Either translated
images on disk stand beside the originals (``data.source.translated_root``,
e.g. CycleGAN outputs or ``drsl data translate``), or, without them, the
built-in FDA translates images on the fly when ``isa.probability`` > 0.

On the fly, each source sample of a stage in ``isa.stages`` draws, from its
augmentation seed (so from the run's seed, the stage, the iteration, the rank
and its place in the batch), whether it is translated (``isa.probability``)
and with which target training image; the loader brings that image resized to
the crop, and :func:`translate_batch` runs FDA on the model's device. With
``isa.probability = 0`` nothing is wrapped and nothing is drawn.
"""
import os
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from drsl_fast.data import ImageNormalization
from drsl_fast.data.io import read_rgb
from drsl_fast.data.transforms import resize_pair
from drsl_fast.ops.fda import fourier_domain_adaptation

from .checkpoint import atomic_write
from .data import AugmentedSamples, normalization, source_dataset, stream_seed, target_dataset, train_transform
from .log import progress, to_stderr
from .settings import ISA, Data, Settings, SourceData


def in_stage(settings: ISA, stage: str) -> bool:
    """Whether ``stage`` ('source' or 'adaptation') is one of ``isa.stages``."""
    return settings.stages in (stage, "both")


def active(settings: ISA, source: SourceData, stage: str) -> bool:
    """Whether FDA translates the source images of ``stage`` on the fly: a
    directory of translated images (data.source.translated_root), where given, takes its place."""
    return settings.probability > 0 and in_stage(settings, stage) and source.translated_root is None


def draw(seed: int, probability: float, targets: int) -> Optional[int]:
    """The target image a sample with augmentation ``seed`` is translated
    with, or None when it is not translated (its own stream: the
    augmentation's draws are not touched)."""
    generator = torch.Generator().manual_seed(stream_seed(seed, "isa"))
    translated = float(torch.rand((), generator=generator)) < probability
    index = int(torch.randint(targets, (), generator=generator))
    return index if translated else None


class TranslatableSamples(Dataset):
    """:class:`AugmentedSamples` plus, per sample, ``isa`` (whether to
    translate it) and ``isa_target`` (the drawn target image resized to the
    sample's image; zeros when not drawn)."""

    def __init__(self, samples: AugmentedSamples, targets: Dataset, probability: float):
        self.samples, self.targets, self.probability = samples, targets, probability

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        sample = self.samples[key]
        image = sample["image"]
        index = draw(key[1], self.probability, len(self.targets))
        target = (torch.zeros_like(image) if index is None
                  else resize_pair(self.targets[index]["image"], None, tuple(image.shape[-2:]))[0])
        return {**sample, "isa": torch.tensor(index is not None), "isa_target": target}


def samples(data: Data, settings: ISA, stage: str) -> Dataset:
    """The augmented source samples of ``stage``: with the translated images
    beside the originals, or wrapped for FDA when :func:`active`."""
    source = AugmentedSamples(source_dataset(data, translated=in_stage(settings, stage)),
                              train_transform(data, "source"))
    if not active(settings, data.source, stage):
        return source
    return TranslatableSamples(source, target_dataset(data, "train", with_labels=False), settings.probability)


def fda_normalised(images: Tensor, targets: Tensor, beta: float, normalization: ImageNormalization) -> Tensor:
    """FDA of normalised (N, 3, H, W) ``images`` towards normalised
    ``targets``, run on ``x * std + mean`` (the image times the
    normalisation's scale, which FDA commutes with), not on the
    mean-subtracted tensors (docs/method.md §6)."""
    mean = torch.tensor(normalization.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    translated = fourier_domain_adaptation(images * std + mean, targets * std + mean, beta)
    return ((translated - mean) / std).to(images.dtype)


def translate_batch(batch: Dict, beta: float, normalization: ImageNormalization) -> Dict:
    """The batch with each image flagged ``isa`` replaced by its FDA with
    ``isa_target``, on their device."""
    image = batch["image"]
    translated = fda_normalised(image, batch["isa_target"], beta, normalization)
    return {**batch, "image": torch.where(batch["isa"].view(-1, 1, 1, 1), translated, image)}


class SourceLook(Dataset):
    """Target images in the source's look for the pseudo-label pass
    (``pseudo_labels.isa``, docs/method.md §6): each image translated by FDA
    (beta = isa.fda_beta) towards a source training image drawn from the
    image's name and the run's seed, so both passes of a round and every
    rank see the same image; labels untouched."""

    def __init__(self, data: Data, seed: int, beta: float, targets: Dataset):
        self.targets, self.sources = targets, source_dataset(data)
        self.items = targets.items
        self.seed, self.beta, self.normalization = seed, beta, normalization(data)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Dict:
        sample = self.targets[index]
        image = sample["image"]
        source = self.sources[pairing_index(self.seed, sample["name"], len(self.sources), "source look")]["image"]
        source = resize_pair(source, None, tuple(image.shape[-2:]))[0]
        return {**sample, "image": fda_normalised(image[None], source[None], self.beta, self.normalization)[0]}


def pseudo_label_images(settings: Settings, targets: Dataset) -> Dataset:
    """The target images the pseudo-label pass predicts on: in the source's
    look with ``pseudo_labels.isa``, else as they are."""
    if not settings.pseudo_labels.isa:
        return targets
    return SourceLook(settings.data, settings.seed, settings.isa.fda_beta, targets)


def pairing_index(seed: int, name: str, count: int, stream: str = "translate") -> int:
    """The image (of ``count``) paired with image ``name``: the target image
    that ``drsl data translate`` translates source image ``name`` towards, or
    (``stream`` 'source look') the source image of :class:`SourceLook`."""
    generator = torch.Generator().manual_seed(stream_seed(seed, stream, name))
    return int(torch.randint(count, (), generator=generator))


def rgb_tensor(path: str) -> Tensor:
    """(1, 3, H, W) float32 RGB in 0-255."""
    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1)[None].float()


def translate_to_disk(data: Data, seed: int, beta: float, out: str) -> int:
    """Writes every source training image (without data.source.translated_root)
    translated with FDA (beta = isa.fda_beta) towards its paired target
    training image, to ``out`` under the same relative name and format
    (uint8, clipped to [0, 255]); returns how many."""
    items = source_dataset(data).items
    targets = target_dataset(data, "train", with_labels=False).items
    bar = progress(len(items), "drsl data translate", to_stderr)
    for item in items:
        target = targets[pairing_index(seed, item.name, len(targets))]
        image = fourier_domain_adaptation(rgb_tensor(item.image), rgb_tensor(target.image), beta)
        pixels = image[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
        path = os.path.join(out, item.name)
        jpeg = os.path.splitext(path)[1].lower() in (".jpg", ".jpeg")
        with atomic_write(path) as temporary:
            Image.fromarray(np.ascontiguousarray(pixels)).save(temporary, **(
                {"format": "JPEG", "quality": 95} if jpeg else {"format": "PNG"}))
        bar.update(1)
    bar.close()
    return len(items)
