"""Kill a run (SIGKILL) in the middle of every training stage in turn, on two
threads: source, DRSL, DRSL+, IntraDA inter- and intra-domain. Each
``--resume`` continues from the stage's checkpoint, and the run ends with the
bits of an uninterrupted run: every weights file, every summary, results.json."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from test_pipeline_run import drsl, tiny

STAGES = ("source", "drsl/round_1", "drsl_plus/round_1", "intrada/inter", "intrada/intra")
SETTINGS = {
    "adaptation.methods": "[drsl, drsl_plus, intrada]", "adaptation.rounds": 1, "adaptation.epochs_per_round": 2,
    "source.iterations": 6, "train.checkpoint_every": 1, "train.threads": 2,
    "intrada.inter_iterations": 4, "intrada.intra_iterations": 4, "intrada.batch_size": 2, "intrada.lr": 0.002,
    "intrada.discriminator_width": 0.125,
}


def kill_when_checkpointed(args, stage_dir):
    """Starts ``drsl *args`` and SIGKILLs it as soon as ``stage_dir`` holds a checkpoint."""
    process = subprocess.Popen([sys.executable, "-m", "drsl_fast.cli", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = os.path.join(stage_dir, "checkpoint.pt")
    deadline = time.time() + 300
    while not os.path.exists(checkpoint) and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert os.path.exists(checkpoint), f"no checkpoint seen in {stage_dir}: {stderr.decode()[-2000:]}"
    assert not os.path.exists(os.path.join(stage_dir, "model.pt"))


def outputs(directory):
    """Every weights file (relative path -> state dict) and JSON summary of a run."""
    weights, summaries = {}, {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if name.endswith(".pt"):
                weights[relative] = torch.load(path, weights_only=True)["model"]
            elif name.endswith(".json") and "tensorboard" not in relative:
                summaries[relative] = json.load(open(path))
    return weights, summaries


def test_kills_in_every_stage_resume_to_the_same_bits(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    done = drsl("run", "--config", "demo", *tiny(str(tmp_path), whole, **SETTINGS))
    assert done.returncode == 0, done.stderr[-3000:]

    for number, stage in enumerate(STAGES):
        resume = ["--resume"] if number else []
        kill_when_checkpointed(["run", "--config", "demo", *resume, *tiny(str(tmp_path), killed, **SETTINGS)],
                               os.path.join(killed, stage))
    resumed = drsl("run", "--config", "demo", "--resume", *tiny(str(tmp_path), killed, **SETTINGS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at iteration" in resumed.stdout + resumed.stderr

    leftovers = [name for _, _, names in os.walk(killed) for name in names if name.endswith(".tmp")]
    assert leftovers == []
    (weights_a, summaries_a), (weights_b, summaries_b) = outputs(whole), outputs(killed)
    assert sorted(weights_a) == sorted(weights_b)
    assert any(name.startswith("intrada/intra") for name in weights_a)
    for name, state in weights_a.items():
        assert all(torch.equal(state[key], weights_b[name][key]) for key in state), name
    assert summaries_a == summaries_b
