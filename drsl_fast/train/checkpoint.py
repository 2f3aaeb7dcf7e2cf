"""Atomic, resumable checkpoints, read without running code.

A checkpoint holds the model, optimiser, gradient scaler and scheduler
position, the RNG states and where the run stands (stage, round, iteration),
plus the digest of the config it belongs to. Everything in it is a tensor or a
plain value (numbers, strings, lists, dicts), so it is read with
``torch.load(weights_only=True)``: a planted pickle is refused, never run.

Files are written to a temporary name in the same directory and renamed over
the old one, so a crash at any moment leaves either the previous file or the
new one, never a torn file; a temporary left by a killed process is removed at
the next start (:func:`remove_stale_temporaries`).
"""
import contextlib
import hashlib
import json
import math
import os
import random
import re
from typing import Any, Dict, Optional

import numpy as np
import torch

# config keys that may differ between a run and its resumption (they change
# neither the numbers nor the files a stage writes; evaluation.tta adds a report)
RESUMABLE_CHANGES = ("train", "data.workers", "dry_run", "adaptation.methods", "evaluation.tta", "predict")
TEMPORARY = re.compile(r".+\.(\d+)\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used: damaged, not ours, or
    from a run with another config. The message is one line naming the file."""


def comparable(config: Dict) -> Dict:
    """``config`` without the keys of :data:`RESUMABLE_CHANGES`."""
    reduced = json.loads(json.dumps(config))
    for key in RESUMABLE_CHANGES:
        section, _, leaf = key.partition(".")
        if leaf:
            reduced.get(section, {}).pop(leaf, None)
        else:
            reduced.pop(section, None)
    # settings added after runs were made leave those runs' digest alone while
    # off: ISA unused, TTA and source-look pseudo-labels off, inference.*
    # while no pseudo-label depends on it (only evaluation.tta reads it then),
    # and the classifiers as convolutions (model.head_as_gemm false)
    labels = reduced.get("pseudo_labels", {})
    for key in ("tta", "isa"):
        if not labels.get(key):
            labels.pop(key, None)
    if not (reduced.get("isa", {}).get("probability") or labels.get("isa")
            or reduced.get("data", {}).get("source", {}).get("translated_root")):
        reduced.pop("isa", None)
    if not labels.get("tta") and not reduced.get("inference", {}).get("window"):
        reduced.pop("inference", None)
    if reduced.get("model", {}).get("head_as_gemm") is False:
        reduced["model"].pop("head_as_gemm")
    return reduced


def config_digest(config: Dict) -> str:
    """The SHA-256 of the settings that decide a run's numbers
    (:func:`comparable`, less ``output_dir``: a run directory may be moved)."""
    settings = comparable(config)
    settings.pop("output_dir", None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def temporary_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_write(path: str):
    """Yields a temporary name beside ``path`` to write; renames it over
    ``path`` when the block succeeds and removes it otherwise. A failed write
    (a full disk, say) is one :class:`CheckpointError` naming ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().split("\n")[0]
        raise CheckpointError(f"{path}: could not be written ({reason[:200]})") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_save(obj: Any, path: str) -> None:
    with atomic_write(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_json(obj: Any, path: str) -> None:
    """A stage's JSON summary (strict JSON: undefined numbers are null),
    written to a temporary name and renamed: a present summary always marks a
    finished step."""
    with atomic_write(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(json_safe(obj), handle, indent=1, allow_nan=False)


def remove_stale_temporaries(directory: str) -> int:
    """Removes the temporaries (``.<name>.<pid>.tmp``) that processes other
    than this one left under ``directory``; returns how many."""
    removed = 0
    for root, _, names in os.walk(directory):
        for name in names:
            match = TEMPORARY.fullmatch(name)
            if match and int(match.group(1)) != os.getpid():
                os.remove(os.path.join(root, name))
                removed += 1
    return removed


def rng_states() -> Dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generator states as tensors and plain values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    python, numpy = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def read_file(path: str, map_location=None, keys=("model",)) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` of a file this package wrote; any
    failure (damaged, truncated, a pickle that would run code, another
    program's file) is one :class:`CheckpointError` naming the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every way a file can be unreadable ends the same
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable drsl_fast file ({type(exc).__name__}: {reason[:200]}); "
                              f"delete it to redo that step") from None
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise CheckpointError(f"{path}: not a drsl_fast file (expected the keys {list(keys)}); "
                              f"delete it to redo that step")
    return state


def load_state(module, state: Dict[str, Any], path: str) -> None:
    """``module.load_state_dict(state)``; a mismatch is one line naming the file."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:300]
        raise CheckpointError(f"{path}: does not fit this model or run ({detail})") from None


def check_digest(state: Dict[str, Any], path: str, digest: Optional[str]) -> None:
    if digest is not None and state.get("digest") != digest:
        raise CheckpointError(f"{path}: written by a run with another config (settings digest differs); "
                              f"use that run's config, or delete the file to redo that step")


def save_training_state(path: str, *, model, optimizer, scaler, position: Dict[str, Any], digest: str) -> None:
    """``position``: stage, round, iteration (the next one to run) and the
    number of iterations of the stage (the scheduler is a function of these);
    ``digest``: :func:`config_digest` of the run."""
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "position": dict(position),
            "rng": rng_states(),
            "digest": digest,
        },
        path,
    )


def load_training_state(path: str, *, model, optimizer, scaler, digest: str, stage: str, iterations: int,
                        map_location=None) -> Optional[Dict[str, Any]]:
    """Restores what :func:`save_training_state` wrote for ``stage`` of the
    run with ``digest``; returns its position, or None when there is no
    checkpoint. Another run's, another stage's or a damaged file is a
    :class:`CheckpointError`."""
    if not os.path.isfile(path):
        return None
    state = read_file(path, map_location, keys=("model", "optimizer", "scaler", "position", "rng"))
    check_digest(state, path, digest)
    position = state["position"]
    if position.get("stage") != stage or position.get("iterations") != iterations:
        raise CheckpointError(f"{path}: a checkpoint of {position.get('stage')!r} with "
                              f"{position.get('iterations')} iterations, expected {stage!r} with {iterations}; "
                              f"delete it to restart the stage")
    load_state(model, state["model"], path)
    load_state(optimizer, state["optimizer"], path)
    if scaler is not None and state["scaler"] is not None:
        load_state(scaler, state["scaler"], path)
    restore_rng_states(state["rng"])
    return position


def save_weights(model, path: str, meta: Dict[str, Any]) -> None:
    """Final weights of a stage (the mark that the stage is complete); the
    run's digest goes in ``meta['digest']``."""
    atomic_save({"model": model.state_dict(), "meta": meta}, path)


def load_weights(model, path: str, map_location=None, digest: Optional[str] = None) -> Dict[str, Any]:
    """Loads a :func:`save_weights` file into ``model``; with ``digest``, the
    file must come from the run with that config digest."""
    state = read_file(path, map_location, keys=("model", "meta"))
    check_digest(state["meta"], path, digest)
    load_state(model, state["model"], path)
    return state["meta"]
