"""Measurement harness shared by the benchmarks in bench/.

- measurements run in fresh Python processes (:func:`run_fresh`,
  :func:`measure_all`), so their peak memory is their own: the RSS
  high-water mark on the CPU (one process per measurement, since it cannot
  be reset), ``torch.cuda.max_memory_allocated`` after a reset on a GPU
  (where one process may serve several measurements, :func:`serve`);
- times are medians over repeats after a warm-up, taken with CUDA events on
  a GPU and ``perf_counter`` on the CPU (:func:`median_ms`);
- microbenchmarks rotate through several copies of their inputs
  (:class:`Rotating`) so that a GPU's L2 cache does not serve them;
- achieved bandwidth = the op's minimal bytes read + written / time;
- results go to ``STEM.json``, ``STEM.csv`` and ``STEM.md`` (:func:`write_results`).
"""
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIB = 2**20
# torch.profiler event names: the host's kernel launches, and the operators
# (not the autograd:: ranges of backward nodes), as the profiling scripts count them
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel")
OPERATOR_NAMESPACES = ("aten::", "drsl_fast::")
# Input copies for rotation are kept to this many bytes in all (well above
# the 50 MiB L2 of an H100).
ROTATION_BYTES = 256 * MIB


def default_device(requested: Optional[str]) -> str:
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_high_water_bytes() -> int:
    """This process's own RSS peak (VmHWM). Not ``getrusage``'s ru_maxrss: on
    Linux that keeps the high-water mark of the pre-exec copy of the parent,
    so a worker started by a large parent reports the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def warm_up_runtime(device) -> None:
    """Runs a tiny convolution forward/backward and an SGD step, so that the
    kernel libraries, thread pools and allocator arenas they bring are loaded
    before a CPU measurement's RSS baseline is taken."""
    import torch

    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(device)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    for dtype in (None, torch.bfloat16):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            out = conv(torch.randn(1, 3, 16, 16, device=device))
            loss = torch.nn.functional.interpolate(out, scale_factor=2.0, mode="bilinear").float().square().mean()
        loss.backward()
        optimizer.step()
    sync(device)


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the moment of entering, as a context manager:
    ``max_memory_allocated`` on a GPU (reset on entry), RSS high-water mark
    on the CPU (the process's, so measure on a fresh process). ``total``
    is the absolute peak (GPU: all allocated tensors; CPU: the RSS high-water)."""

    def __init__(self, device):
        self.device = str(device)
        self.before = self.total = self.extra = 0

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = current_rss_bytes()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated()
        else:
            self.total = rss_high_water_bytes()
        self.extra = max(self.total - self.before, 0)
        return False


def median_ms(step: Callable[[], object], device, repeats: int, budget_s: float, warmup: int = 1) -> Dict:
    """Median time of ``step`` in ms over up to ``repeats`` runs after
    ``warmup`` runs, stopping early (after at least 3 runs) once ``budget_s``
    is spent. Returns ``time_ms``, ``runs`` and the spread (min, max)."""
    import torch

    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        step()
    sync(device)
    times: List[float] = []
    deadline = time.perf_counter() + budget_s
    for i in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
        if time.perf_counter() > deadline and i >= 2:
            break
    return dict(time_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), runs=len(times))


def host_and_pipelined_ms(step: Callable[[], object], device, steps: int = 20) -> Dict:
    """The host's time to issue one step (``steps`` steps back to back, no
    synchronisation between them) and the time per step of that run,
    synchronised at its end only, as in a training loop. On a GPU, a step
    whose host time exceeds its kernels' leaves the GPU idle between them;
    :func:`median_ms` (one synchronised step at a time) then counts the host
    time too."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    issued = time.perf_counter()
    sync(device)
    done = time.perf_counter()
    return dict(host_ms=1e3 * (issued - start) / steps, pipelined_ms=1e3 * (done - start) / steps)


