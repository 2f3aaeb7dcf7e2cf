"""The files a run reads and writes: no file it loads can run code, a damaged
or foreign checkpoint is refused with one line naming it, temporaries of a
killed process are cleaned, missing pseudo-labels are written again,
results.json is strict JSON, progress is plain lines off a terminal, and the
Eq. 6 backward adds in a fixed order."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from drsl_fast import cli, reference
from drsl_fast.models import DeepLabV2, load_init_weights
from drsl_fast.train import checkpoint
from drsl_fast.train.checkpoint import CheckpointError
from drsl_fast.train.log import RunLog
from test_pipeline_run import TINY_PAIR, drsl, tiny


class Plant:
    """Unpickling this object creates ``path``: the proof that a load ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path, marker, **extra):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": {"weight": Plant(marker)}, "meta": {}, **extra}, path)


def small_state():
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_every_loader_refuses_a_planted_pickle(tmp_path):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "evil.pt")
    plant(path, marker, optimizer={}, scaler=None, position={}, rng={})
    model, optimizer = small_state()
    loads = [
        lambda: checkpoint.load_training_state(path, model=model, optimizer=optimizer, scaler=None, digest="d",
                                               stage="source", iterations=4),
        lambda: checkpoint.load_weights(model, path),
        lambda: checkpoint.read_file(path),
    ]
    for load in loads:
        with pytest.raises(CheckpointError, match="evil.pt") as raised:
            load()
        assert "\n" not in str(raised.value)
    with pytest.raises(Exception, match="evil.pt"):
        load_init_weights(DeepLabV2(4, depth=18, width=0.125), path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("place", ["source/checkpoint.pt", "source/model.pt"])
def test_the_command_line_refuses_a_planted_checkpoint(tmp_path, place):
    """A crafted file in a fresh output directory: one line naming it, exit 2, nothing run."""
    out, marker = str(tmp_path / "run"), str(tmp_path / "ran")
    plant(os.path.join(out, place), marker)
    done = drsl("run", "--config", "demo", *tiny(str(tmp_path), out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and place.split("/")[1] in done.stderr.strip().splitlines()[-1]
    assert not os.path.exists(marker)
    weights = drsl("evaluate", "--config", "demo", "--weights", os.path.join(out, place), *tiny(str(tmp_path), out))
    assert weights.returncode == 2 and "Traceback" not in weights.stderr
    assert not os.path.exists(marker)


def test_training_state_round_trips_through_weights_only(tmp_path):
    model, optimizer = small_state()
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = str(tmp_path / "checkpoint.pt")
    torch.manual_seed(7)
    np.random.seed(7)
    position = {"stage": "source", "iteration": 2, "iterations": 4}
    checkpoint.save_training_state(path, model=model, optimizer=optimizer, scaler=None, position=position,
                                   digest="abc")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    other, other_optimizer = small_state()
    torch.manual_seed(1)
    np.random.seed(1)
    assert checkpoint.load_training_state(path, model=other, optimizer=other_optimizer, scaler=None,
                                          digest="abc", stage="source", iterations=4) == position
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(other_optimizer.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]


@pytest.mark.parametrize("damage", ["truncated", "foreign digest", "other stage", "other iterations",
                                    "other model", "not ours"])
def test_a_damaged_or_foreign_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    model, optimizer = small_state()
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_training_state(path, model=model, optimizer=optimizer, scaler=None,
                                   position={"stage": "source", "iteration": 2, "iterations": 4}, digest="abc")
    wanted = {"digest": "abc", "stage": "source", "iterations": 4}
    if damage == "truncated":
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    elif damage == "foreign digest":
        wanted["digest"] = "xyz"
    elif damage == "other stage":
        wanted["stage"] = "drsl/round_1"
    elif damage == "other iterations":
        wanted["iterations"] = 8
    elif damage == "other model":
        model, optimizer = (lambda m: (m, torch.optim.SGD(m.parameters(), lr=0.1)))(nn.Linear(5, 2))
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError) as raised:
        checkpoint.load_training_state(path, model=model, optimizer=optimizer, scaler=None, **wanted)
    message = str(raised.value)
    assert message.startswith(path) and "\n" not in message and len(message) < 500


def test_the_digest_ignores_what_may_change_on_resume():
    from drsl_fast.train.config import load_config

    config = load_config("demo")
    same = dict(config, output_dir="elsewhere", train=dict(config["train"], log_every=3), dry_run=True)
    assert checkpoint.config_digest(config) == checkpoint.config_digest(same)
    # a run made before model.head_as_gemm existed keeps its digest while it is off; on, it rounds otherwise
    assert not config["model"]["head_as_gemm"]
    older = dict(config, model={k: v for k, v in config["model"].items() if k != "head_as_gemm"})
    assert checkpoint.config_digest(config) == checkpoint.config_digest(older)
    gemm = dict(config, model=dict(config["model"], head_as_gemm=True))
    assert checkpoint.config_digest(config) != checkpoint.config_digest(gemm)
    other = dict(config, source=dict(config["source"], iterations=config["source"]["iterations"] + 1))
    assert checkpoint.config_digest(config) != checkpoint.config_digest(other)


def test_temporaries_of_other_processes_are_removed(tmp_path):
    stale = tmp_path / "a" / ".checkpoint.pt.999999.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"x" * 10)
    mine = tmp_path / f".model.pt.{os.getpid()}.tmp"
    mine.write_bytes(b"x")
    keep = tmp_path / "model.pt"
    keep.write_bytes(b"x")
    assert checkpoint.remove_stale_temporaries(str(tmp_path)) == 1
    assert not stale.exists() and mine.exists() and keep.exists()


def test_json_files_are_strict_json(tmp_path):
    path = str(tmp_path / "x.json")
    checkpoint.atomic_write_json({"miou": float("nan"), "classes": {"car": float("inf"), "road": 1.5}}, path)
    text = open(path).read()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert data == {"miou": None, "classes": {"car": None, "road": 1.5}}


def test_progress_off_a_terminal_is_plain_lines(tmp_path, capsys):
    log = RunLog(str(tmp_path), tensorboard=False)
    bar = log.bar(100, 0, "source")
    for _ in range(100):
        bar.set_postfix(loss="0.5")
        bar.update(1)
    bar.close()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("source:")]
    assert len(lines) == 4 and lines[-1].startswith("source: 100/100")


def test_eq6_gradient_adds_in_a_fixed_order():
    """Many triplets on few pixels, two threads: the gradient maps of Eq. 6
    (drsl_fast::consistency_hinge on the CPU) are the same bits on every
    call and match a float64 computation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        target = torch.randn(2, 64, 5, 7, generator=generator)
        source = torch.randn(2, 64, 5, 7, generator=generator)
        anchor, positive, negative = (torch.randint(0, 2 * 35, (20000,), generator=generator) for _ in range(3))
        triplet_args = (anchor, positive, negative, 300.0)  # a margin that keeps every hinge active

        def gradients(t, s, op):
            t, s = t.clone().requires_grad_(), s.clone().requires_grad_()
            op(t, s, *triplet_args)[0].backward()
            return t.grad, s.grad

        runs = [gradients(target, source, torch.ops.drsl_fast.consistency_hinge) for _ in range(5)]
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
        exact = gradients(target.double(), source.double(), reference.consistency_hinge)
        for got, want in zip(runs[0], exact):
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_missing_pseudo_labels_are_written_again(tmp_path):
    """A round whose pseudo-label pass finished but one PNG was deleted
    writes the same PNG again before it trains."""
    from drsl_fast.train.config import load_config
    from drsl_fast.train.log import quiet_log
    from drsl_fast.train.label_pass import make_pseudo_labels
    from drsl_fast.train.network import seeded_network
    from drsl_fast.train.runtime import Runtime
    from drsl_fast.train.settings import Settings

    out = str(tmp_path / "run")
    assert cli.main(["source", "--config", "demo", *tiny(str(tmp_path), out)]) == 0
    config = load_config("demo", tiny(str(tmp_path), out))
    settings = Settings.of(config)
    network = seeded_network(settings, print)
    runtime = Runtime(torch.device("cpu"))
    round_dir = os.path.join(out, "drsl", "round_1")
    first = make_pseudo_labels(runtime, settings, network, round_dir, 0, quiet_log())
    labels = os.path.join(round_dir, "pseudo_labels")
    names = sorted(os.listdir(labels))
    assert len(names) == TINY_PAIR["n_target_train"]
    original = open(os.path.join(labels, names[1]), "rb").read()
    os.remove(os.path.join(labels, names[1]))
    assert make_pseudo_labels(runtime, settings, network, round_dir, 0, quiet_log(), need_files=False) == first
    assert not os.path.exists(os.path.join(labels, names[1]))
    assert make_pseudo_labels(runtime, settings, network, round_dir, 0, quiet_log()) == first
    assert open(os.path.join(labels, names[1]), "rb").read() == original
    assert sorted(os.listdir(labels)) == names


def test_a_failed_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk (ENOSPC from the write) names the file and leaves the old one."""
    import errno

    path = str(tmp_path / "model.pt")
    checkpoint.atomic_save({"model": {}, "meta": {}}, path)
    before = open(path, "rb").read()

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="model.pt: could not be written \\(No space left on device\\)"):
        checkpoint.atomic_save({"model": {}, "meta": {}}, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["model.pt"]
