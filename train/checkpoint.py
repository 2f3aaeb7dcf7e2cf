"""Atomic, resumable checkpoints.

A checkpoint holds the model, optimiser, gradient scaler and scheduler
position, the RNG states and where the run stands (stage, round, iteration).
It is written to a temporary file in the same directory and renamed over the
old one, so a crash at any moment leaves either the previous checkpoint or the
new one, never a torn file.
"""
import json
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch


def atomic_save(obj: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_json(obj: Any, path: str) -> None:
    """A stage's JSON summary, written to a temporary name and renamed: a
    present summary always marks a finished step."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)
    os.replace(temporary, path)


def rng_states() -> Dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(path: str, *, model, optimizer, scaler, position: Dict[str, Any]) -> None:
    """``position``: stage, round, iteration (the next one to run) and the
    number of iterations of the stage (the scheduler is a function of these)."""
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "position": dict(position),
            "rng": rng_states(),
        },
        path,
    )


def load_training_state(path: str, *, model, optimizer, scaler, map_location=None) -> Optional[Dict[str, Any]]:
    """Restores what :func:`save_training_state` wrote; returns its position,
    or None when there is no checkpoint."""
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng_states(state["rng"])
    return state["position"]


def save_weights(model, path: str, meta: Dict[str, Any]) -> None:
    """Final weights of a stage (the mark that the stage is complete)."""
    atomic_save({"model": model.state_dict(), "meta": meta}, path)


def load_weights(model, path: str, map_location=None) -> Dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state["model"])
    return state["meta"]
