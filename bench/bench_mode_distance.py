"""Benchmark of the mode-distance op (SPEC.md §3) against what a user would
otherwise write, in the same run.

Methods:
  broadcast  ((e[..., None, None, :] - R) ** 2).sum(-1).min(-1) on permuted embeddings
  cdist      torch.cdist(e, R) ** 2 on permuted embeddings, then min over modes
  reference  drsl_fast's pure-PyTorch oracle (a broadcast with gather)
  cpu / cuda / triton   drsl_fast's fused backends

Each (method, size, pass) runs in a fresh subprocess: the peak memory is the
process's RSS high-water mark (CPU) or torch.cuda.max_memory_allocated (GPU),
minus what was in use once the inputs existed. Times are medians of repeated
runs after a warm-up.

    python bench/bench_mode_distance.py            # full sweep -> bench/results/
    python bench/bench_mode_distance.py --quick    # realistic size only, printed
"""
import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REALISTIC = dict(B=2, D=64, C=19, M=3, H=256, W=256)  # embedding map of a 512x512 crop
SWEEP = [
    dict(B=2, D=64, C=19, M=3, H=64, W=64),
    dict(B=2, D=64, C=19, M=3, H=128, W=128),
    REALISTIC,
    dict(B=2, D=64, C=19, M=3, H=256, W=512),
    dict(B=2, D=128, C=19, M=3, H=128, W=128),
    dict(B=2, D=64, C=16, M=5, H=128, W=128),
]
BASELINES = ("broadcast", "cdist")
# Methods that build the (B, H, W, C, M, D) difference tensor are skipped where
# it (and its gradient) would not fit this budget.
BROADCAST_BUDGET_BYTES = 8 * 2**30


def broadcast_bytes(size, backward):
    B, D, C, M, H, W = (size[k] for k in ("B", "D", "C", "M", "H", "W"))
    return B * H * W * C * M * D * 4 * (2 if backward else 1)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build_method(name, backend_device):
    import torch

    import drsl_fast

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
    return lambda e, r: drsl_fast.mode_distance(e, r, backend=name).dmin


def worker(spec):
    """Runs one measurement; prints one JSON line."""
    import torch

    device = torch.device(spec["device"])
    size = spec["size"]
    torch.manual_seed(0)
    B, D, C, M, H, W = (size[k] for k in ("B", "D", "C", "M", "H", "W"))
    emb = torch.randn(B, D, H, W, device=device)
    modes = torch.randn(C, M, D, device=device)
    weights = torch.randn(B, C, H, W, device=device)
    fn = build_method(spec["method"], device)
    backward = spec["pass"] == "forward+backward"
    if backward:
        emb.requires_grad_(True)
        modes.requires_grad_(True)

    def step():
        out = fn(emb, modes)
        if out.shape != weights.shape:  # baselines return (B, H, W, C)
            out = out.permute(0, 3, 1, 2)
        if backward:
            (out * weights).sum().backward()
            emb.grad = None
            modes.grad = None
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Memory of the first call, on a clean process.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = current_rss_bytes()
        out = step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    output_bytes = out.numel() * out.element_size()
    del out
    times = []
    deadline = time.perf_counter() + spec["budget_s"]
    for i in range(spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and i >= 1:
            break
    print(json.dumps(dict(spec, time_ms=1e3 * statistics.median(times), runs=len(times),
                          peak_extra_mib=max(peak, 0) / 2**20, dmin_mib=output_bytes / 2**20)))


def measure(spec):
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True, text=True, timeout=1800,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(spec, error=(done.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(lines[-1])


def device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def methods_for(device):
    import torch

    import drsl_fast

    fast = [b for b in ("cpu", "cuda", "triton") if b in drsl_fast.available_backends(torch.device(device))]
    if device == "cpu":
        fast = [b for b in fast if b != "triton"]  # the interpreter is not a speed path
    return list(BASELINES) + ["reference"] + fast


def markdown_table(rows):
    header = "| size (B,D,C,M,HxW) | pass | method | time ms | peak extra MiB | speed-up vs best baseline |"
    lines = [header, "|" + "---|" * 6]
    groups = {}
    for r in rows:
        groups.setdefault((json.dumps(r["size"], sort_keys=True), r["pass"]), []).append(r)
    for (size_key, pass_name), group in groups.items():
        best = min((r["time_ms"] for r in group if r["method"] in BASELINES and "time_ms" in r), default=None)
        s = json.loads(size_key)
        label = f"{s['B']},{s['D']},{s['C']},{s['M']},{s['H']}x{s['W']}"
        for r in group:
            if "error" in r:
                lines.append(f"| {label} | {pass_name} | {r['method']} | {r['error'][:60]} | | |")
                continue
            speedup = f"{best / r['time_ms']:.1f}x" if best else ""
            lines.append(f"| {label} | {pass_name} | {r['method']} | {r['time_ms']:.1f} | "
                         f"{r['peak_extra_mib']:.1f} | {speedup} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="realistic size only; print, write nothing")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=20.0, help="time budget per measurement")
    parser.add_argument("--out", default=None, help="output stem (default bench/results/mode_distance_<device>)")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [REALISTIC] if args.quick else SWEEP
    rows = []
    for size in sizes:
        for pass_name in ("forward", "forward+backward"):
            for method in methods_for(device):
                spec = dict(method=method, size=size, device=device, repeats=args.repeats,
                            budget_s=args.budget_s, **{"pass": pass_name})
                needed = broadcast_bytes(size, pass_name != "forward")
                if method in ("broadcast", "reference") and needed > BROADCAST_BUDGET_BYTES:
                    row = dict(spec, error=f"skipped: needs ~{needed / 2**30:.0f} GiB")
                else:
                    row = measure(spec)
                rows.append(row)
                shown = f"{row['time_ms']:9.1f} ms  {row['peak_extra_mib']:8.1f} MiB" if "time_ms" in row else row["error"]
                print(f"{str(size):60s} {pass_name:17s} {method:10s} {shown}", flush=True)
    table = markdown_table(rows)
    machine = device_name(device)
    print(f"\nmode_distance on {machine}\n\n{table}")
    if args.quick:
        return
    stem = args.out or os.path.join(RESULTS_DIR, f"mode_distance_{device}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    meta = dict(device=machine, torch=torch.__version__, command=" ".join(["python"] + sys.argv))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta, results=rows), f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        fields = ["method", "pass", "B", "D", "C", "M", "H", "W", "time_ms", "peak_extra_mib", "dmin_mib", "runs", "error"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(dict(r, **r["size"]))
    with open(stem + ".md", "w") as f:
        f.write(f"# mode_distance benchmark\n\nDevice: {machine}; torch {torch.__version__}. "
                f"Command: `{meta['command']}`. Times are medians; peak extra memory is measured on a fresh "
                f"process ({'max_memory_allocated' if device == 'cuda' else 'RSS high-water mark'}) above the "
                f"inputs. The fp32 `dmin` output of the realistic size is "
                f"{REALISTIC['B'] * REALISTIC['C'] * REALISTIC['H'] * REALISTIC['W'] * 4 / 2**20:.1f} MiB.\n\n"
                f"{table}\n")
    print(f"wrote {stem}.json, .csv, .md")


if __name__ == "__main__":
    main()
