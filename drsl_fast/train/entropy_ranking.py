"""IntraDA stage 2 (docs/method.md §7): entropy ranking of the target training images
and the easy split's pseudo-labels.

One pass of the inter-domain model over the target training set (sharded over
DDP ranks): per image, the logits upsampled to the image size go through the
fused :func:`~drsl_fast.ops.entropy_map` (its ``image_score`` is the mean of
the entropy map over C, H, W) and their argmax is the pseudo-label. The scores
(optionally normalised by the rare classes predicted) are ranked with
:func:`drsl_fast.ranking.rank_easy_hard`: the first ``floor(lambda N)`` images
are the easy split. Outputs in the ranking directory:

- ``easy_split.txt`` / ``hard_split.txt``: image names, easiest first;
- ``scores.json``: per image its score, rare-class count, normalised score and split;
- ``pseudo_labels/<name>.png``: uint8 argmax of every easy image (no
  threshold), and ``pseudo_labels_colour/<name>.png`` the same as palette PNGs;
- ``ranking.json``: the summary (counts, lambda, normalisation, and the
  pseudo-label accuracy where the target training images have ground truth).

Rare classes are docs/method.md §7's Cityscapes train ids; for the 16-class SYNTHIA
protocol they are mapped to the 16-class ids (terrain, truck and train are
not among the 16), and the normalisation divides by their count (8).
"""
import json
import os
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from drsl_fast.data.labels import TRAIN_19_TO_16
from drsl_fast.ops.entropy import entropy_map
from drsl_fast.ranking import RARE_CLASSES, rank_easy_hard, rare_classes_present

from .checkpoint import atomic_write_json
from .data import DRY_RUN_IMAGES, has_labels, missing_files, pseudo_label_path, target_dataset, write_label_png
from .inference import batches
from .log import RunLog
from .network import DRSLNetwork
from .runtime import Runtime, nvtx_range
from .settings import Settings
from .visualize import save_colour_label

SUMMARY = "ranking.json"
PSEUDO_LABELS = "pseudo_labels"
COLOUR_PSEUDO_LABELS = "pseudo_labels_colour"
EASY_SPLIT, HARD_SPLIT, SCORES = "easy_split.txt", "hard_split.txt", "scores.json"


def rare_classes(num_classes: int) -> Tuple[int, ...]:
    """docs/method.md §7's rare classes in the ids of a 19- or 16-class run."""
    if num_classes == 19:
        return RARE_CLASSES
    mapped = tuple(TRAIN_19_TO_16[c] for c in RARE_CLASSES if TRAIN_19_TO_16[c] != 255)
    return mapped


