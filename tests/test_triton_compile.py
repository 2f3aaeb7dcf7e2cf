"""Every Triton kernel compiles for real GPU targets (sm_90, sm_80), no GPU needed.

Each launcher of drsl_fast/triton_kernels/*.py is called on small CPU tensors, as the ops
call it, with a ``launch`` that compiles the kernel ahead of time for the
argument types it was given (specialised as a real launch specialises them)
instead of running it. The Triton interpreter, which runs the other tests
without a GPU, accepts code the GPU compiler rejects (non-constexpr globals,
for one), and a kernel module imported under it holds no compilable kernels,
so the compiling runs in a subprocess without TRITON_INTERPRET.

Run as a script (``python tests/test_triton_compile.py REPORT.json``) it
compiles every case and writes the results to REPORT.json.
"""
import json
import os
import subprocess
import sys
from typing import Dict, List, NamedTuple

import pytest
import torch

pytest.importorskip("triton")

TARGETS = {"sm_90": 90, "sm_80": 80}
WARP_SIZE = 32
FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
    torch.bool: "*u1",
}
INT32_RANGE = range(-2**31, 2**31)

# Small shapes: B images, C classes, M modes, D channels, H x W pixels, S samples per image.
B, C, M, D, H, W, S = 2, 5, 3, 24, 4, 6, 10
ROWS = 30  # pixels of an (N, D) embedding


# ---------------------------------------------------------------- inputs, as the ops pass them


def _scores(dtype: str, layout: str) -> torch.Tensor:
    """(B, C, H, W) logits or probabilities, contiguous or channels-last."""
    x = torch.rand(B, C, H, W).to(FLOATS[dtype])
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _emb(dtype: str, layout: str) -> torch.Tensor:
    """(B, D, H, W) contiguous or channels-last, or (N, D) for layout 'rows'."""
    if layout == "rows":
        return torch.randn(ROWS, D).to(FLOATS[dtype])
    x = torch.randn(B, D, H, W).to(FLOATS[dtype])
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _per_class(emb: torch.Tensor, classes: int = C, dtype=torch.float32) -> torch.Tensor:
    """dmin-shaped: (B, classes, H, W), or (N, classes) for an (N, D) embedding."""
    shape = (emb.shape[0], classes) if emb.dim() == 2 else (emb.shape[0], classes, emb.shape[2], emb.shape[3])
    return torch.zeros(shape, dtype=dtype)


def _modes() -> torch.Tensor:
    return torch.randn(C, M, D)  # the ops pass modes.float().contiguous()


def _samples(emb: torch.Tensor):
    """int64 (B, S) index and label, as mmdl_losses.check_inputs returns them."""
    batch, pixels = (1, emb.shape[0]) if emb.dim() == 2 else (emb.shape[0], emb.shape[2] * emb.shape[3])
    return torch.randint(-1, pixels, (batch, S)), torch.randint(-1, C, (batch, S))


def entropy_forward(kernels, launch, dtype, layout, with_map):
    logits = _scores(dtype, layout)
    entropy_map = torch.empty(B, C, H, W) if with_map else None
    kernels.entropy.forward(logits, entropy_map, torch.empty(B, H, W), launch=launch)


def entropy_backward(kernels, launch, dtype, layout, with_map_grad):
    logits = _scores(dtype, layout)
    grad_map = torch.zeros(B, C, H, W) if with_map_grad else None
    kernels.entropy.backward(logits, grad_map, torch.zeros(B, H, W), torch.empty_like(logits), launch=launch)


def pseudo_labels_histogram(kernels, launch, dtype, layout, from_logits, mantissa_bits):
    counts = torch.zeros(C, 1 + (24 << mantissa_bits), dtype=torch.int64)
    kernels.pseudo_labels.histogram(_scores(dtype, layout), counts, from_logits, mantissa_bits, launch=launch)


def pseudo_labels_select(kernels, launch, dtype, layout):
    labels = torch.empty(B, H, W, dtype=torch.uint8)
    kernels.pseudo_labels.select(_scores(dtype, layout), torch.full((C,), 0.5), labels, launch=launch)


def mode_distance_forward(kernels, launch, dtype, layout, with_posterior, classes=C):
    emb = _emb(dtype, layout)
    posterior, scale = (_per_class(emb, classes), -2.0) if with_posterior else (None, 0.0)
    kernels.mode_distance.forward(emb, torch.randn(classes, M, D), _per_class(emb, classes),
                                  _per_class(emb, classes, torch.uint8), posterior, scale, launch=launch)


