"""Run configuration: built-in YAML configs, ``key=value`` overrides and the
resolved config every run writes.

A config is a nested dict. ``defaults.yaml`` holds every key with the
settings of docs/method.md §4-§6; a named config (``gta5``, ``synthia``, ``demo``) or
a YAML file changes some of them, and ``a.b=value`` overrides change single
keys (the value is read as YAML: ``true``, ``0.5``, ``[512, 1024]``, ``null``).
Unknown keys are errors, so a typo never runs silently with a default, and
the resolved config is checked against the types and ranges of
:mod:`~drsl_fast.train.schema` before anything runs.
"""
import copy
import os
import re
from typing import Any, Dict, Iterable, List

import yaml

from .schema import ConfigError, nullable_section, validate

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULTS = "defaults"


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; here it is a float, as users mean."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text):
    return yaml.load(text, Loader=ConfigLoader)


def one_line(error: yaml.YAMLError) -> str:
    """A YAML error (several lines with a pointer into the text) as one line."""
    return " ".join(str(error).split())


def builtin_configs() -> List[str]:
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml") and name != "defaults.yaml")


def read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = parse_yaml(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {one_line(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def config_path(name_or_path: str) -> str:
    """A built-in config name (``demo``) or a path to a YAML file."""
    if os.path.isfile(name_or_path):
        return name_or_path
    builtin = os.path.join(CONFIG_DIR, name_or_path + ".yaml")
    if os.path.isfile(builtin):
        return builtin
    raise ConfigError(f"no config file {name_or_path!r}; built-in configs: {', '.join(builtin_configs())}")


def merge(base: Dict[str, Any], changes: Dict[str, Any], where: str, prefix: str = "") -> Dict[str, Any]:
    """``base`` updated by ``changes`` recursively; keys absent from ``base``
    are errors, and a section can only be replaced by null where the schema
    allows it (``data.synthetic=null`` switches the synthetic pair off)."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        dotted = prefix + str(key)
        if key not in merged:
            raise ConfigError(f"{where}: unknown key {dotted!r}; known here: {', '.join(sorted(map(str, merged)))}")
        if isinstance(merged[key], dict) and not (value is None and nullable_section(dotted)):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {dotted!r} is a section; give its keys, e.g. {dotted}.<key>=...")
            merged[key] = merge(merged[key], value, where, dotted + ".")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> Dict[str, Any]:
    """``a.b.c=value`` -> {'a': {'b': {'c': value}}}, the value read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value (e.g. adaptation.rounds=2)")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {one_line(exc)}") from exc
    nested: Dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(name_or_path: str = "demo", overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """defaults.yaml <- the named config or file <- each ``key=value``
    override, checked against the schema (raises ConfigError)."""
    config = read_yaml(os.path.join(CONFIG_DIR, DEFAULTS + ".yaml"))
    path = config_path(name_or_path)
    config = merge(config, read_yaml(path), path)
    for text in overrides:
        config = merge(config, parse_override(text), f"override {text!r}")
    config["config_name"] = os.path.splitext(os.path.basename(path))[0]
    validate(config)
    return config


def save_config(config: Dict[str, Any], path: str) -> None:
    """Writes the resolved config (what the run actually used)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
