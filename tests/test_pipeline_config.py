"""The run configuration (drsl_fast/train/config.py): built-in configs, key=value
overrides typed as YAML, unknown keys rejected, every key checked against the
schema (drsl_fast/train/schema.py), the resolved config written."""
import dataclasses
import os

import pytest
import yaml

from drsl_fast import cli
from drsl_fast.data import SyntheticPairConfig
from drsl_fast.train import isa
from drsl_fast.train.config import CONFIG_DIR, ConfigError, builtin_configs, load_config, parse_override, save_config
from drsl_fast.train.schema import SCHEMA, check_paths
from drsl_fast.train.settings import Settings


def test_builtin_configs_load_with_spec_settings():
    assert {"demo", "gta5", "synthia"} <= set(builtin_configs())
    gta5, synthia = load_config("gta5"), load_config("synthia")
    assert gta5["data"]["num_classes"] == 19 and synthia["data"]["num_classes"] == 16
    assert synthia["data"]["source"]["kind"] == "synthia" and synthia["evaluation"]["protocol"] == "16"
    for config in (gta5, synthia):  # docs/method.md §4-§6
        assert config["model"]["depth"] == 101 and config["model"]["num_modes"] == 3
        assert config["model"]["sigma"] == 0.5 and config["loss"]["samples_per_class"] == 300
        assert (config["loss"]["lambda1"], config["loss"]["lambda2"], config["loss"]["lambda3"]) == (0.25, 0.1, 0.1)
        assert config["source"]["lr"] == 2.5e-4 and config["adaptation"]["lr"] == 5e-5
        assert config["optim"] == {"momentum": 0.9, "weight_decay": 5e-4, "poly_power": 0.9}
        assert config["pseudo_labels"]["portion_start"] == 0.2 and config["pseudo_labels"]["portion_max"] == 0.5
        assert config["adaptation"]["rounds"] == 4 and config["adaptation"]["epochs_per_round"] == 2
        # ISA in adaptation, by FDA unless a directory of translated images is given (docs/method.md §6)
        settings = Settings.of(config)
        assert isa.active(settings.isa, settings.data.source, "adaptation")
        assert not isa.active(settings.isa, settings.data.source, "source")
        with_directory = dataclasses.replace(settings.data.source, translated_root="cyclegan")
        assert isa.in_stage(settings.isa, "adaptation") and not isa.active(settings.isa, with_directory, "adaptation")


def test_overrides_are_typed_as_yaml():
    config = load_config("demo", ["model.mmdl=false", "seed=7", "data.crop=[32, 48]", "model.init_weights=null",
                                  "adaptation.methods=[drsl]", "source.lr=1e-3"])
    assert config["model"]["mmdl"] is False and config["seed"] == 7 and config["data"]["crop"] == [32, 48]
    assert config["model"]["init_weights"] is None and config["adaptation"]["methods"] == ["drsl"]
    assert config["source"]["lr"] == pytest.approx(1e-3)
    assert parse_override("a.b=False") == {"a": {"b": False}}  # booleans parse as booleans, never as strings


@pytest.mark.parametrize("override, message", [
    ("model.depht=50", "unknown key 'model.depht'"),
    ("model=3", "'model' is a section"),
    ("seed", "expected key=value"),
    ("data.crop=[1, 2", "not valid YAML"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_unknown_config_name_lists_builtins():
    with pytest.raises(ConfigError, match="built-in configs: demo, gta5, gta5_intrada, synthia"):
        load_config("gta6")


def test_resolved_config_round_trips(tmp_path):
    config = load_config("synthia", ["seed=3"])
    save_config(config, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == dict(config, config_name="config")


def test_cli_prints_resolved_config_and_rejects_typos(capsys):
    assert cli.main(["config", "--config", "gta5", "seed=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["config_name"] == "gta5"
    assert cli.main(["config", "--config", "gta5", "sede=5"]) == 2
    assert "unknown key 'sede'" in capsys.readouterr().err


def dotted_keys(section, prefix=""):
    """Every key of a nested dict, sections included (``data``, ``data.source``, ...)."""
    for key, value in section.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from dotted_keys(value, prefix + key + ".")


def test_schema_has_a_rule_for_every_key_of_defaults():
    with open(os.path.join(CONFIG_DIR, "defaults.yaml"), encoding="utf-8") as handle:
        defaults = set(dotted_keys(yaml.safe_load(handle)))
    synthetic = {f"data.synthetic.{field.name}" for field in dataclasses.fields(SyntheticPairConfig)}
    assert set(SCHEMA) == defaults | synthetic


@pytest.mark.parametrize("name", builtin_configs())
def test_builtin_configs_fit_the_schema(name):
    load_config(name)


def test_numbers_integers_and_booleans_are_told_apart():
    config = load_config("demo", ["source.lr=1", "adaptation.epochs_per_round=0.5", "device=cuda:0", "dry_run=True"])
    assert config["source"]["lr"] == 1 and config["adaptation"]["epochs_per_round"] == 0.5 and config["dry_run"]
    for override in ("source.batch_size=2.0", "source.batch_size=true", "flip=1", "data.flip=1", "seed=-1",
                     "device=cuda:x", "device=cpu:0", "evaluation.protocol=19", "data.source.root=null",
                     "data.source.root=''", "intrada.discriminator_betas=[0.9, 1.5]"):
        with pytest.raises(ConfigError):
            load_config("demo", [override])


def test_paths_of_the_synthetic_pair_may_be_missing(tmp_path):
    """The run writes the pair under data.synthetic_root first; other roots must exist."""
    demo = load_config("demo", [f"data.synthetic_root={tmp_path}/pair", f"data.source.root={tmp_path}/pair/source",
                                f"data.target.root={tmp_path}/pair/target", f"output_dir={tmp_path}/run"])
    check_paths(demo)
    without_pair = dict(demo, data=dict(demo["data"], synthetic=None))
    with pytest.raises(ConfigError, match="data.source.root: expected an existing directory"):
        check_paths(without_pair)
    with pytest.raises(ConfigError, match="data.target.root: expected an existing directory"):
        check_paths(without_pair, training=False)  # evaluating model files reads no source images
    elsewhere = dict(demo["data"], target=dict(demo["data"]["target"], root=str(tmp_path / "cityscapes")))
    with pytest.raises(ConfigError, match="data.target.root: expected an existing directory"):
        check_paths(dict(demo, data=elsewhere))
