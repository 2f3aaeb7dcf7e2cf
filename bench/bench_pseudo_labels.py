"""Benchmark of the class-balanced thresholds (docs/method.md §5) and the entropy map
(docs/method.md §7) against what a user would otherwise write, in the same run.

Thresholds, over a simulated pass of N images of 19 x 512 x 1024 class
probabilities, generated batch by batch on the fly (the same images for every
method; generation time is not counted):
  sort_all     keep every pixel's (class, confidence), sort per class (exact)
  crst_lists   CRST's way: every fourth pixel's confidence appended to a Python
               list per class, then sorted
  histogram_<backend>   drsl_fast.pseudo_labels.ClassBalancedThresholds
Reported: time in the accumulation and threshold computation (after one
warm-up update on the first image, outside the timing: loading a method's
kernels, and compiling Triton's, is a cost of the pass, not of each image),
peak memory
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
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

C, H, W = 19, 512, 1024
PORTION = 0.5


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return harness.rss_high_water_bytes()


def entropy_roofline_bytes(backward: bool) -> int:
    """Read the logits, write the map, the pixel entropy and the score;
    backward: read the map's gradient and the logits, write their gradient."""
    forward = C * H * W * 4 * 2 + H * W * 4
    return forward + (3 * C * H * W * 4 if backward else 0)


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


def accumulator(method: str, device):
    """The streaming state of ``sort_all`` or ``histogram_<backend>``."""
    from drsl_fast.pseudo_labels import ClassBalancedThresholds
    from drsl_fast.reference import SortedThresholds

    if method == "sort_all":
        return SortedThresholds(C)
    return ClassBalancedThresholds(C, device=device, backend=method.split("_", 1)[1])


def warm_up(method: str, probs) -> None:
    """One update and threshold computation of ``method``, results dropped."""
    if method == "crst_lists":
        crst_lists_thresholds([probs], PORTION)
    elif method != "generate_only":
        acc = accumulator(method, probs.device)
        acc.update(probs)
        acc.thresholds(PORTION)


def threshold_worker(spec):
    import torch

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
    warm_up(method, first)
    del first
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    host_base = harness.current_rss_bytes()
    if method == "generate_only":
        for _ in timed_batches():
            pass
        thresholds = torch.ones(C)
    elif method == "crst_lists":
        thresholds = crst_lists_thresholds(timed_batches(), PORTION)
    else:
        acc = accumulator(method, device)
        for probs in timed_batches():
            acc.update(probs)
        start = time.perf_counter()
        thresholds = acc.thresholds(PORTION)
        sync()
        elapsed[0] += time.perf_counter() - start
    read = spec["images"] * C * H * W * 4  # every probability read once
    harness.emit(dict(spec, time_s=elapsed[0], peak_mib=(peak_bytes(device) - base) / 2**20,
                      host_peak_mib=(harness.rss_high_water_bytes() - host_base) / 2**20,
                      images_per_s=spec["images"] / elapsed[0] if elapsed[0] > 0 else float("nan"),
                      bandwidth_gbs=harness.bandwidth_gbs(read, 1e3 * elapsed[0]),
                      thresholds=[float(v) for v in thresholds.cpu()]))


