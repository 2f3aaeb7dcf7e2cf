"""What the demo experiments share: where they write, and one demo run in a
fresh process (so every run starts from the same interpreter state)."""
import json
import os
import subprocess
import sys
from typing import Dict, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_demo(output_dir: str, seed: int, overrides: Sequence[str]) -> Dict:
    """``drsl run --config demo seed=<seed> output_dir=<output_dir> *overrides``
    (key=value) in a fresh process; returns the run's results.json."""
    subprocess.run([sys.executable, "-m", "drsl_fast.cli", "run", "--config", "demo", f"seed={seed}",
                    f"output_dir={output_dir}", "train.progress=false", *overrides], check=True)
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)
