"""Input checks shared by the ops: one validation per op, run in its Python
wrapper before any backend, so that every backend accepts and rejects the same
inputs. Messages read ``"<op>: <argument> must be <expected>, got <what>"``.

Checks of a tensor's values (not only its shape and dtype) read the values on
the host; the ops that do so say it in their docstrings.
"""
import math
import numbers
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_NAMES = "float16, bfloat16, float32 or float64"
# torch's uint16/32/64 lack most CPU kernels: not accepted
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
INTEGER_NAMES = "uint8, int8, int16, int32 or int64"


def describe(value) -> str:
    """What ``value`` is, for an error message."""
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)} on {value.device}"
    if isinstance(value, (bool, numbers.Number, str)) or value is None:
        return f"{value!r} ({type(value).__name__})"
    return f"a {type(value).__name__}"


def check_tensor(op: str, name: str, value) -> Tensor:
    """``value`` must be a torch tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {describe(value)}")
    return value


def check_float_tensor(op: str, name: str, value) -> Tensor:
    """``value`` must be a float16, bfloat16, float32 or float64 tensor."""
    check_tensor(op, name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a {FLOAT_NAMES} tensor, got {describe(value)}")
    return value


def check_integer_tensor(op: str, name: str, value, what: str = "ids") -> Tensor:
    """``value`` must be a uint8, int8, int16, int32 or int64 tensor (not
    bool, not float: float ids would be truncated)."""
    check_tensor(op, name, value)
    if value.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor ({what}; {INTEGER_NAMES}), got {describe(value)}")
    return value


def check_dim(op: str, name: str, value: Tensor, dims: Iterable[int], layout: str) -> None:
    """``value.dim()`` must be one of ``dims``; ``layout`` names the shape, e.g. "(B, H, W)"."""
    if value.dim() not in tuple(dims):
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(value.shape)}")


def check_same_device(op: str, name: str, value: Tensor, other_name: str, other: Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{op}: {name} is on {value.device} but {other_name} is on {other.device}; "
                         f"they must be on one device")


def check_real(op: str, name: str, value, *, positive: bool = False, low: Optional[float] = None,
               high: Optional[float] = None) -> float:
    """``value`` must be a finite real number (Python or NumPy, not bool), > 0
    with ``positive``, within [low, high] when given. Returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {describe(value)}")
    number = float(value)
    bounds = ["> 0" if positive else "", f">= {low}" if low is not None else "",
              f"<= {high}" if high is not None else ""]
    expected = " and ".join(b for b in bounds if b)
    wrong = (not math.isfinite(number) or (positive and not number > 0) or (low is not None and number < low)
             or (high is not None and number > high))
    if wrong:
        raise ValueError(f"{op}: {name} must be a finite number{' ' + expected if expected else ''}, got {number}")
    return number


def check_int(op: str, name: str, value, low: int, high: Optional[int] = None) -> int:
    """``value`` must be an integer (Python or NumPy, not bool) in [low, high]
    (no upper bound when ``high`` is None). Returns it as int."""
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int {bounds}, got {describe(value)}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ValueError(f"{op}: {name} must be an int {bounds}, got {number}")
    return number


def check_bool(op: str, name: str, value) -> bool:
    """``value`` must be a bool (Python or NumPy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be True or False, got {describe(value)}")
    return bool(value)


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {describe(value)}")


def check_class_maps(op: str, what: str, maps: Tensor, min_classes: int, max_classes: Optional[int],
                     reason: str) -> None:
    """``maps`` must be a (B, C, H, W) floating-point tensor with
    ``min_classes <= C <= max_classes`` (no upper bound when None)."""
    check_float_tensor(op, what, maps)
    check_dim(op, what, maps, (4,), "(B, C, H, W)")
    classes = maps.shape[1]
    if classes < min_classes or (max_classes is not None and classes > max_classes):
        bounds = f"C >= {min_classes}" if max_classes is None else f"{min_classes} <= C <= {max_classes}"
        raise ValueError(f"{op}: {what} must have {bounds} classes ({reason}), got C={classes} "
                         f"in shape {tuple(maps.shape)}")


def check_no_nan(op: str, name: str, value: Tensor, reason: str) -> None:
    """``value`` must hold no NaN (reads the values on the host)."""
    nan = torch.isnan(value)
    if bool(nan.any()):
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise ValueError(f"{op}: {name} must not contain NaN ({reason}), got {int(nan.sum())} NaN, "
                         f"the first at {first}")
