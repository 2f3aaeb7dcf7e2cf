"""One training stage (docs/method.md §4, §6): source training (Eq. 8) or one
adaptation round (Eq. 9 / Eq. 10), resumable at any checkpoint.

SGD with momentum 0.9 and weight decay 5e-4, backbone at lr and heads at
10 x lr, poly decay (power 0.9) for source training and a constant lr in
adaptation rounds (CRST). Each step takes ``batch_size`` source images and,
in adaptation, as many target images with their pseudo-labels; both go through
the network in one batch (BatchNorm is frozen, so this is the same as two
passes, at one launch sequence).
"""
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from drsl_fast.losses import DRSLLoss, segmentation_loss
from drsl_fast.models.deeplab import AUX_LOSS_WEIGHT

from .checkpoint import load_training_state, save_training_state, save_weights
from .data import AugmentedSamples, StepSampler, normalization, stream_seed
from .isa import translate_batch
from .log import RunLog
from .network import DRSLNetwork, network_settings
from .runtime import Runtime, nvtx_range
from .settings import Loss, Optim, Settings

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"


def finished(directory: str) -> bool:
    """A stage is finished once its weights file is there (written last, atomically)."""
    return os.path.isfile(os.path.join(directory, WEIGHTS))


@dataclass
class Stage:
    name: str                      # e.g. "source", "drsl_plus/round_2"
    directory: str
    iterations: int
    lr: float
    poly: bool
    source: Dataset                              # AugmentedSamples, or isa.TranslatableSamples
    target: Optional[AugmentedSamples] = None   # None: source training (Eq. 8)
    batch_size: int = 1                          # source (and target) images per step
    consistency: bool = False                    # Eq. 10 (DRSL+)
    mmdl: bool = True                            # False: segmentation terms only (plain self-training)


def drsl_loss(loss: Loss, num_classes: int, sigma: float, consistency: bool) -> DRSLLoss:
    """The loss of Eq. 8-10 (docs/method.md §4) with the weights of ``loss``;
    ``sigma`` is model.sigma, ``consistency`` adds Eq. 6 (DRSL+)."""
    return DRSLLoss(
        num_classes, samples_per_class=loss.samples_per_class, sigma=sigma, alpha=loss.alpha, scale=loss.scale,
        beta=loss.beta, lambda1=loss.lambda1, lambda2=loss.lambda2, lambda3=loss.lambda3, consistency=consistency,
    )


def sgd(network: DRSLNetwork, lr: float, optim: Optim) -> torch.optim.SGD:
    """SGD with the momentum and weight decay of ``optim``, backbone at ``lr``
    and heads at 10 x ``lr`` (docs/method.md §6)."""
    return torch.optim.SGD(network.parameter_groups(lr), lr=lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay)


def poly_factor(iteration: int, iterations: int, power: float) -> float:
    """The poly decay ``(1 - iteration / iterations) ** power`` of the lr (docs/method.md §6)."""
    return (1 - iteration / iterations) ** power


def segmentation_terms(out, labels, start: int, stop: int):
    seg = segmentation_loss(out.logits[start:stop].float(), labels)
    if out.aux_logits is not None:
        seg = seg + AUX_LOSS_WEIGHT * segmentation_loss(out.aux_logits[start:stop].float(), labels)
    return seg


def step_loss(model, network: DRSLNetwork, loss_fn: DRSLLoss, source: Dict, target: Optional[Dict],
              generator: torch.Generator, mmdl: bool = True):
    """Eq. 8 without a target batch, else Eq. 9 / 10; without the MMDL-FR head
    or with ``mmdl`` False only the segmentation terms (plain self-training)."""
    n = source["image"].shape[0]
    images = source["image"] if target is None else torch.cat([source["image"], target["image"]])
    embedding_size = source["embedding_label"].shape[-2:] if network.head is not None and mmdl else None
    out = model(images, embedding_size)
    seg_source = segmentation_terms(out, source["label"], 0, n)
    seg_target = segmentation_terms(out, target["label"], n, None) if target is not None else None
    if out.embeddings is None:
        total = seg_source if seg_target is None else seg_source + seg_target
        terms = {"seg_source": seg_source} if seg_target is None else {"seg_source": seg_source,
                                                                         "seg_target": seg_target}
        return total, terms
    emb = out.embeddings
    result = loss_fn(
        network.head.modes, emb[:n], source["embedding_label"], seg_source,
        emb[n:] if target is not None else None, target["embedding_label"] if target is not None else None,
        seg_target, generator=generator,
    )
    return result.total, result.terms


