"""What the demo experiments share: where they write, one demo run in a
fresh process (so every run starts from the same interpreter state), and a
finished run's settings and trained stages, reopened for a study."""
import json
import os
import subprocess
import sys
from typing import Dict, Sequence, Tuple

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_demo(output_dir: str, seed: int, overrides: Sequence[str]) -> Dict:
    """``drsl run --config demo seed=<seed> output_dir=<output_dir> *overrides``
    (key=value) in a fresh process; returns the run's results.json."""
    subprocess.run([sys.executable, "-m", "drsl_fast.cli", "run", "--config", "demo", f"seed={seed}",
                    f"output_dir={output_dir}", "train.progress=false", *overrides], check=True)
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def open_run(run: str, threads: int) -> Tuple[dict, object, object]:
    """A finished run's config (as loaded, no progress bars, ``threads`` CPU
    threads), its Settings and a started runtime."""
    import torch

    from drsl_fast.train.config import load_config
    from drsl_fast.train.runtime import start
    from drsl_fast.train.settings import Settings

    torch.set_num_threads(threads)
    config = load_config(os.path.join(run, "config.yaml"), ["train.progress=false", f"train.threads={threads}"])
    settings = Settings.of(config)
    return config, settings, start(settings.device, settings.train)


def trained_stage(run: str, stage: str, settings):
    """The network of ``settings`` with the weights of ``run``'s ``stage``
    (e.g. "source", "drsl_plus/round_2"). The weights belong to the run's own
    config.yaml, as written (before newer keys' defaults join it)."""
    from drsl_fast.train.checkpoint import config_digest, load_weights
    from drsl_fast.train.config import read_yaml
    from drsl_fast.train.network import seeded_network

    network = seeded_network(settings, lambda line: None)
    load_weights(network, os.path.join(run, stage, "model.pt"), map_location="cpu",
                 digest=config_digest(read_yaml(os.path.join(run, "config.yaml"))))
    return network
