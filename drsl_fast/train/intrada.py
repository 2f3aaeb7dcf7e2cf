"""The IntraDA pipeline (docs/method.md §7), on the models, data, ops and command
line of the DRSL pipeline:

1. inter-domain adaptation (ADVENT) from the run's source model:
   source segmentation + adversarial entropy alignment of the target   -> intrada/inter/model.pt
2. entropy ranking of the target training set, easy/hard split at lambda,
   easy-split pseudo-labels (argmax)                                   -> intrada/ranking/
3. intra-domain adaptation: segmentation on the easy images with their
   pseudo-labels + adversarial alignment easy (label 0) vs hard (label 1) -> intrada/intra/model.pt
4. evaluation on target val after stages 1 and 3                       -> evaluation.json, results.*

Each adversarial stage is :func:`train_adversarial_stage`: SGD (momentum,
weight decay, heads at 10 x lr) with poly decay for the network, Adam
(lr 1e-4, betas (0.9, 0.99)) with the same poly decay for one discriminator
per output level, AMP, DDP, checkpoints and per-iteration sample seeds
exactly as the DRSL stages (one skeleton, :func:`.loop.run_stage`), so a resumed run ends where
an uninterrupted one does.

The snapshot a stage hands on is an explicit choice, ``intrada.select_snapshot``:
``last`` (default), or ``best_on_val`` / ``best_on_train``: every
``intrada.snapshot_every`` iterations a snapshot is kept and the one with the
best mIoU on target val (the split the results are reported on, so the number
is optimistic, as in ADVENT's protocol) or on the labelled target training
images is taken. The results name the split used.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from drsl_fast.data.base import Item, SegmentationDataset
from drsl_fast.data.io import read_label_ids
from drsl_fast.data.labels import LabelMap
from drsl_fast.models import DeepLabV2, load_init_weights

from . import isa
from .adversarial import AdversarialWeights, Discriminators, adversarial_step, discriminator_optimizer
from .checkpoint import (CheckpointError, atomic_write_json, check_digest, config_digest, load_weights, read_file,
                         save_weights)
from .data import (AugmentedSamples, has_labels, pseudo_label_path, stream_seed,
                   target_dataset, train_transform)
from .entropy_ranking import EASY_SPLIT, HARD_SPLIT, PSEUDO_LABELS, rank_target, read_split
from .evaluate import evaluate, evaluated, main_protocol
from .log import RunLog
from .loop import WEIGHTS, StageRun, data_parallel, finished, run_stage
from .network import DRSLNetwork
from .runtime import Runtime, nvtx_range

METHOD, TITLE = "intrada", "IntraDA"
SNAPSHOTS, SELECTION = "snapshots", "selection.json"


class AugmentedImages(Dataset):
    """Unlabelled images under the :class:`TrainTransform` seeded by the
    :class:`StepSampler` (the adversarial target stream)."""

    def __init__(self, dataset: SegmentationDataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Dict:
        index, seed = key
        image, _ = self.transform(self.dataset[index]["image"], None, torch.Generator().manual_seed(seed))
        return {"image": image}


@dataclass
class AdversarialStage:
    name: str                  # "intrada/inter" or "intrada/intra"
    directory: str
    iterations: int
    source: Dataset            # labelled: source images, or easy images with pseudo-labels
    target: Dataset            # unlabelled: target images, or hard images


def intrada_network(config: Dict, log=print, init_weights: bool = False) -> DRSLNetwork:
    """DeepLab-v2 with the auxiliary classifier of ``intrada.aux_classifier``
    (no MMDL-FR head), weights drawn from the run's seed."""
    state = torch.get_rng_state()
    torch.manual_seed(stream_seed(config["seed"], METHOD, "network"))
    try:
        segmenter = DeepLabV2(config["data"]["num_classes"], depth=config["model"]["depth"],
                              width=config["model"]["width"], aux_classifier=config["intrada"]["aux_classifier"],
                              checkpointing=config["model"]["checkpointing"])
    finally:
        torch.set_rng_state(state)
    if init_weights and config["model"]["init_weights"]:
        report = load_init_weights(segmenter, config["model"]["init_weights"])
        log(f"init weights {config['model']['init_weights']}: {report.summary()}")
    return DRSLNetwork(segmenter, None)


