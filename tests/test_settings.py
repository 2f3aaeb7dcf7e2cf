"""Typed config sections (drsl_fast/train/settings.py): every key of
defaults.yaml lands in a typed field, every built-in config builds, and the
dict stays what the digest is made of."""
import dataclasses
import os

import pytest

from drsl_fast.train.checkpoint import config_digest
from drsl_fast.train.config import CONFIG_DIR, builtin_configs, load_config, read_yaml
from drsl_fast.train.settings import Settings, field_name


def typed_keys(value, prefix=""):
    """The dotted keys of a settings object (nested dataclasses recursively)."""
    keys = set()
    for f in dataclasses.fields(value):
        if f.name == "config":
            continue
        inner = getattr(value, f.name)
        keys.add(prefix + f.name)
        if dataclasses.is_dataclass(inner):
            keys |= typed_keys(inner, prefix + f.name + ".")
    return keys


def dict_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        dotted = prefix + field_name(key)
        keys.add(dotted)
        if isinstance(value, dict) and key != "synthetic":  # data.synthetic is kept as a mapping
            keys |= dict_keys(value, dotted + ".")
    return keys


def values_agree(typed, raw):
    if dataclasses.is_dataclass(typed):
        return all(values_agree(getattr(typed, field_name(k)), v) for k, v in raw.items())
    if isinstance(raw, list):
        return isinstance(typed, tuple) and len(typed) == len(raw) and all(map(values_agree, typed, raw))
    return typed == raw and type(typed) is type(raw)


def test_every_key_of_defaults_has_a_typed_field():
    defaults = read_yaml(os.path.join(CONFIG_DIR, "defaults.yaml"))
    settings = Settings.of(load_config("demo"))
    assert dict_keys(defaults) == typed_keys(settings)


@pytest.mark.parametrize("name", builtin_configs())
def test_builtin_configs_build(name):
    config = load_config(name)
    settings = Settings.of(config)
    assert settings.config is config and settings.digest == config_digest(config)
    assert all(values_agree(getattr(settings, field_name(key)), value) for key, value in config.items())
    assert settings.intrada.lambda_ == config["intrada"]["lambda"]
    assert settings.data.target.split("val") == config["data"]["target"]["val_split"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.loss.alpha = 2.0


def test_settings_leave_the_config_alone():
    config = load_config("demo", ["inference.window=[64, 64]"])
    before = repr(config)
    settings = Settings.of(config)
    assert settings.inference.window == (64, 64) and settings.adaptation.methods == tuple(
        config["adaptation"]["methods"])
    assert repr(config) == before
