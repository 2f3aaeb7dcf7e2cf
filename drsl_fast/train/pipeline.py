"""The stages of a DRSL run, in order (docs/method.md §4-§6, §9):

1. source training with MMDL-FR (Eq. 8)                 -> source/model.pt
2. per round: class-balanced pseudo-labels (§5)          -> <method>/round_k/pseudo_labels/
3. per round: adaptation, DRSL (Eq. 9) or DRSL+ (Eq. 10) -> <method>/round_k/model.pt
4. evaluation on target val after each stage            -> results.json, results.md, rounds.png, panels/

Every stage is skipped when its output exists and resumed from its checkpoint
when it was interrupted, so ``drsl run --resume`` after a crash continues where
the run stopped and ends with the numbers of an uninterrupted run.
"""
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional

from drsl_fast.data import SyntheticPairConfig, make_synthetic_pair

from . import intrada, isa
from .checkpoint import atomic_write_json, comparable, load_weights, remove_stale_temporaries
from .config import read_yaml, save_config
from .data import AugmentedSamples, pseudo_labelled_target, target_dataset, train_transform
from .evaluate import evaluated, main_protocol, write_pictures
from .label_pass import DIRECTORY as PSEUDO_LABEL_DIR
from .label_pass import make_pseudo_labels
from .log import RunLog
from .loop import WEIGHTS, Stage, finished, train_stage
from .network import DRSLNetwork, seeded_network
from .runtime import Runtime, nvtx_range
from .settings import Data, Settings

RESOLVED_CONFIG = "config.yaml"


class RunDirectoryError(RuntimeError):
    """The output directory holds another run (or none to resume)."""


def prepare_synthetic_data(data: Data, runtime: Runtime, log: RunLog) -> None:
    """Writes the built-in synthetic pair when the config asks for it
    (data.synthetic) and it is not already there with the same settings."""
    settings, root = data.synthetic, data.synthetic_root
    if not settings:
        return
    pair = SyntheticPairConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    marker = os.path.join(root, "synthetic_pair.json")
    if runtime.is_main:
        current = None
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as handle:
                current = json.load(handle)
        wanted = json.loads(json.dumps(pair.__dict__))
        if current != wanted:
            log.info(f"writing the synthetic pair to {root} ...")
            make_synthetic_pair(root, pair)
    runtime.barrier()


def claim_output_dir(config: Dict, resume: bool, runtime: Runtime) -> None:
    """A new run needs an output directory without a run in it; ``--resume``
    needs the same resolved config (up to logging and worker settings). A
    run is there once its first stage has written ``source/``: a start that
    failed before leaves only its config (and logs), which the next start replaces."""
    path = os.path.join(config["output_dir"], RESOLVED_CONFIG)
    exists = os.path.isfile(path) and os.path.isdir(os.path.join(config["output_dir"], "source"))
    if exists and not resume:
        raise RunDirectoryError(f"{config['output_dir']} already holds a run; pass --resume to continue it "
                                f"or choose another output_dir=...")
    if exists:
        previous = read_yaml(path)
        if comparable(previous) != comparable(config):
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise RunDirectoryError(f"--resume: the config differs from the run's {path} (sections: {changed})")
    runtime.barrier()
    if runtime.is_main:
        save_config(config, path)


def source_stage(runtime: Runtime, settings: Settings, log: RunLog, directory_name: str = "source") -> DRSLNetwork:
    """Stage 1 (Eq. 8) in ``output_dir/directory_name``; returns the trained network."""
    network = seeded_network(settings, log.info)
    directory = os.path.join(settings.output_dir, directory_name)
    if not finished(directory):
        source = settings.source
        stage = Stage("source", directory, 1 if settings.dry_run else source.iterations, source.lr, poly=True,
                      batch_size=source.batch_size, source=isa.samples(settings.data, settings.isa, "source"))
        with nvtx_range(directory_name):
            train_stage(runtime, settings, network, stage, log)
    load_weights(network, os.path.join(directory, WEIGHTS), map_location="cpu", digest=settings.digest)
    return network


SOURCE_ISA = "source_isa"


def source_isa_settings(settings: Settings) -> Settings:
    """The settings of the ablation's 'source + ISA' row: ISA in source
    training only (a changed config, so its own digest)."""
    config = settings.config
    return Settings.of(dict(config, isa=dict(config["isa"], stages="source")))


def source_isa_rows(runtime: Runtime, settings: Settings, log: RunLog) -> List[Dict]:
    """The 'source + ISA' row: source training (Eq. 8) with ISA, in
    ``source_isa/``. The stage keeps the name 'source', which seeds the
    initialisation, sample order, augmentation and loss samples, so the row
    differs from source only by ISA alone."""
    changed = source_isa_settings(settings)
    log.info(f"source + ISA: the source stage with ISA, in {SOURCE_ISA}/")
    network = source_stage(runtime, changed, log, SOURCE_ISA)
    result = evaluated(runtime, changed, network, os.path.join(settings.output_dir, SOURCE_ISA), "source + ISA", log)
    return [{"round": None, "miou": result[main_protocol(settings.data)]["miou"], "portion": 0.0,
             "pseudo_label_accuracy": None, "pseudo_label_coverage": 0.0, "evaluation": result}]