def measure_entropy(spec):
    """One entropy measurement (run by :func:`harness.serve`; on a GPU every
    one in a single process, on the CPU each in its own)."""
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

    with harness.PeakMemory(device) as memory:
        step()
    timing = harness.median_ms(step, device, spec["repeats"], spec.get("budget_s", 30.0), warmup=0)
    nbytes = entropy_roofline_bytes(logits.requires_grad)
    return dict(spec, **timing, peak_extra_mib=memory.extra / 2**20, roofline_mib=nbytes / 2**20,
                bandwidth_gbs=harness.bandwidth_gbs(nbytes, timing["time_ms"]))


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
    base_peak = next((r["peak_mib"] for r in threshold_rows if r["method"] == "generate_only" and "peak_mib" in r), 0.0)
    base_host = next((r.get("host_peak_mib", 0.0) for r in threshold_rows if r["method"] == "generate_only"), 0.0)
    lines = [f"### Thresholds over {images} images of {C}x{H}x{W} (portion {PORTION})", "",
             "| method | time s | images/s | GB/s read | peak extra MiB | host peak extra MiB | speed-up vs sort_all "
             "| max error / (1 - t*) | label disagreement |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in threshold_rows:
        if r["method"] == "generate_only":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:60]} | | | | | | | |")
            continue
        speed = f"{sort_time / r['time_s']:.1f}x" if sort_time else ""
        err = f"{r['max_rel_threshold_error']:.2e}" if "max_rel_threshold_error" in r else "0 (exact)"
        dis = f"{100 * r['disagreement']:.4f} %" if "disagreement" in r else "0 (exact)"
        host = max(r.get("host_peak_mib", 0.0) - base_host, 0)
        lines.append(f"| {r['method']} | {r['time_s']:.3g} | {r.get('images_per_s', float('nan')):.1f} | "
                     f"{r.get('bandwidth_gbs', float('nan')):.1f} | {max(r['peak_mib'] - base_peak, 0):.1f} | "
                     f"{host:.1f} | {speed} | {err} | {dis} |")
    lines += ["", f"### Entropy map, logits 1x{C}x{H}x{W}", "",
              "| pass | method | time ms | peak extra MiB | speed-up vs advent_ops | achieved GB/s (roofline bytes) |",
              "|---|---|---|---|---|---|"]
    for pass_name in ("forward", "forward+backward"):
        group = [r for r in entropy_rows if r["pass"] == pass_name]
        base = next((r["time_ms"] for r in group if r["method"] == "advent_ops" and "time_ms" in r), None)
        for r in group:
            if "error" in r:
                lines.append(f"| {pass_name} | {r['method']} | failed: {r['error'][:60]} | | | |")
                continue
            speed = f"{base / r['time_ms']:.1f}x" if base else ""
            lines.append(f"| {pass_name} | {r['method']} | {r['time_ms']:.2f} | {r['peak_extra_mib']:.1f} | {speed} | "
                         f"{r.get('bandwidth_gbs', float('nan')):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one threshold measurement (its host RSS: own process)
    parser.add_argument("--entropy-worker", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=None, help="images in the pass (default 500 on GPU, 12 on CPU)")
    harness.add_run_arguments(parser, "pseudo_labels", "entropy timed runs (default 5 CPU, 100 GPU)",
                              "entropy time budget (default 30 CPU, 1 GPU)")
    args = parser.parse_args()
    if args.worker:
        return threshold_worker(json.loads(args.worker))
    if args.entropy_worker:
        return harness.serve(measure_entropy, json.loads(args.entropy_worker))

    device = harness.default_device(args.device)
    gpu = device == "cuda"
    images = args.images or (500 if gpu else 12)
    repeats = args.repeats or (100 if gpu else 5)
    budget = args.budget_s or (1.0 if gpu else 30.0)
    fast = harness.fast_backends(device)
    threshold_rows = []
    for method in ["generate_only", "sort_all", "crst_lists", "histogram_reference"] + [f"histogram_{b}" for b in fast]:
        spec = dict(method=method, device=device, images=images)
        row = harness.run_fresh(__file__, ["--worker", json.dumps(spec)], spec, timeout=3600)
        threshold_rows.append(row)
        print(method, {k: v for k, v in row.items() if k in ("time_s", "peak_mib", "host_peak_mib", "error")},
              flush=True)
    selection_disagreement(threshold_rows, images, device)
    entropy_specs = [dict(method=method, device=device, repeats=repeats, budget_s=budget, **{"pass": pass_name})
                     for pass_name in ("forward", "forward+backward") for method in ["advent_ops", "reference"] + fast]
    entropy_rows = []
    for row in harness.measure_all(__file__, entropy_specs, one_process=gpu, flag="--entropy-worker"):
        entropy_rows.append(row)
        print(row["pass"], row["method"], {k: v for k, v in row.items() if k in ("time_ms", "peak_extra_mib", "error")},
              flush=True)

    machine = harness.device_name(device)
    table = markdown(threshold_rows, entropy_rows, images)
    print(f"\n{machine}\n\n{table}")
    stem = harness.results_stem(args.out, "pseudo_labels", device)
    fields = ["part", "method", "pass", "images", "time_s", "images_per_s", "time_ms", "peak_mib", "host_peak_mib",
              "peak_extra_mib", "bandwidth_gbs", "max_rel_threshold_error", "disagreement", "error"]
    rows = [dict(r, part="thresholds") for r in threshold_rows] + [dict(r, part="entropy") for r in entropy_rows]
    body = ("Threshold times exclude generating the images and a warm-up update on the first image (kernel "
            "loading, Triton's compilation) and include every update plus the final threshold "
            "computation; images/s and GB/s read (19x512x1024 fp32 probabilities per image) follow from them. Peak "
            f"extra memory ({'max_memory_allocated' if gpu else 'RSS high-water'}) and host peak extra memory "
            "(RSS high-water) are above a generation-only pass (fresh process each). Entropy times are medians; "
            f"peak memory is above the inputs ({'one process, peak reset each time' if gpu else 'fresh process each'}); "
            f"achieved bandwidth uses the op's roofline bytes.\n\n{table}")
    harness.write_results(stem, harness.metadata(device, images=images), rows, fields,
                          "Pseudo-label thresholds and entropy map benchmark", body,
                          extra_json=dict(thresholds=threshold_rows, entropy=entropy_rows))


if __name__ == "__main__":
    main()
