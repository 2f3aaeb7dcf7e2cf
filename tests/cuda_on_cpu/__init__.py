"""The CUDA kernels of the mode-distance op, run on the CPU.

launchers.cpp compiles the device half of csrc/cuda/mode_distance.cu with
the stand-ins of include/ (fibers for threads, whole-tile WMMA fragments with
the tensor cores' tf32 rounding); this module builds it with the system C++
compiler and calls it on CPU tensors laid out as the CUDA launchers lay them
out. It lets the tests check the kernels' logic (indices, barriers, the
tensor-core kernels' trust rule and fallbacks) on a machine without a GPU; it
says nothing about their speed, and the real GPU remains the judge of
anything the hardware does differently (fused multiply-adds, the order of
the tensor cores' sums).
"""
import contextlib
import ctypes
import hashlib
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "launchers.cpp", *sorted((HERE / "include").glob("*.h")),
           HERE.parents[1] / "csrc" / "cuda" / "mode_distance.cu", *sorted((HERE.parents[1] / "kernels").rglob("*.h*"))]
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def why_unavailable():
    """None when a C++ compiler is here, else the reason the emulation cannot run."""
    return None if shutil.which("g++") else "no g++ on PATH to build the CUDA kernels for the CPU"


def _fma_flags():
    # nvcc fuses a * b + c into one rounding by default: do the same where the CPU can.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["-mfma", "-ffp-contract=fast"] if " fma " in flags else ["-ffp-contract=off"]


def build(directory, source=None):
    """Compiles launchers.cpp into `directory` (once per source version) and
    loads it; `source` replaces csrc/cuda/mode_distance.cu (a copy placed as
    it is, next to a kernels/ folder, for its includes)."""
    sources = SOURCES + ([Path(source)] if source else [])
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    library = Path(directory) / f"launchers_{digest}.so"
    if not library.exists():
        # -fno-extern-tls-init: the extern __shared__ array (thread_local here) has no
        # dynamic initialiser to call.
        command = ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-extern-tls-init", "-Wall",
                   "-Wno-unknown-pragmas", *_fma_flags(), "-I", str(HERE / "include"),
                   *([f'-DMODE_DISTANCE_CU="{Path(source).resolve()}"'] if source else []),
                   str(HERE / "launchers.cpp"), "-o", str(library)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the emulated CUDA kernels failed:\n{done.stderr[-4000:]}")
    return Kernels(ctypes.CDLL(str(library)))


def _layout(*strides):
    return (ctypes.c_int64 * 3)(*strides)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else None)


def as_bdp(emb):
    """(B, D, P) view (or copy) of the embeddings, as csrc/host.h's as_bdp."""
    return emb.t().unsqueeze(0) if emb.dim() == 2 else emb.reshape(emb.shape[0], emb.shape[1], emb.shape[2] * emb.shape[3])


def per_class_layout(emb, C):
    if emb.dim() == 2:
        return _layout(0, 1, C)
    P = emb.shape[2] * emb.shape[3]
    return _layout(C * P, P, 1)


def per_class_empty(emb, C, dtype):
    shape = (emb.shape[0], C) if emb.dim() == 2 else (emb.shape[0], C, *emb.shape[2:])
    return torch.empty(shape, dtype=dtype)


