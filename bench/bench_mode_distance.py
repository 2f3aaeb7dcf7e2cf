"""Benchmark of the mode-distance op (docs/method.md §3) against what a user would
otherwise write, in the same run.

Methods:
  broadcast  ((e[..., None, None, :] - R) ** 2).sum(-1).min(-1) on permuted embeddings
  cdist      torch.cdist(e, R) ** 2 on permuted embeddings, then min over modes
  pykeops    the best peer that installs here (a benchmark-only dependency,
             requirements-bench.txt): per class, a KeOps LazyTensor min over
             the class's modes, as its users write it (with gradients: its
             argmin, then the distances to the chosen modes in PyTorch); it
             compiles its kernels at first use (outside the timing); on a GPU
             with the NVRTC of torch's wheels where the machine has none
             (keops_cuda.py)
  reference  drsl_fast's pure-PyTorch oracle (a broadcast with gather)
  cpu / cuda / triton   drsl_fast's fused backends (cuda: the fp32 kernels,
             the ones older GPUs such as the GTX 1080 Ti run)
  cuda-tc-backward / cuda-tc-forward  the CUDA backend with
             DRSL_FAST_TENSOR_CORE_BACKWARD=1 or DRSL_FAST_TENSOR_CORE_FORWARD=1:
             its tensor-core backward or forward; listed on GPUs that have
             tensor cores (cuda-fp32 in results of earlier versions: the fp32
             kernels, when the tensor-core backward was the default there)
  triton-pXwY  the Triton forward with X pixels per program and Y warps
             (the library's: 128 and 4; triton-ieee, triton-tf32 and other
             triton-pXwY rows in results of earlier versions: the forward
             that ranked modes with a tl.dot product, in that precision)

Each row also states the roofline: the bytes the op must move and its FLOPs
(3 per pixel, mode and channel forward: a difference and a fused
multiply-add; backward 4 more per pixel, class and channel plus 2 per pixel,
mode and channel for the mode gradient), with the achieved rates.

Each (method, size, pass) runs in a fresh subprocess on the CPU, where the peak
memory is the process's RSS high-water mark; on a GPU all run in one process,
the peak being torch.cuda.max_memory_allocated reset per measurement. Either
way, minus what was in use once the inputs existed. Times are medians of
repeated runs after a warm-up, one synchronised call at a time; on a GPU each
row also gives the host's time to issue a call and the time per call of calls
issued back to back (where the host is slower than the kernels, the GPU idles
and the median counts host time).

    python bench/bench_mode_distance.py            # full sweep -> bench/results/
    python bench/bench_mode_distance.py --quick    # realistic size only, printed
    python bench/bench_mode_distance.py --kernels --out DIR/mode_distance   # GPU: time per kernel
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import keops_cuda  # noqa: E402

REALISTIC = dict(B=2, D=64, C=19, M=3, H=256, W=256)  # embedding map of a 512x512 crop
SWEEP = [
    dict(B=2, D=64, C=19, M=3, H=64, W=64),
    dict(B=2, D=64, C=19, M=3, H=128, W=128),
    REALISTIC,
    dict(B=2, D=64, C=19, M=3, H=256, W=512),
    dict(B=2, D=128, C=19, M=3, H=128, W=128),
    dict(B=2, D=64, C=16, M=5, H=128, W=128),
]
REALISTIC_SIZES = [REALISTIC, dict(B=2, D=64, C=19, M=3, H=256, W=512)]  # 512x512 and 512x1024 crops
BASELINES = ("broadcast", "cdist")
# Methods that build the (B, H, W, C, M, D) difference tensor are skipped where
# it (and its gradient) would not fit this budget.
BROADCAST_BUDGET_BYTES = 8 * 2**30


def broadcast_bytes(size, backward):
    B, D, C, M, H, W = (size[k] for k in ("B", "D", "C", "M", "H", "W"))
    return B * H * W * C * M * D * 4 * (2 if backward else 1)


def roofline_bytes(size, backward):
    """The least a fused op must move: read the embeddings and write dmin (fp32)
    and mstar (uint8); backward reads the dmin gradient, mstar and the
    embeddings again and writes the embedding gradient (modes are tiny)."""
    B, D, C, M, H, W = (size[k] for k in ("B", "D", "C", "M", "H", "W"))
    pixels = B * H * W
    forward = pixels * D * 4 + pixels * C * (4 + 1)
    return forward + (pixels * C * (4 + 1) + 2 * pixels * D * 4 if backward else 0)


def flops(size, backward):
    """Arithmetic of the direct formulation (see the module docstring)."""
    B, D, C, M, H, W = (size[k] for k in ("B", "D", "C", "M", "H", "W"))
    pixels = B * H * W
    forward = 3 * pixels * C * M * D
    return forward + ((4 * pixels * C * D + 2 * pixels * C * M * D) if backward else 0)


def keops_min(e, r):
    """Per class, KeOps' min over the class's modes of the squared distance
    (a LazyTensor reduction), stacked to (B, H, W, C). KeOps has no gradient
    for a min, so with gradients its argmin picks the modes and the distances
    to them are recomputed in PyTorch, as its users do."""
    import torch
    from pykeops.torch import LazyTensor

    C, M, D = r.shape
    rows = e.permute(0, 2, 3, 1).reshape(-1, D)
    x = LazyTensor(rows.detach().contiguous()[:, None, :])
    distances = [((x - LazyTensor(r[c].detach().reshape(1, M, D))) ** 2).sum(-1) for c in range(C)]
    if not (e.requires_grad or r.requires_grad):
        dmin = torch.cat([d.min(dim=1) for d in distances], 1)
    else:
        winner = torch.cat([d.argmin(dim=1) for d in distances], 1).long()  # (N, C)
        chosen = r[torch.arange(C, device=r.device), winner]  # (N, C, D)
        dmin = ((rows[:, None, :] - chosen) ** 2).sum(-1)
    return dmin.reshape(e.shape[0], e.shape[2], e.shape[3], C)


class Retiled:
    """A ``launch`` for the Triton forward launcher that runs its kernel with
    ``pixels`` pixels per program (its grid rescaled to match) and ``warps``
    warps."""

    def __init__(self, pixels, warps, base_pixels):
        self.pixels, self.warps, self.base_pixels = pixels, warps, base_pixels

    def __call__(self, kernel):
        def with_grid(grid):
            blocks = -(-grid[0] * self.base_pixels // self.pixels)

            def run(*args, **kwargs):
                kwargs.update(BLOCK_P=self.pixels, num_warps=self.warps)
                return kernel[(blocks,) + tuple(grid[1:])](*args, **kwargs)
            return run
        return type("Launch", (), {"__getitem__": lambda _, grid: with_grid(grid)})()


def triton_launcher(kernels, pixels, warps):
    """The library's Triton forward launcher as a method (forward only), with
    other tiles."""
    def run(e, r):
        import torch

        shape = (e.shape[0], r.shape[0], e.shape[2], e.shape[3])
        dmin = torch.empty(shape, device=e.device)
        kernels.forward(e, r, dmin, torch.empty(shape, dtype=torch.uint8, device=e.device), None, 0.0,
                        launch=Retiled(pixels, warps, kernels.FORWARD_PIXELS))
        return dmin
    return run


LIBRARY = "drsl_fast.triton_kernels.mode_distance"
# forward-only Triton methods: name -> (module, pixels per program, warps). The
# library's forward runs 128 pixels on 4 warps, one pixel per thread; compiled
# for sm_90, 256 on 8 is the same per thread in larger programs, and 256 on 4
# (two pixels per thread) issues 8 % fewer instructions on 214 registers
# instead of 96 (2 programs per SM instead of 5).
TRITON_FORWARDS = {"triton-p256w8": (LIBRARY, 256, 8),
                   "triton-p256w4": (LIBRARY, 256, 4)}


def build_method(name, device):
    import torch

    import drsl_fast
    from drsl_fast.backends import CUDA_KERNEL_VARIANTS

    def broadcast(e, r):
        x = e.permute(0, 2, 3, 1)
        return ((x[..., None, None, :] - r) ** 2).sum(-1).min(-1).values

    def cdist(e, r):
        C, M, D = r.shape
        x = e.permute(0, 2, 3, 1).reshape(-1, D)
        d = torch.cdist(x, r.reshape(C * M, D)) ** 2
        return d.reshape(e.shape[0], e.shape[2], e.shape[3], C, M).min(-1).values

    if name == "broadcast":
        return broadcast
    if name == "cdist":
        return cdist
    if name == "pykeops":
        if str(device).startswith("cuda"):
            keops_cuda.check()
        return keops_min
    if name in TRITON_FORWARDS:
        import importlib

        module, pixels, warps = TRITON_FORWARDS[name]
        return triton_launcher(importlib.import_module(module), pixels, warps)
    for variable in CUDA_KERNEL_VARIANTS.values():  # read by the CUDA launcher at each call
        os.environ.pop(variable, None)
    if name in CUDA_KERNEL_VARIANTS:
        os.environ[CUDA_KERNEL_VARIANTS[name]] = "1"
        return lambda e, r: drsl_fast.mode_distance(e, r, backend="cuda").dmin
    return lambda e, r: drsl_fast.mode_distance(e, r, backend=name).dmin


def measure(spec):
    """One measurement (run by :func:`harness.serve` in a worker process)."""
    import torch

    device = torch.device(spec["device"])
    size = spec["size"]
    torch.manual_seed(0)
    B, D, C, M, H, W = (size[k] for k in ("B", "D", "C", "M", "H", "W"))
    fn = build_method(spec["method"], device)
    backward = spec["pass"] == "forward+backward"

    def make(_):
        emb = torch.randn(B, D, H, W, device=device).requires_grad_(backward)
        modes = torch.randn(C, M, D, device=device).requires_grad_(backward)
        return emb, modes, torch.randn(B, C, H, W, device=device)

    inputs = harness.Rotating(make, B * (D + C) * H * W * 4, device)

    def step():
        emb, modes, weights = inputs.next()
        out = fn(emb, modes)
        if out.shape != weights.shape:  # baselines return (B, H, W, C)
            out = out.permute(0, 3, 1, 2)
        if backward:
            (out * weights).sum().backward()
            emb.grad = None
            modes.grad = None
        return out

    # Memory of the first call, on a clean process.
    with harness.PeakMemory(device) as memory:
        out = step()
    output_bytes = out.numel() * out.element_size()
    del out
    timing = harness.median_ms(step, device, spec["repeats"], spec["budget_s"], warmup=0)
    if device.type == "cuda":
        timing.update(harness.host_and_pipelined_ms(step, device))
    nbytes = roofline_bytes(size, backward)
    work = flops(size, backward)
    error = {} if backward else dict(rel_error=relative_error(fn, *inputs.next()[:2]))
    return dict(spec, **timing, **error, peak_extra_mib=memory.extra / 2**20, dmin_mib=output_bytes / 2**20,
                roofline_mib=nbytes / 2**20, bandwidth_gbs=harness.bandwidth_gbs(nbytes, timing["time_ms"]),
                gflop=work / 1e9, gflops=work / 1e6 / timing["time_ms"])


def relative_error(fn, emb, modes):
    """||dmin - dmin_64|| / ||dmin_64|| against float64 distances of the same inputs."""
    import torch

    with torch.no_grad():
        out = fn(emb, modes)
        if out.dim() == 4 and out.shape[1] != modes.shape[0]:
            out = out.permute(0, 3, 1, 2)
        C, M, D = modes.shape
        rows = emb.double().permute(0, 2, 3, 1).reshape(-1, D)
        exact = (torch.cdist(rows, modes.double().reshape(C * M, D), compute_mode="donot_use_mm_for_euclid_dist")
                 ** 2).reshape(emb.shape[0], emb.shape[2], emb.shape[3], C, M).amin(-1).permute(0, 3, 1, 2)
        return ((out.double() - exact).norm() / exact.norm()).item()


def kernel_table(method: str, steps: int = 20) -> str:
    """GPU kernel time of one forward+backward of ``method`` at the realistic
    size (torch.profiler), per kernel: where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    B, D, C, M, H, W = (REALISTIC[k] for k in ("B", "D", "C", "M", "H", "W"))
    fn = build_method(method, "cuda")
    emb = torch.randn(B, D, H, W, device="cuda", requires_grad=True)
    modes = torch.randn(C, M, D, device="cuda", requires_grad=True)
    weights = torch.randn(B, H, W, C, device="cuda")

    def step():
        out = fn(emb, modes)
        if out.shape[-1] != C:  # the fused ops return (B, C, H, W)
            out = out.permute(0, 2, 3, 1)
        (out * weights).sum().backward()
        emb.grad = modes.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.count // steps, e.device_time_total / steps) for e in prof.key_averages()
                   if e.device_time_total > 0 and e.count >= steps), key=lambda r: -r[2])
    lines = [f"**{method}**: {sum(r[2] for r in rows):.0f} us of kernel time per forward+backward", "",
             "| kernel | launches per step | us per step |", "|---|---|---|"]
    return "\n".join(lines + [f"| `{name[:90]}` | {count} | {us:.1f} |" for name, count, us in rows[:12]])


