"""Benchmark of the DRSL losses (SPEC.md §4 Eq. 4-7, 10) against what a user
would otherwise write, in the same run: one DRSL+ loss step (sampling,
MMDL triplet + cross-entropy on source and target, cross-domain consistency),
forward + backward.

Methods:
  loop       Python loops over images x classes with nonzero/randperm; Eq. 4/5
             from the full (samples, C, M) distance tensor; Eq. 6 from a
             torch.cdist anchor x source-sample distance matrix, positives and
             negatives picked by masked random scores
  reference  drsl_fast's pure-PyTorch oracles
  cpu / cuda drsl_fast's fused ops (sample_per_class, mmdl_losses, consistency_loss)

Each measurement runs in a fresh subprocess: peak memory is the RSS
high-water mark (CPU) or max_memory_allocated (GPU) above the inputs. Host
synchronisations are counted with a TorchDispatchMode (calls of
_local_scalar_dense / nonzero / masked_select, i.e. .item() and data-dependent
shapes) on CPU, and with torch.cuda.set_sync_debug_mode on GPU.

    python bench/bench_drsl_losses.py            # -> bench/results/drsl_losses_<device>.{json,csv,md}
    python bench/bench_drsl_losses.py --quick    # print only
"""
import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

SIZE = dict(B=2, C=19, M=3, D=64, H=256, W=256, k=300)  # 1 source + 1 target, embedding maps of 512x512 crops
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def loop_step(source, source_labels, target, target_labels, modes, k, generator):
    """What a user would write (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    C, M, D = modes.shape

    def sample(emb, labels):
        rows, classes = [], []
        for b in range(emb.shape[0]):
            flat = labels[b].reshape(-1)
            for c in range(C):
                pixels = (flat == c).nonzero().squeeze(1)
                chosen = pixels[torch.randperm(pixels.numel(), generator=generator)[:k]]
                rows.append(emb[b].reshape(D, -1)[:, chosen].t())
                classes.append(torch.full((chosen.numel(),), c, dtype=torch.long))
        return torch.cat(rows), torch.cat(classes)

    def mmdl(e, y):
        dist = ((e[:, None, None, :] - modes[None]) ** 2).sum(-1)  # (S, C, M)
        dmin, mstar = dist.min(-1)
        positive = dmin.gather(1, y[:, None]).squeeze(1)
        negative = dmin.masked_fill(F.one_hot(y, C).bool(), float("inf")).min(1).values
        triplet = torch.relu(positive - negative + 1.0).mean()
        ce = F.cross_entropy(15.0 * torch.exp(-dmin / 0.5), y)
        return triplet, ce, mstar.gather(1, y[:, None]).squeeze(1)

    e_s, y_s = sample(source, source_labels)
    e_t, y_t = sample(target, target_labels)
    tri_s, ce_s, m_s = mmdl(e_s, y_s)
    tri_t, ce_t, m_t = mmdl(e_t, y_t)
    pairwise = torch.cdist(e_t, e_s) ** 2  # (anchors, source samples)
    same_group = (y_t[:, None] == y_s[None]) & (m_t[:, None] == m_s[None])
    other_class = y_t[:, None] != y_s[None]
    scores = torch.rand(pairwise.shape, generator=generator)
    positive = torch.where(same_group, scores, -1.0).argmax(1)
    negative = torch.where(other_class, scores, -1.0).argmax(1)
    rows = torch.arange(e_t.shape[0])
    valid = same_group.any(1) & other_class.any(1)
    hinge = torch.relu(pairwise[rows, positive] - pairwise[rows, negative] + 1.0)[valid]
    cons = hinge.mean() if hinge.numel() else hinge.sum()
    return 0.25 * (tri_s + tri_t) + 0.1 * (ce_s + ce_t) + 0.1 * cons


def fused_step(source, source_labels, target, target_labels, modes, k, generator, backend):
    from drsl_fast.losses import consistency_loss, mmdl_losses, sample_per_class

    C = modes.shape[0]
    pairs_s = sample_per_class(source_labels, C, k, generator, backend=backend).pairs()
    pairs_t = sample_per_class(target_labels, C, k, generator, backend=backend).pairs()
    s = mmdl_losses(source, *pairs_s, modes, backend=backend)
    t = mmdl_losses(target, *pairs_t, modes, backend=backend)
    cons = consistency_loss(target, *pairs_t, source, source_labels, modes, 1.0, generator, backend=backend)
    return 0.25 * (s.triplet + t.triplet) + 0.1 * (s.ce + t.ce) + 0.1 * cons.loss


def count_syncs(step, device):
    """Host synchronisations of one step (see the module docstring)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(name in str(func) for name in SYNC_OPS):
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return Counter.count