class Kernels:
    def __init__(self, library):
        self._lib = library
        for name in ("mode_distance_forward", "mode_distance_backward"):
            getattr(library, name).restype = ctypes.c_char_p

    @staticmethod
    def _problem(emb, modes):
        acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
        bdp = as_bdp(emb)
        centres = modes.to(acc).contiguous()
        C, M, D = centres.shape
        layout = _layout(*bdp.stride())
        return bdp, layout, centres, acc, C, M, D, bdp.shape[2], bdp.shape[0]

    @staticmethod
    def _check(error):
        if error is not None:
            raise RuntimeError(f"emulated CUDA kernel: {error.decode()}")

    def forward(self, emb, modes, sigma=None, *, tensor_cores, reverse=False):
        """(dmin, mstar, posterior or None) from the forward kernel the CUDA
        launcher would run (tensor_cores: on sm_80 and newer)."""
        bdp, layout, centres, acc, C, M, D, P, B = self._problem(emb, modes)
        dmin, mstar = per_class_empty(emb, C, acc), per_class_empty(emb, C, torch.uint8)
        posterior = per_class_empty(emb, C, acc) if sigma is not None else None
        if dmin.numel() > 0:
            self._check(self._lib.mode_distance_forward(
                DTYPES[emb.dtype], int(tensor_cores), int(reverse), _ptr(bdp), layout, _ptr(centres), C, M, D,
                ctypes.c_int64(P), ctypes.c_int64(B), per_class_layout(emb, C), _ptr(dmin),
                ctypes.cast(_ptr(mstar), ctypes.POINTER(ctypes.c_uint8)), _ptr(posterior),
                ctypes.c_double(sigma if sigma is not None else 0.0)))
        return dmin, mstar, posterior

    def backward(self, grad_dmin, emb, modes, mstar, *, tensor_cores, reverse=False, emb_grad=True,
                 modes_grad=True):
        """(grad_emb or None, grad_modes or None) from the backward kernels."""
        bdp, layout, centres, acc, C, M, D, P, B = self._problem(emb, modes)
        grad_dmin = grad_dmin.to(acc).contiguous()
        mstar = mstar.contiguous()
        grad_emb = grad_modes = None
        grad_layout = _layout(0, 0, 0)
        if emb_grad:
            four_d_channels_last = emb.dim() == 4 and emb.is_contiguous(memory_format=torch.channels_last) \
                and not emb.is_contiguous()
            grad_emb = (torch.empty_like(emb) if emb.dim() == 2 else torch.empty(
                emb.shape, dtype=emb.dtype,
                memory_format=torch.channels_last if four_d_channels_last else torch.contiguous_format))
            grad_layout = _layout(*as_bdp(grad_emb).stride())
        if modes_grad:
            grad_modes = torch.empty(C, M, D, dtype=acc)
        if P > 0 and B > 0:
            self._check(self._lib.mode_distance_backward(
                DTYPES[emb.dtype], int(tensor_cores), int(reverse), _ptr(bdp), layout, _ptr(centres), C, M, D,
                ctypes.c_int64(P), ctypes.c_int64(B), per_class_layout(emb, C), _ptr(grad_dmin),
                ctypes.cast(_ptr(mstar), ctypes.POINTER(ctypes.c_uint8)), _ptr(grad_emb), grad_layout,
                _ptr(grad_modes)))
        else:
            grad_emb = grad_emb.zero_() if grad_emb is not None else None
            grad_modes = grad_modes.zero_() if grad_modes is not None else None
        return grad_emb, (grad_modes.to(modes.dtype) if grad_modes is not None else None)


@contextlib.contextmanager
def as_cpu_kernels(kernels, *, tensor_cores):
    """Within the block, the CPU kernels of drsl_fast::mode_distance and
    mode_distance_backward are the emulated CUDA kernels (the tensor-core ones
    or the fp32 ones): every test of the op with backend="cpu" runs them."""
    library = torch.library.Library("drsl_fast", "IMPL")

    def forward(emb, modes, sigma):
        dmin, mstar, posterior = kernels.forward(emb, modes, sigma, tensor_cores=tensor_cores)
        return dmin, mstar, posterior if posterior is not None else dmin.new_empty(0)

    def backward(grad_dmin, emb, modes, mstar, emb_requires_grad, modes_requires_grad):
        grad_emb, grad_modes = kernels.backward(grad_dmin, emb, modes, mstar, tensor_cores=tensor_cores,
                                                emb_grad=emb_requires_grad, modes_grad=modes_requires_grad)
        return (grad_emb if grad_emb is not None else emb.new_empty(0),
                grad_modes if grad_modes is not None else modes.new_empty(0))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        library.impl("mode_distance", forward, "CPU")
        library.impl("mode_distance_backward", backward, "CPU")
    try:
        yield
    finally:
        library._destroy()
