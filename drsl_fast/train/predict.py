"""``drsl predict``: a trained model on one's own images (docs/method.md §9).

Each image is predicted at ``data.target_size`` (``predict.resize``, as
evaluation does) or at its own size, over the TTA views of ``inference.*``
with ``predict.tta``, in sliding windows where ``inference.window`` is set;
the probabilities are upsampled to the image's own size. Images of one size go
through the network in batches of ``data.eval_batch_size``. For every image
``--out`` gets ``labels/<name>.png`` (uint8 train ids), ``colour/<name>.png``
(Cityscapes colours), ``overlay/<name>.png`` (the image blended with the
colours, with a legend of the classes present) and, with ``predict.map``,
``confidence/`` or ``entropy/<name>.png`` (grey, 255 = 1; entropy normalised
by log C as in §7). An unreadable image is reported in one line and skipped.
"""
import os
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from drsl_fast.data import CITYSCAPES_CLASSES, SYNTHIA_CLASSES, UnreadableFileError
from drsl_fast.data.io import read_rgb
from drsl_fast.ops import entropy_map

from .checkpoint import atomic_write
from .data import normalization
from .inference import class_probabilities, views
from .log import progress, to_stderr
from .model_file import load_model_file
from .overlay import grey, overlay
from .predict_inputs import InputImage, find_images
from .runtime import start, stop
from .schema import ConfigError, shown
from .settings import Data, Predict, Settings
from .visualize import colourize

SMALLEST_PROBABILITY = 1e-30  # log of a zero probability, for the entropy map


class Loaded(NamedTuple):
    image: InputImage
    rgb: np.ndarray  # (H, W, 3) uint8


def readable(images: Sequence[InputImage], skipped: Callable[[InputImage, str], None]) -> Iterator[Loaded]:
    """The images that can be read; ``skipped(image, reason)`` for the others."""
    for image in images:
        try:
            yield Loaded(image, read_rgb(image.path))
        except UnreadableFileError as exc:
            skipped(image, " ".join(str(exc).split()))


def same_size_batches(loaded: Iterable[Loaded], batch_size: int) -> Iterator[List[Loaded]]:
    """Batches of images of one size: a batch leaves when it is full, the rest at the end."""
    pending: Dict[Tuple[int, int], List[Loaded]] = {}
    for item in loaded:
        size = item.rgb.shape[:2]
        pending.setdefault(size, []).append(item)
        if len(pending[size]) == batch_size:
            yield pending.pop(size)
    yield from pending.values()


def network_input(batch: List[Loaded], data: Data, resize: bool) -> torch.Tensor:
    """The normalised images (B, 3, H, W), scaled to data.target_size with ``resize`` (predict.resize)."""
    images = torch.stack([normalization(data)(item.rgb) for item in batch])
    size = tuple(data.target_size)
    if resize and tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images


def pixel_map(probs: torch.Tensor, kind: str) -> Optional[np.ndarray]:
    """(H, W) confidence (the top probability) or normalised entropy of (C, H, W) probabilities."""
    if kind == "confidence":
        return probs.max(0).values.cpu().numpy()
    if kind == "entropy":
        logits = probs.clamp_min(SMALLEST_PROBABILITY).log()[None]  # softmax of log p is p
        return entropy_map(logits, with_map=False).pixel_entropy[0].cpu().numpy()
    return None


def save_png(picture: Image.Image, path: str) -> None:
    with atomic_write(path) as temporary:
        picture.save(temporary, format="PNG")


def write_outputs(out: str, item: Loaded, probs: torch.Tensor, settings: Predict) -> None:
    """The PNGs of one image from its (C, H, W) probabilities."""
    num_classes = probs.shape[0]
    names = CITYSCAPES_CLASSES if num_classes == 19 else SYNTHIA_CLASSES
    label = probs.argmax(0).to(torch.uint8).cpu().numpy()
    file_name = item.image.name + ".png"
    save_png(Image.fromarray(label), os.path.join(out, "labels", file_name))
    save_png(Image.fromarray(colourize(label, num_classes)), os.path.join(out, "colour", file_name))
    save_png(overlay(item.rgb, label, names, settings.overlay_alpha), os.path.join(out, "overlay", file_name))
    kind = settings.map
    values = pixel_map(probs, kind)
    if values is not None:
        save_png(grey(values), os.path.join(out, kind, file_name))


def check_arguments(weights: str, arguments: Sequence[str], out: str) -> None:
    if not arguments:
        raise ConfigError("INPUT: expected at least one image file, folder or glob pattern")
    if not os.path.isfile(weights):
        raise ConfigError(f"--weights: expected an existing file, got {shown(weights)}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out: expected a directory, not a file, got {shown(out)}")


def predict(config: Dict, weights: str, arguments: Sequence[str], out: str) -> int:
    """Runs the model file ``weights`` on the images of ``arguments`` and writes
    the PNGs under ``out``; returns 0, or 1 when some images were skipped."""
    check_arguments(weights, arguments, out)
    images = find_images(arguments)
    given = Settings.of(config)
    runtime = start(given.device, given.train)
    try:
        network, config, origin = load_model_file(config, weights)
        settings = Settings.of(config)
        network.to(runtime.device).eval()
        tta, window = settings.predict.tta, settings.inference.window
        print(f"drsl predict: {len(images)} images, model {weights} (settings from {origin}), {runtime.device}, "
              f"views {views(settings.inference, tta)}, window {list(window) if window else window}", flush=True)
        skipped: List[str] = []

        def skip(image: InputImage, reason: str) -> None:
            skipped.append(image.path)
            tqdm.write(f"drsl predict: {reason}; skipped", file=sys.stderr)

        bar = progress(len(images), "predict", to_stderr if settings.train.progress else None)
        began = time.perf_counter()
        for batch in same_size_batches(readable(images, skip), settings.data.eval_batch_size):
            images_in = network_input(batch, settings.data, settings.predict.resize).to(runtime.device)
            probs = class_probabilities(network, images_in, batch[0].rgb.shape[:2], runtime, settings.inference, tta)
            for item, item_probs in zip(batch, probs):
                write_outputs(out, item, item_probs, settings.predict)
            bar.update(len(batch))
        bar.update(len(skipped))
        bar.close()
        elapsed = time.perf_counter() - began
        done = len(images) - len(skipped)
        print(f"drsl predict: {done} images in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f} images/s) written to "
              f"{out}" + (f"; {len(skipped)} unreadable skipped" if skipped else ""), flush=True)
        return 1 if skipped else 0
    finally:
        stop(runtime)