def mode_distance_backward(kernels, launch, dtype, layout, emb_grad, modes_grad, classes=C):
    emb = _emb(dtype, layout)
    modes = torch.randn(classes, M, D)
    batch, pixels = (1, emb.shape[0]) if emb.dim() == 2 else (emb.shape[0], emb.shape[2] * emb.shape[3])
    out = torch.empty_like(emb) if emb_grad else None  # keeps channels-last, as the op's grad_emb does
    partial = torch.zeros(batch * kernels.mode_distance.mode_grad_chunks(pixels), classes, M, D) if modes_grad else None
    kernels.mode_distance.backward(_per_class(emb, classes), _per_class(emb, classes, torch.uint8), emb, modes,
                                   out, partial, launch=launch)


def mmdl_losses_forward(kernels, launch, dtype, layout):
    emb = _emb(dtype, layout)
    index, label = _samples(emb)
    triplet, ce = torch.empty(index.shape), torch.empty(index.shape)
    kernels.mmdl_losses.forward(emb, index, label, _modes(), triplet, ce, 2.0, 1.0, 15.0, launch=launch)


def mmdl_losses_backward(kernels, launch, dtype, layout, emb_grad, modes_grad):
    emb = _emb(dtype, layout)
    index, label = _samples(emb)
    rows = torch.empty(index.numel(), D) if emb_grad else None
    partial = torch.empty(kernels.mmdl_losses.sample_blocks(index.numel()), C, M, D) if modes_grad else None
    kernels.mmdl_losses.backward(
        torch.ones(index.shape), torch.ones(index.shape), emb, index, label, _modes(), rows, partial, 2.0, 1.0, 15.0,
        launch=launch,
    )


def mmdl_losses_scatter_rows(kernels, launch, dtype, layout):
    emb = _emb(dtype, layout)
    index, label = _samples(emb)
    rows = torch.zeros(index.numel(), D)
    kernels.mmdl_losses.scatter_rows(rows, index, label, C, torch.zeros_like(emb), launch=launch)


def mmdl_losses_label_mode(kernels, launch, dtype, layout):
    emb = _emb(dtype, layout)
    index, label = _samples(emb)
    mode = torch.empty(index.shape, dtype=torch.uint8)
    kernels.mmdl_losses.label_mode(emb, index, label, _modes(), mode, launch=launch)


def tap_sum_forward(kernels, launch, dtype):
    y = torch.randn(B, 4, C, 9, H, W).to(FLOATS[dtype])
    kernels.tap_sum.forward(y, (6, 12, 18, 24), torch.empty(B, C, H, W, dtype=y.dtype), launch=launch)


def tap_sum_backward(kernels, launch, dtype):
    grad_y = torch.empty(B, 4, C, 9, H, W).to(FLOATS[dtype])
    kernels.tap_sum.backward(torch.randn(B, C, H, W).to(FLOATS[dtype]), (6, 12, 18, 24), grad_y, launch=launch)


# ---------------------------------------------------------------- cases


class Case(NamedTuple):
    launcher: str  # module.function in drsl_fast/triton_kernels
    options: Dict[str, object]
    target: str

    @property
    def id(self) -> str:
        values = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.launcher}[{values}]@{self.target}"


CALLS = {
    "entropy.forward": entropy_forward,
    "entropy.backward": entropy_backward,
    "pseudo_labels.histogram": pseudo_labels_histogram,
    "pseudo_labels.select": pseudo_labels_select,
    "mode_distance.forward": mode_distance_forward,
    "mode_distance.backward": mode_distance_backward,
    "mmdl_losses.forward": mmdl_losses_forward,
    "mmdl_losses.backward": mmdl_losses_backward,
    "mmdl_losses.scatter_rows": mmdl_losses_scatter_rows,
    "mmdl_losses.label_mode": mmdl_losses_label_mode,
    "tap_sum.forward": tap_sum_forward,
    "tap_sum.backward": tap_sum_backward,
}

# The embedding launchers take no boolean switch: each dtype once, over the three layouts.
EMBEDDING_VARIANTS = [
    dict(dtype="fp32", layout="contiguous"),
    dict(dtype="fp16", layout="channels_last"),
    dict(dtype="bf16", layout="rows"),
]

