"""Stage 2: class-balanced pseudo-labels for every target training image
(docs/method.md §5) with the streaming per-class histograms of
:class:`~drsl_fast.pseudo_labels.ClassBalancedThresholds`.

Two passes over the target set: the first accumulates the histograms (summed
over DDP ranks, so every rank gets the same thresholds), the second selects
labels and writes them as uint8 PNGs. No probability map is kept in memory or
on disk beyond the image at hand. With ``pseudo_labels.tta`` both passes use
the probabilities averaged over the test-time augmentation views
(docs/method.md §9), which the histograms and thresholds take unchanged.
Where the target training images have ground truth, the round's pseudo-label
accuracy and coverage are measured.
"""
import json
import math
import os
from typing import Dict

import torch

from drsl_fast.data import CITYSCAPES_CLASSES, SYNTHIA_CLASSES
from drsl_fast.pseudo_labels import ClassBalancedThresholds, portion_for_round, select_labels

from . import isa
from .checkpoint import atomic_write_json
from .data import DRY_RUN_IMAGES, has_labels, missing_files, pseudo_label_path, target_dataset, write_label_png
from .inference import batches, class_probabilities, views
from .log import RunLog
from .network import DRSLNetwork
from .runtime import Runtime, nvtx_range
from .settings import PseudoLabels, Settings

SUMMARY = "pseudo_labels.json"
DIRECTORY = "pseudo_labels"


def class_names(num_classes: int):
    return CITYSCAPES_CLASSES if num_classes == 19 else SYNTHIA_CLASSES


def round_portion(settings: PseudoLabels, round_index: int) -> float:
    """The portion of pixels per class labelled in round ``round_index`` (docs/method.md §5)."""
    return portion_for_round(round_index, settings.portion_start, settings.portion_step, settings.portion_max)


def make_pseudo_labels(runtime: Runtime, settings: Settings, network: DRSLNetwork, round_dir: str, round_index: int,
                       log: RunLog, need_files: bool = True) -> Dict:
    """Writes ``round_dir/pseudo_labels/*.png`` and ``round_dir/pseudo_labels.json``
    (portion, thresholds, pixel counts, accuracy); returns the summary. A
    finished pass (summary present) is not redone, unless ``need_files`` and
    some of its PNGs are missing (the pass is deterministic, so it writes the
    same labels again)."""
    summary_path = os.path.join(round_dir, SUMMARY)
    out_dir = os.path.join(round_dir, DIRECTORY)
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as handle:
            summary = json.load(handle)
        if not need_files:
            return summary
        labelled = target_dataset(settings.data, "train", with_labels=False).items[:summary["images"]]
        missing = missing_files([pseudo_label_path(out_dir, item.name) for item in labelled])
        if not missing:
            return summary
        log.info(f"{os.path.relpath(round_dir, settings.output_dir)}: {missing} pseudo-label files are missing; "
                 f"writing them again")
    data, labels_settings, inference = settings.data, settings.pseudo_labels, settings.inference
    num_classes = data.num_classes
    with_labels = has_labels(data.target.root, data.target.train_split)
    dataset = isa.pseudo_label_images(settings, target_dataset(data, "train", with_labels=with_labels))
    limit = DRY_RUN_IMAGES if settings.dry_run else None
    os.makedirs(out_dir, exist_ok=True)
    size = data.target_size
    network.to(runtime.device).eval()
    state = ClassBalancedThresholds(num_classes, runtime.device, labels_settings.mantissa_bits)
    portion = round_portion(labels_settings, round_index)
    name = os.path.relpath(round_dir, settings.output_dir)
    tta = labels_settings.tta

    with nvtx_range(f"{name}/pseudo_labels/histograms"):
        bar = log.bar(len(dataset) if limit is None else limit, 0, f"{name} confidences")
        for batch in batches(dataset, size, runtime, data, limit):
            images = batch["image"].to(runtime.device)
            probs = class_probabilities(network, images, batch["size"][0], runtime, inference, tta)
            state.update(probs)
            bar.update(runtime.world * len(batch["name"]))
        bar.close()
    if runtime.distributed:
        state.all_reduce()
    thresholds = state.thresholds(portion)

    # selected, correct (of the selected pixels with ground truth), labelled ground-truth pixels
    counts = torch.zeros(4, dtype=torch.int64, device=runtime.device)
    with nvtx_range(f"{name}/pseudo_labels/select"):
        bar = log.bar(len(dataset) if limit is None else limit, 0, f"{name} pseudo-labels")
        for batch in batches(dataset, size, runtime, data, limit):
            images = batch["image"].to(runtime.device)
            probs = class_probabilities(network, images, batch["size"][0], runtime, inference, tta)
            labels = select_labels(probs, thresholds)
            selected = labels != 255
            counts[0] += selected.sum()
            counts[3] += labels.numel()
            if "label" in batch:
                truth = batch["label"].to(runtime.device)
                known = truth != 255
                counts[1] += (selected & known & (labels.long() == truth)).sum()
                counts[2] += (selected & known).sum()
            for item_name, label in zip(batch["name"], labels.cpu().numpy()):
                write_label_png(pseudo_label_path(out_dir, item_name), label)
            bar.update(runtime.world * len(batch["name"]))
        bar.close()
    runtime.all_reduce_sum(counts)
    selected, correct, known, pixels = counts.tolist()
    names = class_names(num_classes)
    summary = {
        "round": round_index + 1,
        "portion": portion,
        "images": len(dataset) if limit is None else min(limit, len(dataset)),
        "thresholds": {names[c]: (t if math.isfinite(t) else None) for c, t in enumerate(thresholds.tolist())},
        "predicted_pixels": {names[c]: int(n) for c, n in enumerate(state.pixels_per_class().tolist())},
        "coverage": selected / max(pixels, 1),
        "accuracy": correct / known if with_labels and known else None,
    }
    if tta:
        summary["tta"] = views(inference, tta)
    if runtime.is_main:
        atomic_write_json(summary, summary_path)
    runtime.barrier()
    accuracy = f", accuracy {100 * summary['accuracy']:.1f} %" if summary["accuracy"] is not None else ""
    log.info(f"{name}: pseudo-labels at portion {portion:.2f}: coverage {100 * summary['coverage']:.1f} %{accuracy}")
    return summary
