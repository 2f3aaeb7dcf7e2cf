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
from .visualize import save_colour_label, save_panels

TTA_EVALUATION = "evaluation_tta.json"  # beside evaluation.json, with evaluation.tta


def protocols(config: Dict) -> List[str]:
    """The reports of a run: 19 classes, or 16 and 13 (mIoU*) for SYNTHIA."""
    return ["19"] if config["data"]["num_classes"] == 19 else ["16", "13"]


def main_protocol(config: Dict) -> str:
    """The report whose mIoU the tables and plots show (19, or 16 for SYNTHIA)."""
    return protocols(config)[0]


def evaluate(runtime: Runtime, config: Dict, network: DRSLNetwork, log: RunLog, title: str,
             split: str = "val", tta: bool = False) -> Dict[str, Report]:
    """Reports of ``network`` on the target val split, or on the labelled
    target training images with ``split='train'`` (all ranks get them); with
    ``tta`` from the probabilities averaged over the TTA views."""
    dataset = target_dataset(config, split, with_labels=True)
    limit = DRY_RUN_IMAGES if config["dry_run"] else config["evaluation"]["max_images"]
    network.to(runtime.device).eval()
    confusion = ConfusionMatrix(config["data"]["num_classes"], runtime.device, align_corners=False)
    with nvtx_range(f"evaluate/{title}"):
        total = len(dataset) if limit is None else min(limit, len(dataset))
        bar = log.bar(total, 0, f"evaluate {title}" + (" with TTA" if tta else ""))
        for batch in batches(dataset, config["data"]["target_size"], runtime, config, limit):
            images = batch["image"].to(runtime.device)
            probs = class_probabilities(network, images, batch["size"][0], runtime, config, tta)
            confusion.update(probs, batch["label"])
            bar.update(runtime.world * len(batch["name"]))
        bar.close()
    if runtime.distributed:
        confusion.all_reduce()
    return {protocol: report(confusion, protocol) for protocol in protocols(config)}


@torch.no_grad()
def predictions(runtime: Runtime, config: Dict, network: DRSLNetwork, indices: List[int]) -> Dict[int, np.ndarray]:
    """Argmax maps (at the label size) of some val images."""
    images = ResizedImages(target_dataset(config, "val", with_labels=True), config["data"]["target_size"], indices)
    network.to(runtime.device).eval()
    out = {}
    for sample in images:
        probs = class_probabilities(network, sample["image"][None].to(runtime.device), sample["size"].tolist(), runtime,
                                    config)
        out[sample["index"]] = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
    return out


def write_pictures(runtime: Runtime, config: Dict, networks: Dict[str, DRSLNetwork], directory: str,
                   count: Optional[int] = None) -> List[str]:
    """Panels image / ground truth / one prediction per network for the first
    ``evaluation.panels`` val images, plus each prediction as a palette PNG."""
    count = config["evaluation"]["panels"] if count is None else count
    if not runtime.is_main or count <= 0:
        return []
    dataset = target_dataset(config, "val", with_labels=True)
    indices = list(range(min(count, len(dataset))))
    num_classes = config["data"]["num_classes"]
    per_network = {title: predictions(runtime, config, net, indices) for title, net in networks.items()}
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


def evaluated(runtime: Runtime, config: Dict, network: DRSLNetwork, directory: str, title: str,
              log: RunLog) -> Dict:
    """The evaluation of a finished stage, cached in ``directory/evaluation.json``;
    with ``evaluation.tta`` also its TTA evaluation, in ``evaluation_tta.json``."""
    result = cached_evaluation(runtime, config, network, os.path.join(directory, "evaluation.json"), title, log)
    if config["evaluation"]["tta"]:
        with_tta = cached_evaluation(runtime, config, network, os.path.join(directory, TTA_EVALUATION), title, log,
                                     tta=True)
        protocol = main_protocol(config)
        log.info(f"{title}: mIoU {result[protocol]['miou']:.1f} single-scale, {with_tta[protocol]['miou']:.1f} "
                 f"with TTA {with_tta['views']}")
    return result


def summary(reports: Dict[str, Report]) -> Dict:
    """Strict-JSON form of reports: per protocol its mIoU, per-class IoUs (%) and table."""
    return {protocol: {"miou": 100 * r.miou, "classes": dict(zip(r.names, [100 * v for v in r.iou])),
                       "markdown": r.markdown()} for protocol, r in reports.items()}


def cached_evaluation(runtime: Runtime, config: Dict, network: DRSLNetwork, path: str, title: str, log: RunLog,
                      tta: bool = False) -> Dict:
    """:func:`summary` of :func:`evaluate`, read from ``path`` when it is there
    (for ``tta``: when it was made with the current views)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
        if not tta or cached.get("views") == views(config, tta):
            return cached
    result = summary(evaluate(runtime, config, network, log, title, tta=tta))
    if tta:
        result["views"] = views(config, tta)
    if runtime.is_main:
        atomic_write_json(result, path)
    runtime.barrier()
    return result
