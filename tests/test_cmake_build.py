"""CMakeLists.txt builds the operators as a plain C++ library (find_package(Torch));
loading that library alone registers drsl_fast::* with the same results."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmake_environment():
    """cmake flags and environment; CUDA sources are built when nvcc is present."""
    env = dict(os.environ)
    flags = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    # A CUDA build of libtorch needs the toolkit's real prefix even for a CPU-only
    # library (torch may guess it wrong from a wrapper nvcc on PATH).
    candidates = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    cuda_home = next((c for c in candidates if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h"))), None)
    with_cuda = torch.version.cuda is not None and cuda_home is not None
    if with_cuda:
        env["CUDA_HOME"] = cuda_home
        env["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + env["PATH"]
        env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0")
        flags += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_home, 'bin', 'nvcc')}"]
    flags.append(f"-DDRSL_FAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}")
    return flags, env, with_cuda


def cmake_executable():
    """The environment's pinned cmake (requirements.txt), else the one on PATH."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "cmake")
    return beside_python if os.path.exists(beside_python) else shutil.which("cmake")


@pytest.mark.slow
@pytest.mark.skipif(cmake_executable() is None, reason="cmake is not installed")
def test_cmake_library_registers_the_operators(tmp_path):
    flags, env, with_cuda = cmake_environment()
    build = tmp_path / "build"
    cmake = cmake_executable()
    for cmd in ([cmake, "-S", ROOT, "-B", str(build)] + flags, [cmake, "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    library = build / "libdrsl_fast_ops.so"
    assert library.exists()
    if with_cuda:
        assert (build / "CMakeFiles" / "drsl_fast_ops.dir" / "csrc" / "cuda").exists()

    # A fresh process that never imports drsl_fast: the library alone defines the ops.
    script = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(library)!r})\n"
        "g = torch.Generator().manual_seed(0)\n"
        "emb = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)\n"
        "modes = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)\n"
        "dmin, mstar, post = torch.ops.drsl_fast.mode_distance(emb, modes, 0.5)\n"
        "dist = ((emb.permute(0, 2, 3, 1)[..., None, None, :] - modes) ** 2).sum(-1)\n"
        "best = dist.min(-1)\n"
        "torch.testing.assert_close(dmin, best.values.permute(0, 3, 1, 2))\n"
        "torch.testing.assert_close(post, torch.exp(-dmin / 0.5))\n"
        "assert torch.equal(mstar.long(), best.indices.permute(0, 3, 1, 2))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