# Per launcher, each input dtype the op passes and each value of every boolean
# switch once, spread over the layouts (a stride of 1 is specialised into the
# kernel, so layouts compile differently).
VARIANTS = {
    "entropy.forward": [
        dict(dtype="fp32", layout="contiguous", with_map=True),
        dict(dtype="fp16", layout="channels_last", with_map=False),
        dict(dtype="bf16", layout="contiguous", with_map=True),
    ],
    "entropy.backward": [
        dict(dtype="fp32", layout="contiguous", with_map_grad=True),
        dict(dtype="fp16", layout="channels_last", with_map_grad=False),
        dict(dtype="bf16", layout="contiguous", with_map_grad=True),
    ],
    "pseudo_labels.histogram": [
        dict(dtype="fp32", layout="contiguous", from_logits=True, mantissa_bits=8),
        dict(dtype="fp16", layout="channels_last", from_logits=False, mantissa_bits=8),
        dict(dtype="bf16", layout="contiguous", from_logits=True, mantissa_bits=0),
        dict(dtype="fp64", layout="contiguous", from_logits=False, mantissa_bits=8),
    ],
    "pseudo_labels.select": [
        dict(dtype="fp32", layout="contiguous"),
        dict(dtype="fp16", layout="channels_last"),
        dict(dtype="bf16", layout="contiguous"),
        dict(dtype="fp64", layout="contiguous"),
    ],
    "mode_distance.forward": [
        dict(dtype="fp32", layout="contiguous", with_posterior=True),
        dict(dtype="fp16", layout="channels_last", with_posterior=False),
        dict(dtype="bf16", layout="rows", with_posterior=True),
        # 19 classes of 3 modes: a full pass of 16 classes, then one of 4 slots
        dict(dtype="fp32", layout="contiguous", with_posterior=True, classes=19),
    ],
    "mode_distance.backward": [  # 40 classes of 3 modes: two passes of the product, both kernels
        dict(dtype="fp32", layout="contiguous", emb_grad=True, modes_grad=True),
        dict(dtype="fp16", layout="channels_last", emb_grad=True, modes_grad=False),
        dict(dtype="bf16", layout="rows", emb_grad=False, modes_grad=True),
        dict(dtype="fp32", layout="contiguous", emb_grad=True, modes_grad=True, classes=40),
    ],
    "mmdl_losses.forward": EMBEDDING_VARIANTS,
    "mmdl_losses.backward": [
        dict(dtype="fp32", layout="contiguous", emb_grad=True, modes_grad=True),
        dict(dtype="fp16", layout="channels_last", emb_grad=True, modes_grad=False),
        dict(dtype="bf16", layout="rows", emb_grad=False, modes_grad=True),
    ],
    "mmdl_losses.scatter_rows": EMBEDDING_VARIANTS,
    "mmdl_losses.label_mode": EMBEDDING_VARIANTS,
    "tap_sum.forward": [dict(dtype=dtype) for dtype in FLOATS],
    "tap_sum.backward": [dict(dtype=dtype) for dtype in FLOATS],
}


def _cases() -> List[Case]:
    return [Case(launcher, options, target)
            for launcher, variants in VARIANTS.items() for options in variants for target in TARGETS]


CASES = _cases()


# ---------------------------------------------------------------- compiling instead of launching


def _argument_type(value, param):
    """(signature type, divisible by 16) of one non-constexpr argument, as
    Triton's launcher specialises it: ints equal to 1 become constexprs."""
    if value is None:
        return "constexpr", False
    if isinstance(value, torch.Tensor):
        if value.dtype not in POINTER_TYPES:
            raise TypeError(f"{param.name}: no Triton pointer type for {value.dtype}")
        return POINTER_TYPES[value.dtype], value.data_ptr() % 16 == 0 and not param.do_not_specialize_on_alignment
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1 and not param.do_not_specialize:
            return "constexpr", False
        divisible = value % 16 == 0 and not param.do_not_specialize and not param.do_not_specialize_on_alignment
        if value in INT32_RANGE:
            return "i32", divisible
        return ("i64" if value < 2**63 else "u64"), divisible
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"{param.name}: cannot pass {type(value).__name__} to a Triton kernel")


