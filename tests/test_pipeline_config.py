"""The run configuration (train/config.py): built-in configs, key=value
overrides typed as YAML, unknown keys rejected, the resolved config written."""
import pytest
import yaml

from drsl_fast import cli
from drsl_fast.train.config import ConfigError, builtin_configs, load_config, parse_override, save_config


def test_builtin_configs_load_with_spec_settings():
    assert {"demo", "gta5", "synthia"} <= set(builtin_configs())
    gta5, synthia = load_config("gta5"), load_config("synthia")
    assert gta5["data"]["num_classes"] == 19 and synthia["data"]["num_classes"] == 16
    assert synthia["data"]["source"]["kind"] == "synthia" and synthia["evaluation"]["protocol"] == "16"
    for config in (gta5, synthia):  # SPEC §4-§6
        assert config["model"]["depth"] == 101 and config["model"]["num_modes"] == 3
        assert config["model"]["sigma"] == 0.5 and config["loss"]["samples_per_class"] == 300
        assert (config["loss"]["lambda1"], config["loss"]["lambda2"], config["loss"]["lambda3"]) == (0.25, 0.1, 0.1)
        assert config["source"]["lr"] == 2.5e-4 and config["adaptation"]["lr"] == 5e-5
        assert config["optim"] == {"momentum": 0.9, "weight_decay": 5e-4, "poly_power": 0.9}
        assert config["pseudo_labels"]["portion_start"] == 0.2 and config["pseudo_labels"]["portion_max"] == 0.5
        assert config["adaptation"]["rounds"] == 4 and config["adaptation"]["epochs_per_round"] == 2


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