def worker(spec):
    import torch

    device = torch.device(spec["device"])
    s = spec["size"]
    g = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    shape = (s["B"] // 2, s["D"], s["H"], s["W"])
    source = torch.randn(shape, device=device, requires_grad=True)
    target = torch.randn(shape, device=device, requires_grad=True)
    modes = torch.randn(s["C"], s["M"], s["D"], device=device, requires_grad=True)
    source_labels = torch.randint(0, s["C"], shape[:1] + shape[2:], device=device)
    target_labels = torch.randint(0, s["C"], shape[:1] + shape[2:], device=device)
    target_labels[:, : s["H"] // 4] = 255  # unlabelled target rows
    args = (source, source_labels, target, target_labels, modes, s["k"], g)
    method = spec["method"]

    def step():
        loss = loop_step(*args) if method == "loop" else fused_step(*args, backend=method)
        loss.backward()
        for t in (source, target, modes):
            t.grad = None
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = current_rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    syncs = count_syncs(step, device)
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
                          peak_extra_mib=max(peak, 0) / 2**20, host_syncs=syncs)))


def measure(spec):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(spec, error=(done.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(lines[-1])


def device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "cpu"
    return f"{model}, {torch.get_num_threads()} threads"


def markdown_table(rows):
    base = next((r["time_ms"] for r in rows if r["method"] == "loop" and "time_ms" in r), None)
    lines = ["| method | fwd+bwd ms | peak extra MiB | host syncs | speed-up vs loop |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:60]} | | | |")
            continue
        speedup = f"{base / r['time_ms']:.1f}x" if base else ""
        lines.append(f"| {r['method']} | {r['time_ms']:.1f} | {r['peak_extra_mib']:.1f} | {r['host_syncs']} | {speedup} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="print only, write nothing")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=30.0)
    parser.add_argument("--out", default=None, help="output stem (default bench/results/drsl_losses_<device>)")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    import torch

    import drsl_fast

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast = [b for b in ("cpu", "cuda") if b in drsl_fast.available_backends(torch.device(device))]
    rows = []
    for method in ["loop", "reference"] + fast:
        row = measure(dict(method=method, size=SIZE, device=device, repeats=args.repeats, budget_s=args.budget_s))
        rows.append(row)
        print(row, flush=True)
    table = markdown_table(rows)
    machine = device_name(device)
    print(f"\nDRSL+ loss step on {machine}\n\n{table}")
    if args.quick:
        return
    stem = args.out or os.path.join(RESULTS_DIR, f"drsl_losses_{device}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    meta = dict(device=machine, torch=torch.__version__, size=SIZE, command=" ".join(["python"] + sys.argv))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta, results=rows), f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "time_ms", "peak_extra_mib", "host_syncs", "runs", "error"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(stem + ".md", "w") as f:
        f.write(f"# DRSL losses benchmark\n\nOne DRSL+ loss step (sampling, Eq. 4/5 on source and target, Eq. 6), "
                f"forward + backward, at B={SIZE['B']} (1 source + 1 target), C={SIZE['C']}, M={SIZE['M']}, "
                f"D={SIZE['D']}, {SIZE['H']}x{SIZE['W']} embedding maps, k={SIZE['k']}. Device: {machine}; torch "
                f"{torch.__version__}. Command: `{meta['command']}`. Times are medians; peak extra memory is "
                f"measured on a fresh process above the inputs; host syncs are counted as described in "
                f"bench/bench_drsl_losses.py.\n\n{table}\n")
    print(f"wrote {stem}.json, .csv, .md")


if __name__ == "__main__":
    main()
