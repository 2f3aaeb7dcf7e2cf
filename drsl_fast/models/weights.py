"""Loading user-supplied init weights into :class:`DeepLabV2` (docs/method.md §2 "Init").

Accepted files (read with ``torch.load(weights_only=True)``: no code runs):
- the DeepLab ImageNet init used by ADVENT
  (``DeepLab_resnet_pretrained_imagenet.pth``): keys ``conv1.weight``,
  ``bn1.*``, ``layer1.0.conv1.weight`` ..., ``layer5.conv2d_list.*`` (the
  classifier), optionally under a ``Scale.`` or ``module.`` prefix;
  ``layer6.*`` (ADVENT's auxiliary classifier) is accepted too;
- torchvision ResNet weights (``conv1``, ``bn1``, ``layer1``-``layer4``,
  ``fc``); their ``fc.*`` classification layer has no counterpart and is
  reported as unexpected.
A dict holding the state dict under ``state_dict`` or ``model`` is unwrapped.

Every key that is not loaded is reported: missing (in the model, not in the
file), unexpected (in the file, no counterpart) and shape mismatches (e.g. a
classifier trained for another number of classes). The report is returned and,
when any list is non-empty, also raised as a warning. BatchNorm's
``num_batches_tracked`` counters are not reported: frozen BatchNorm never reads
them. Caffe-converted DeepLab weights expect BGR input with mean
(104.007, 116.669, 122.679) (see ``drsl_fast.data.transforms.CAFFE_BGR``).
"""

import os
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .deeplab import DeepLabV2

WRAPPER_KEYS = ("state_dict", "model")
IGNORED_PREFIXES = ("module.", "Scale.")
BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
HEAD_ROOTS = {"layer5": "classifier", "layer6": "aux_classifier"}


class InitWeightsWarning(UserWarning):
    """Raised (as a warning) when init weights do not cover the model exactly."""


@dataclass
class LoadReport:
    """Outcome of :func:`load_init_weights`; keys are the model's names."""

    path: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self, max_keys: int = 8) -> str:
        def listed(keys):
            shown = ", ".join(str(k) for k in keys[:max_keys])
            return shown + (f", ... ({len(keys) - max_keys} more)" if len(keys) > max_keys else "")

        lines = [f"init weights {self.path}: {len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing (left at their initialisation): {listed(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected (not loaded): {listed(self.unexpected)}")
        if self.shape_mismatch:
            items = [f"{k} file {tuple(f)} vs model {tuple(m)}" for k, f, m in self.shape_mismatch]
            lines.append(f"  {len(items)} shape mismatches (not loaded): {listed(items)}")
        return "\n".join(lines)


def model_key(file_key: str) -> str:
    """Maps a checkpoint key to the :class:`DeepLabV2` name, or returns it
    unchanged (then reported as unexpected) when it has no counterpart."""
    key = file_key
    stripped = True
    while stripped:
        stripped = False
        for prefix in IGNORED_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    root, _, rest = key.partition(".")
    if root in BACKBONE_ROOTS:
        return f"backbone.{key}"
    if root in HEAD_ROOTS:
        return f"{HEAD_ROOTS[root]}.{rest}"
    return key


def read_state_dict(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init weights: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise pickle.UnpicklingError(f"init weights {path!r}: refused, it holds more than tensors and plain "
                                     f"values ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"init weights {path!r}: not a readable torch file ({type(exc).__name__})") from None
    for wrapper in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"init weights {path!r}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_init_weights(model: DeepLabV2, path: str) -> LoadReport:
    """Copies the matching tensors of the checkpoint at ``path`` into ``model``
    and reports the rest (see the module docstring)."""
    report = LoadReport(path=path)
    target = model.state_dict()
    found = set()
    updates = {}
    for file_key, value in read_state_dict(path).items():
        key = model_key(file_key)
        if key not in target:
            report.unexpected.append(file_key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.shape_mismatch.append((key, tuple(value.shape), tuple(target[key].shape)))
            found.add(key)
        else:
            updates[key] = value
            found.add(key)
    report.loaded = sorted(updates)
    report.missing = sorted(k for k in target if k not in found and not k.endswith("num_batches_tracked"))
    with torch.no_grad():
        model.load_state_dict(updates, strict=False)
    if not report.complete:
        warnings.warn(report.summary(), InitWeightsWarning, stacklevel=2)
    return report