def loader(samples: AugmentedSamples, sampler: StepSampler, batch_size: int, workers: int, device) -> DataLoader:
    return DataLoader(samples, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def to_device(batch: Dict, device) -> Dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def step_batches(dataset: AugmentedSamples, stage_name: str, stream: str, start: int, stop: int, batch_size: int,
                 runtime: Runtime, seed: int, workers: int):
    """Batches of iterations ``start`` .. ``stop``-1 of one stream of a stage
    (the :class:`StepSampler` order of the run's ``seed``, so a resumed stage
    sees the same samples), loaded by ``workers`` workers."""
    sampler = StepSampler(len(dataset), batch_size, start, stop, seed, f"{stage_name}/{stream}",
                          runtime.rank, runtime.world)
    return iter(loader(dataset, sampler, batch_size, workers, runtime.device))


class RunningMeans:
    """Loss terms summed on the device between two log points; :meth:`log`
    makes the one host synchronisation of a logging interval."""

    def __init__(self, every: int, iterations: int):
        self.every, self.iterations = max(1, every), iterations
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, terms: Dict[str, torch.Tensor], total: torch.Tensor) -> None:
        for name, value in terms.items():
            if value.is_floating_point():
                self.sums[name] = self.sums.get(name, 0.0) + value.detach()
        self.sums["loss"] = self.sums.get("loss", 0.0) + total.detach()

    def log(self, done: int, log: RunLog, name: str, bar, **extra: float) -> None:
        """Logs the means at every ``every``-th and at the last iteration."""
        if done % self.every and done != self.iterations:
            return
        count = self.every if done % self.every == 0 else done % self.every
        means = {key: float(value) / count for key, value in self.sums.items()}
        self.sums.clear()
        means.update(extra)
        log.scalars(name, means, done)
        bar.set_postfix(loss=f"{means['loss']:.3f}")


def checkpoint_if_due(runtime: Runtime, every: int, digest: str, done: int, stage_name: str, iterations: int,
                      path: str, **state) -> None:
    """Every ``every`` (train.checkpoint_every) iterations (not at the end,
    where the stage's weights are written): :func:`save_training_state` on
    rank 0, marked with the run's config ``digest``."""
    if done % max(1, every) or done >= iterations:
        return
    if runtime.is_main:
        save_training_state(path, **state, position={"stage": stage_name, "iteration": done,
                                                     "iterations": iterations}, digest=digest)
    runtime.barrier()


def finish_stage(runtime: Runtime, settings: Settings, stage_name: str, iterations: int, checkpoint_path: str,
                 outputs: Dict[str, nn.Module]) -> None:
    """Writes the stage's final weights (``outputs``: path -> module), the
    mark that it is complete, and drops its resumable checkpoint."""
    if runtime.is_main:
        meta = {"stage": stage_name, "iterations": iterations, "digest": settings.digest,
                "settings": network_settings(settings.config)}
        for path, module in outputs.items():
            save_weights(module, path, meta)
        if os.path.exists(checkpoint_path):
            os.remove(checkpoint_path)
    runtime.barrier()


