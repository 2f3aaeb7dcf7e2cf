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

STAGES = {"run": ("source", "adapt", "evaluate"), "source": ("source",), "adapt": ("source", "adapt"),
          "evaluate": ("source", "adapt", "evaluate"), "intrada": ("source", "adapt", "evaluate")}
# what a bad command line raises: the CLI reports these in one line, exit code 2
EXPECTED_ERRORS = (ConfigError, RunDirectoryError, CheckpointError, DatasetLayoutError)


def with_intrada(config: Dict) -> Dict:
    """``drsl intrada``: the IntraDA stages (docs/method.md §7) in output_dir, reported
    beside the DRSL methods of the run that are already finished there."""
    done = [m for m in config["adaptation"]["methods"] if m != INTRADA and finished(last_round_directory(config, m))]
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
    if command in ("adapt", "evaluate") and not weights and not finished(os.path.join(config["output_dir"], "source")):
        raise RunDirectoryError(f"no finished source model in {config['output_dir']}/source; "
                                f"run `drsl source` (or `drsl run`) with the same config first")
    runtime = start(config)
    torch.manual_seed(config["seed"])
    log = RunLog(config["output_dir"], enabled=runtime.is_main, tensorboard=config["train"]["tensorboard"],
                 progress=config["train"]["progress"])
    began = time.perf_counter()
    try:
        if weights:
            return evaluate_files(runtime, config, weights, log)
        # stage commands work on the run in output_dir; `run` starts one unless --resume
        claim_output_dir(config, resume or command != "run", runtime)
        amp = str(runtime.amp_dtype).replace("torch.", "") if runtime.amp_dtype else "fp32"
        log.info(f"drsl {command}: config {config['config_name']}, seed {config['seed']}, {runtime.device} "
                 f"x{runtime.world}, {amp}, output {config['output_dir']}")
        run(runtime, config, log, STAGES[command])
        log.info(f"drsl {command}: done in {time.perf_counter() - began:.0f} s")
        return 0
    finally:
        log.close()
        stop(runtime)


def evaluate_files(runtime, config: Dict, paths: List[str], log: RunLog) -> int:
    """The reports of each model file; with ``evaluation.tta`` also those with
    TTA, and a line with both mIoUs."""
    for path in paths:
        network = seeded_network(config, log.info)
        load_weights(network, path, map_location="cpu")
        reports = evaluate(runtime, config, network, log, os.path.basename(path))
        for protocol, report in reports.items():
            log.info(f"{path} ({protocol} classes):\n{report.markdown()}")
        if config["evaluation"]["tta"]:
            with_tta = evaluate(runtime, config, network, log, os.path.basename(path), tta=True)
            for protocol, report in with_tta.items():
                log.info(f"{path} ({protocol} classes, TTA {views(config, True)}):\n{report.markdown()}")
            protocol = main_protocol(config)
            log.info(f"{path}: mIoU {100 * reports[protocol].miou:.1f} single-scale, "
                     f"{100 * with_tta[protocol].miou:.1f} with TTA")
    return 0
