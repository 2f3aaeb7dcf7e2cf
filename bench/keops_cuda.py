"""pykeops, the benchmarks' peer (requirements-bench.txt), on a GPU.

KeOps finds the CUDA driver and NVRTC with ctypes' ``find_library`` and the
headers cuda.h and nvrtc.h under CUDA_PATH or CUDA_HOME. Where it finds no
NVRTC (a toolkit without one; torch's CUDA 13 wheels carry their own under
site-packages/nvidia/cu13/), it switches to its CPU code, which then reads the
addresses of CUDA tensors as host memory: the likely cause of the
segmentation faults of pykeops on the H200 machines (bench/NOTES.md).
:func:`environment` gives the worker that runs pykeops on a GPU the NVRTC and
headers of torch's wheel; :func:`check` turns a KeOps without GPU support
into an error that says why and what CUDA set-up it found.

An NVRTC that ``find_library`` does find (ldconfig's cache first) is the one
KeOps uses, even if its version is not torch's: an environment cannot
override that cache.
"""
import ctypes
import glob
import os
import tempfile
from ctypes.util import find_library
from typing import Callable, Dict, Iterable, Optional, Tuple


class _LinkMap(ctypes.Structure):  # the head of glibc's struct link_map
    _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]


def versioned(folder: str, name: str) -> Optional[str]:
    """``folder``/lib<name>.so.<major>, the file the loader opens, or None."""
    found = sorted(glob.glob(os.path.join(folder, f"lib{name}.so.[0-9]*")))
    return found[0] if found else None


def wheel_cuda(roots: Optional[Iterable[str]] = None) -> Optional[Tuple[str, str]]:
    """(include, lib) folders of the first CUDA wheel under ``roots`` (default:
    the ``nvidia`` package's folders) whose include holds cuda.h and nvrtc.h
    and whose lib holds NVRTC (the CUDA 13 wheels' nvidia/cu13 layout; the
    CUDA 12 wheels split those headers over two folders); None if none does."""
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
    """The path under which the loader opens ``soname`` (loaded into this
    process to ask, then asked with glibc's dlinfo), or None."""
    try:
        handle = ctypes.CDLL(soname)
    except OSError:
        return None
    for library in (None, find_library("dl")):  # dlinfo: in libc since glibc 2.34, in libdl before
        try:
            dlinfo = ctypes.CDLL(library).dlinfo
        except (OSError, AttributeError):
            continue
        dlinfo.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
        link_map = ctypes.POINTER(_LinkMap)()
        if dlinfo(handle._handle, 2, ctypes.byref(link_map)) == 0 and link_map:  # 2: RTLD_DI_LINKMAP
            name = link_map.contents.l_name
            return os.fsdecode(name) if name else None
    return None


def environment(base: Optional[Dict[str, str]] = None, found: Callable[[str], Optional[str]] = find_library,
                roots: Optional[Iterable[str]] = None, links: Optional[str] = None) -> Dict[str, str]:
    """``base`` (default this process's environment) for a pykeops worker on
    a GPU: unchanged where ``found`` (find_library) finds an NVRTC, or where
    no torch CUDA wheel has one. Else CUDA_PATH names the wheel's folder (its
    headers), and ``links`` (default a new folder under the temporary
    directory) holds libnvrtc.so and libcudart.so, the names the linker and
    find_library look for, beside their versioned names, and libcuda.so for
    the driver; it comes first on LD_LIBRARY_PATH and LIBRARY_PATH, the
    wheel's lib folder (NVRTC's builtins) next."""
    env = dict(os.environ if base is None else base)
    wheel = None if found("nvrtc") else wheel_cuda(roots)
    if wheel is None:
        return env
    include, lib = wheel
    if links is None:
        links = tempfile.mkdtemp(prefix="drsl_fast_keops_cuda_")
    else:
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
        path = os.path.join(links, name)
        if os.path.lexists(path):
            os.remove(path)
        os.symlink(target, path)
    env["CUDA_PATH"] = os.path.dirname(include)
    for variable in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
        env[variable] = os.pathsep.join(p for p in (links, lib, env.get(variable)) if p)
    return env


def check() -> None:
    """Raises RuntimeError where pykeops has no GPU support (its CPU code
    would read the device's memory), with KeOps' reason and the CUDA set-up
    it found."""
    import keopscore
    import pykeops

    if pykeops.config.gpu_available:
        return
    cuda = keopscore.cuda_config
    reason = cuda.cuda_message or "its CUDA set-up failed"
    raise RuntimeError(f"pykeops {pykeops.__version__} has no GPU support here ({reason}; GPUs found "
                       f"{getattr(cuda, 'n_gpus', '?')}, NVRTC in {cuda.libnvrtc_folder}, CUDA headers in "
                       f"{cuda.cuda_include_path}, CUDA runtime {cuda.cuda_version}): its CPU code would read the "
                       f"device's memory")
