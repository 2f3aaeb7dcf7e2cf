"""What each ``drsl`` pipeline subcommand does (see :mod:`drsl_fast.cli`)."""
import os
import time
from typing import Dict, List, Optional

import torch

from .checkpoint import load_weights
from .evaluate import evaluate
from .log import RunLog
from .network import seeded_network
from .pipeline import INTRADA, RunDirectoryError, claim_output_dir, finished, run
from .runtime import start, stop

STAGES = {"run": ("source", "adapt", "evaluate"), "source": ("source",), "adapt": ("source", "adapt"),
          "evaluate": ("source", "adapt", "evaluate"), "intrada": ("source", "adapt", "evaluate")}


def with_intrada(config: Dict) -> Dict:
    """``drsl intrada``: the IntraDA stages (SPEC §7) in output_dir, reported
    beside the DRSL methods of the run that are already finished there."""
    rounds = 1 if config["dry_run"] else config["adaptation"]["rounds"]
    done = [m for m in config["adaptation"]["methods"]
            if m != INTRADA and finished(os.path.join(config["output_dir"], m, f"round_{rounds}"))]
    return dict(config, adaptation=dict(config["adaptation"], methods=done + [INTRADA]))


def execute(command: str, config: Dict, resume: bool = False, weights: Optional[List[str]] = None) -> int:
    runtime = start(config)
    torch.manual_seed(config["seed"])
    log = RunLog(config["output_dir"], enabled=runtime.is_main, tensorboard=config["train"]["tensorboard"],
                 progress=config["train"]["progress"])
    began = time.perf_counter()
    try:
        if weights:
            return evaluate_files(runtime, config, weights, log)
        if command in ("adapt", "evaluate") and not finished(os.path.join(config["output_dir"], "source")):
            log.info(f"drsl {command}: no finished source model in {config['output_dir']}/source; "
                     f"run `drsl source` (or `drsl run`) with the same config first")
            return 2
        if command == "intrada":
            config = with_intrada(config)
        # stage commands work on the run in output_dir; `run` starts one unless --resume
        claim_output_dir(config, resume or command != "run", runtime)
        amp = str(runtime.amp_dtype).replace("torch.", "") if runtime.amp_dtype else "fp32"
        log.info(f"drsl {command}: config {config['config_name']}, seed {config['seed']}, {runtime.device} "
                 f"x{runtime.world}, {amp}, output {config['output_dir']}")
        run(runtime, config, log, STAGES[command])
        log.info(f"drsl {command}: done in {time.perf_counter() - began:.0f} s")
        return 0
    except RunDirectoryError as exc:
        log.info(f"drsl {command}: {exc}")
        return 2
    finally:
        log.close()
        stop(runtime)


def evaluate_files(runtime, config: Dict, paths: List[str], log: RunLog) -> int:
    for path in paths:
        network = seeded_network(config, log.info)
        load_weights(network, path, map_location="cpu")
        for protocol, report in evaluate(runtime, config, network, log, os.path.basename(path)).items():
            log.info(f"{path} ({protocol} classes):\n{report.markdown()}")
    return 0