@dataclass
class StageRun:
    """One training stage for :func:`run_stage`, the skeleton every stage
    shares (DRSL's source training and rounds, IntraDA's adversarial stages).

    ``source`` and ``target`` are the sample streams (``target`` None for one);
    ``outputs`` maps file names in ``directory`` to the modules the checkpoint
    holds and the finished stage writes; every lr of ``optimizers`` (name ->
    optimiser; its lr is logged as ``lr`` for 'network', ``lr_<name>``
    otherwise) is its initial value times ``lr_factor(iteration)``; ``step``
    runs one iteration on device batches (forward, backward, optimiser steps;
    source images flagged for ISA already translated) and returns the total and
    the terms to log; ``after_step(done)`` runs after each iteration (snapshots)."""

    name: str
    directory: str
    iterations: int
    batch_size: int
    source: Dataset
    target: Optional[Dataset]
    outputs: Dict[str, nn.Module]
    optimizers: Dict[str, torch.optim.Optimizer]
    lr_factor: Callable[[int], float]
    step: Callable[[int, Dict, Optional[Dict]], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
    after_step: Callable[[int], None] = lambda done: None


class Joint:
    """Several modules or optimisers saved and restored as one (for the checkpoint functions)."""

    def __init__(self, parts: Dict):
        self.parts = parts

    def state_dict(self) -> Dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: Dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def run_stage(runtime: Runtime, settings: Settings, stage: StageRun, scaler, log: RunLog) -> None:
    """Runs ``stage`` to completion, or resumes it from its checkpoint, with
    the checkpoints of ``train.checkpoint_every`` and the loss means of
    ``train.log_every``; writes its ``outputs`` at the end."""
    checkpoint_path = os.path.join(stage.directory, CHECKPOINT)
    modules, optimizers = Joint(stage.outputs), Joint(stage.optimizers)
    base_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in stage.optimizers.values()]
    digest = settings.digest
    position = load_training_state(checkpoint_path, model=modules, optimizer=optimizers, scaler=scaler,
                                   digest=digest, stage=stage.name, iterations=stage.iterations,
                                   map_location=runtime.device)
    start = 0 if position is None else position["iteration"]
    if position is not None:
        log.info(f"{stage.name}: resumed at iteration {start}/{stage.iterations}")
    beta, images = settings.isa.fda_beta, normalization(settings.data)
    streams = [step_batches(dataset, stage.name, stream, start, stage.iterations, stage.batch_size, runtime,
                            settings.seed, settings.data.workers)
               if dataset is not None else None
               for stream, dataset in (("source", stage.source), ("target", stage.target))]
    bar = log.bar(stage.iterations, start, stage.name)
    running = RunningMeans(settings.train.log_every, stage.iterations)
    for iteration in range(start, stage.iterations):
        with nvtx_range(f"{stage.name}/step"):
            factor = stage.lr_factor(iteration)
            for optimizer, bases in zip(stage.optimizers.values(), base_lrs):
                for group, base in zip(optimizer.param_groups, bases):
                    group["lr"] = base * factor
            source, target = (to_device(next(batches), runtime.device) if batches is not None else None
                              for batches in streams)
            if "isa" in source:  # docs/method.md §6: ISA by FDA on the flagged source images
                source = translate_batch(source, beta, images)
            total, terms = stage.step(iteration, source, target)
        running.add(terms, total)
        done = iteration + 1
        running.log(done, log, stage.name, bar, **{"lr" if name == "network" else f"lr_{name}":
                                                   optimizer.param_groups[0]["lr"]
                                                   for name, optimizer in stage.optimizers.items()})
        bar.update(1)
        stage.after_step(done)
        checkpoint_if_due(runtime, settings.train.checkpoint_every, digest, done, stage.name, stage.iterations,
                          checkpoint_path, model=modules, optimizer=optimizers, scaler=scaler)
    bar.close()
    finish_stage(runtime, settings, stage.name, stage.iterations, checkpoint_path,
                 {os.path.join(stage.directory, name): module for name, module in stage.outputs.items()})


def data_parallel(runtime: Runtime, module: nn.Module) -> nn.Module:
    """``module`` wrapped for DDP under torchrun, else itself."""
    if not runtime.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)


def train_stage(runtime: Runtime, settings: Settings, network: DRSLNetwork, stage: Stage, log: RunLog) -> None:
    """Runs ``stage`` (Eq. 8, or Eq. 9 / 10 with a target stream) with
    :func:`run_stage` and writes its final weights to ``<directory>/model.pt``."""
    device = runtime.device
    network.to(device).train()
    if network.head is not None:  # without MMDL-FR the head is not evaluated: frozen, so DDP skips it
        network.head.requires_grad_(stage.mmdl)
    model = data_parallel(runtime, network)
    optimizer = sgd(network, stage.lr, settings.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.needs_scaler)
    loss_fn = drsl_loss(settings.loss, settings.data.num_classes, settings.model.sigma, stage.consistency)

    def step(iteration: int, source: Dict, target: Optional[Dict]):
        generator = torch.Generator(device).manual_seed(stream_seed(settings.seed, stage.name, "losses", iteration,
                                                                    runtime.rank))
        with runtime.autocast():
            total, terms = step_loss(model, network, loss_fn, source, target, generator, stage.mmdl)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        return total, terms

    def lr_factor(iteration: int) -> float:
        return poly_factor(iteration, stage.iterations, settings.optim.poly_power) if stage.poly else 1.0

    run_stage(runtime, settings, StageRun(stage.name, stage.directory, stage.iterations, stage.batch_size, stage.source,
                                        stage.target, {WEIGHTS: network}, {"network": optimizer}, lr_factor, step),
              scaler, log)
