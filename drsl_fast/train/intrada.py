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
from .checkpoint import CheckpointError, atomic_write_json, check_digest, load_weights, read_file, save_weights
from .data import (AugmentedSamples, has_labels, pseudo_label_path, stream_seed,
                   target_dataset, train_transform)
from .entropy_ranking import EASY_SPLIT, HARD_SPLIT, PSEUDO_LABELS, rank_target, read_split
from .evaluate import evaluate, evaluated, main_protocol
from .log import RunLog
from .loop import WEIGHTS, StageRun, data_parallel, finished, run_stage, sgd
from .network import DRSLNetwork
from .runtime import Runtime, nvtx_range
from .settings import Data, IntraDA, Settings

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


def intrada_network(settings: Settings, log=print, init_weights: bool = False) -> DRSLNetwork:
    """DeepLab-v2 with the auxiliary classifier of ``intrada.aux_classifier``
    (no MMDL-FR head), weights drawn from the run's seed."""
    state = torch.get_rng_state()
    model = settings.model
    torch.manual_seed(stream_seed(settings.seed, METHOD, "network"))
    try:
        segmenter = DeepLabV2(settings.data.num_classes, depth=model.depth, width=model.width,
                              aux_classifier=settings.intrada.aux_classifier, checkpointing=model.checkpointing,
                              head_as_gemm=model.head_as_gemm)
    finally:
        torch.set_rng_state(state)
    if init_weights and model.init_weights:
        report = load_init_weights(segmenter, model.init_weights)
        log(f"init weights {model.init_weights}: {report.summary()}")
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


def discriminators_for(seed: int, num_classes: int, width: float, network: DRSLNetwork) -> Discriminators:
    """One discriminator (docs/method.md §7, widths times ``width``) per output
    level of ``network``, weights drawn from the run's ``seed``."""
    levels = ("main", "aux") if network.segmenter.aux_classifier is not None else ("main",)
    state = torch.get_rng_state()
    torch.manual_seed(stream_seed(seed, METHOD, "discriminators"))
    try:
        return Discriminators(num_classes, levels, width)
    finally:
        torch.set_rng_state(state)


def poly_factor(settings: IntraDA, power: float, iteration: int, iterations: int) -> float:
    """The lr factor of both optimisers (docs/method.md §7): poly decay over
    ``intrada.poly_iterations`` (else the stage's ``iterations``), or 1."""
    if not settings.poly:
        return 1.0
    total = settings.poly_iterations or iterations
    return max(0.0, 1 - iteration / total) ** power


def adversarial_weights(settings: IntraDA) -> AdversarialWeights:
    """The adversarial and aux segmentation weights of docs/method.md §7."""
    return AdversarialWeights(settings.adv_main, settings.adv_aux, settings.seg_aux)


def train_adversarial_stage(runtime: Runtime, settings: Settings, network: DRSLNetwork, stage: AdversarialStage,
                            log: RunLog) -> None:
    """Runs (or resumes) ``stage`` with :func:`~.loop.run_stage`; writes
    ``<directory>/model.pt`` and ``discriminators.pt`` and, when a best
    snapshot is to be selected, ``snapshots/model_<iteration>.pt``."""
    intrada, device = settings.intrada, runtime.device
    discriminators = discriminators_for(settings.seed, settings.data.num_classes, intrada.discriminator_width, network)
    network.to(device).train()
    discriminators.to(device).train()
    model, discriminator_model = data_parallel(runtime, network), data_parallel(runtime, discriminators)
    optimizer = sgd(network, intrada.lr, settings.optim)
    d_optimizer = discriminator_optimizer(discriminators, intrada.discriminator_lr, intrada.discriminator_betas)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.needs_scaler)
    weights = adversarial_weights(intrada)
    snapshot_every = intrada.snapshot_every if intrada.select_snapshot != "last" else 0

    def step(iteration: int, source: Dict, target: Dict):
        losses = adversarial_step(model, discriminators, optimizer, d_optimizer, source["image"], source["label"],
                                  target["image"], weights, autocast=runtime.autocast, scaler=scaler,
                                  discriminator_model=discriminator_model)
        return losses.generator, losses.terms

    def snapshot(done: int) -> None:
        if runtime.is_main and snapshot_every and done % snapshot_every == 0 and done < stage.iterations:
            save_weights(network, snapshot_path(stage.directory, done),
                         {"stage": stage.name, "iteration": done, "digest": settings.digest})

    run_stage(runtime, settings, StageRun(
        stage.name, stage.directory, stage.iterations, intrada.batch_size, stage.source, stage.target,
        {WEIGHTS: network, "discriminators.pt": discriminators}, {"network": optimizer, "discriminator": d_optimizer},
        lambda iteration: poly_factor(intrada, settings.optim.poly_power, iteration, stage.iterations), step, snapshot),
        scaler, log)


