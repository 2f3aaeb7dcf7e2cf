"""The DRSL pipeline end to end on a tiny synthetic pair (CPU): outputs of
every stage, resume after a kill mid-round, DDP through torchrun with two
processes, and dry runs of the real-dataset configs on fixtures in their
directory layouts."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from drsl_fast import cli
from drsl_fast.data import SyntheticPairConfig, make_synthetic_pair

TINY_PAIR = dict(seed=3, n_source=8, n_target_train=6, n_target_val=4, source_size=[64, 36], target_size=[64, 32])


def tiny(tmp, out, **changes):
    """Overrides of the demo config for a run of a few seconds."""
    data = os.path.join(tmp, "data")
    settings = {
        "output_dir": out, "seed": 0, "device": "cpu",
        "data.synthetic_root": data, "data.synthetic": json.dumps(TINY_PAIR),
        "data.source.root": os.path.join(data, "source"), "data.target.root": os.path.join(data, "target"),
        "data.source_size": "[36, 64]", "data.target_size": "[32, 64]", "data.crop": "[32, 32]",
        "data.workers": 0, "data.eval_batch_size": 2,
        "model.depth": 18, "model.width": 0.125, "model.embedding_dim": 8, "loss.samples_per_class": 20,
        "source.iterations": 4, "source.batch_size": 2, "source.lr": 0.01,
        "adaptation.rounds": 2, "adaptation.epochs_per_round": 1, "adaptation.batch_size": 2,
        "adaptation.lr": 0.002, "adaptation.methods": "[drsl, drsl_plus]", "isa.probability": 0,
        "pseudo_labels.isa": False, "evaluation.panels": 2,
        "train.checkpoint_every": 2, "train.log_every": 1, "train.threads": 1, "train.tensorboard": False,
        "train.progress": False,
    }
    settings.update(changes)
    return [f"{k}={v if not isinstance(v, bool) else str(v).lower()}" for k, v in settings.items()]


def drsl(*args, env=None):
    """``drsl`` in a fresh process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "drsl_fast.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_run_writes_every_stage_output(tmp_path):
    out = str(tmp_path / "run")
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), out)]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["methods"]) == {"DRSL", "DRSL+"}
    assert [r["round"] for r in results["methods"]["DRSL+"]] == [1, 2]
    assert 0 <= results["source_only"]["miou"] <= 100
    for method in ("drsl", "drsl_plus"):
        for round_number, portion in ((1, 0.2), (2, 0.25)):
            directory = os.path.join(out, method, f"round_{round_number}")
            summary = json.load(open(os.path.join(directory, "pseudo_labels.json")))
            assert summary["portion"] == portion and summary["images"] == TINY_PAIR["n_target_train"]
            assert 0 <= summary["accuracy"] <= 1 and len(summary["thresholds"]) == 19
            pngs = sorted(os.listdir(os.path.join(directory, "pseudo_labels")))
            assert len(pngs) == TINY_PAIR["n_target_train"]
            label = np.array(Image.open(os.path.join(directory, "pseudo_labels", pngs[0])))
            assert label.dtype == np.uint8 and label.shape == (32, 64)
            assert set(np.unique(label).tolist()) <= set(range(19)) | {255}
            assert os.path.isfile(os.path.join(directory, "model.pt"))
            assert not os.path.exists(os.path.join(directory, "checkpoint.pt"))
    assert len(os.listdir(os.path.join(out, "panels"))) == 2
    assert os.path.isfile(os.path.join(out, "rounds.png"))
    assert "| source only |" in open(os.path.join(out, "results.md")).read()
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    # a second `run` into the same directory refuses; `evaluate` re-reads what is finished
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), out)]) == 2
    assert cli.main(["evaluate", "--config", "demo", *tiny(str(tmp_path), out)]) == 0


