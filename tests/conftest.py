import contextlib
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


# The CUDA kernels emulated on the CPU (tests/cuda_on_cpu), as backends of the
# ops that have them: the fp32 kernels (the CUDA backend's default) and the
# tensor-core ones.
EMULATED = ("cuda-emulated", "cuda-tc-emulated")


@contextlib.contextmanager
def emulating(request, name: str):
    """Within the block, the ops' CPU kernels are the emulated CUDA kernel set ``name``."""
    with cuda_on_cpu.as_cpu_kernels(request.getfixturevalue("emulated_cuda"), tensor_cores=name == "cuda-tc-emulated"):
        yield


def backend_under_test(request, name: str):
    """The body of a fast_backend fixture: yields (backend, device) for
    ``name``, a backend or an emulated kernel set (run as backend "cpu",
    emulated for the test's duration), or skips saying why it cannot run."""
    if name in EMULATED:
        with emulating(request, name):
            yield "cpu", torch.device("cpu")
        return
    device = device_for(name)
    reason = why_unavailable(name, device)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    yield name, device


@pytest.fixture(params=["cpu", "cuda", "triton"])
def fast_backend(request):
    """Each fast backend available here, with the device it runs on."""
    yield from backend_under_test(request, request.param)


@pytest.fixture(scope="session")
def emulated_cuda(tmp_path_factory):
    """The mode-distance and MMDL-loss CUDA kernels built for the CPU
    (tests/cuda_on_cpu), from csrc/cuda/ or the copy of it named by
    DRSL_FAST_EMULATED_CUDA_DIR (tests/cuda_on_cpu/mutations.py)."""
    reason = cuda_on_cpu.why_unavailable() or why_unavailable("cpu", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"emulated CUDA: {reason}")
    return cuda_on_cpu.build(tmp_path_factory.mktemp("cuda_on_cpu"), os.environ.get("DRSL_FAST_EMULATED_CUDA_DIR"))