def snapshot_path(directory: str, iteration: int) -> str:
    return os.path.join(directory, SNAPSHOTS, f"model_{iteration:07d}.pt")


def selected_snapshot(runtime: Runtime, settings: Settings, directory: str, iterations: int, title: str,
                      log: RunLog) -> Dict:
    """The snapshot of a finished stage that ``intrada.select_snapshot`` picks,
    {'path', 'iteration', 'selected_on' (None, 'val' or 'train'), 'miou_by_iteration'},
    cached in ``directory/selection.json``."""
    mode = settings.intrada.select_snapshot
    if mode == "last":
        return {"path": os.path.join(directory, WEIGHTS), "iteration": iterations, "selected_on": None,
                "miou_by_iteration": None}
    path = os.path.join(directory, SELECTION)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    split = mode[len("best_on_"):]
    target = settings.data.target
    if split == "train" and not has_labels(target.root, target.train_split):
        raise ValueError("intrada.select_snapshot=best_on_train needs ground truth of the target training images")
    candidates = {}
    snapshots = os.path.join(directory, SNAPSHOTS)
    for name in sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []:
        candidates[int(name[len("model_"):-len(".pt")])] = os.path.join(snapshots, name)
    candidates[iterations] = os.path.join(directory, WEIGHTS)
    scores = {}
    network = intrada_network(settings, log.info)
    for iteration, file in sorted(candidates.items()):
        load_weights(network, file, map_location="cpu", digest=settings.digest)
        reports = evaluate(runtime, settings, network, log, f"{title} @ {iteration} on {split}", split=split)
        scores[iteration] = 100 * reports[main_protocol(settings.data)].miou
    best = max(scores, key=lambda it: (scores[it], -it))  # the earliest of equal scores
    selection = {"path": candidates[best], "iteration": best, "selected_on": split,
                 "miou_by_iteration": {str(k): v for k, v in scores.items()}}
    if runtime.is_main:
        atomic_write_json(selection, path)
    runtime.barrier()
    log.info(f"{title}: snapshot of iteration {best} selected on target {split} (mIoU {scores[best]:.1f})")
    return selection


def stage_iterations(settings: Settings, stage: str) -> int:
    """The iterations of stage 'inter' or 'intra' (intrada.<stage>_iterations; 1 in a dry run)."""
    if settings.dry_run:
        return 1
    return settings.intrada.inter_iterations if stage == "inter" else settings.intrada.intra_iterations


def easy_dataset(data: Data, ranking_dir: str) -> SegmentationDataset:
    """The easy split's images with their pseudo-labels (uint8 PNGs)."""
    images = target_dataset(data, "train", with_labels=False)
    by_name = {item.name: item for item in images.items}
    label_dir = os.path.join(ranking_dir, PSEUDO_LABELS)
    items = [Item(name, by_name[name].image, pseudo_label_path(label_dir, name))
             for name in read_split(os.path.join(ranking_dir, EASY_SPLIT))]
    identity = LabelMap("pseudo-label", {**{c: c for c in range(data.num_classes)}, 255: 255})
    return SegmentationDataset(items, read_label_ids, identity, normalization=images.normalization)


def hard_dataset(data: Data, ranking_dir: str) -> SegmentationDataset:
    """The hard split's images (unlabelled)."""
    images = target_dataset(data, "train", with_labels=False)
    by_name = {item.name: item for item in images.items}
    images.items = [by_name[name] for name in read_split(os.path.join(ranking_dir, HARD_SPLIT))]
    return images