# keywords of a launch that are compile options, not kernel arguments
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class CompileInsteadOfLaunch:
    """``launch`` for the launchers: ``launch(kernel)[grid](*args, **kwargs)``
    compiles ``kernel`` for ``target`` with the types of args and kwargs."""

    def __init__(self, target):
        self.target = target
        self.kernels: List[str] = []  # names of the kernels launched
        self.compiled = []  # their compiled kernels (bench/triton_sass.py reads them)

    def __call__(self, kernel):
        return _KernelCompiler(self, kernel)

    def compile(self, kernel, args, kwargs):
        import triton
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        self.kernels.append(kernel.__name__)
        if not isinstance(kernel, JITFunction):
            raise TypeError(f"{kernel.__name__} is a {type(kernel).__name__}, not a JITFunction: "
                            "its module was imported under TRITON_INTERPRET")
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        names = [p.name for p in kernel.params]
        if len(args) > len(names) or set(kwargs) - set(names):
            raise TypeError(f"{kernel.__name__}: arguments do not match its parameters {names}")
        values = dict(zip(names, args), **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            if param.name not in values:
                if not param.has_default:
                    raise TypeError(f"{kernel.__name__}: missing argument {param.name}")
                values[param.name] = param.default
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
                continue
            ty, divisible = _argument_type(value, param)
            signature[param.name] = ty
            if ty == "constexpr":
                constexprs[param.name] = value
            elif divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
        self.compiled.append(triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                                            target=self.target, options=options))


class _KernelCompiler:
    def __init__(self, launch: CompileInsteadOfLaunch, kernel):
        self.launch, self.kernel = launch, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch.compile(self.kernel, args, kwargs)


def _uncovered(kernels, called: set, launched: set) -> List[str]:
    """Kernels (``*_kernel`` jit functions) never launched and launchers
    (functions with a ``launch`` parameter) never called, per module."""
    import importlib
    import inspect
    import pkgutil

    from triton.runtime.jit import JITFunction

    missing = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, value in vars(module).items():
            qualified = f"{info.name}.{name}"
            if isinstance(value, JITFunction) and name.endswith("_kernel") and qualified not in launched:
                missing.append(f"kernel {qualified} is launched by no case")
            elif (inspect.isfunction(value) and value.__module__ == module.__name__
                  and "launch" in inspect.signature(value).parameters and qualified not in called):
                missing.append(f"launcher {qualified} has no case")
    return missing


def compile_all(report_path: str) -> None:
    """Compiles every case, writing {"cases": {id: {"ok", "error", "seconds"}}, "uncovered": [...]}."""
    import importlib
    import time
    import traceback
    import types

    from triton.backends.compiler import GPUTarget

    kernels = importlib.import_module("drsl_fast.triton_kernels")
    modules = types.SimpleNamespace(**{
        name: importlib.import_module(f"drsl_fast.triton_kernels.{name}")
        for name in {case.launcher.split(".")[0] for case in CASES}
    })
    results, called, launched = {}, set(), set()
    for case in CASES:
        launch = CompileInsteadOfLaunch(GPUTarget("cuda", TARGETS[case.target], WARP_SIZE))
        start = time.perf_counter()
        try:
            CALLS[case.launcher](modules, launch, **case.options)
            ok, error = bool(launch.kernels), "" if launch.kernels else "the launcher launched no kernel"
        except Exception as e:  # noqa: BLE001 - reported per case
            ok, error = False, "".join(traceback.format_exception_only(type(e), e))
        called.add(case.launcher)
        launched.update(f"{case.launcher.split('.')[0]}.{name}" for name in launch.kernels)
        results[case.id] = {"ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 2)}
        print(f"{'ok  ' if ok else 'FAIL'} {results[case.id]['seconds']:5.2f}s {case.id}", flush=True)
    with open(report_path, "w") as f:
        json.dump({"cases": results, "uncovered": _uncovered(kernels, called, launched)}, f, indent=1)


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    """Runs :func:`compile_all` in a subprocess without TRITON_INTERPRET (and
    with a fresh Triton cache, so every case really compiles)."""
    work = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")}
    env["TRITON_CACHE_DIR"] = str(work / "cache")
    report = work / "report.json"
    proc = subprocess.run([sys.executable, __file__, str(report)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and report.exists(), f"the compiling subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(report.read_text())


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_kernel_compiles_for_gpu(compile_report, case):
    result = compile_report["cases"][case.id]
    assert result["ok"], f"{case.id} does not compile:\n{result['error']}"


def test_every_kernel_and_launcher_has_a_case(compile_report):
    assert not compile_report["uncovered"], "\n".join(compile_report["uncovered"])


if __name__ == "__main__":
    compile_all(sys.argv[1])