class Rotating:
    """Cycles through copies of a microbenchmark's inputs: ``next()`` returns
    the next set. As many copies as fit :data:`ROTATION_BYTES` (at least 1,
    at most ``max_copies``); on the CPU one copy."""

    def __init__(self, make: Callable[[int], Sequence], bytes_per_copy: int, device, max_copies: int = 8):
        count = 1
        if str(device).startswith("cuda"):
            count = max(1, min(max_copies, ROTATION_BYTES // max(bytes_per_copy, 1)))
        self.copies = [make(i) for i in range(count)]
        self.index = -1

    def next(self):
        self.index = (self.index + 1) % len(self.copies)
        return self.copies[self.index]


def bandwidth_gbs(nbytes: float, time_ms: float) -> float:
    """Achieved bandwidth in GB/s (10^9 bytes) for ``nbytes`` moved in ``time_ms``."""
    return nbytes / (time_ms * 1e-3) / 1e9 if time_ms > 0 else float("nan")


def device_name(device) -> str:
    """The GPU's name, or the CPU model with the thread count torch uses."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def device_slug(device) -> str:
    """The device's name as a directory name (bench/results/<slug>/)."""
    return device_name(device).split(",")[0].replace(" ", "_") if str(device).startswith("cuda") else "cpu"


def fast_backends(device: str) -> List[str]:
    """drsl_fast's fast backends that run on ``device`` (on the CPU, not the
    Triton interpreter, which is no speed path)."""
    import torch

    import drsl_fast

    names = [b for b in ("cpu", "cuda", "triton") if b in drsl_fast.available_backends(torch.device(device))]
    return [b for b in names if not (device == "cpu" and b == "triton")]


def run_fresh(script: str, args: Sequence[str], spec: Dict, timeout: float = 1800) -> Dict:
    """Runs ``python script *args`` in a fresh process; its last stdout line
    starting with '{' is the result (JSON). On failure: ``spec`` plus ``error``."""
    return run_fresh_many(script, args, [spec], timeout)[0]


def run_fresh_many(script: str, args: Sequence[str], specs: Sequence[Dict], timeout: float = 3600,
                   env: Optional[Dict[str, str]] = None) -> List[Dict]:
    """Runs a worker that measures every spec of ``specs`` in one fresh
    process (with environment ``env``, default this one's) and emits one
    result line each, carrying its ``index`` (a worker of one spec may leave
    it out); a spec without a line (the process died) gets ``error``."""
    try:
        done = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
        stdout, reason = done.stdout, crash_reason(done.stderr, done.returncode)
        if done.returncode:
            echo_stderr(script, done.stderr)
    except subprocess.TimeoutExpired as exc:
        stdout, reason = as_text(exc.stdout), f"timed out after {timeout:.0f} s"
        echo_stderr(script, as_text(exc.stderr))
    found = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            found[result.pop("index", 0)] = result
    return [found.get(i, dict(spec, error=reason)) for i, spec in enumerate(specs)]


def as_text(output) -> str:
    """A subprocess's captured output as text (a timeout hands it over as bytes, or None)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def echo_stderr(script: str, stderr: str, lines: int = 60) -> None:
    """The last ``lines`` of a failed or timed-out worker's stderr, on this
    process's stderr (the run's log): a row keeps one line of why, the log
    keeps the native crash's traceback and what the worker printed before it."""
    tail = stderr.strip().splitlines()[-lines:]
    if tail:
        print(f"--- {os.path.basename(script)} worker failed; its stderr ends:", *tail, "---", sep="\n",
              file=sys.stderr, flush=True)


def crash_reason(stderr: str, returncode: int) -> str:
    """Why a worker ended without a result: Python's fatal-error line where
    faulthandler wrote one (a crash in native code), else stderr's last line."""
    lines = stderr.strip().splitlines()
    fatal = [line for line in lines if line.startswith("Fatal Python error")]
    if fatal:
        return f"crashed: {fatal[0]}"
    return lines[-1] if lines else f"failed (exit status {returncode})"


def serve(measure: Callable[[Dict], Dict], specs: Sequence[Dict]) -> None:
    """The worker side of :func:`run_fresh_many`: measures each spec in turn
    and prints its result line with its ``index``. A failure (out of memory,
    a backend that cannot run) is that spec's row, not the end of the process;
    between specs the garbage is collected and the CUDA cache emptied."""
    import gc

    import torch

    for index, spec in enumerate(specs):
        try:
            result = measure(spec)
        except Exception as exc:  # reported in the spec's row
            message = str(exc).splitlines()[0] if str(exc) else ""
            result = dict(spec, error=f"{type(exc).__name__}: {message}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        emit(dict(result, index=index))


def measure_all(script: str, specs: Sequence[Dict], one_process: bool, flag: str = "--worker",
                env: Optional[Dict[str, str]] = None) -> Iterator[Dict]:
    """Results of ``specs``, in order, measured by ``script <flag> '<json
    list>'`` (environment ``env``, default this one's): all in one fresh
    process (on a GPU, where ``max_memory_allocated`` is reset per
    measurement) or each in its own, yielded as it ends (on the CPU, whose
    RSS high-water mark cannot be reset)."""
    if one_process:
        yield from run_fresh_many(script, [flag, json.dumps(list(specs))], specs, env=env)
        return
    for spec in specs:
        yield run_fresh_many(script, [flag, json.dumps([spec])], [spec], env=env)[0]


def emit(result: Dict) -> None:
    """A worker's result line for :func:`run_fresh`."""
    print(json.dumps(result), flush=True)


def add_run_arguments(parser, name: str, repeats: str, budget: str) -> None:
    """--device, --repeats, --budget-s and --out, which every op benchmark
    takes; ``repeats`` and ``budget`` are their help texts."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None, help=repeats)
    parser.add_argument("--budget-s", type=float, default=None, help=budget)
    parser.add_argument("--out", default=None, help=f"output stem (default bench/results/{name}_<device>)")


def add_head_arguments(parser, name: str, repeats: int) -> None:
    """--device, --quick, --repeats and --out of the benchmarks of the
    network's head (full size on the GPU, or a quick run on the CPU)."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 x0.25 at 64x64, fp32 only, on the CPU")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default=None, help=f"output stem (default bench/results/<device>/{name})")


def results_stem(out: Optional[str], name: str, device) -> str:
    """Where a benchmark writes: ``out`` if given, else bench/results/<name>_<device>."""
    return out or os.path.join(RESULTS_DIR, f"{name}_{device}")


def command_line() -> str:
    return " ".join(["python"] + sys.argv)


def write_results(stem: str, meta: Dict, rows: Iterable[Dict], fields: Sequence[str], title: str, body: str,
                  extra_json: Optional[Dict] = None) -> None:
    """``stem``.json (meta + rows + extra_json), .csv (rows, ``fields``) and
    .md (title, a line naming the device, torch and command, then ``body``)."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta, results=rows, **(extra_json or {})), f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(stem + ".md", "w") as f:
        device = meta["device"] + (f"; the CPU kernels' {meta['cpu_build']} build" if meta.get("cpu_build") else "")
        f.write(f"# {title}\n\nDevice: {device}; torch {meta['torch']}. Command: `{meta['command']}`.\n\n{body}\n")
    print(f"wrote {stem}.json, .csv, .md")


def metadata(device: str, **extra) -> Dict:
    import torch

    # the instruction set of drsl_fast's C++ CPU loops (csrc/cpu/multiversion.h) is ATen's CPU capability
    build = {} if str(device).startswith("cuda") else dict(cpu_build=torch.backends.cpu.get_cpu_capability())
    return dict(device=device_name(device), device_type=device, torch=torch.__version__, command=command_line(),
                date=time.strftime("%Y-%m-%d"), **build, **extra)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
