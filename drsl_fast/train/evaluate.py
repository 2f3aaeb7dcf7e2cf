"""Stage 4: evaluation on the target val split (docs/method.md §9): per-class IoU
table in the paper's column order, mIoU (and mIoU* for SYNTHIA's 13 classes),
colour-coded predictions and side-by-side panels. With ``evaluation.tta`` the
reports with test-time augmentation (``inference.*``) come beside the
single-scale ones."""
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from drsl_fast.data.io import read_rgb
from drsl_fast.evaluation import ConfusionMatrix, Report, report

from .checkpoint import atomic_write_json
from .data import DRY_RUN_IMAGES, ResizedImages, target_dataset
from .inference import batches, class_probabilities, views
from .log import RunLog
from .network import DRSLNetwork
from .runtime import Runtime, nvtx_range
from .settings import Data, Settings
from .visualize import save_colour_label, save_panels

TTA_EVALUATION = "evaluation_tta.json"  # beside evaluation.json, with evaluation.tta


def protocols(data: Data) -> List[str]:
    """The reports of a run: 19 classes, or 16 and 13 (mIoU*) for SYNTHIA (docs/method.md §9)."""
    return ["19"] if data.num_classes == 19 else ["16", "13"]


def main_protocol(data: Data) -> str:
    """The report whose mIoU the tables and plots show (19, or 16 for SYNTHIA)."""
    return protocols(data)[0]


def evaluate(runtime: Runtime, settings: Settings, network: DRSLNetwork, log: RunLog, title: str,
             split: str = "val", tta: bool = False) -> Dict[str, Report]:
    """Reports of ``network`` on the target val split, or on the labelled
    target training images with ``split='train'`` (all ranks get them); with
    ``tta`` from the probabilities averaged over the TTA views."""
    data = settings.data
    dataset = target_dataset(data, split, with_labels=True)
    limit = DRY_RUN_IMAGES if settings.dry_run else settings.evaluation.max_images
    network.to(runtime.device).eval()
    confusion = ConfusionMatrix(data.num_classes, runtime.device, align_corners=False)
    with nvtx_range(f"evaluate/{title}"):
        total = len(dataset) if limit is None else min(limit, len(dataset))
        bar = log.bar(total, 0, f"evaluate {title}" + (" with TTA" if tta else ""))
        for batch in batches(dataset, data.target_size, runtime, data, limit):
            images = batch["image"].to(runtime.device)
            probs = class_probabilities(network, images, batch["size"][0], runtime, settings.inference, tta)
            confusion.update(probs, batch["label"])
            bar.update(runtime.world * len(batch["name"]))
        bar.close()
    if runtime.distributed:
        confusion.all_reduce()
    return {protocol: report(confusion, protocol) for protocol in protocols(data)}


@torch.no_grad()
def predictions(runtime: Runtime, settings: Settings, network: DRSLNetwork, indices: List[int]
                ) -> Dict[int, np.ndarray]:
    """Argmax maps (at the label size) of some val images."""
    data = settings.data
    images = ResizedImages(target_dataset(data, "val", with_labels=True), data.target_size, indices)
    network.to(runtime.device).eval()
    out = {}
    for sample in images:
        probs = class_probabilities(network, sample["image"][None].to(runtime.device), sample["size"].tolist(), runtime,
                                    settings.inference)
        out[sample["index"]] = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
    return out


def write_pictures(runtime: Runtime, settings: Settings, networks: Dict[str, DRSLNetwork], directory: str,
                   count: Optional[int] = None) -> List[str]:
    """Panels image / ground truth / one prediction per network for the first
    ``evaluation.panels`` val images, plus each prediction as a palette PNG."""
    count = settings.evaluation.panels if count is None else count
    if not runtime.is_main or count <= 0:
        return []
    dataset = target_dataset(settings.data, "val", with_labels=True)
    indices = list(range(min(count, len(dataset))))
    num_classes = settings.data.num_classes
    per_network = {title: predictions(runtime, settings, net, indices) for title, net in networks.items()}
    rows = []
    for index in indices:
        item = dataset.items[index]
        label = dataset[index]["label"].numpy()
        preds = {title: per_network[title][index] for title in networks}
        for title, pred in preds.items():
            folder = os.path.join(directory, "predictions", title.replace(" ", "_").replace("+", "_plus"))
            os.makedirs(folder, exist_ok=True)
            save_colour_label(os.path.join(folder, item.name.replace("/", "__")), pred, num_classes)
        rows.append({"name": item.name, "image": read_rgb(item.image), "label": label, "predictions": preds})
    return save_panels(os.path.join(directory, "panels"), rows, num_classes)


def evaluated(runtime: Runtime, settings: Settings, network: DRSLNetwork, directory: str, title: str,
              log: RunLog) -> Dict:
    """The evaluation of a finished stage, cached in ``directory/evaluation.json``;
    with ``evaluation.tta`` also its TTA evaluation, in ``evaluation_tta.json``."""
    result = cached_evaluation(runtime, settings, network, os.path.join(directory, "evaluation.json"), title, log)
    if settings.evaluation.tta:
        with_tta = cached_evaluation(runtime, settings, network, os.path.join(directory, TTA_EVALUATION), title, log,
                                     tta=True)
        protocol = main_protocol(settings.data)
        log.info(f"{title}: mIoU {result[protocol]['miou']:.1f} single-scale, {with_tta[protocol]['miou']:.1f} "
                 f"with TTA {with_tta['views']}")
    return result


def summary(reports: Dict[str, Report]) -> Dict:
    """Strict-JSON form of reports: per protocol its mIoU, per-class IoUs (%) and table."""
    return {protocol: {"miou": 100 * r.miou, "classes": dict(zip(r.names, [100 * v for v in r.iou])),
                       "markdown": r.markdown()} for protocol, r in reports.items()}


def cached_evaluation(runtime: Runtime, settings: Settings, network: DRSLNetwork, path: str, title: str, log: RunLog,
                      tta: bool = False) -> Dict:
    """:func:`summary` of :func:`evaluate`, read from ``path`` when it is there
    (for ``tta``: when it was made with the current views)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
        if not tta or cached.get("views") == views(settings.inference, tta):
            return cached
    result = summary(evaluate(runtime, settings, network, log, title, tta=tta))
    if tta:
        result["views"] = views(settings.inference, tta)
    if runtime.is_main:
        atomic_write_json(result, path)
    runtime.barrier()
    return result