@torch.no_grad()
def upsampled_logits(network: DRSLNetwork, images: torch.Tensor, size, runtime: Runtime) -> torch.Tensor:
    """Main-classifier logits upsampled bilinearly to ``size``, fp32."""
    with runtime.autocast():
        logits = network.segmenter(images).logits
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def read_split(path: str) -> List[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def rank_target(runtime: Runtime, settings: Settings, network: DRSLNetwork, directory: str, log: RunLog) -> Dict:
    """Writes the split files, scores and easy pseudo-labels into
    ``directory``; returns the summary. A finished ranking (summary present)
    is not redone."""
    summary_path = os.path.join(directory, SUMMARY)
    intrada, data = settings.intrada, settings.data
    num_classes = data.num_classes
    label_dir, colour_dir = os.path.join(directory, PSEUDO_LABELS), os.path.join(directory, COLOUR_PSEUDO_LABELS)
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as handle:
            summary = json.load(handle)
        easy_path = os.path.join(directory, EASY_SPLIT)
        easy = read_split(easy_path) if os.path.isfile(easy_path) else []
        missing = missing_files([easy_path] + [pseudo_label_path(label_dir, name) for name in easy])
        if not missing:
            return summary
        log.info(f"intrada ranking: {missing} of its files are missing; ranking again")
    os.makedirs(label_dir, exist_ok=True)
    os.makedirs(colour_dir, exist_ok=True)
    with_labels = has_labels(data.target.root, data.target.train_split)
    dataset = target_dataset(data, "train", with_labels=with_labels)
    limit = DRY_RUN_IMAGES if settings.dry_run else None
    count = len(dataset) if limit is None else min(limit, len(dataset))
    rare_ids = rare_classes(num_classes)
    device = runtime.device
    # per image: score, rare classes present, correct and known ground-truth pixels of the argmax
    scores = torch.zeros(count, dtype=torch.float64, device=device)
    rare = torch.zeros(count, dtype=torch.int64, device=device)
    agreement = torch.zeros(count, 2, dtype=torch.int64, device=device)
    network.to(device).eval()
    with nvtx_range("intrada/ranking"):
        bar = log.bar(count, 0, "intrada ranking")
        for batch in batches(dataset, data.target_size, runtime, data, limit):
            logits = upsampled_logits(network, batch["image"].to(device), batch["size"][0], runtime)
            index = batch["index"].to(device)
            scores[index] = entropy_map(logits, with_map=False).image_score.double()
            labels = logits.argmax(1)
            rare[index] = rare_classes_present(labels, rare_ids)
            if "label" in batch:
                truth = batch["label"].to(device)
                known = truth != 255
                agreement[index, 0] = ((labels == truth) & known).flatten(1).sum(1)
                agreement[index, 1] = known.flatten(1).sum(1)
            for name, label in zip(batch["name"], labels.to(torch.uint8).cpu().numpy()):
                write_label_png(pseudo_label_path(label_dir, name), label)
            bar.update(runtime.world * len(batch["name"]))
        bar.close()
    for tensor in (scores, rare, agreement):  # each rank filled its own images, zeros elsewhere
        runtime.all_reduce_sum(tensor)
    split = rank_easy_hard(scores, intrada.lambda_, rare if intrada.normalize else None, len(rare_ids))
    easy, hard = split.easy.tolist(), split.hard.tolist()
    names = [item.name for item in dataset.items[:count]]
    correct, known = agreement[easy].sum(0).tolist() if easy else (0, 0)
    summary = {
        "images": count, "easy": len(easy), "hard": len(hard), "lambda": intrada.lambda_,
        "normalize": bool(intrada.normalize), "rare_classes": list(rare_ids),
        "pseudo_label_accuracy": correct / known if with_labels and known else None,
        "mean_score_easy": float(split.scores[easy].mean()) if easy else None,
        "mean_score_hard": float(split.scores[hard].mean()) if hard else None,
    }
    if runtime.is_main:
        write_outputs(directory, names, easy, hard, scores, rare, split.scores, num_classes)
        atomic_write_json(summary, summary_path)
    runtime.barrier()
    accuracy = summary["pseudo_label_accuracy"]
    log.info(f"intrada ranking: {len(easy)} easy / {len(hard)} hard images (lambda {intrada.lambda_}, "
             f"normalise {summary['normalize']})"
             + (f", easy pseudo-label accuracy {100 * accuracy:.1f} %" if accuracy is not None else ""))
    return summary


def write_outputs(directory: str, names: List[str], easy: List[int], hard: List[int], scores: torch.Tensor,
                  rare: torch.Tensor, ranked_scores: torch.Tensor, num_classes: int) -> None:
    """Split files, scores.json, and the easy split's colour pseudo-labels;
    the hard images' argmax PNGs are removed (only the easy split is labelled)."""
    for filename, indices in ((EASY_SPLIT, easy), (HARD_SPLIT, hard)):
        with open(os.path.join(directory, filename), "w", encoding="utf-8") as handle:
            handle.writelines(names[i] + "\n" for i in indices)
    in_easy = set(easy)
    records = [{"name": names[i], "score": float(scores[i]), "rare_classes": int(rare[i]),
                "ranked_score": float(ranked_scores[i]), "split": "easy" if i in in_easy else "hard"}
               for i in range(len(names))]
    atomic_write_json(records, os.path.join(directory, SCORES))
    label_dir, colour_dir = os.path.join(directory, PSEUDO_LABELS), os.path.join(directory, COLOUR_PSEUDO_LABELS)
    for i in hard:
        path = pseudo_label_path(label_dir, names[i])
        if os.path.exists(path):
            os.remove(path)
    for i in easy:
        label = np.array(read_label(pseudo_label_path(label_dir, names[i])))
        save_colour_label(pseudo_label_path(colour_dir, names[i]), label, num_classes)


def read_label(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image)