def write_kernel_tables(stem: str) -> None:
    """Kernel tables of cdist + min and the GPU backends -> STEM_kernels.md."""
    import torch

    sections = [f"# Mode distance forward+backward per kernel on {torch.cuda.get_device_name()}", ""]
    fast = harness.fast_backends("cuda")
    for method in ["cdist"] + fast + cuda_variants(fast):
        try:
            sections += [kernel_table(method), ""]
        except Exception as exc:  # one method's failure must not lose the others
            sections += [f"**{method}**: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", ""]
    text = "\n".join(sections)
    with open(stem + "_kernels.md", "w") as f:
        f.write(text)
    print(text)


def methods_for(device):
    fast = harness.fast_backends(device)
    return (list(BASELINES) + peers() + ["reference"] + fast + cuda_variants(fast)
            + (list(TRITON_FORWARDS) if "triton" in fast else []))


def cuda_variants(fast):
    """drsl_fast's CUDA_KERNEL_VARIANTS (tensor-core kernels), where this GPU
    runs them (compute capability >= 8.0): measured beside its default."""
    import torch

    from drsl_fast.backends import CUDA_KERNEL_VARIANTS

    if "cuda" not in fast or torch.cuda.get_device_capability()[0] < 8:
        return []
    return list(CUDA_KERNEL_VARIANTS)


