"""Builds drsl_fast and its compiled extension drsl_fast._C.

C++ CPU kernels are always built. CUDA kernels are built when torch is a CUDA
build and nvcc is found (CUDA_HOME), with or without a visible GPU.

Environment switches:
  DRSL_FAST_SKIP_CUDA=1   build the C++ CPU kernels only
  FORCE_CUDA=1            fail instead of skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST    GPU architectures; default below when unset and no GPU
                          is visible (a visible GPU's own architecture otherwise)
  DRSL_FAST_NO_EXTENSION=1  install the pure-Python package only

Build against the torch you run with: `pip install --no-build-isolation .`
"""
import glob
import os

from setuptools import find_packages, setup

# torch 2.x with CUDA 12.8+ / 13 supports Turing and newer; Pascal (sm_61) needs a
# CUDA <= 12.x toolkit and an explicit TORCH_CUDA_ARCH_LIST=6.1.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extension_modules():
    """The drsl_fast._C extension, with CUDA sources when they can be built."""
    if _flag("DRSL_FAST_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            "drsl_fast: building the extension needs torch in the build environment. "
            "Install torch first, then `pip install --no-build-isolation .` "
            "(or set DRSL_FAST_NO_EXTENSION=1 for the pure-Python package)."
        ) from exc

    root = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")))
    cpp_sources += sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
    cpp_sources += sorted(glob.glob(os.path.join(root, "csrc", "autograd", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))

    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("DRSL_FAST_SKIP_CUDA")
    )
    if _flag("FORCE_CUDA") and not with_cuda:
        raise SystemExit(
            "drsl_fast: FORCE_CUDA=1 but CUDA cannot be built "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )

    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi"]
    include_dirs = [root]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        # The pip-installed CUDA runtime keeps cuBLAS/cuSPARSE headers in site-packages.
        include_dirs += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
        module = cpp_extension.CUDAExtension(
            "drsl_fast._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        module = cpp_extension.CppExtension(
            "drsl_fast._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    print(f"drsl_fast: building the extension with{'' if with_cuda else 'out'} CUDA kernels")
    return [module], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="drsl_fast",
    version="0.1.0",
    description="Fast, memory-lean DRSL and IntraDA/ADVENT domain adaptation for semantic segmentation",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["drsl_fast", "drsl_fast.*"]),
    package_data={"drsl_fast.train": ["configs/*.yaml"]},
    install_requires=["torch>=2.4", "numpy", "pillow", "opencv-python-headless", "pyyaml", "tqdm"],
    entry_points={"console_scripts": ["drsl = drsl_fast.cli:main"]},
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "expecttest"], "plots": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