def source_isa_final(runtime: Runtime, settings: Settings, log: RunLog) -> Optional[DRSLNetwork]:
    return finished_network(source_isa_settings(settings), log, os.path.join(settings.output_dir, SOURCE_ISA))


@dataclass(frozen=True)
class Rounds:
    """What a round of self-training trains on: DRSL (Eq. 9) uses the target
    pseudo-labels and the MMDL-FR terms, DRSL+ (Eq. 10) adds the consistency
    term; the ablations drop the MMDL-FR terms (plain self-training, Eq. 3)
    or the pseudo-labels (the source images alone, with ISA where it is on:
    the control that tells what the pseudo-labels add)."""

    pseudo_labels: bool = True
    mmdl: bool = True
    consistency: bool = False


def round_count(settings: Settings) -> int:
    return 1 if settings.dry_run else settings.adaptation.rounds


def last_round_directory(settings: Settings, method: str) -> str:
    return os.path.join(settings.output_dir, method, f"round_{round_count(settings)}")


def adaptation_rounds(runtime: Runtime, settings: Settings, log: RunLog, method: str, title: str,
                      variant: Rounds) -> List[Dict]:
    """Stages 2-3 of ``method`` (DRSL, DRSL+ or an ablation, as ``variant``
    says), every round evaluated; returns one summary per round."""
    network = trained_network(settings, log, os.path.join(settings.output_dir, "source"))
    data, adaptation = settings.data, settings.adaptation
    source = isa.samples(data, settings.isa, "adaptation")
    target_images = len(target_dataset(data, "train", with_labels=False))
    summaries = []
    for round_index in range(round_count(settings)):
        directory = os.path.join(settings.output_dir, method, f"round_{round_index + 1}")
        name = f"{method}/round_{round_index + 1}"
        pseudo = {"portion": 0.0, "accuracy": None, "coverage": 0.0}
        if not finished(directory):
            target = None
            if variant.pseudo_labels:
                with nvtx_range(f"{name}/pseudo_labels"):
                    pseudo = make_pseudo_labels(runtime, settings, network, directory, round_index, log)
                labelled = pseudo_labelled_target(data, os.path.join(directory, PSEUDO_LABEL_DIR), settings.dry_run)
                target = AugmentedSamples(labelled, train_transform(data, "target"))
            steps = math.ceil(adaptation.epochs_per_round * target_images / (adaptation.batch_size * runtime.world))
            stage = Stage(name, directory, 1 if settings.dry_run else steps, adaptation.lr, adaptation.poly,
                          source, target, batch_size=adaptation.batch_size, consistency=variant.consistency,
                          mmdl=variant.mmdl)
            with nvtx_range(name):
                train_stage(runtime, settings, network, stage, log)
        elif variant.pseudo_labels:
            pseudo = make_pseudo_labels(runtime, settings, network, directory, round_index, log, need_files=False)
        load_weights(network, os.path.join(directory, WEIGHTS), map_location="cpu", digest=settings.digest)
        result = evaluated(runtime, settings, network, directory, f"{title} round {round_index + 1}", log)
        main = result[main_protocol(data)]
        accuracy = pseudo["accuracy"]
        summaries.append({
            "round": round_index + 1, "miou": main["miou"], "portion": pseudo["portion"],
            "pseudo_label_accuracy": 100 * accuracy if accuracy is not None else None,
            "pseudo_label_coverage": 100 * pseudo["coverage"], "evaluation": result,
        })
        log.info(f"{title} round {round_index + 1}: mIoU {main['miou']:.1f}")
        log.scalars(f"{method}/evaluation", {"miou": main["miou"]}, round_index + 1)
    return summaries


def trained_network(settings: Settings, log: RunLog, directory: str) -> DRSLNetwork:
    """The network the finished stage in ``directory`` wrote (trained under ``settings``)."""
    network = seeded_network(settings, log.info)
    load_weights(network, os.path.join(directory, WEIGHTS), map_location="cpu", digest=settings.digest)
    return network


def finished_network(settings: Settings, log: RunLog, directory: str) -> Optional[DRSLNetwork]:
    """:func:`trained_network` when the stage in ``directory`` is finished, else None."""
    return trained_network(settings, log, directory) if finished(directory) else None


def last_round(runtime: Runtime, settings: Settings, log: RunLog, method: str) -> Optional[DRSLNetwork]:
    """The network of the last round of ``method`` when it is finished, else None."""
    return finished_network(settings, log, last_round_directory(settings, method))


