"""Registration shared by the differentiable ops: the fake kernels (shapes
and dtypes for ``torch.compile``) of a forward and a backward operator, and,
for the Triton operators, the autograd formula that runs the backward one
(the C++ operators carry theirs in csrc/autograd/)."""
from typing import Callable, Optional

import torch


def register_differentiable(name: str, fake_forward: Callable, fake_backward: Callable,
                            register_autograd: Optional[Callable] = None, backend: str = "") -> None:
    """Fake kernels of ``drsl_fast::<name><backend>`` and of its backward
    ``drsl_fast::<name>_backward<backend>`` (backend: "" for the C++
    operators, "_triton"), and, when given, ``register_autograd(forward name,
    backward operator)``."""
    forward, backward = f"{name}{backend}", f"{name}_backward{backend}"
    torch.library.register_fake(f"drsl_fast::{forward}")(fake_forward)
    torch.library.register_fake(f"drsl_fast::{backward}")(fake_backward)
    if register_autograd is not None:
        register_autograd(f"drsl_fast::{forward}", getattr(torch.ops.drsl_fast, backward))
