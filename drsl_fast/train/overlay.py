"""Pictures of a prediction for ``drsl predict``: the image blended with the
Cityscapes colours of its predicted classes, beside a legend of the classes
present (colour, name, share of the pixels), and grey maps of per-pixel
confidence or entropy."""
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .visualize import colourize, palette

LINE = 13          # legend row height, px
SWATCH = 10
PADDING = 4
BACKGROUND = (255, 255, 255)


def blend(image: np.ndarray, label: np.ndarray, num_classes: int, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8: ``(1 - alpha) * image + alpha * colour(label)``, rounded."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colourize(label, num_classes).astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def legend_rows(label: np.ndarray, names: Sequence[str]) -> list:
    """(class id, 'name NN %') of the classes present, in train-id order."""
    counts = np.bincount(label.reshape(-1), minlength=256)
    total = max(int(counts[: len(names)].sum()), 1)
    return [(c, f"{names[c]} {100 * counts[c] / total:.0f} %") for c in range(len(names)) if counts[c]]


def overlay(image: np.ndarray, label: np.ndarray, names: Sequence[str], alpha: float) -> Image.Image:
    """The blended image with the legend of the classes present on its right
    (the canvas grows below the image when the legend is taller)."""
    rows = legend_rows(label, names)
    colours = palette(len(names))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(text)) for _, text in rows)
    height, width = label.shape
    legend_width = PADDING + SWATCH + PADDING + text_width + PADDING
    canvas = Image.new("RGB", (width + legend_width, max(height, PADDING + LINE * len(rows))), BACKGROUND)
    canvas.paste(Image.fromarray(blend(image, label, len(names), alpha)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (class_id, text) in enumerate(rows):
        top = PADDING + row * LINE
        left = width + PADDING
        draw.rectangle([left, top, left + SWATCH - 1, top + SWATCH - 1], fill=tuple(int(v) for v in colours[class_id]),
                       outline=(0, 0, 0))
        draw.text((left + SWATCH + PADDING, top - 1), text, fill=(0, 0, 0))
    return canvas


def grey(values: np.ndarray) -> Image.Image:
    """(H, W) values in [0, 1] as an 8-bit grey image (255 = 1)."""
    return Image.fromarray(np.clip(np.rint(values * 255), 0, 255).astype(np.uint8))
