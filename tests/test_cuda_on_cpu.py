"""The CPU emulation of the CUDA kernels (tests/cuda_on_cpu) built with
AddressSanitizer: no kernel reads or writes outside its inputs, outputs and
scratch buffers in global memory, over the layouts, dtypes, class and mode
counts the op tests use; the architecture-chosen forms of a kernel that
the default emulation does not build (dL/de's class batches loaded ahead, as
on sm_90) give the same results as the default; and the tensor-core
forward falls back to the direct sums exactly where it should. (Shared
memory is not covered: the emulation refills it with NaN before every block
instead, so a read of what no thread wrote shows in the results.) (The op tests themselves run on the emulation through their
"cuda-emulated" and "cuda-tc-emulated" backends; the race check is in tests/test_mode_distance.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_on_cpu

# Runs in a fresh interpreter with the sanitizer preloaded; imports torch and
# cuda_on_cpu only (Triton's native module does not load under the sanitizer).
EXERCISE = r"""
import sys
import torch
import cuda_on_cpu

k = cuda_on_cpu.Kernels(sys.argv[1])
g = torch.Generator().manual_seed(0)
embeddings = [
    torch.randn(2, 5, 7, 9, generator=g),
    torch.randn(2, 16, 5, 6, generator=g).contiguous(memory_format=torch.channels_last),
    torch.randn(8, 37, generator=g).t(),
    torch.randn(2, 70, 19, 23, generator=g),
    torch.randn(1, 6, 9, 11, generator=g)[:, :, ::2, 1:],
]
for emb in embeddings:
    for C, M in ((3, 2), (19, 3), (23, 5), (2, 16)):
        modes = torch.randn(C, M, emb.shape[1], generator=g)
        for dtype, tensor_cores in ((torch.float32, True), (torch.bfloat16, True), (torch.float64, False)):
            e = emb.to(dtype)
            dmin, mstar, _ = k.forward(e, modes, 0.5, tensor_cores=tensor_cores)
            k.backward(torch.randn(dmin.shape, generator=g), e, modes, mstar, tensor_cores=tensor_cores)
emb, modes = torch.randn(2, 8, 12, 13, generator=g), torch.randn(19, 3, 8, generator=g)
index, label = torch.randint(-1, 160, (2, 700), generator=g), torch.randint(0, 20, (2, 700), generator=g)
k.mmdl_losses(emb, index, label, modes, 0.5, 1.0, 15.0)
k.mmdl_losses_backward(torch.ones(2, 700), torch.ones(2, 700), emb, index, label, modes, 0.5, 1.0, 15.0)
k.label_mode(emb, index, label, modes)
# Eq. 6: anchors and source pixels that do not count, labels and modes out of range, then
# the hinge over positions inside, outside (-1, past the end) and on the maps' edges.
for C, M, P in ((3, 2, 50), (19, 3, 1), (5, 16, 300)):
    anchor_index = torch.randint(0, 9, (2, 40), generator=g)
    anchor_label = torch.randint(-2, C + 2, (2, 40), generator=g)
    anchor_mode = torch.randint(0, 256, (2, 40), generator=g, dtype=torch.uint8)
    source_label = torch.randint(-2, C + 2, (3, P), generator=g)
    source_mode = torch.randint(0, 256, (3, P), generator=g, dtype=torch.uint8)
    draws = torch.rand(2, 2, 40, generator=g, dtype=torch.float64)
    k.consistency_triplets(anchor_index, anchor_label, anchor_mode, source_label, source_mode, draws, C, M, 9)
for target, source in ((torch.randn(2, 6, 4, 5, generator=g), torch.randn(1, 6, 3, 3, generator=g)),
                       (torch.randn(3, 8, 2, 3, generator=g).contiguous(memory_format=torch.channels_last),
                        torch.randn(11, 8, generator=g))):
    for dtype in (torch.float32, torch.float16, torch.float64):
        t, s = target.to(dtype), source.to(dtype)
        Nt, Ns = t.shape[0] * t.shape[2] * t.shape[3], s.numel() // s.shape[1]
        anchor = torch.randint(-2, Nt + 2, (300,), generator=g)
        positive, negative = (torch.randint(-2, Ns + 2, (300,), generator=g) for _ in range(2))
        loss, used = k.consistency_hinge(t, s, anchor, positive, negative, 5.0)
        k.consistency_hinge_backward(torch.ones(()), used, t, s, anchor, positive, negative, 5.0, True, True)