def test_resume_after_kill_mid_round_gives_the_same_result(tmp_path):
    """A run killed while a round trains (its checkpoint on disk, its model not)
    and resumed ends with the weights and numbers of an uninterrupted run."""
    args = ["run", "--config", "demo"]
    settings = dict(**{"adaptation.epochs_per_round": 12, "train.checkpoint_every": 1,
                       "adaptation.methods": "[drsl]"})
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    done = drsl(*args, *tiny(str(tmp_path), whole, **settings))
    assert done.returncode == 0, done.stderr

    process = subprocess.Popen([sys.executable, "-m", "drsl_fast.cli", *args, *tiny(str(tmp_path), killed, **settings)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(killed, "drsl", "round_2", "checkpoint.pt")
    deadline = time.time() + 300
    while not os.path.exists(checkpoint) and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.exists(checkpoint), "the run ended before a mid-round checkpoint was seen"
    assert not os.path.exists(os.path.join(killed, "drsl", "round_2", "model.pt"))
    assert torch.load(checkpoint, weights_only=True)["position"]["iteration"] < 36

    resumed = drsl(*args, "--resume", *tiny(str(tmp_path), killed, **settings))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at iteration" in resumed.stderr + resumed.stdout
    for name in ("source/model.pt", "drsl/round_1/model.pt", "drsl/round_2/model.pt"):
        a, b = weights(os.path.join(whole, name)), weights(os.path.join(killed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (json.load(open(os.path.join(d, "results.json"))) for d in (whole, killed))
    assert a == b


def test_two_process_ddp_gives_the_thresholds_of_one_process(tmp_path):
    """torchrun, gloo, 2 CPU processes: the all-reduced histograms give every
    rank the thresholds (and the pseudo-labels) of a single-process pass."""
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    settings = {"adaptation.rounds": 1, "adaptation.methods": "[drsl]", "data.synthetic": json.dumps(
        dict(TINY_PAIR, n_target_train=7))}
    assert cli.main(["source", "--config", "demo", *tiny(str(tmp_path), single, **settings)]) == 0
    os.makedirs(ddp)
    shutil.copytree(os.path.join(single, "source"), os.path.join(ddp, "source"))
    assert cli.main(["adapt", "--config", "demo", *tiny(str(tmp_path), single, **settings)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "drsl_fast.cli", "adapt", "--config", "demo", *tiny(str(tmp_path), ddp, **settings)],
        capture_output=True, text=True, env=env, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = (json.load(open(os.path.join(d, "drsl", "round_1", "pseudo_labels.json"))) for d in (single, ddp))
    assert a["thresholds"] == b["thresholds"] and a["predicted_pixels"] == b["predicted_pixels"]
    assert a["images"] == b["images"] == 7 and a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-12)
    labels = os.path.join("drsl", "round_1", "pseudo_labels")
    names = sorted(os.listdir(os.path.join(single, labels)))
    assert names == sorted(os.listdir(os.path.join(ddp, labels))) and len(names) == 7
    for name in names:
        assert np.array_equal(np.array(Image.open(os.path.join(single, labels, name))),
                              np.array(Image.open(os.path.join(ddp, labels, name))))
    assert os.path.isfile(os.path.join(ddp, "drsl", "round_1", "model.pt"))


def write_synthia_fixture(root, count=3, height=36, width=64):
    """SYNTHIA-RAND-CITYSCAPES layout: RGB/*.png and 16-bit GT/LABELS/*.png (class id in channel 0)."""
    from test_data import write_png16_rgba, write_rgb

    rng = np.random.default_rng(0)
    for i in range(count):
        name = f"{i:07d}.png"
        write_rgb(os.path.join(root, "RGB", name), height, width, i)
        raw = np.zeros((height, width, 4), np.uint16)
        raw[..., 0] = rng.integers(0, 23, (height, width))
        write_png16_rgba(os.path.join(root, "GT", "LABELS", name), raw)


@pytest.mark.parametrize("config", ["gta5", "synthia"])
def test_real_dataset_configs_dry_run_on_fixtures(tmp_path, config):
    """The gta5 / synthia configs, pointed at fixtures in the real layouts
    (GTA5 images/labels, SYNTHIA RGB + 16-bit GT/LABELS, Cityscapes
    leftImg8bit/gtFine), run every stage once (dry_run)."""
    make_synthetic_pair(str(tmp_path / "pair"), SyntheticPairConfig(**dict(TINY_PAIR, source_size=(64, 36))))
    source_root = str(tmp_path / "pair" / "source")
    if config == "synthia":
        source_root = str(tmp_path / "SYNTHIA")
        write_synthia_fixture(source_root)
    out = str(tmp_path / "run")
    overrides = [f"output_dir={out}", "device=cpu", "dry_run=true", f"data.source.root={source_root}",
                 f"data.target.root={tmp_path / 'pair' / 'target'}", "model.init_weights=null", "model.depth=18",
                 "model.width=0.125", "data.source_size=[36, 64]", "data.target_size=[32, 64]", "data.crop=[32, 32]",
                 "data.workers=0", "train.tensorboard=false", "train.progress=false", "train.threads=1"]
    assert cli.main(["run", "--config", config, *overrides]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert [len(r) for r in results["methods"].values()] == [1, 1]
    protocols = {"gta5": {"19"}, "synthia": {"16", "13"}}[config]
    assert set(results["source_only"]["evaluation"]) == protocols


def test_ablation_rounds_drop_the_pseudo_labels_or_the_mmdl_terms(tmp_path):
    """no_pseudo_labels trains on the source stream alone (no pass, no labels);
    self_training keeps the pseudo-labels and only the segmentation terms."""
    out = str(tmp_path / "run")
    settings = {"adaptation.rounds": 1, "adaptation.methods": "[no_pseudo_labels, self_training]"}
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), out, **settings)]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    control, plain = (results["methods"][t][0] for t in ("no pseudo-labels (control)", "self-training (no MMDL-FR)"))
    assert control["pseudo_label_accuracy"] is None and control["pseudo_label_coverage"] == 0
    assert not os.path.exists(os.path.join(out, "no_pseudo_labels", "round_1", "pseudo_labels"))
    assert plain["pseudo_label_coverage"] > 0
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    terms = {tag: set(row) - {"tag", "step", "time", "lr"} for row in logged for tag in [row["tag"]]}
    assert terms["self_training/round_1"] == {"seg_source", "seg_target", "loss"}
    assert terms["no_pseudo_labels/round_1"] >= {"seg_source", "loss"} and "seg_target" not in \
        terms["no_pseudo_labels/round_1"] and len(terms["no_pseudo_labels/round_1"]) > 2