def stage_summary(round_number: int, stage: str, evaluation: Dict, selection: Dict, data: Data,
                  ranking: Optional[Dict] = None) -> Dict:
    """One row of the run's results (the shape of a DRSL round, plus the stage and the snapshot choice)."""
    accuracy = ranking["pseudo_label_accuracy"] if ranking else None
    return {
        "round": round_number, "stage": stage, "miou": evaluation[main_protocol(data)]["miou"],
        "pseudo_label_accuracy": 100 * accuracy if accuracy is not None else None,
        "pseudo_label_coverage": 100 * ranking["easy"] / max(ranking["images"], 1) if ranking else None,
        "snapshot": selection["iteration"], "selected_on": selection["selected_on"],
        "evaluation": evaluation,
    }


def intrada_stages(runtime: Runtime, settings: Settings, log: RunLog) -> List[Dict]:
    """Stages 1-3 of IntraDA, each evaluated on target val; returns the
    results rows of the inter-domain (round 1) and intra-domain (round 2) models."""
    out, data = os.path.join(settings.output_dir, METHOD), settings.data
    inter_dir, ranking_dir, intra_dir = (os.path.join(out, name) for name in ("inter", "ranking", "intra"))

    network = intrada_network(settings, log.info)
    load_segmenter(network, os.path.join(settings.output_dir, "source", WEIGHTS), settings.digest)
    inter_eval, inter_selection = adapted_and_evaluated(
        runtime, settings, network, "inter", inter_dir, "IntraDA inter-domain (ADVENT)", log,
        lambda: (isa.samples(data, settings.isa, "adaptation"),
                 AugmentedImages(target_dataset(data, "train", with_labels=False), train_transform(data, "target"))))

    with nvtx_range("intrada/ranking"):
        ranking = rank_target(runtime, settings, network, ranking_dir, log)

    if settings.intrada.intra_start == "init":
        network = intrada_network(settings, log.info, init_weights=True)
    intra_eval, intra_selection = adapted_and_evaluated(
        runtime, settings, network, "intra", intra_dir, "IntraDA", log,
        lambda: (AugmentedSamples(easy_dataset(data, ranking_dir), train_transform(data, "target")),
                 AugmentedImages(hard_dataset(data, ranking_dir), train_transform(data, "target"))))
    for number, evaluation in ((1, inter_eval), (2, intra_eval)):
        log.scalars(f"{METHOD}/evaluation", {"miou": evaluation[main_protocol(data)]["miou"]}, number)
    return [stage_summary(1, "inter", inter_eval, inter_selection, data),
            stage_summary(2, "intra", intra_eval, intra_selection, data, ranking)]


def adapted_and_evaluated(runtime: Runtime, settings: Settings, network: DRSLNetwork, stage: str, directory: str,
                          title: str, log: RunLog, datasets) -> Tuple[Dict, Dict]:
    """Stage 1 or 3 of IntraDA (``stage``: 'inter' or 'intra'): trains it
    unless finished (``datasets()`` gives its source-side and target-side
    samples), loads the selected snapshot into ``network`` and evaluates it;
    returns (evaluation, selection)."""
    iterations = stage_iterations(settings, stage)
    if not finished(directory):
        source, target = datasets()
        with nvtx_range(f"{METHOD}/{stage}"):
            train_adversarial_stage(runtime, settings, network,
                                    AdversarialStage(f"{METHOD}/{stage}", directory, iterations, source, target), log)
    selection = selected_snapshot(runtime, settings, directory, iterations, f"IntraDA {stage}-domain", log)
    load_weights(network, selection["path"], map_location="cpu", digest=settings.digest)
    evaluation = evaluated(runtime, settings, network, directory, title, log)
    log.info(f"{title}: mIoU {evaluation[main_protocol(settings.data)]['miou']:.1f}")
    return evaluation, selection


def final_network(runtime: Runtime, settings: Settings, log: RunLog) -> Optional[DRSLNetwork]:
    """The selected intra-domain model of a finished IntraDA run (for the panels), else None."""
    directory = os.path.join(settings.output_dir, METHOD, "intra")
    if not finished(directory):
        return None
    selection = selected_snapshot(runtime, settings, directory, stage_iterations(settings, "intra"),
                                  "IntraDA intra-domain", log)
    network = intrada_network(settings, log.info)
    load_weights(network, selection["path"], map_location="cpu", digest=settings.digest)
    return network
