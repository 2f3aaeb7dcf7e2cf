"""The C++ CPU kernels' builds for each instruction set (csrc/cpu/multiversion.h):
every build this CPU runs passes the CPU backend's tests, and the AVX2 and
AVX-512 builds give the same bits. ATen's CPU capability picks the build; it
is read once per process, so each build runs in a child process with
ATEN_CPU_CAPABILITY set."""
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

from drsl_fast.backends import why_unavailable

HERE = os.path.dirname(os.path.abspath(__file__))
# ATEN_CPU_CAPABILITY values, from the lowest instruction set up
BUILDS = ("default", "avx2", "avx512")

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(why_unavailable("cpu", CPU) is not None, reason=str(why_unavailable("cpu", CPU)))


def builds_here():
    """The builds this CPU runs (ATen's capability and those below it)."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    return BUILDS[:BUILDS.index(best) + 1] if best in BUILDS else BUILDS[:1]


def run_with(build, args):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=build)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=HERE)


@pytest.mark.parametrize("build", BUILDS)
def test_each_build_passes_the_cpu_backend_tests(build):
    if build not in builds_here():
        pytest.skip(f"this CPU has no {build} build (ATen capability {torch.backends.cpu.get_cpu_capability()})")
    done = run_with(build, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu and not emulated",
                            "test_mode_distance.py", "test_pseudo_labels.py", "test_mmdl_losses.py"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* passed\b", done.stdout), done.stdout[-2000:]


OUTPUTS = """
import sys, torch, drsl_fast
from drsl_fast.ops.pseudo_labels import confidence_histogram
assert torch.backends.cpu.get_cpu_capability().lower() == sys.argv[2]
g = torch.Generator().manual_seed(0)
out = {}
for name, (B, D, C, M, H, W) in {"odd": (2, 70, 19, 3, 19, 23), "wide": (1, 64, 16, 5, 40, 48),
                                 "narrow": (3, 5, 4, 2, 7, 9)}.items():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        emb = torch.randn(B, D, H, W, generator=g).to(dtype).requires_grad_()
        modes = (torch.randn(C, M, D, generator=g) * 0.7).to(dtype)
        modes[0, 0] = emb.detach()[0, :, 0, 0]  # a pixel on a mode: the direct recomputation
        modes.requires_grad_()
        result = drsl_fast.mode_distance(emb, modes, sigma=1.5, backend="cpu")
        weights = torch.randn(result.dmin.shape, generator=g, dtype=result.dmin.dtype)
        (result.dmin * weights).sum().backward()
        key = f"{name}-{dtype}"
        out[key] = [result.dmin, result.mstar, result.posterior, emb.grad, modes.grad]
from drsl_fast.losses import label_mode, mmdl_losses
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    emb = torch.randn(2, 37, 30, 31, generator=g).to(dtype).requires_grad_()
    modes = (torch.randn(19, 3, 37, generator=g) * 0.3).to(dtype).requires_grad_()
    index = torch.randint(-1, 30 * 31, (2, 1500), generator=g)
    label = torch.randint(0, 19, (2, 1500), generator=g)
    losses = mmdl_losses(emb, index, label, modes, sigma=3.0, reduction="none", backend="cpu")
    (losses.triplet.sum() + losses.ce.sum()).backward()
    out[f"mmdl-{dtype}"] = [losses.triplet, losses.ce, emb.grad, modes.grad,
                            label_mode(emb.detach(), index, label, modes.detach(), backend="cpu")]
scores = torch.randn(2, 19, 33, 41, generator=g).softmax(1)
out["histogram"] = [confidence_histogram(scores, backend="cpu"),
                    confidence_histogram(scores.log(), from_logits=True, backend="cpu")]
torch.save(out, sys.argv[1])
"""


def test_avx2_and_avx512_builds_agree_to_the_bit(tmp_path):
    """Also that the capability does switch the build: the baseline build,
    without FMA, rounds the products differently."""
    if "avx512" not in builds_here() or platform.machine() != "x86_64":
        pytest.skip(f"this CPU has no AVX-512 build (ATen capability {torch.backends.cpu.get_cpu_capability()})")
    script = tmp_path / "outputs.py"
    script.write_text(OUTPUTS)
    results = {}
    for build in BUILDS:
        done = run_with(build, [str(script), str(tmp_path / f"{build}.pt"), build])
        assert done.returncode == 0, done.stderr[-4000:]
        results[build] = torch.load(tmp_path / f"{build}.pt")
    assert results["avx2"].keys() == results["avx512"].keys()
    for key, tensors in results["avx2"].items():
        for a, b in zip(tensors, results["avx512"][key]):
            assert torch.equal(a, b), key
    assert not all(torch.equal(a, b) for a, b in zip(results["default"]["odd-torch.float32"],
                                                      results["avx2"]["odd-torch.float32"]))
