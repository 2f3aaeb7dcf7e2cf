"""pykeops, the benchmarks' peer (requirements-bench.txt), on a GPU.

KeOps finds the CUDA driver and NVRTC with ctypes' ``find_library`` and the
headers cuda.h and nvrtc.h under CUDA_PATH or CUDA_HOME. Where it finds no
NVRTC (a toolkit without one; torch's CUDA wheels carry their own under
site-packages/nvidia/), it switches to its CPU code, which then reads the
addresses of CUDA tensors as host memory, and the process dies with a
segmentation fault. :func:`environment` gives the worker that runs pykeops on
a GPU the NVRTC and headers of torch's wheel; :func:`check` turns a KeOps
without GPU support into an error that says why, and prints the CUDA set-up
it found (on stderr: the run's log).
"""
import ctypes
import glob
import os
import sys
import tempfile
from ctypes.util import find_library
from typing import Callable, Dict, Iterable, Optional, Tuple


def versioned(folder: str, name: str) -> Optional[str]:
    """``folder``/lib<name>.so.<major>, the file the loader opens, or None."""
    found = sorted(glob.glob(os.path.join(folder, f"lib{name}.so.[0-9]*")))
    return found[0] if found else None


def wheel_cuda(roots: Optional[Iterable[str]] = None) -> Optional[Tuple[str, str]]:
    """(include, lib) folders of the first CUDA wheel under ``roots`` (default:
    the ``nvidia`` package's folders) whose include holds cuda.h and nvrtc.h
    and whose lib holds NVRTC; None if there is none."""
    if roots is None:
        try:
            import nvidia
        except ImportError:
            return None
        roots = list(nvidia.__path__)
    for root in roots:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            lib = os.path.join(os.path.dirname(include), "lib")
            headers = all(os.path.isfile(os.path.join(include, h)) for h in ("cuda.h", "nvrtc.h"))
            if headers and versioned(lib, "nvrtc"):
                return include, lib
    return None


def loaded_path(soname: str) -> Optional[str]:
    """The file the loader opens for ``soname`` (lib<name>.so.<version>;
    loaded into this process to ask), or None."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return None
    stem = soname.split(".so")[0] + ".so"
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith(stem):
                return path
    return None


def link(path: str, target: str) -> None:
    """``path`` a symbolic link to ``target``, replaced atomically."""
    temporary = f"{path}.{os.getpid()}"
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, path)


def environment(base: Optional[Dict[str, str]] = None, found: Callable[[str], Optional[str]] = find_library,
                roots: Optional[Iterable[str]] = None, links: Optional[str] = None) -> Dict[str, str]:
    """``base`` (default this process's environment) for a pykeops worker on
    a GPU: unchanged where ``found`` (find_library) finds an NVRTC, or where
    no torch CUDA wheel has one. Else CUDA_PATH names the wheel's folder (its
    headers), and ``links`` (default a folder under the temporary directory)
    holds libnvrtc.so and libcudart.so, the names the linker and find_library
    look for, beside their versioned names, and libcuda.so for the driver;
    it comes first on LD_LIBRARY_PATH and LIBRARY_PATH, the wheel's lib
    folder (NVRTC's builtins) next."""
    env = dict(os.environ if base is None else base)
    wheel = None if found("nvrtc") else wheel_cuda(roots)
    if wheel is None:
        return env
    include, lib = wheel
    links = links or os.path.join(tempfile.gettempdir(), "drsl_fast_keops_cuda")
    os.makedirs(links, exist_ok=True)
    targets = {}
    for name in ("nvrtc", "cudart"):
        path = versioned(lib, name)
        if path:
            targets[f"lib{name}.so"] = targets[os.path.basename(path)] = path
    driver = found("cuda")
    driver = driver and loaded_path(driver)
    if driver:
        targets["libcuda.so"] = driver
    for name, target in targets.items():
        link(os.path.join(links, name), target)
    env["CUDA_PATH"] = os.path.dirname(include)
    for variable in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
        env[variable] = os.pathsep.join(p for p in (links, lib, env.get(variable)) if p)
    return env


def check() -> None:
    """Prints KeOps' CUDA set-up on stderr; raises RuntimeError where it has
    no GPU support (its CPU code would read the device's memory)."""
    import keopscore
    import pykeops

    cuda = keopscore.cuda_config
    print(f"pykeops {pykeops.__version__}: GPU support {pykeops.config.gpu_available}; NVRTC in "
          f"{cuda.libnvrtc_folder}, CUDA headers in {cuda.cuda_include_path}, CUDA runtime {cuda.cuda_version}",
          file=sys.stderr, flush=True)
    if not pykeops.config.gpu_available:
        reason = cuda.cuda_message or "its CUDA set-up failed"
        raise RuntimeError(f"pykeops has no GPU support here ({reason}): its CPU code would read the device's "
                           f"memory")
