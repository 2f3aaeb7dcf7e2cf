"""The CUDA kernels of the mode-distance op, of the MMDL losses, of the per-class
sampling and of the Eq. 6 triplet draw and hinge, run on the CPU.

launchers.cpp compiles the device half of csrc/cuda/mode_distance.cu,
mmdl_losses.cu, class_sampling.cu, consistency_triplets.cu and
consistency_hinge.cu with the
stand-ins of include/ (fibers for threads, shared memory refilled with NaN
for every block, whole-tile WMMA fragments with the tensor cores' tf32
rounding); this module builds it with the system C++
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
CUDA_DIR = HERE.parents[1] / "csrc" / "cuda"
KERNEL_FILES = ("mode_distance.cu", "mmdl_losses.cu", "class_sampling.cu", "consistency_triplets.cu",
                "consistency_hinge.cu")
NAN = float("nan")  # what outputs start as: an entry the kernels leave unwritten shows
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
LABEL_DTYPES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}


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


def build(directory, cuda_dir=None, flags=(), load=True):
    """Compiles launchers.cpp into `directory` (once per source version and
    flags) and loads it (or, with load False, returns the library's path).
    `cuda_dir` replaces csrc/cuda/ (a copy whose kernels/ folder sits beside
    it, for the files' relative includes); `flags` go to the compiler."""
    cuda_dir = Path(cuda_dir or CUDA_DIR).resolve()
    sources = [HERE / "launchers.cpp", *sorted((HERE / "include").glob("*.h")),
               *(cuda_dir / name for name in KERNEL_FILES), *sorted((cuda_dir.parents[1] / "kernels").rglob("*.h*"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + " ".join(flags).encode()).hexdigest()[:16]
    library = Path(directory) / f"launchers_{digest}.so"
    if not library.exists():
        command = ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas", *_fma_flags(),
                   *flags, "-I", str(HERE / "include"), "-I", str(cuda_dir), str(HERE / "launchers.cpp"),
                   "-o", str(library)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the emulated CUDA kernels failed:\n{done.stderr[-4000:]}")
    return Kernels(library) if load else library


def shared_variables(library):
    """(address offset, bytes) in `library` of the kernels' __shared__
    variables: the static locals of functions of drsl_fast::cuda (mangled
    _ZZN9drsl_fast4cuda...), from its symbol table."""
    listed = subprocess.run(["nm", "-S", "--defined-only", str(library)], capture_output=True, text=True,
                            check=True).stdout
    found, anchor = [], None
    for line in listed.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3].startswith("_ZZN9drsl_fast4cuda") and fields[2] in "bBdDuV":
            found.append((int(fields[0], 16), int(fields[1], 16)))
        elif len(fields) >= 3 and fields[-1] == "mode_distance_forward":
            anchor = int(fields[0], 16)
    return anchor, found


def _layout(*strides):
    return (ctypes.c_int64 * 3)(*strides)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else None)


# as_bdp and empty_like_pixel_viewable repeat drsl_fast's pixel_view and
# empty_like_pixel_viewable (both as csrc/host.h): importing drsl_fast would
# load Triton, whose native module does not load under AddressSanitizer
# (tests/test_cuda_on_cpu.py).
def accumulation(dtype):
    """The kernels' accumulation dtype: fp64 for fp64 storage, else fp32 (csrc/host.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_bdp(emb):
    """(B, D, P) view (or copy) of the embeddings, as csrc/host.h's as_bdp."""
    return emb.t().unsqueeze(0) if emb.dim() == 2 else emb.reshape(emb.shape[0], emb.shape[1], emb.shape[2] * emb.shape[3])


def empty_like_pixel_viewable(emb):
    """Like emb, contiguous or channels-last, as csrc/host.h's."""
    if emb.dim() == 2:
        return torch.empty_like(emb)
    channels_last = emb.is_contiguous(memory_format=torch.channels_last) and not emb.is_contiguous()
    return torch.empty(emb.shape, dtype=emb.dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def per_class_layout(emb, C):
    if emb.dim() == 2:
        return _layout(0, 1, C)
    P = emb.shape[2] * emb.shape[3]
    return _layout(C * P, P, 1)


def per_class_empty(emb, C, dtype):
    shape = (emb.shape[0], C) if emb.dim() == 2 else (emb.shape[0], C, *emb.shape[2:])
    return torch.empty(shape, dtype=dtype)


class Kernels:
    """The kernels of one built library (``build``). Each method takes CPU
    tensors as the op does, lays them out and launches the kernels as the
    CUDA launcher would, and returns the op's outputs; an error the emulation
    found (include/emulated_cuda.h) raises RuntimeError."""

    def __init__(self, path):
        self._lib = library = ctypes.CDLL(str(path))
        anchor, variables = shared_variables(path)
        if anchor is None or not variables:
            raise RuntimeError(f"no __shared__ variables found in {path}")
        base = ctypes.cast(library.mode_distance_forward, ctypes.c_void_p).value - anchor
        library.set_shared_regions((ctypes.c_void_p * len(variables))(*(base + a for a, _ in variables)),
                                   (ctypes.c_int64 * len(variables))(*(size for _, size in variables)),
                                   ctypes.c_int64(len(variables)))
        for name in ("mode_distance_forward", "mode_distance_backward", "mmdl_losses_forward", "mmdl_losses_backward",
                     "label_mode", "sample_class_keys", "sample_classes", "flagged_means",
                     "consistency_source_groups", "consistency_group_starts", "consistency_triplets",
                     "consistency_hinge_forward", "consistency_hinge_backward"):
            getattr(library, name).restype = ctypes.c_char_p

    @staticmethod
    def _inputs(emb, modes):
        """The accumulation dtype, emb as (B, D, P) and the modes in it, contiguous (csrc/host.h)."""
        acc = accumulation(emb.dtype)
        return acc, as_bdp(emb), modes.to(acc).contiguous()

    @staticmethod
    def _problem(emb, modes):
        acc, bdp, centres = Kernels._inputs(emb, modes)
        C, M, D = centres.shape
        layout = _layout(*bdp.stride())
        return bdp, layout, centres, acc, C, M, D, bdp.shape[2], bdp.shape[0]

    @staticmethod
    def _check(error):
        if error is not None:
            raise RuntimeError(f"emulated CUDA kernel: {error.decode()}")

    def forward(self, emb, modes, sigma=None, *, tensor_cores, reverse=False):
        """(dmin, mstar, posterior or None) from the forward kernel the CUDA
        launcher would run (tensor_cores: on sm_80 and newer with
        DRSL_FAST_TENSOR_CORE_FORWARD=1)."""
        bdp, layout, centres, acc, C, M, D, P, B = self._problem(emb, modes)
        dmin, mstar = per_class_empty(emb, C, acc).fill_(NAN), per_class_empty(emb, C, torch.uint8).fill_(255)
        posterior = per_class_empty(emb, C, acc).fill_(NAN) if sigma is not None else None
        if dmin.numel() > 0:
            self._check(self._lib.mode_distance_forward(
                DTYPES[emb.dtype], int(tensor_cores), int(reverse), _ptr(bdp), layout,
                _ptr(centres), C, M, D, ctypes.c_int64(P), ctypes.c_int64(B), per_class_layout(emb, C), _ptr(dmin),
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
            grad_emb = empty_like_pixel_viewable(emb).fill_(NAN)
            grad_layout = _layout(*as_bdp(grad_emb).stride())
        if modes_grad:
            grad_modes = torch.full((C, M, D), NAN, dtype=acc)
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

    @staticmethod
    def _samples(emb, index, label, modes):
        """The arguments every per-sample kernel takes, as csrc/host.h's sample_problem."""
        acc, bdp, centres = Kernels._inputs(emb, modes)
        index, label = index.contiguous(), label.contiguous()
        C, M, D = centres.shape
        B, S = index.shape
        keep = (bdp, index, label, centres)
        args = (DTYPES[emb.dtype], _ptr(bdp), _layout(*bdp.stride()), _ptr(index), _ptr(label), _ptr(centres),
                ctypes.c_int64(B), ctypes.c_int64(S), ctypes.c_int64(bdp.shape[2]), C, M, D)
        return keep, args, acc

    def mmdl_losses(self, emb, index, label, modes, sigma, alpha, scale, mean=False, *, reverse=False):
        """(triplet, ce, count) as the CUDA launcher computes them: the forward
        kernel's per-sample losses and flags, then (flagged_means) the count
        and, with mean, the means over the counted samples."""
        keep, (dtype, *args), acc = self._samples(emb, index, label, modes)
        triplet, ce = torch.full(index.shape, NAN, dtype=acc), torch.full(index.shape, NAN, dtype=acc)
        counted = torch.ones(index.shape, dtype=torch.bool)  # a flag left unwritten shows as a wrong count
        if index.numel() > 0:
            self._check(self._lib.mmdl_losses_forward(dtype, int(reverse), *args, ctypes.c_double(sigma),
                                                      ctypes.c_double(alpha), ctypes.c_double(scale), _ptr(triplet),
                                                      _ptr(ce), _ptr(counted)))
        mean_triplet, mean_ce, count = self.flagged_means(triplet if mean else None, ce if mean else None, counted,
                                                          reverse=reverse)
        return (mean_triplet, mean_ce, count) if mean else (triplet, ce, count)

    def mmdl_losses_backward(self, grad_triplet, grad_ce, emb, index, label, modes, sigma, alpha, scale, *,
                             emb_grad=True, modes_grad=True, reverse=False):
        """(grad_emb or None, grad_modes or None) as the CUDA launcher computes them:
        the loss gradients read in place when each is one value (stride 0), the
        kernels' per-sample rows written into the zeroed embedding gradient
        (repeated pixels summed in sample order)."""
        keep, (dtype, *args), acc = self._samples(emb, index, label, modes)
        B, S = index.shape
        C, M, D = modes.shape
        one_value = grad_triplet.numel() == 1 and grad_ce.numel() == 1
        if one_value:
            grad_triplet, grad_ce = grad_triplet.to(acc).reshape(1), grad_ce.to(acc).reshape(1)
        else:
            grad_triplet = grad_triplet.to(acc).expand(B, S).contiguous()
            grad_ce = grad_ce.to(acc).expand(B, S).contiguous()
        grad_emb = empty_like_pixel_viewable(emb).zero_() if emb_grad else None
        grad_bdp = as_bdp(grad_emb) if emb_grad else None
        grad_modes = torch.full((C, M, D), NAN, dtype=acc) if modes_grad else None
        if B * S == 0:  # the launcher's zeros
            grad_modes = grad_modes.zero_() if grad_modes is not None else None
        elif emb_grad or modes_grad:
            self._check(self._lib.mmdl_losses_backward(
                dtype, int(reverse), *args, ctypes.c_double(sigma), ctypes.c_double(alpha), ctypes.c_double(scale),
                _ptr(grad_triplet), _ptr(grad_ce), ctypes.c_int64(0 if one_value else 1), _ptr(grad_emb),
                _layout(*(grad_bdp.stride() if emb_grad else (0, 0, 0))), _ptr(grad_modes)))
        return grad_emb, (grad_modes.to(modes.dtype) if grad_modes is not None else None)

    def label_mode(self, emb, index, label, modes, *, reverse=False):
        """mstar of each sample's own class (uint8 (B, S), 255 where it does not count)."""
        keep, (dtype, *args), _ = self._samples(emb, index, label, modes)
        mode = torch.full(index.shape, 254, dtype=torch.uint8)
        if index.numel() > 0:
            self._check(self._lib.label_mode(dtype, int(reverse), *args,
                                             ctypes.cast(_ptr(mode), ctypes.POINTER(ctypes.c_uint8))))
        return mode

    def sample_per_class(self, labels, keys, num_classes, k, *, reverse=False):
        """(index, count) of drsl_fast::sample_per_class from the CUDA launcher's
        steps: the sort keys (labels of any integer dtype read with their strides),
        torch.sort (stable) in place of at::sort, then a thread per output slot."""
        B, H, W = labels.shape
        P, C = H * W, num_classes
        if B * P == 0 or k == 0:  # the launcher's early return
            return torch.full((B, C, k), -1, dtype=torch.int64), torch.zeros(B, C, dtype=torch.int64)
        keys = keys.contiguous()
        sort_key = torch.full((B, P), -7, dtype=torch.int64)
        self._check(self._lib.sample_class_keys(int(reverse), LABEL_DTYPES[labels.dtype], _ptr(labels),
                                                _layout(*labels.stride()), ctypes.c_int64(B),
                                                ctypes.c_int64(W), ctypes.c_int64(P), ctypes.c_int64(C), _ptr(keys),
                                                _ptr(sort_key)))
        ordered, order = torch.sort(sort_key, dim=1, stable=True)
        index = torch.full((B, C, k), -2, dtype=torch.int64)
        count = torch.full((B, C), -2, dtype=torch.int64)
        self._check(self._lib.sample_classes(int(reverse), _ptr(ordered), _ptr(order), ctypes.c_int64(B),
                                             ctypes.c_int64(P), ctypes.c_int64(C), ctypes.c_int64(k), _ptr(index),
                                             _ptr(count)))
        return index, count

    def consistency_triplets(self, anchor_index, anchor_label, anchor_mode, source_label, source_mode, draws,
                             num_classes, num_modes, target_pixels, *, reverse=False):
        """The outputs of drsl_fast::consistency_triplets from the CUDA launcher's
        steps: the group keys, torch.sort (stable) in place of at::sort, the
        group starts, then a thread per anchor."""
        anchor_index, anchor_label, anchor_mode, draws = (t.contiguous() for t in (anchor_index, anchor_label,
                                                                                   anchor_mode, draws))
        label, mode = source_label.reshape(-1).long(), source_mode.reshape(-1).contiguous()
        C, M, n, anchors = num_classes, num_modes, label.numel(), anchor_index.numel()
        outputs = [torch.full(anchor_index.shape, -2, dtype=torch.int64) for _ in range(3)]
        valid = torch.zeros(anchor_index.shape, dtype=torch.bool)
        skipped = torch.zeros(2, dtype=torch.int64)
        if anchors == 0:
            return (*outputs, valid, skipped)
        key = torch.full((n,), -7, dtype=torch.int32)
        if n > 0:
            self._check(self._lib.consistency_source_groups(int(reverse), _ptr(label), _ptr(mode),
                                                            ctypes.c_int64(n), ctypes.c_int64(C), ctypes.c_int64(M),
                                                            _ptr(key)))
        ordered, order = torch.sort(key, stable=True)
        start = torch.full((C * M + 1,), -3, dtype=torch.int64)
        self._check(self._lib.consistency_group_starts(int(reverse), _ptr(ordered), ctypes.c_int64(n),
                                                       ctypes.c_int64(C * M), _ptr(start)))
        self._check(self._lib.consistency_triplets(
            int(reverse), _ptr(anchor_index), _ptr(anchor_label), _ptr(anchor_mode), _ptr(draws),
            ctypes.c_int64(anchors), ctypes.c_int64(anchor_index.shape[1]), _ptr(start), _ptr(order),
            ctypes.c_int64(C), ctypes.c_int64(M), ctypes.c_int64(target_pixels), *(_ptr(t) for t in outputs),
            _ptr(valid), _ptr(skipped)))
        return (*outputs, valid, skipped)

    @staticmethod
    def _hinge_args(target_emb, source_emb, anchor, positive, negative, beta):
        """The kernels' HingeArgs (launchers.cpp) and the tensors they point into."""
        target, source = as_bdp(target_emb), as_bdp(source_emb)
        anchor, positive, negative = (t.reshape(-1).contiguous() for t in (anchor, positive, negative))
        layouts = _layout(*target.stride()), _layout(*source.stride())
        args = _HingeArgs(_ptr(target), _ptr(source), ctypes.cast(layouts[0], ctypes.POINTER(ctypes.c_int64)),
                          ctypes.cast(layouts[1], ctypes.POINTER(ctypes.c_int64)), target.shape[2],
                          target.shape[0] * target.shape[2], source.shape[2], source.shape[0] * source.shape[2],
                          target.shape[1], *(ctypes.cast(_ptr(t), ctypes.POINTER(ctypes.c_int64))
                                             for t in (anchor, positive, negative)), anchor.numel(), beta)
        return args, (target, source, anchor, positive, negative, layouts)

    def consistency_hinge(self, target_emb, source_emb, anchor, positive, negative, beta, *, reverse=False):
        """(loss, used) as the CUDA launcher computes them: the kernel's
        per-triplet hinges and flags, then (flagged_means) their mean and count."""
        acc = accumulation(target_emb.dtype)
        args, keep = self._hinge_args(target_emb, source_emb, anchor, positive, negative, beta)
        hinge = torch.full((args.T,), NAN, dtype=acc)
        counted = torch.zeros(args.T, dtype=torch.bool)
        if args.T > 0:
            self._check(self._lib.consistency_hinge_forward(DTYPES[target_emb.dtype], int(reverse), ctypes.byref(args),
                                                            _ptr(hinge), _ptr(counted)))
        mean, _, used = self.flagged_means(hinge, None, counted, reverse=reverse)
        return mean, used

    def flagged_means(self, a, b, flagged, *, reverse=False):
        """(mean of a, mean of b, count) over the flagged items as the CUDA
        launchers end mmdl_losses and consistency_hinge (flagged_means_kernel;
        a mean is None where its values are)."""
        like = a if a is not None else b
        dtype = like.dtype if like is not None else torch.float32
        means = [torch.full((), NAN, dtype=dtype) if v is not None else None for v in (a, b)]
        count = torch.full((), -1, dtype=torch.int64)
        self._check(self._lib.flagged_means(DTYPES[dtype], int(reverse), _ptr(a), _ptr(b), _ptr(flagged),
                                            ctypes.c_int64(flagged.numel()), _ptr(means[0]), _ptr(means[1]),
                                            _ptr(count)))
        return means[0], means[1], count

    def consistency_hinge_backward(self, grad, used, target_emb, source_emb, anchor, positive, negative, beta,
                                   target_requires_grad, source_requires_grad, *, reverse=False):
        """(grad_target, grad_source) as the CUDA launcher computes them (empty where not asked for)."""
        acc = accumulation(target_emb.dtype)
        args, keep = self._hinge_args(target_emb, source_emb, anchor, positive, negative, beta)
        grads = [empty_like_pixel_viewable(emb).to(acc).zero_() if wanted else None
                 for emb, wanted in ((target_emb, target_requires_grad), (source_emb, source_requires_grad))]
        views = [as_bdp(g) if g is not None else None for g in grads]
        layouts = [_layout(*v.stride()) if v is not None else _layout(0, 0, 0) for v in views]
        grad, used = grad.to(acc).contiguous(), used.long().contiguous()  # alive through the call
        if args.T > 0 and any(g is not None for g in grads):
            self._check(self._lib.consistency_hinge_backward(
                DTYPES[target_emb.dtype], int(reverse), ctypes.byref(args), _ptr(grad), _ptr(used), _ptr(views[0]),
                layouts[0], _ptr(views[1]), layouts[1]))
        return tuple(g.to(emb.dtype) if g is not None else emb.new_empty(0)
                     for g, emb in zip(grads, (target_emb, source_emb)))


class _HingeArgs(ctypes.Structure):
    """launchers.cpp's HingeArgs."""
    _fields_ = [("target", ctypes.c_void_p), ("source", ctypes.c_void_p),
                ("target_layout", ctypes.POINTER(ctypes.c_int64)), ("source_layout", ctypes.POINTER(ctypes.c_int64)),
                ("target_pixels", ctypes.c_int64), ("target_flat", ctypes.c_int64),
                ("source_pixels", ctypes.c_int64), ("source_flat", ctypes.c_int64), ("D", ctypes.c_int),
                ("anchor", ctypes.POINTER(ctypes.c_int64)), ("positive", ctypes.POINTER(ctypes.c_int64)),
                ("negative", ctypes.POINTER(ctypes.c_int64)), ("T", ctypes.c_int64), ("beta", ctypes.c_double)]


@contextlib.contextmanager
def as_cpu_kernels(kernels, *, tensor_cores):
    """Within the block, the CPU kernels of drsl_fast::mode_distance,
    mode_distance_backward (the tensor-core kernels or the fp32 ones),
    mmdl_losses, mmdl_losses_backward, label_mode, sample_per_class, consistency_triplets,
    consistency_hinge and consistency_hinge_backward are the emulated CUDA
    kernels: every test of those ops with backend="cpu" runs them."""
    library = torch.library.Library("drsl_fast", "IMPL")

    def forward(emb, modes, sigma):
        dmin, mstar, posterior = kernels.forward(emb, modes, sigma, tensor_cores=tensor_cores)
        return dmin, mstar, posterior if posterior is not None else dmin.new_empty(0)

    def as_op_gradients(grads, emb, modes):  # a gradient not asked for is an empty tensor
        return tuple(g if g is not None else like.new_empty(0) for g, like in zip(grads, (emb, modes)))

    def backward(grad_dmin, emb, modes, mstar, emb_requires_grad, modes_requires_grad):
        return as_op_gradients(kernels.backward(grad_dmin, emb, modes, mstar, tensor_cores=tensor_cores,
                                                emb_grad=emb_requires_grad, modes_grad=modes_requires_grad),
                               emb, modes)

    def losses_backward(grad_triplet, grad_ce, emb, index, label, modes, sigma, alpha, scale, emb_requires_grad,
                        modes_requires_grad):
        return as_op_gradients(kernels.mmdl_losses_backward(grad_triplet, grad_ce, emb, index, label, modes, sigma,
                                                            alpha, scale, emb_grad=emb_requires_grad,
                                                            modes_grad=modes_requires_grad),
                               emb, modes)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        library.impl("mode_distance", forward, "CPU")
        library.impl("mode_distance_backward", backward, "CPU")
        library.impl("mmdl_losses", kernels.mmdl_losses, "CPU")
        library.impl("mmdl_losses_backward", losses_backward, "CPU")
        library.impl("label_mode", kernels.label_mode, "CPU")
        library.impl("sample_per_class", kernels.sample_per_class, "CPU")
        library.impl("consistency_triplets", kernels.consistency_triplets, "CPU")
        library.impl("consistency_hinge", kernels.consistency_hinge, "CPU")
        library.impl("consistency_hinge_backward", kernels.consistency_hinge_backward, "CPU")
    try:
        yield
    finally:
        library._destroy()
