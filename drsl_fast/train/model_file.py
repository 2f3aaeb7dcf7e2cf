"""The network a weights file holds, built with the settings it was trained
with: those saved in the file (``meta['settings']``, every stage's weights
since they carry them), else those of the run's ``config.yaml`` in a folder
above the file when its settings digest is the file's, else the config given.
Read with ``torch.load(weights_only=True)``."""
import os
from typing import Dict, Optional, Tuple

from .checkpoint import config_digest, load_state, read_file
from .config import merge, read_yaml
from .network import DRSLNetwork, build_network, network_settings
from .schema import check_keys
from .settings import Settings

RUN_CONFIG = "config.yaml"
LEVELS_UP = 3  # <run>/<method>/round_k/model.pt


def run_settings(path: str, digest: Optional[str]) -> Tuple[Optional[Dict], Optional[str]]:
    """The network settings of the run that wrote ``path`` (the first
    config.yaml above it whose digest is ``digest``) and that file's path."""
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(LEVELS_UP):
        candidate = os.path.join(folder, RUN_CONFIG)
        if digest is not None and os.path.isfile(candidate):
            config = read_yaml(candidate)
            if config_digest(config) == digest:
                return network_settings(config), candidate
        folder = os.path.dirname(folder)
    return None, None


def load_model_file(config: Dict, path: str, map_location="cpu") -> Tuple[DRSLNetwork, Dict, str]:
    """(network with the file's weights, ``config`` with the settings it was
    trained with, where those came from). A file that does not fit is one
    :class:`~drsl_fast.train.checkpoint.CheckpointError` naming it."""
    state = read_file(path, map_location, keys=("model", "meta"))
    meta = state["meta"] if isinstance(state["meta"], dict) else {}
    settings, origin = meta.get("settings"), "the weights file"
    if settings is None:
        settings, origin = run_settings(path, meta.get("digest"))
    if settings is None:
        settings, origin = {}, "--config (the file holds none and no run config.yaml matches it)"
    config = merge(config, settings, path)
    config["model"]["init_weights"] = None  # the file holds every weight
    check_keys(config)  # types and ranges; the data source of training need not agree with the class set
    settings = Settings.of(config)
    network = build_network(settings.model, settings.data.num_classes, log=lambda line: None)
    load_state(network, state["model"], path)
    return network, config, origin
