"""Where a DRSL+ training step spends what the plain DeepLab-v2 floor does not:
operator calls, kernel launches and host synchronisations per step.

Both variants run the code of bench/bench_training_step.py
(:func:`bench_training_step.training_step`: ``step_loss``, backward, SGD with
momentum) on random weights and a simulated batch; the floor is DeepLab-v2 with
the segmentation loss only, DRSL+ adds the MMDL-FR head and every Eq. 10 loss
(docs/method.md §4) with the fast ops. Per variant, after ``--warmup`` steps,
each part below runs on its own (a failure in one is recorded and the others
go on):

  profile   ``--steps`` steps under ``torch.profiler``: aten operator calls
            per step (every level of the dispatcher, as the profiler lists
            them), kernel launches and DtoH copies / synchronising runtime
            calls per step (CUDA), self time per operator
  dispatch  one step under a dispatch mode: operator calls as the backend
            kernels see them (after autograd, decompositions included), and
            the calls of operators that synchronise with the host on a GPU
            (``_local_scalar_dense``: .item()/.tolist()/bool(); ``nonzero``:
            boolean-mask indexing; ``unique``; ``masked_select``; ...), each
            with the line of drsl_fast that issued it
  flops     one step under ``torch.utils.flop_counter.FlopCounterMode``
            (convolutions and matrix products, forward and backward)
  syncs     (CUDA) ``--steps`` steps under ``torch.cuda.set_sync_debug_mode("warn")``:
            the synchronising calls counted, by source line
  time      (CUDA) median step time over ``--steps`` steps (CUDA events), and
            again with cuDNN's autotuner on (torch.backends.cudnn.benchmark)

The report (``--out`` stem: .md and .json) has a table per step for floor vs
DRSL+, the operators DRSL+ adds (by count and by self time: DRSL+ minus the
floor, per operator name) and the synchronising calls.

    python bench/profile_training_step.py                          # CPU: ResNet-18 x0.25 at 64x64
    python bench/profile_training_step.py --device cuda \\
        --out bench/results/<device>/training_step_profile          # ResNet-101 at 512x512
"""
import argparse
import collections
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_training_step import training_step  # noqa: E402

CPU_SIZES = dict(depth=18, width=0.25, crop=(64, 64))
GPU_SIZES = dict(depth=101, width=1.0, crop=(512, 512))
# Operators that make the host wait for the device (or return a data-dependent shape).
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "masked_scatter", "argwhere",
               "repeat_interleave.Tensor", "_assert_async", "equal", "is_nonzero", "allclose")
SYNC_RUNTIME_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LIBRARY = os.sep + "drsl_fast" + os.sep
# record_function ranges of bench_training_step.training_step (network and drsl_loss lie inside forward)
PHASES = ("step/forward", "step/network", "step/drsl_loss", "step/backward", "step/optimizer")


def parse_crop(text: str):
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def caller_line() -> str:
    """The innermost frame of the drsl_fast library (else of the caller) on the stack, as path:line."""
    frames = traceback.extract_stack()[:-2]
    inside = [f for f in frames if LIBRARY in f.filename] or frames[-1:]
    frame = inside[-1]
    path = frame.filename[frame.filename.rfind(LIBRARY) + 1:] if LIBRARY in frame.filename else frame.filename
    return f"{path}:{frame.lineno} ({frame.name})"


def is_syncing(name: str) -> bool:
    return any(op in name for op in SYNCING_OPS)


