"""Bad command lines end in one line on stderr naming the key or file, with
exit code 2 and no traceback (unless asked for), before anything runs; and a
start that failed does not block the corrected command."""
import json
import os
import subprocess
import sys

import pytest
import torch

from drsl_fast import cli
from drsl_fast.data import SyntheticPairConfig, make_synthetic_pair
from drsl_fast.train.config import ConfigError, load_config, save_config
from drsl_fast.train.pipeline import claim_output_dir
from drsl_fast.train.runtime import Runtime, device_for

TINY_PAIR = dict(seed=3, n_source=8, n_target_train=6, n_target_val=4, source_size=[64, 36], target_size=[64, 32])


def tiny(out, data, **changes):
    """Overrides of the demo config for a dry run of a few seconds on the
    synthetic pair under ``data`` (written by the run itself)."""
    settings = {
        "output_dir": out, "device": "cpu", "dry_run": "true",
        "data.synthetic_root": data, "data.synthetic": json.dumps(TINY_PAIR),
        "data.source.root": os.path.join(data, "source"), "data.target.root": os.path.join(data, "target"),
        "data.source_size": "[36, 64]", "data.target_size": "[32, 64]", "data.crop": "[32, 32]",
        "data.workers": 0, "data.eval_batch_size": 2, "model.depth": 18, "model.width": 0.125,
        "model.embedding_dim": 8, "loss.samples_per_class": 20, "source.batch_size": 2, "adaptation.batch_size": 2,
        "adaptation.methods": "[drsl]", "isa.probability": 0, "pseudo_labels.isa": "false",
        "evaluation.panels": 0, "train.threads": 1, "train.tensorboard": "false",
        "train.progress": "false",
    }
    settings.update(changes)
    return [f"{key}={value}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A synthetic pair on disk (for configs that read existing roots)."""
    root = str(tmp_path_factory.mktemp("pair"))
    make_synthetic_pair(root, SyntheticPairConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in TINY_PAIR.items()}))
    return root


def on_disk(pair, out, **changes):
    """``tiny`` with the pair already on disk (no synthetic pair written)."""
    return tiny(out, pair, **{"data.synthetic": "null", **changes})