def load_segmenter(network: DRSLNetwork, path: str, digest: str) -> None:
    """The segmenter weights of the run's model file ``path``; only the
    auxiliary classifier may be absent from it (a source model trained
    without one keeps its seeded initialisation, N(0, 0.01))."""
    state = read_file(path, "cpu", keys=("model", "meta"))
    check_digest(state["meta"], path, digest)
    segmenter = {k: v for k, v in state["model"].items() if k.startswith("segmenter.")}
    try:
        missing, unexpected = network.load_state_dict(segmenter, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit the IntraDA network ({str(exc).splitlines()[-1].strip()})") \
            from None
    missing = [k for k in missing if not k.startswith("segmenter.aux_classifier.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the IntraDA network ({len(missing)} missing keys, e.g. "
                              f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")


def discriminators_for(config: Dict, network: DRSLNetwork) -> Discriminators:
    levels = ("main", "aux") if network.segmenter.aux_classifier is not None else ("main",)
    state = torch.get_rng_state()
    torch.manual_seed(stream_seed(config["seed"], METHOD, "discriminators"))
    try:
        return Discriminators(config["data"]["num_classes"], levels, config["intrada"]["discriminator_width"])
    finally:
        torch.set_rng_state(state)


def poly_factor(config: Dict, iteration: int, iterations: int) -> float:
    settings = config["intrada"]
    if not settings["poly"]:
        return 1.0
    total = settings["poly_iterations"] or iterations
    return max(0.0, 1 - iteration / total) ** config["optim"]["poly_power"]


def train_adversarial_stage(runtime: Runtime, config: Dict, network: DRSLNetwork, stage: AdversarialStage,
                            log: RunLog) -> None:
    """Runs (or resumes) ``stage`` with :func:`~.loop.run_stage`; writes
    ``<directory>/model.pt`` and ``discriminators.pt`` and, when a best
    snapshot is to be selected, ``snapshots/model_<iteration>.pt``."""
    settings, device = config["intrada"], runtime.device
    discriminators = discriminators_for(config, network)
    network.to(device).train()
    discriminators.to(device).train()
    model, discriminator_model = data_parallel(runtime, network), data_parallel(runtime, discriminators)
    optimizer = torch.optim.SGD(network.parameter_groups(settings["lr"]), lr=settings["lr"],
                                momentum=config["optim"]["momentum"], weight_decay=config["optim"]["weight_decay"])
    d_optimizer = discriminator_optimizer(discriminators, settings["discriminator_lr"],
                                          settings["discriminator_betas"])
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.needs_scaler)
    weights = AdversarialWeights(settings["adv_main"], settings["adv_aux"], settings["seg_aux"])
    snapshot_every = settings["snapshot_every"] if settings["select_snapshot"] != "last" else 0

    def step(iteration: int, source: Dict, target: Dict):
        losses = adversarial_step(model, discriminators, optimizer, d_optimizer, source["image"], source["label"],
                                  target["image"], weights, autocast=runtime.autocast, scaler=scaler,
                                  discriminator_model=discriminator_model)
        return losses.generator, losses.terms

    def snapshot(done: int) -> None:
        if runtime.is_main and snapshot_every and done % snapshot_every == 0 and done < stage.iterations:
            save_weights(network, snapshot_path(stage.directory, done),
                         {"stage": stage.name, "iteration": done, "digest": config_digest(config)})

    run_stage(runtime, config, StageRun(
        stage.name, stage.directory, stage.iterations, settings["batch_size"], stage.source, stage.target,
        {WEIGHTS: network, "discriminators.pt": discriminators}, {"network": optimizer, "discriminator": d_optimizer},
        lambda iteration: poly_factor(config, iteration, stage.iterations), step, snapshot), scaler, log)


def snapshot_path(directory: str, iteration: int) -> str:
    return os.path.join(directory, SNAPSHOTS, f"model_{iteration:07d}.pt")


def selected_snapshot(runtime: Runtime, config: Dict, directory: str, iterations: int, title: str,
                      log: RunLog) -> Dict:
    """The snapshot of a finished stage that ``intrada.select_snapshot`` picks,
    {'path', 'iteration', 'selected_on' (None, 'val' or 'train'), 'miou_by_iteration'},
    cached in ``directory/selection.json``."""
    mode = config["intrada"]["select_snapshot"]
    if mode == "last":
        return {"path": os.path.join(directory, WEIGHTS), "iteration": iterations, "selected_on": None,
                "miou_by_iteration": None}
    path = os.path.join(directory, SELECTION)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    split = mode[len("best_on_"):]
    target = config["data"]["target"]
    if split == "train" and not has_labels(target["root"], target["train_split"]):
        raise ValueError("intrada.select_snapshot=best_on_train needs ground truth of the target training images")
    candidates = {}
    snapshots = os.path.join(directory, SNAPSHOTS)
    for name in sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []:
        candidates[int(name[len("model_"):-len(".pt")])] = os.path.join(snapshots, name)
    candidates[iterations] = os.path.join(directory, WEIGHTS)
    scores = {}
    network = intrada_network(config, log.info)
    for iteration, file in sorted(candidates.items()):
        load_weights(network, file, map_location="cpu", digest=config_digest(config))
        reports = evaluate(runtime, config, network, log, f"{title} @ {iteration} on {split}", split=split)
        scores[iteration] = 100 * reports[main_protocol(config)].miou
    best = max(scores, key=lambda it: (scores[it], -it))  # the earliest of equal scores
    selection = {"path": candidates[best], "iteration": best, "selected_on": split,
                 "miou_by_iteration": {str(k): v for k, v in scores.items()}}
    if runtime.is_main:
        atomic_write_json(selection, path)
    runtime.barrier()
    log.info(f"{title}: snapshot of iteration {best} selected on target {split} (mIoU {scores[best]:.1f})")
    return selection


def stage_iterations(config: Dict, key: str) -> int:
    return 1 if config["dry_run"] else config["intrada"][key]


def easy_dataset(config: Dict, ranking_dir: str) -> SegmentationDataset:
    """The easy split's images with their pseudo-labels (uint8 PNGs)."""
    images = target_dataset(config, "train", with_labels=False)
    by_name = {item.name: item for item in images.items}
    label_dir = os.path.join(ranking_dir, PSEUDO_LABELS)
    items = [Item(name, by_name[name].image, pseudo_label_path(label_dir, name))
             for name in read_split(os.path.join(ranking_dir, EASY_SPLIT))]
    identity = LabelMap("pseudo-label", {**{c: c for c in range(config["data"]["num_classes"])}, 255: 255})
    return SegmentationDataset(items, read_label_ids, identity, normalization=images.normalization)


def hard_dataset(config: Dict, ranking_dir: str) -> SegmentationDataset:
    """The hard split's images (unlabelled)."""
    images = target_dataset(config, "train", with_labels=False)
    by_name = {item.name: item for item in images.items}
    images.items = [by_name[name] for name in read_split(os.path.join(ranking_dir, HARD_SPLIT))]
    return images


def stage_summary(round_number: int, stage: str, evaluation: Dict, selection: Dict, config: Dict,
                  ranking: Optional[Dict] = None) -> Dict:
    """One row of the run's results (the shape of a DRSL round, plus the stage and the snapshot choice)."""
    accuracy = ranking["pseudo_label_accuracy"] if ranking else None
    return {
        "round": round_number, "stage": stage, "miou": evaluation[main_protocol(config)]["miou"],
        "pseudo_label_accuracy": 100 * accuracy if accuracy is not None else None,
        "pseudo_label_coverage": 100 * ranking["easy"] / max(ranking["images"], 1) if ranking else None,
        "snapshot": selection["iteration"], "selected_on": selection["selected_on"],
        "evaluation": evaluation,
    }


def intrada_stages(runtime: Runtime, config: Dict, log: RunLog) -> List[Dict]:
    """Stages 1-3 of IntraDA, each evaluated on target val; returns the
    results rows of the inter-domain (round 1) and intra-domain (round 2) models."""
    out = os.path.join(config["output_dir"], METHOD)
    inter_dir, ranking_dir, intra_dir = (os.path.join(out, name) for name in ("inter", "ranking", "intra"))

    network = intrada_network(config, log.info)
    load_segmenter(network, os.path.join(config["output_dir"], "source", WEIGHTS), config_digest(config))
    inter_eval, inter_selection = adapted_and_evaluated(
        runtime, config, network, "inter", inter_dir, "IntraDA inter-domain (ADVENT)", log,
        lambda: (isa.samples(config, "adaptation"),
                 AugmentedImages(target_dataset(config, "train", with_labels=False),
                                 train_transform(config, "target"))))

    with nvtx_range("intrada/ranking"):
        ranking = rank_target(runtime, config, network, ranking_dir, log)

    if config["intrada"]["intra_start"] == "init":
        network = intrada_network(config, log.info, init_weights=True)
    intra_eval, intra_selection = adapted_and_evaluated(
        runtime, config, network, "intra", intra_dir, "IntraDA", log,
        lambda: (AugmentedSamples(easy_dataset(config, ranking_dir), train_transform(config, "target")),
                 AugmentedImages(hard_dataset(config, ranking_dir), train_transform(config, "target"))))
    for number, evaluation in ((1, inter_eval), (2, intra_eval)):
        log.scalars(f"{METHOD}/evaluation", {"miou": evaluation[main_protocol(config)]["miou"]}, number)
    return [stage_summary(1, "inter", inter_eval, inter_selection, config),
            stage_summary(2, "intra", intra_eval, intra_selection, config, ranking)]


def adapted_and_evaluated(runtime: Runtime, config: Dict, network: DRSLNetwork, stage: str, directory: str,
                          title: str, log: RunLog, datasets) -> Tuple[Dict, Dict]:
    """Stage 1 or 3 of IntraDA (``stage``: 'inter' or 'intra'): trains it
    unless finished (``datasets()`` gives its source-side and target-side
    samples), loads the selected snapshot into ``network`` and evaluates it;
    returns (evaluation, selection)."""
    iterations = stage_iterations(config, f"{stage}_iterations")
    if not finished(directory):
        source, target = datasets()
        with nvtx_range(f"{METHOD}/{stage}"):
            train_adversarial_stage(runtime, config, network,
                                    AdversarialStage(f"{METHOD}/{stage}", directory, iterations, source, target), log)
    selection = selected_snapshot(runtime, config, directory, iterations, f"IntraDA {stage}-domain", log)
    load_weights(network, selection["path"], map_location="cpu", digest=config_digest(config))
    evaluation = evaluated(runtime, config, network, directory, title, log)
    log.info(f"{title}: mIoU {evaluation[main_protocol(config)]['miou']:.1f}")
    return evaluation, selection


def final_network(runtime: Runtime, config: Dict, log: RunLog) -> Optional[DRSLNetwork]:
    """The selected intra-domain model of a finished IntraDA run (for the panels), else None."""
    directory = os.path.join(config["output_dir"], METHOD, "intra")
    if not finished(directory):
        return None
    selection = selected_snapshot(runtime, config, directory, stage_iterations(config, "intra_iterations"),
                                  "IntraDA intra-domain", log)
    network = intrada_network(config, log.info)
    load_weights(network, selection["path"], map_location="cpu", digest=config_digest(config))
    return network