def keops_environment():
    """The pykeops worker's environment on a GPU (keops_cuda.py); where making
    it fails, this process's (the rows will say what KeOps then does)."""
    try:
        return keops_cuda.environment()
    except OSError as exc:
        print(f"pykeops: torch's NVRTC not given to KeOps ({exc})", file=sys.stderr, flush=True)
        return None


def peers():
    """pykeops where it is installed (requirements-bench.txt)."""
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return []
    return ["pykeops"]


FIELDS = ["method", "pass", "B", "D", "C", "M", "H", "W", "time_ms", "min_ms", "max_ms", "host_ms", "pipelined_ms",
          "peak_extra_mib", "dmin_mib", "roofline_mib", "bandwidth_gbs", "gflop", "gflops", "rel_error", "runs", "error"]


def markdown_table(rows):
    header = ("| size (B,D,C,M,HxW) | pass | method | time ms | host ms / pipelined ms | peak extra MiB "
              "| speed-up vs best baseline | achieved GB/s (roofline bytes) | achieved GFLOP/s | error vs float64 |")
    lines = [header, "|" + "---|" * 10]
    groups = {}
    for r in rows:
        groups.setdefault((json.dumps(r["size"], sort_keys=True), r["pass"]), []).append(r)
    for (size_key, pass_name), group in groups.items():
        best = min((r["time_ms"] for r in group if r["method"] in BASELINES and "time_ms" in r), default=None)
        s = json.loads(size_key)
        label = f"{s['B']},{s['D']},{s['C']},{s['M']},{s['H']}x{s['W']}"
        for r in group:
            if "error" in r:
                lines.append(f"| {label} | {pass_name} | {r['method']} | {r['error'][:60]} | | | | | | |")
                continue
            speedup = f"{best / r['time_ms']:.1f}x" if best else ""
            bandwidth = f"{r['bandwidth_gbs']:.3g}" if "bandwidth_gbs" in r else ""
            rate = f"{r['gflops']:.3g}" if "gflops" in r else ""
            error = f"{r['rel_error']:.1e}" if "rel_error" in r else ""
            host = f"{r['host_ms']:.3f} / {r['pipelined_ms']:.3f}" if "host_ms" in r else ""
            lines.append(f"| {label} | {pass_name} | {r['method']} | {r['time_ms']:.3f} | {host} | "
                         f"{r['peak_extra_mib']:.1f} | {speedup} | {bandwidth} | {rate} | {error} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="realistic size only; print, write nothing")
    parser.add_argument("--sizes", choices=("sweep", "realistic"), default="sweep",
                        help="sweep: all sizes; realistic: the 512x512 and 512x1024 crops' maps only")
    harness.add_run_arguments(parser, "mode_distance", "timed runs (default 7 CPU, 100 GPU)",
                              "time budget per measurement (default 20 CPU, 1 GPU)")
    parser.add_argument("--kernels", action="store_true",
                        help="GPU: only the kernel time per forward+backward of each backend (-> <out>_kernels.md)")
    args = parser.parse_args()
    if args.worker:
        return harness.serve(measure, json.loads(args.worker))
    if args.kernels:
        return write_kernel_tables(harness.results_stem(args.out, "mode_distance", "cuda"))

    device = harness.default_device(args.device)
    gpu = device == "cuda"
    repeats = args.repeats or (100 if gpu else 7)
    budget = args.budget_s or (1.0 if gpu else 20.0)
    sizes = [REALISTIC] if args.quick else REALISTIC_SIZES if args.sizes == "realistic" else SWEEP
    specs, skipped = [], {}
    for size in sizes:
        for pass_name in ("forward", "forward+backward"):
            for method in methods_for(device):
                spec = dict(method=method, size=size, device=device, repeats=repeats,
                            budget_s=budget, **{"pass": pass_name})
                needed = broadcast_bytes(size, pass_name != "forward")
                if method in ("broadcast", "reference") and needed > BROADCAST_BUDGET_BYTES:
                    skipped[len(specs)] = dict(spec, error=f"skipped: needs ~{needed / 2**30:.0f} GiB")
                if method in TRITON_FORWARDS and pass_name != "forward":
                    skipped[len(specs)] = dict(spec, error="skipped: forward only")
                specs.append(spec)
    # on a GPU every measurement in one process (saves a process start each), but pykeops in its own (its
    # run-time compilation can take its process down), given the CUDA of torch's wheels where the machine's
    # toolkit lacks NVRTC (keops_cuda.py); on the CPU one each
    to_measure = [i for i in range(len(specs)) if i not in skipped]
    own = [i for i in to_measure if specs[i]["method"] == "pykeops"]
    shared = [i for i in to_measure if specs[i]["method"] != "pykeops"]
    measured = dict(zip(shared, harness.measure_all(__file__, [specs[i] for i in shared], one_process=gpu)))
    measured.update(zip(own, harness.measure_all(__file__, [specs[i] for i in own], one_process=gpu,
                                                 env=keops_environment() if gpu and own else None)))
    rows = []
    for index, spec in enumerate(specs):
        row = skipped[index] if index in skipped else measured[index]
        rows.append(row)
        shown = f"{row['time_ms']:9.2f} ms  {row['peak_extra_mib']:8.1f} MiB" if "time_ms" in row else row["error"]
        print(f"{str(spec['size']):60s} {spec['pass']:17s} {spec['method']:10s} {shown}", flush=True)
    table = markdown_table(rows)
    machine = harness.device_name(device)
    print(f"\nmode_distance on {machine}\n\n{table}")
    if args.quick:
        return
    stem = harness.results_stem(args.out, "mode_distance", device)
    harness.write_results(stem, harness.metadata(device), [dict(r, **r["size"]) for r in rows], FIELDS,
                          "mode_distance benchmark", describe(table, gpu))


def describe(table, gpu):
    """The markdown body of the results: how they were measured, then the table."""
    host = ("; host ms is the host's time to issue one call, pipelined ms the time per call of 20 calls back to "
            "back, synchronised at the end only (as in a training loop)") if gpu else ""
    return (f"Times are medians ({'CUDA events, inputs rotated through several copies' if gpu else 'wall clock'}) "
            f"of one synchronised call at a time{host}; "
            f"peak extra memory is measured on a fresh process "
            f"({'max_memory_allocated' if gpu else 'RSS high-water mark'}) above the inputs. Achieved bandwidth is "
            f"the op's roofline bytes (read the embeddings, write dmin and mstar; backward: read the dmin gradient, "
            f"mstar and the embeddings, write their gradient) over the time, for every method alike. The fp32 "
            f"`dmin` output of the realistic size is "
            f"{REALISTIC['B'] * REALISTIC['C'] * REALISTIC['H'] * REALISTIC['W'] * 4 / 2**20:.1f} MiB.\n\n{table}")


if __name__ == "__main__":
    main()