def one_error_line(capsys, command="run"):
    """The single stderr line of a failed command (asserted to be one, without a traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"drsl {command}: "), err
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("source.iterations=abc", 'source.iterations: expected an integer >= 1, got "abc"'),
    ("source.iterations=-5", "source.iterations: expected an integer >= 1, got -5"),
    ("source.iterations=2.0", "source.iterations: expected an integer >= 1, got 2.0"),
    ("adaptation.rounds=-1", "adaptation.rounds: expected an integer >= 1, got -1"),
    ("intrada.inter_iterations=0", "intrada.inter_iterations: expected an integer >= 1, got 0"),
    ("dry_run='false'", 'dry_run: expected true or false, got "false"'),
    ("model.mmdl=1", "model.mmdl: expected true or false, got 1"),
    ("device=gpu", 'device: expected auto, cpu, cuda or cuda:N, got "gpu"'),
    ("source.lr=-0.01", "source.lr: expected a number > 0, got -0.01"),
    ("source.lr=.nan", "source.lr: expected a number > 0, got NaN"),
    ("data.crop=[32]", "data.crop: expected a list [H, W] of two values, each an integer >= 1, got [32]"),
    ("data.crop=[32, 32, 3]", "data.crop: expected a list [H, W]"),
    ("train.amp=fp32", 'train.amp: expected one of "auto", "off", "fp16", "bf16", got "fp32"'),
    ("adaptation.methods=[drsl, dann]", "adaptation.methods: expected a non-empty list without repeats"),
    ("adaptation.methods=[]", "adaptation.methods: expected a non-empty list"),
    ("model.depth=42", "model.depth: expected one of 18, 34, 50, 101, 152, got 42"),
    ("pseudo_labels.portion_max=1.5", "pseudo_labels.portion_max: expected a number in (0, 1], got 1.5"),
    ("intrada.lambda=-0.1", "intrada.lambda: expected a number in [0, 1], got -0.1"),
    ("optim.momentum=2", "optim.momentum: expected a number in [0, 1], got 2"),
    ("train.threads=0", "train.threads: expected null or an integer >= 1, got 0"),
    ("evaluation.max_images=0", "evaluation.max_images: expected null or an integer >= 1, got 0"),
    ("data.num_classes=16", "data.num_classes: expected 19 for data.source.kind gta5, got 16"),
    ("pseudo_labels.portion_start=0.6", "pseudo_labels.portion_start: expected at most pseudo_labels.portion_max"),
    ("data.scale_range=[1.5, 0.5]", "data.scale_range: expected [low, high] with low <= high"),
    ("data.synthetic.n_source=0", "data.synthetic.n_source: expected an integer >= 1, got 0"),
    ("data.synthetic.colours=3", "unknown key 'data.synthetic.colours'"),
    ("data.synthetic.target_style={glare: 1}", "data.synthetic.target_style: expected null or a mapping"),
    ("model.depht=50", "unknown key 'model.depht'"),
    ("model=3", "'model' is a section"),
    ("seed", "expected key=value"),
    ("data.crop=[1, 2", "not valid YAML"),
])
def test_bad_value_is_one_line_and_leaves_nothing(tmp_path, capsys, override, message):
    out = str(tmp_path / "run")
    assert cli.main(["run", *tiny(out, str(tmp_path / "data")), override]) == 2
    assert message in one_error_line(capsys)
    assert not os.path.exists(out)


@pytest.mark.parametrize("make_file, message", [
    (lambda path: None, "no config file"),
    (lambda path: open(path, "w").write("seed: [1\n"), "not valid YAML"),
    (lambda path: open(path, "w").write("- seed\n"), "expected a mapping at the top level"),
    (lambda path: open(path, "wb").write(b"\xff\xfe\x00seed: 1"), "not a text file"),
    (lambda path: open(path, "w").write("source: {iterations: many}\n"), "source.iterations: expected an integer"),
])
def test_bad_config_file_is_one_line_naming_it(tmp_path, capsys, make_file, message):
    path = str(tmp_path / "mine.yaml")
    make_file(path)
    assert cli.main(["config", "--config", path]) == 2
    line = one_error_line(capsys, "config")
    assert message in line and ("mine.yaml" in line or "source.iterations" in line)


def test_null_switches_an_optional_section_off():
    assert load_config("demo", ["data.synthetic=null"])["data"]["synthetic"] is None
    with pytest.raises(ConfigError, match="'data' is a section"):
        load_config("demo", ["data=null"])
    with pytest.raises(ConfigError, match="data.synthetic_root: expected a path when data.synthetic is set"):
        load_config("gta5", ["data.synthetic.seed=1"])
    with pytest.raises(ConfigError, match="unknown key 'data.synthetic.colours'; known here: n_source, "):
        load_config("gta5", ["data.synthetic={colours: 3}", "data.synthetic_root=pair"])


@pytest.mark.parametrize("key, value, message", [
    ("data.source.root", "{tmp}/missing", "data.source.root: expected an existing directory, got"),
    ("data.target.root", "{tmp}/missing", "data.target.root: expected an existing directory, got"),
    ("data.target.val_split", "test", "data.target.val_split: expected an existing directory, got"),
    ("data.source.translated_root", "{tmp}/missing", "data.source.translated_root: expected an existing directory"),
    ("data.source.list_file", "{tmp}/missing.txt", "data.source.list_file: expected an existing file"),
    ("model.init_weights", "{tmp}/missing.pth", "model.init_weights: expected an existing file"),
])
def test_missing_path_is_found_before_anything_runs(tmp_path, capsys, pair, key, value, message):
    out = str(tmp_path / "run")
    assert cli.main(["run", *on_disk(pair, out, **{key: value.format(tmp=tmp_path)})]) == 2
    assert message in one_error_line(capsys)
    assert not os.path.exists(out)


def test_synthetic_roots_may_be_missing_when_the_run_writes_them(tmp_path, capsys):
    """The demo's roots lie under data.synthetic_root: checked as present only without data.synthetic."""
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    assert cli.main(["run", *tiny(out, data, **{"data.synthetic": "null"})]) == 2
    assert "data.source.root: expected an existing directory" in one_error_line(capsys)
    assert cli.main(["evaluate", *tiny(out, data), "--weights", str(tmp_path / "model.pt")]) == 2
    assert f'--weights: expected an existing file, got "{tmp_path / "model.pt"}"' in one_error_line(capsys, "evaluate")
    # key=value after --weights files is an override, not a file name
    assert cli.main(["evaluate", *tiny(out, data), "--weights", str(tmp_path / "model.pt"), "model.depht=3"]) == 2
    assert "unknown key 'model.depht'" in one_error_line(capsys, "evaluate")