print("exercised")
"""


def address_sanitizer():
    """The sanitizer's runtime library, or None."""
    try:
        found = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


def test_emulated_kernels_stay_inside_their_buffers(tmp_path):
    reason = cuda_on_cpu.why_unavailable()
    runtime = address_sanitizer()
    if reason is not None or runtime is None:
        pytest.skip(reason or "g++ has no AddressSanitizer runtime here")
    # dL/de's class batches loaded ahead (sm_90's form), whose last load runs past the classes
    library = cuda_on_cpu.build(tmp_path, flags=("-fsanitize=address", "-fno-omit-frame-pointer", "-g",
                                                 "-DDRSL_DL_DE_LOAD_AHEAD=1"), load=False)
    env = dict(os.environ, LD_PRELOAD=runtime, PYTHONPATH=str(Path(__file__).parent),
               ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0")
    done = subprocess.run([sys.executable, "-c", EXERCISE, str(library)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert "ERROR: AddressSanitizer" not in done.stderr, done.stderr[-6000:]
    assert done.returncode == 0 and "exercised" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dl_de_loaded_ahead_matches_the_default(tmp_path, emulated_cuda, dtype):
    """dL/de with the class batches loaded one batch ahead (sm_90's form,
    csrc/cuda/mode_distance.cu kDlDeLoadAhead) equals, bit for bit, the form
    that loads each batch after the last (elsewhere, and the emulation's
    default): the same sums in the same order. Class counts below, at and
    past one batch of 8, so the last batch is partial or whole."""
    ahead = cuda_on_cpu.build(tmp_path, flags=("-DDRSL_DL_DE_LOAD_AHEAD=1",))
    g = torch.Generator().manual_seed(3)
    for emb in (torch.randn(2, 64, 9, 11, generator=g),
                torch.randn(1, 70, 5, 7, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randn(37, 5, generator=g)):
        for C, M in ((3, 2), (8, 3), (19, 3), (23, 5)):
            e, modes = emb.to(dtype), torch.randn(C, M, emb.shape[1], generator=g, dtype=torch.float64)
            dmin, mstar, _ = emulated_cuda.forward(e, modes, 0.5, tensor_cores=False)
            grad = torch.randn(dmin.shape, generator=g)
            expected, _ = emulated_cuda.backward(grad, e, modes, mstar, tensor_cores=False, modes_grad=False)
            got, _ = ahead.backward(grad, e, modes, mstar, tensor_cores=False, modes_grad=False)
            assert not got.isnan().any()
            assert torch.equal(got, expected), (dtype, tuple(emb.shape), C, M)


@pytest.mark.parametrize("reverse", [False, True])
def test_tensor_core_forward_falls_back_to_the_direct_sums(emulated_cuda, reverse):
    """The tensor-core forward (DRSL_FAST_TENSOR_CORE_FORWARD) with every
    class's modes the same three points and every embedding within 1e-4 of
    the first: each (pixel, class) pair cancels (dmin about 6e-7, the
    expanded form's rounding about 1e-5), so the trust rule refuses all of
    them, every pair of every block queued, and all must come out as direct
    sums: to fp32 rounding of the float64 distances, mode 0 every time,
    threads in either order. On spread-out inputs the expanded minima are
    kept: not the direct kernel's bits, within rounding of them."""
    g = torch.Generator().manual_seed(5)
    points = torch.randn(3, 64, generator=g)
    modes = points.expand(19, 3, 64).contiguous()
    emb = points[0].reshape(1, 64, 1, 1) + 1e-4 * torch.randn(2, 64, 9, 17, generator=g)  # 153 pixels a image
    dmin, mstar, _ = emulated_cuda.forward(emb, modes, 0.5, tensor_cores=True, reverse=reverse)
    exact = ((emb.double() - points[0].double().reshape(1, 64, 1, 1)) ** 2).sum(1, keepdim=True).expand_as(dmin)
    torch.testing.assert_close(dmin.double(), exact, rtol=1e-5, atol=0)
    assert (mstar == 0).all()
    spread = torch.randn(2, 64, 9, 17, generator=g)
    modes = torch.randn(19, 3, 64, generator=g)
    direct = emulated_cuda.forward(spread, modes, None, tensor_cores=False)
    expanded = emulated_cuda.forward(spread, modes, None, tensor_cores=True)
    assert not torch.equal(expanded[0], direct[0])
    torch.testing.assert_close(expanded[0], direct[0], rtol=2e-6, atol=0)
    assert torch.equal(expanded[1], direct[1])
