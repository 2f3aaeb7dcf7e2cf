"""Pictures of a run: colour-coded label maps (Cityscapes palette by train
id), side-by-side panels (image / ground truth / predictions) and the plot of
mIoU and pseudo-label accuracy per round."""
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from drsl_fast.data.labels import DROPPED_19_TO_16

# Cityscapes colours of the 19 train ids (cityscapesscripts' definitions).
TRAIN_ID_COLOURS = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)  # fmt: skip
IGNORE_COLOUR = (0, 0, 0)
TITLE_HEIGHT = 14


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8: class ids of a 19- or 16-class label map to colours, 255 to black."""
    if num_classes == 19:
        colours = TRAIN_ID_COLOURS
    elif num_classes == 16:
        colours = np.delete(TRAIN_ID_COLOURS, DROPPED_19_TO_16, axis=0)
    else:
        raise ValueError(f"palette: 19 or 16 classes, got {num_classes}")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = IGNORE_COLOUR
    table[: len(colours)] = colours
    return table


def colourize(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB."""
    return palette(num_classes)[label.astype(np.uint8)]


def save_colour_label(path: str, label: np.ndarray, num_classes: int) -> None:
    """A palette PNG: the pixel values stay the class ids, viewers show colours."""
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(palette(num_classes).reshape(-1).tolist())
    image.save(path)


def panel(columns: Sequence[Tuple[str, np.ndarray]]) -> Image.Image:
    """Titled RGB images (same size) side by side, 4 px apart."""
    height, width = columns[0][1].shape[:2]
    gap = 4
    canvas = Image.new("RGB", (len(columns) * (width + gap) - gap, height + TITLE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (title, rgb) in enumerate(columns):
        x = i * (width + gap)
        draw.text((x + 2, 1), title, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(rgb), (x, TITLE_HEIGHT))
    return canvas


def plot_rounds(results: Dict, path: str) -> Optional[str]:
    """mIoU on target val and pseudo-label accuracy per round, one line per
    method, with the source-only mIoU as a dashed line (a row without
    rounds, such as source + ISA, as a dotted one). Needs matplotlib;
    returns None (nothing written) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    source = results.get("source_only", {}).get("miou")
    for method, rounds in results.get("methods", {}).items():
        if rounds and rounds[0]["round"] is None:  # a row without rounds (source + ISA)
            left.axhline(rounds[0]["miou"], linestyle=":", color="black", label=method)
            continue
        xs = [r["round"] for r in rounds]
        left.plot([0] + xs, [source] + [r["miou"] for r in rounds], marker="o", label=method)
        accuracy = [(r["round"], r["pseudo_label_accuracy"]) for r in rounds if r.get("pseudo_label_accuracy") is not None]
        if accuracy:
            right.plot(*zip(*accuracy), marker="o", label=method)
    if source is not None:
        left.axhline(source, linestyle="--", color="grey", label="source only")
    left.set(xlabel="round", ylabel="mIoU on target val (%)", title="Adaptation")
    right.set(xlabel="round (pseudo-labels made at its start)", ylabel="pseudo-label accuracy (%)",
              title="Pseudo-labels")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_panels(directory: str, rows: List[Dict], num_classes: int) -> List[str]:
    """One PNG per row: {'name', 'image' (H, W, 3), 'label' or None, 'predictions': {title: (H, W)}}."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for row in rows:
        columns = [("image", row["image"])]
        if row.get("label") is not None:
            columns.append(("ground truth", colourize(row["label"], num_classes)))
        columns += [(title, colourize(pred, num_classes)) for title, pred in row["predictions"].items()]
        path = os.path.join(directory, row["name"].replace("/", "__").replace(".png", "") + "_panel.png")
        panel(columns).save(path)
        paths.append(path)
    return paths
