"""What each ``drsl`` pipeline subcommand does (see :mod:`drsl_fast.cli`)."""
import os
import time
from typing import Dict, List, Optional

import torch

from drsl_fast.data.base import DatasetLayoutError

from .checkpoint import CheckpointError, load_weights
from .evaluate import evaluate, main_protocol
from .inference import views
from .log import RunLog
from .network import seeded_network
from .intrada import METHOD as INTRADA
from .loop import finished
from .pipeline import RunDirectoryError, claim_output_dir, last_round_directory, run
from .runtime import start, stop
from .schema import ConfigError, check_paths, shown
from .settings import Settings

STAGES = {"run": ("source", "adapt", "evaluate"), "source": ("source",), "adapt": ("source", "adapt"),
          "evaluate": ("source", "adapt", "evaluate"), "intrada": ("source", "adapt", "evaluate")}
# what a bad command line raises: the CLI reports these in one line, exit code 2
EXPECTED_ERRORS = (ConfigError, RunDirectoryError, CheckpointError, DatasetLayoutError)


def with_intrada(config: Dict) -> Dict:
    """``drsl intrada``: the IntraDA stages (docs/method.md §7) in output_dir, reported
    beside the DRSL methods of the run that are already finished there."""
    settings = Settings.of(config)
    done = [m for m in settings.adaptation.methods if m != INTRADA and finished(last_round_directory(settings, m))]
    return dict(config, adaptation=dict(config["adaptation"], methods=done + [INTRADA]))


def check_files(paths: List[str]) -> None:
    """The model files of ``drsl evaluate --weights`` exist."""
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--weights: expected an existing file, got {shown(path)}")


def execute(command: str, config: Dict, resume: bool = False, weights: Optional[List[str]] = None) -> int:
    """Runs ``command`` on a validated config. Paths and the device are
    checked, and output_dir claimed, before anything runs; what does not fit
    raises one of :data:`EXPECTED_ERRORS` (one line, reported by the CLI)."""
    if command == "intrada":
        config = with_intrada(config)
    check_paths(config, training=not weights)
    check_files(weights or [])
    settings = Settings.of(config)
    out = settings.output_dir
    if command in ("adapt", "evaluate") and not weights and not finished(os.path.join(out, "source")):
        raise RunDirectoryError(f"no finished source model in {out}/source; "
                                f"run `drsl source` (or `drsl run`) with the same config first")
    runtime = start(settings.device, settings.train)
    torch.manual_seed(settings.seed)
    log = RunLog(out, enabled=runtime.is_main, tensorboard=settings.train.tensorboard,
                 progress=settings.train.progress)
    began = time.perf_counter()
    try:
        if weights:
            return evaluate_files(runtime, settings, weights, log)
        # stage commands work on the run in output_dir; `run` starts one unless --resume
        claim_output_dir(config, resume or command != "run", runtime)
        amp = str(runtime.amp_dtype).replace("torch.", "") if runtime.amp_dtype else "fp32"
        log.info(f"drsl {command}: config {settings.config_name}, seed {settings.seed}, {runtime.device} "
                 f"x{runtime.world}, {amp}, output {out}")
        run(runtime, settings, log, STAGES[command])
        log.info(f"drsl {command}: done in {time.perf_counter() - began:.0f} s")
        return 0
    finally:
        log.close()
        stop(runtime)


def evaluate_files(runtime, settings: Settings, paths: List[str], log: RunLog) -> int:
    """The reports of each model file; with ``evaluation.tta`` also those with
    TTA, and a line with both mIoUs."""
    for path in paths:
        network = seeded_network(settings, log.info)
        load_weights(network, path, map_location="cpu")
        reports = evaluate(runtime, settings, network, log, os.path.basename(path))
        for protocol, report in reports.items():
            log.info(f"{path} ({protocol} classes):\n{report.markdown()}")
        if settings.evaluation.tta:
            with_tta = evaluate(runtime, settings, network, log, os.path.basename(path), tta=True)
            for protocol, report in with_tta.items():
                log.info(f"{path} ({protocol} classes, TTA {views(settings.inference, True)}):\n{report.markdown()}")
            protocol = main_protocol(settings.data)
            log.info(f"{path}: mIoU {100 * reports[protocol].miou:.1f} single-scale, "
                     f"{100 * with_tta[protocol].miou:.1f} with TTA")
    return 0
