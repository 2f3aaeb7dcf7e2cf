"""Benchmark of the class-balanced thresholds (SPEC.md §5) and the entropy map
(SPEC.md §7) against what a user would otherwise write, in the same run.

Thresholds, over a simulated pass of N images of 19 x 512 x 1024 class
probabilities, generated batch by batch on the fly (the same images for every
method; generation time is not counted):
  sort_all     keep every pixel's (class, confidence), sort per class (exact)
  crst_lists   CRST's way: every fourth pixel's confidence appended to a Python
               list per class, then sorted
  histogram_<backend>   drsl_fast.pseudo_labels.ClassBalancedThresholds
Reported: time in the accumulation and threshold computation, peak memory
above the generation-only pass (fresh process each; RSS high-water mark on
CPU, max_memory_allocated on GPU), the largest threshold error relative to
1 - t (vs sort_all), and the share of pixels whose selected label differs
from the one the exact thresholds give (portion 0.5).

Entropy, logits 1 x 19 x 512 x 1024: ADVENT's separate ops (softmax, log2,
mul, sum, mean) vs the fused op, forward and forward+backward.

    python bench/bench_pseudo_labels.py                 # -> bench/results/
    python bench/bench_pseudo_labels.py --images 500    # the issue's full pass (GPU)
"""
import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
C, H, W = 19, 512, 1024
PORTION = 0.5


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def simulated_probs(index, device):
    """Image ``index``'s probabilities: smooth logits with a class prior, sharp
    enough that confidences crowd near 1 as a trained model's do."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1000 + index)
    prior = torch.linspace(3.0, -3.0, C)[:, None, None]
    low = (torch.randn(1, C, H // 16, W // 16, generator=g) * 4 + prior).to(device)
    return F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False).mul_(2.5).softmax(1)


def crst_lists_thresholds(batches, portion):
    import numpy as np
    import torch

    lists = [[] for _ in range(C)]
    for probs in batches:
        conf, cls = probs.max(1)
        conf, cls = conf.flatten()[::4].cpu().numpy(), cls.flatten()[::4].cpu().numpy()
        for c in range(C):
            lists[c].extend(conf[cls == c].tolist())
    t = []
    for values in lists:
        rank = math.floor(len(values) * portion)
        t.append(1.0 if not values else math.inf if rank == 0 else float(np.sort(np.array(values))[::-1][rank - 1]))
    return torch.tensor(t, dtype=torch.float32)


def threshold_worker(spec):
    import torch

    import drsl_fast
    from drsl_fast.pseudo_labels import ClassBalancedThresholds
    from drsl_fast.reference.pseudo_labels import SortedThresholds

    device = torch.device(spec["device"])
    method = spec["method"]
    elapsed = [0.0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_batches():
        for i in range(spec["images"]):
            probs = simulated_probs(i, device)
            sync()
            start = time.perf_counter()
            yield probs
            sync()
            elapsed[0] += time.perf_counter() - start

    first = simulated_probs(0, device)  # warm up the generator; same baseline for all
    del first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if method == "generate_only":
        for _ in timed_batches():
            pass
        thresholds = torch.ones(C)
    elif method == "crst_lists":
        thresholds = crst_lists_thresholds(timed_batches(), PORTION)
    else:
        if method == "sort_all":
            acc = SortedThresholds(C)
        else:
            acc = ClassBalancedThresholds(C, device=device, backend=method.split("_", 1)[1])
        for probs in timed_batches():
            acc.update(probs)
        start = time.perf_counter()
        thresholds = acc.thresholds(PORTION)
        sync()
        elapsed[0] += time.perf_counter() - start
    print(json.dumps(dict(spec, time_s=elapsed[0], peak_mib=(peak_bytes(device) - base) / 2**20,
                          thresholds=[float(v) for v in thresholds.cpu()])))


def entropy_worker(spec):
    import torch

    import drsl_fast

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    logits = (torch.randn(1, C, H, W, device=device) * 3).requires_grad_(spec["pass"] == "forward+backward")
    weights = torch.randn(1, C, H, W, device=device)

    def advent(x):
        p = torch.softmax(x, dim=1)
        m = -torch.mul(p, torch.log2(p + 1e-30)) / math.log2(C)
        return m, m.sum(1), m.mean((1, 2, 3))

    fn = advent if spec["method"] == "advent_ops" else (
        lambda x: drsl_fast.ops.entropy_map(x, backend=spec["method"]))

    def step():
        m, pixel, score = fn(logits)
        if logits.requires_grad:
            ((m * weights).sum() + pixel.mean() + score.sum()).backward()
            logits.grad = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
    step()
    sync()
    peak = peak_bytes(device) - before
    times = []
    for _ in range(spec["repeats"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(spec, time_ms=1e3 * statistics.median(times), peak_extra_mib=max(peak, 0) / 2**20)))


def run_worker(kind, spec):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(spec, error=(done.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(lines[-1])


def selection_disagreement(rows, images, device_name):
    """Share of pixels whose label under each method's thresholds differs from
    the exact (sort_all) one, and the largest threshold error relative to 1 - t."""
    import torch

    from drsl_fast.pseudo_labels import select_labels

    device = torch.device(device_name)
    exact = torch.tensor(next(r for r in rows if r["method"] == "sort_all")["thresholds"])
    candidates = [r for r in rows if "thresholds" in r and r["method"] not in ("generate_only", "sort_all")]
    differing = {r["method"]: 0 for r in candidates}
    for i in range(images):
        probs = simulated_probs(i, device)
        reference_labels = select_labels(probs, exact.to(device))
        for r in candidates:
            labels = select_labels(probs, torch.tensor(r["thresholds"]).to(device))
            differing[r["method"]] += int((labels != reference_labels).sum())
    for r in candidates:
        t = torch.tensor(r["thresholds"], dtype=torch.float64)
        finite = torch.isfinite(exact) & (exact < 1)
        rel = ((t[finite] - exact[finite].double()).abs() / (1 - exact[finite].double())).max()
        r["max_rel_threshold_error"] = float(rel)
        r["disagreement"] = differing[r["method"]] / (images * H * W)


def markdown(threshold_rows, entropy_rows, images):
    sort_time = next((r["time_s"] for r in threshold_rows if r["method"] == "sort_all" and "time_s" in r), None)
    base_peak = next((r["peak_mib"] for r in threshold_rows if r["method"] == "generate_only"), 0.0)
    lines = [f"### Thresholds over {images} images of {C}x{H}x{W} (portion {PORTION})", "",
             "| method | time s | peak extra MiB | speed-up vs sort_all | max error / (1 - t*) | label disagreement |",
             "|---|---|---|---|---|---|"]
    for r in threshold_rows:
        if r["method"] == "generate_only":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:60]} | | | | |")
            continue
        speed = f"{sort_time / r['time_s']:.1f}x" if sort_time else ""
        err = f"{r['max_rel_threshold_error']:.2e}" if "max_rel_threshold_error" in r else "0 (exact)"
        dis = f"{100 * r['disagreement']:.4f} %" if "disagreement" in r else "0 (exact)"
        lines.append(f"| {r['method']} | {r['time_s']:.2f} | {max(r['peak_mib'] - base_peak, 0):.1f} | {speed} | "
                     f"{err} | {dis} |")
    lines += ["", f"### Entropy map, logits 1x{C}x{H}x{W}", "",
              "| pass | method | time ms | peak extra MiB | speed-up vs advent_ops |", "|---|---|---|---|---|"]
    for pass_name in ("forward", "forward+backward"):
        group = [r for r in entropy_rows if r["pass"] == pass_name]
        base = next((r["time_ms"] for r in group if r["method"] == "advent_ops" and "time_ms" in r), None)
        for r in group:
            if "error" in r:
                lines.append(f"| {pass_name} | {r['method']} | failed: {r['error'][:60]} | | |")
                continue
            speed = f"{base / r['time_ms']:.1f}x" if base else ""
            lines.append(f"| {pass_name} | {r['method']} | {r['time_ms']:.1f} | {r['peak_extra_mib']:.1f} | {speed} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--images", type=int, default=None, help="images in the pass (default 500 on GPU, 12 on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="output stem (default bench/results/pseudo_labels_<device>)")
    args = parser.parse_args()
    if args.worker:
        kind, spec = args.worker
        return (threshold_worker if kind == "thresholds" else entropy_worker)(json.loads(spec))

    import torch

    import drsl_fast
    from bench_mode_distance import device_name

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    images = args.images or (500 if device == "cuda" else 12)
    fast = [b for b in ("cpu", "cuda", "triton") if b in drsl_fast.available_backends(torch.device(device))]
    if device == "cpu":
        fast = [b for b in fast if b != "triton"]  # the interpreter is not a speed path
    threshold_rows = []
    for method in ["generate_only", "sort_all", "crst_lists", "histogram_reference"] + [f"histogram_{b}" for b in fast]:
        row = run_worker("thresholds", dict(method=method, device=device, images=images))
        threshold_rows.append(row)
        print(method, {k: v for k, v in row.items() if k in ("time_s", "peak_mib", "error")}, flush=True)
    selection_disagreement(threshold_rows, images, device)
    entropy_rows = []
    for pass_name in ("forward", "forward+backward"):
        for method in ["advent_ops", "reference"] + fast:
            row = run_worker("entropy", {"method": method, "device": device, "repeats": args.repeats, "pass": pass_name})
            entropy_rows.append(row)
            print(pass_name, method, {k: v for k, v in row.items() if k in ("time_ms", "peak_extra_mib", "error")},
                  flush=True)

    machine = device_name(device)
    table = markdown(threshold_rows, entropy_rows, images)
    print(f"\n{machine}\n\n{table}")
    stem = args.out or os.path.join(RESULTS_DIR, f"pseudo_labels_{device}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    command = " ".join(["python"] + sys.argv)
    with open(stem + ".json", "w") as f:
        json.dump(dict(device=machine, torch=torch.__version__, command=command, images=images,
                       thresholds=threshold_rows, entropy=entropy_rows), f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        fields = ["part", "method", "pass", "images", "time_s", "time_ms", "peak_mib", "peak_extra_mib",
                  "max_rel_threshold_error", "disagreement", "error"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in threshold_rows:
            writer.writerow(dict(r, part="thresholds"))
        for r in entropy_rows:
            writer.writerow(dict(r, part="entropy"))
    with open(stem + ".md", "w") as f:
        f.write(f"# Pseudo-label thresholds and entropy map benchmark\n\nDevice: {machine}; torch {torch.__version__}. "
                f"Command: `{command}`. Threshold times exclude generating the images and include every update "
                f"plus the final threshold computation; peak extra memory is above a generation-only pass "
                f"(fresh process each). Entropy times are medians; peak memory is above the inputs.\n\n{table}\n")
    print(f"wrote {stem}.json, .csv, .md")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
