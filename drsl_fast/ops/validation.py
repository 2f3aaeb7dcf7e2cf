"""Input checks shared by the ops: a clear error before any kernel runs."""
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_class_maps(op: str, what: str, maps: Tensor, min_classes: int, max_classes: Optional[int],
                     reason: str) -> None:
    """``maps`` must be a (B, C, H, W) floating-point tensor with
    ``min_classes <= C <= max_classes`` (no upper bound when None)."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"{op}: {what} must be a tensor, got {type(maps).__name__}")
    if maps.dim() != 4:
        raise ValueError(f"{op}: expected (B, C, H, W) {what}, got shape {tuple(maps.shape)}")
    if maps.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {what} must be float16, bfloat16, float32 or float64, got {maps.dtype}")
    classes = maps.shape[1]
    if classes < min_classes or (max_classes is not None and classes > max_classes):
        bounds = f"C >= {min_classes}" if max_classes is None else f"{min_classes} <= C <= {max_classes}"
        raise ValueError(f"{op}: needs {bounds} classes ({reason}), got C={classes}")