def guarded(part: str, result: dict, function, *args) -> None:
    """Runs ``function(*args)`` and stores what it returns under ``part``,
    or the error under ``<part>_error`` (the other parts go on)."""
    try:
        result[part] = function(*args)
    except Exception as exc:  # noqa: BLE001  (a failing part must not lose the others)
        result[f"{part}_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()


def profile_steps(step, device, steps: int) -> dict:
    """Per step: operator calls (aten and drsl_fast, every level) with their
    self host and device times (us), CUDA kernels by name with their device
    time, kernel launches, synchronising runtime calls and DtoH copies. Each
    step ends with a synchronisation, as the step-time measurement does, so a
    step's host time holds no wait for the previous step's kernels (that
    synchronisation is not counted among the step's own)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
            harness.sync(device)
    events = prof.events()
    ops = collections.defaultdict(lambda: dict(count=0.0, self_us=0.0, device_us=0.0))
    phases = collections.defaultdict(lambda: dict(count=0.0, self_us=0.0, device_us=0.0))
    phase_of = phase_finder(events)
    kernels = collections.defaultdict(lambda: dict(count=0.0, device_us=0.0))
    runtime = collections.Counter()
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if getattr(event, "is_user_annotation", False):  # a record_function's GPU range, not a kernel
                continue
            entry = kernels[event.name[:120]]
            entry["count"] += 1 / steps
            entry["device_us"] += event.time_range.elapsed_us() / steps
        elif event.name.startswith(harness.OPERATOR_NAMESPACES):
            for entry in (ops[event.name], phases[phase_of(event)]):
                entry["count"] += 1 / steps
                entry["self_us"] += event.self_cpu_time_total / steps
                entry["device_us"] += event.self_device_time_total / steps
        elif event.name.startswith("cu"):
            runtime[event.name] += 1
    if device.type == "cuda":
        runtime["cudaDeviceSynchronize"] -= steps  # the loop's own, one per step
    result = dict(op_calls=sum(v["count"] for v in ops.values()), ops=dict(ops), phases=dict(phases))
    if device.type == "cuda":
        copies = [name for name in kernels if name.startswith(("Memcpy", "Memset"))]
        result.update(
            kernels=sum(v["count"] for name, v in kernels.items() if name not in copies),
            busy_ms=sum(v["device_us"] for v in kernels.values()) / 1e3,
            kernel_launch_calls=sum(runtime[n] for n in harness.LAUNCH_CALLS) / steps,
            dtoh_copies=sum(v["count"] for name, v in kernels.items() if name.startswith("Memcpy DtoH")),
            sync_calls=sum(runtime[n] for n in SYNC_RUNTIME_CALLS) / steps,
            runtime_calls={name: count / steps for name, count in runtime.most_common()},
            kernel_table=dict(kernels))
    return result


def phase_finder(events):
    """A function giving an operator event's phase: the innermost of the
    ``record_function`` ranges of :data:`PHASES` (on any thread) in which the
    host started it, else "other"."""
    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES)

    def phase_of(event) -> str:
        start = event.time_range.start
        inside = [name for first, last, name in ranges if first <= start <= last]
        return inside[-1] if inside else "other"

    return phase_of


def dispatched_ops(step) -> dict:
    """One step under a dispatch mode: operator calls (backward included) and
    the synchronising ones by the line of drsl_fast that issued them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = collections.Counter()
    syncing = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            counts[name] += not name.startswith("profiler.")  # the step's record_function ranges
            if is_syncing(name):
                syncing[f"{name} at {caller_line()}"] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return dict(calls=sum(counts.values()), ops=dict(counts.most_common()), syncing=dict(syncing.most_common()))


def step_flops(step) -> dict:
    """One step's FLOPs as ``FlopCounterMode`` counts them (convolutions, matrix products), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    by_op = {str(op): flops / 1e9 for op, flops in counter.get_flop_counts()["Global"].items()}
    return dict(gflop=counter.get_total_flops() / 1e9, by_op=by_op)


def sync_warnings(step, device, steps: int) -> dict:
    """CUDA: synchronising calls reported by ``set_sync_debug_mode("warn")``, per step, by source line."""
    import torch

    harness.sync(device)
    lines = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            lines[f"{os.path.relpath(warning.filename)}:{warning.lineno}"] += 1
    return dict(per_step=sum(lines.values()) / steps, lines={k: v / steps for k, v in lines.most_common()})


def step_time(step, device, steps: int) -> dict:
    return harness.median_ms(step, device, steps, budget_s=10.0, warmup=0)


def step_time_autotuned(step, device, steps: int) -> dict:
    """Median step time with cuDNN's autotuner on (``torch.backends.cudnn.benchmark``,
    which the pipeline leaves off): what the convolutions' default algorithm
    choice costs. Two steps first, to tune."""
    import torch

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for _ in range(2):
            step()
        harness.sync(device)
        return harness.median_ms(step, device, steps, budget_s=10.0, warmup=0)
    finally:
        torch.backends.cudnn.benchmark = previous


def run_variant(name: str, setting, device, dtype, args) -> dict:
    """Every part for one variant; errors are recorded per part."""
    import torch

    result = dict(variant=name)
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        step = training_step(setting, device, dtype)
        for _ in range(args.warmup):
            step()
        harness.sync(device)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return dict(result, error=f"{type(exc).__name__}: {exc}")
    guarded("profile", result, profile_steps, step, device, args.steps)
    guarded("dispatch", result, dispatched_ops, step)
    guarded("flops", result, step_flops, step)
    if device.type == "cuda":
        guarded("syncs", result, sync_warnings, step, device, args.steps)
        guarded("time", result, step_time, step, device, args.steps)
        guarded("time_autotuned", result, step_time_autotuned, step, device, args.steps)
    result["seconds"] = time.perf_counter() - started
    print(f"{name}: done in {result['seconds']:.1f} s", flush=True)
    return result


def value(result: dict, part: str, key: str, spec: str = ".0f") -> str:
    return format(result[part][key], spec) if part in result and key in result[part] else "-"


def summary_table(results) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], f"failed: {r['error'][:80]}"] + [""] * 10)
            continue
        syncing = format(sum(r["dispatch"]["syncing"].values())) if "dispatch" in r else "-"
        rows.append([r["variant"], value(r, "flops", "gflop", ".1f"), value(r, "profile", "op_calls"),
                     value(r, "dispatch", "calls"), value(r, "profile", "kernels"),
                     value(r, "profile", "busy_ms", ".1f"), syncing, value(r, "syncs", "per_step", ".1f"),
                     value(r, "profile", "sync_calls", ".1f"), value(r, "profile", "dtoh_copies", ".1f"),
                     value(r, "time", "time_ms", ".1f"), value(r, "time_autotuned", "time_ms", ".1f")])
    return harness.markdown_table(["variant", "GFLOP", "op calls (profiler)", "dispatched ops", "kernels",
                                   "GPU busy ms", "syncing ops", "sync warnings", "sync runtime calls",
                                   "DtoH copies", "step ms", "step ms, cuDNN autotuned"], rows)


def added(floor: dict, drsl: dict, key: str, top: int):
    """(name, DRSL+ entry, floor entry) of the names whose ``key`` DRSL+ raises
    most over the floor, largest first."""
    rows = [(name, drsl.get(name, {}), floor.get(name, {})) for name in set(floor) | set(drsl)]
    rows = [(name, d, f) for name, d, f in rows if d.get(key, 0) > f.get(key, 0)]
    rows.sort(key=lambda row: row[1].get(key, 0) - row[2].get(key, 0), reverse=True)
    return rows[:top]


def added_table(floor: dict, drsl: dict, key: str, columns, top: int) -> str:
    """Markdown: per name, DRSL+ and added (DRSL+ minus floor) for every (title, key, scale, digits) column."""
    header = ["name"] + [f"{prefix} {title}" for title, *_ in columns for prefix in ("DRSL+", "added")]
    body = []
    for name, d, f in added(floor, drsl, key, top):
        cells = [f"`{name}`"]
        for _, column, scale, digits in columns:
            ours, theirs = d.get(column, 0) * scale, f.get(column, 0) * scale
            cells += [f"{ours:.{digits}f}", f"{ours - theirs:+.{digits}f}"]
        body.append(cells)
    return harness.markdown_table(header, body) if body else "none"


def lines_table(lines: dict, top: int) -> str:
    if not lines:
        return "none"
    return harness.markdown_table(["call", "per step"], [[f"`{k}`", f"{v:g}"] for k, v in list(lines.items())[:top]])


def comparison_sections(floor: dict, drsl: dict, top: int):
    """The per-operator and per-kernel tables of what DRSL+ adds to the floor."""
    op_columns = [("calls", "count", 1, 0), ("self host ms", "self_us", 1e-3, 2),
                  ("self device ms", "device_us", 1e-3, 3)]
    orderings = [("count", "calls"), ("self_us", "self host time")]
    if "kernels" in drsl:
        orderings.append(("device_us", "self device time"))
    for key, title in orderings:
        yield (f"### Operators DRSL+ adds, by {title} per step (profiler)\n\n"
               f"{added_table(floor['ops'], drsl['ops'], key, op_columns, top)}")
    if "kernel_table" in floor and "kernel_table" in drsl:
        kernel_columns = [("launches", "count", 1, 0), ("device ms", "device_us", 1e-3, 3)]
        yield (f"### Kernels DRSL+ adds, by device time per step\n\n"
               f"{added_table(floor['kernel_table'], drsl['kernel_table'], 'device_us', kernel_columns, top)}")


def phase_table(results) -> str:
    """Per phase of the step: operator calls, self host ms and self device ms of every variant profiled."""
    profiled = [r for r in results if "profile" in r]
    header = ["phase"] + [f"{r['variant']} {what}" for what in ("calls", "host ms", "device ms") for r in profiled]
    rows = []
    for phase in PHASES[1:3] + ("step/forward",) + PHASES[3:] + ("other",):
        entries = [r["profile"]["phases"].get(phase, {}) for r in profiled]
        rows.append([phase] + [f"{e.get('count', 0):.0f}" for e in entries]
                    + [f"{e.get('self_us', 0) / 1e3:.2f}" for e in entries]
                    + [f"{e.get('device_us', 0) / 1e3:.3f}" for e in entries])
    return harness.markdown_table(header, rows)


def report(results, scale: str, top: int) -> str:
    parts = [summary_table(results)]
    if any("profile" in r for r in results):
        parts.append("### Per phase of the step (profiler; step/forward without network and drsl_loss, "
                     "other: zero_grad and the rest)\n\n" + phase_table(results))
    by_name = {r["variant"]: r for r in results}
    floor, drsl = by_name.get("floor", {}), by_name.get("DRSL+", {})
    if "profile" in floor and "profile" in drsl:
        parts += list(comparison_sections(floor["profile"], drsl["profile"], top))
    for r in results:
        if "dispatch" in r:
            parts.append(f"### {r['variant']}: host-synchronising operators per step (dispatch mode)\n\n"
                         f"{lines_table(r['dispatch']['syncing'], top)}")
        if "syncs" in r:
            parts.append(f"### {r['variant']}: `set_sync_debug_mode` warnings per step\n\n"
                         f"{lines_table(r['syncs']['lines'], top)}")
        if "runtime_calls" in r.get("profile", {}):
            parts.append(f"### {r['variant']}: CUDA runtime calls per step\n\n"
                         f"{lines_table(r['profile']['runtime_calls'], top)}")
        errors = [f"- {key[:-len('_error')]}: {text}" for key, text in r.items() if key.endswith("_error")]
        if errors:
            parts.append(f"### {r['variant']}: failed parts\n\n" + "\n".join(errors))
    header = (f"Per training step ({scale}): FLOPs (convolutions and matrix products), operator calls as "
              f"the profiler lists them (aten and drsl_fast, nested calls included), operators as dispatched "
              f"to kernels (backward included), CUDA kernels and the GPU time they take (busy), operators that "
              f"synchronise with the host, sync-debug warnings, synchronising CUDA runtime calls and DtoH "
              f"copies, median step time (CUDA events), also with cuDNN's autotuner on. Added = DRSL+ minus "
              f"the floor, per name.")
    return header + "\n\n" + "\n\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--depth", type=int, default=None, help="ResNet depth (default 18 on CPU, 101 on CUDA)")
    parser.add_argument("--width", type=float, default=None, help="width multiplier (default 0.25 CPU, 1 CUDA)")
    parser.add_argument("--crop", type=parse_crop, default=None, metavar="HxW",
                        help="crop (default 64x64 on CPU, 512x512 on CUDA)")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype (default fp32)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="profiled (and timed) steps (default 5)")
    parser.add_argument("--top", type=int, default=25, help="rows of the per-operator tables")
    parser.add_argument("--variants", nargs="+", choices=("floor", "DRSL+"), default=["floor", "DRSL+"])
    parser.add_argument("--head-as-gemm", action="store_true",
                        help="the classifiers as matrix products (DeepLabV2.head_as_gemm) in every variant")
    parser.add_argument("--out", default=None,
                        help="output stem (default bench/results/training_step_profile_<device>)")
    args = parser.parse_args()

    import torch

    from drsl_fast.backends import resolve
    from drsl_fast.memory_model import StepSetting, amp_dtype

    device = torch.device(args.device)
    defaults = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    depth, width, crop = args.depth or defaults["depth"], args.width or defaults["width"], args.crop or defaults["crop"]
    scale = (f"ResNet-{depth}" + (f" x{width:g}" if width != 1 else "") + f", {crop[0]}x{crop[1]}, "
             f"{args.amp or 'fp32'}, 1 source + 1 target image" + (", head as one GEMM" if args.head_as_gemm else ""))
    stem = harness.results_stem(args.out, "training_step_profile", args.device)
    harness.warm_up_runtime(device)
    results = []
    for name in args.variants:
        setting = StepSetting(depth=depth, width=width, crop=crop, amp=args.amp, mmdl=name == "DRSL+",
                              head_as_gemm=args.head_as_gemm)
        results.append(run_variant(name, setting, device, amp_dtype(args.amp), args))
        text = report(results, scale, args.top)  # written after every variant: a later failure loses nothing
        meta = harness.metadata(args.device, scale=scale, warmup=args.warmup, steps=args.steps,
                                backend=resolve(None, device))
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta, results=results), f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"# DRSL+ training-step profile\n\nDevice: {meta['device']}; torch {meta['torch']}. "
                    f"Command: `{meta['command']}`; loss ops: {meta['backend']} backend.\n\n{text}\n")
    print(text)
    print(f"wrote {stem}.md, .json")


if __name__ == "__main__":
    main()