@dataclass(frozen=True)
class Method:
    """An adaptation method of ``adaptation.methods``: ``adapt`` trains and
    evaluates its stages and returns the rows of the results table; ``final``
    gives the network of a finished run (for the panels), else None."""

    title: str
    adapt: Callable[[Runtime, Settings, RunLog], List[Dict]]
    final: Callable[[Runtime, Settings, RunLog], Optional[DRSLNetwork]]


def rounds_method(title: str, name: str, variant: Rounds) -> Method:
    return Method(title, partial(adaptation_rounds, method=name, title=title, variant=variant),
                  partial(last_round, method=name))


METHODS = {
    SOURCE_ISA: Method("source + ISA", source_isa_rows, source_isa_final),
    "drsl": rounds_method("DRSL", "drsl", Rounds()),
    "drsl_plus": rounds_method("DRSL+", "drsl_plus", Rounds(consistency=True)),
    "self_training": rounds_method("self-training (no MMDL-FR)", "self_training", Rounds(mmdl=False)),
    "no_pseudo_labels": rounds_method("no pseudo-labels (control)", "no_pseudo_labels", Rounds(pseudo_labels=False)),
    intrada.METHOD: Method(intrada.TITLE, intrada.intrada_stages, intrada.final_network),
}


def round_label(row: Dict) -> str:
    """The round number ('-' for a row without rounds), or for IntraDA the stage and the snapshot choice
    (``1 inter, last`` / ``2 intra, best on val @ 400``)."""
    if "stage" not in row:
        return "-" if row["round"] is None else str(row["round"])
    choice = "last" if row["selected_on"] is None else f"best on {row['selected_on']} @ {row['snapshot']}"
    return f"{row['round']} {row['stage']}, {choice}"


def number(value: Optional[float]) -> str:
    """One decimal, or '-' where the value is undefined (None or NaN)."""
    return f"{value:.1f}" if value is not None and math.isfinite(value) else "-"


def summary_table(results: Dict) -> str:
    lines = ["| method | round | mIoU (target val) | pseudo-label accuracy | coverage |", "|---|---|---|---|---|"]
    lines.append(f"| source only | - | {number(results['source_only']['miou'])} | | |")
    for title, rounds in results["methods"].items():
        for r in rounds:
            lines.append(f"| {title} | {round_label(r)} | {number(r['miou'])} | "
                         f"{number(r['pseudo_label_accuracy'])} | {number(r['pseudo_label_coverage'])} |")
    return "\n".join(lines)


def run(runtime: Runtime, settings: Settings, log: RunLog,
        stages=("source", "adapt", "evaluate")) -> Optional[Dict]:
    """Runs the given stages of the pipeline (``drsl run`` runs all)."""
    out = settings.output_dir
    if runtime.is_main and remove_stale_temporaries(out):
        log.info(f"removed the temporary files an interrupted run left in {out}")
    prepare_synthetic_data(settings.data, runtime, log)
    source = source_stage(runtime, settings, log)
    if "adapt" not in stages and "evaluate" not in stages:
        return None
    source_eval = evaluated(runtime, settings, source, os.path.join(out, "source"), "source only", log)
    results = {"source_only": {"miou": source_eval[main_protocol(settings.data)]["miou"], "evaluation": source_eval},
               "methods": {}}
    finals = {"source only": source}
    for name in settings.adaptation.methods:
        method = METHODS[name]
        if "adapt" in stages:
            results["methods"][method.title] = method.adapt(runtime, settings, log)
        network = method.final(runtime, settings, log)
        if network is not None:
            finals[method.title] = network
    if "evaluate" in stages and runtime.is_main:
        write_summary(runtime, settings, results, finals, log)
    runtime.barrier()
    return results


def write_summary(runtime: Runtime, settings: Settings, results: Dict, finals: Dict[str, DRSLNetwork],
                  log: RunLog) -> None:
    from .visualize import plot_rounds

    out = settings.output_dir
    atomic_write_json(results, os.path.join(out, "results.json"))
    table = summary_table(results)
    per_class = [f"### {title}\n\n" + evaluation[protocol]["markdown"]
                 for title, evaluation in [("source only", results["source_only"]["evaluation"])]
                 + [(t, rounds[-1]["evaluation"]) for t, rounds in results["methods"].items() if rounds]
                 for protocol in evaluation]
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# {settings.config_name} run, seed {settings.seed}\n\n{table}\n\n"
                     + "\n\n".join(per_class) + "\n")
    plot = plot_rounds(results, os.path.join(out, "rounds.png"))
    panels = write_pictures(runtime, settings, finals, out)
    log.info("\n" + table + "\n")
    log.info(f"results: {os.path.join(out, 'results.md')}" + (f", plot: {plot}" if plot else "")
             + (f", {len(panels)} panels in {os.path.join(out, 'panels')}" if panels else ""))
