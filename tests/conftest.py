import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. It must be
# switched on before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cuda_on_cpu  # noqa: E402
import drsl_fast  # noqa: E402
from drsl_fast.backends import why_unavailable  # noqa: E402


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu")


@pytest.fixture(params=["cpu", "cuda", "triton"])
def fast_backend(request):
    """Each fast backend available here, with the device it runs on."""
    name = request.param
    device = device_for(name)
    reason = why_unavailable(name, device)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return name, device


@pytest.fixture(scope="session")
def emulated_cuda(tmp_path_factory):
    """The mode-distance and MMDL-loss CUDA kernels built for the CPU
    (tests/cuda_on_cpu), from csrc/cuda/ or the copy of it named by
    DRSL_FAST_EMULATED_CUDA_DIR (tests/cuda_on_cpu/mutations.py)."""
    reason = cuda_on_cpu.why_unavailable() or why_unavailable("cpu", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"emulated CUDA: {reason}")
    return cuda_on_cpu.build(tmp_path_factory.mktemp("cuda_on_cpu"), os.environ.get("DRSL_FAST_EMULATED_CUDA_DIR"))