def test_output_dir_that_is_a_file(tmp_path, capsys, pair):
    out = tmp_path / "run"
    out.write_text("not a directory")
    assert cli.main(["source", *on_disk(pair, str(out))]) == 2
    assert "output_dir: expected a directory, not a file" in one_error_line(capsys, "source")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(tmp_path, capsys, pair):
    out = str(tmp_path / "run")
    assert cli.main(["run", *on_disk(pair, out, device="cuda:1")]) == 2
    assert 'device: expected cpu or auto (torch sees no GPU), got "cuda:1"' in one_error_line(capsys)
    assert not os.path.exists(os.path.join(out, "config.yaml"))


def test_device_names_are_checked_against_the_gpus(monkeypatch):
    """cuda:N must name a GPU torch sees, and under torchrun each rank takes its LOCAL_RANK."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for("cuda:1", local_rank=0, world=1) == torch.device("cuda", 1)
    assert device_for("cuda", local_rank=1, world=2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match='device: expected a GPU index below 2, got "cuda:2"'):
        device_for("cuda:2", local_rank=0, world=1)
    with pytest.raises(ConfigError, match="device: expected cuda under torchrun"):
        device_for("cuda:1", local_rank=0, world=2)


def test_run_directory_errors_are_one_line(tmp_path, capsys, pair):
    out = str(tmp_path / "run")
    assert cli.main(["adapt", *on_disk(pair, out)]) == 2
    assert "no finished source model in" in one_error_line(capsys, "adapt")
    save_config(load_config("demo", on_disk(pair, out)), os.path.join(out, "config.yaml"))
    os.makedirs(os.path.join(out, "source"))  # a run that began training
    assert cli.main(["run", *on_disk(pair, out)]) == 2
    assert "already holds a run; pass --resume" in one_error_line(capsys)
    assert cli.main(["run", "--resume", *on_disk(pair, out, seed=1)]) == 2
    assert "--resume: the config differs" in one_error_line(capsys)


def test_unusable_model_file_is_one_line_naming_it(tmp_path, capsys, pair):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"not a model")
    assert cli.main(["evaluate", *on_disk(pair, str(tmp_path / "run")), "--weights", str(weights)]) == 2
    assert str(weights) in one_error_line(capsys, "evaluate")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="source.iterations"):
        cli.main(["config", "--debug", "source.iterations=abc"])
    command = [sys.executable, "-m", "drsl_fast.cli", "config", "source.iterations=abc"]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == ['drsl config: source.iterations: expected an integer >= 1, got "abc"']
    debug = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, DRSL_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path, capsys, pair):
    """A bad value leaves no config.yaml; a start that fails after claiming
    output_dir (the source root lacks the GTA5 layout) leaves one, which the
    corrected command replaces, with and without --resume."""
    out, empty = str(tmp_path / "run"), tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["run", *on_disk(pair, out, **{"source.iterations": "abc"})]) == 2
    one_error_line(capsys)
    assert not os.path.exists(os.path.join(out, "config.yaml"))
    assert cli.main(["run", *on_disk(pair, out, **{"data.source.root": str(empty)})]) == 2
    assert "GTA5 images" in one_error_line(capsys)
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    corrected = load_config("demo", on_disk(pair, out))
    for resume in (True, False):
        claim_output_dir(corrected, resume, Runtime(torch.device("cpu")))
    assert cli.main(["run", *on_disk(pair, out)]) == 0
    assert os.path.isfile(os.path.join(out, "results.json"))
