"""Benchmark of the DRSL losses (docs/method.md §4 Eq. 4-7, 10) against what a user
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
shapes) on CPU, and with torch.cuda.set_sync_debug_mode on GPU. For the fused
backends a second table says where a step's time goes: each drsl_fast
operator's calls and time per step under torch.profiler (the ATen calls
inside an operator, such as zeroing its gradient maps, included).

    python bench/bench_mmdl_losses.py            # -> bench/results/mmdl_losses_<device>.{json,csv,md}
    python bench/bench_mmdl_losses.py --quick    # print only
"""
import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SIZE = dict(B=2, C=19, M=3, D=64, H=256, W=256, k=300)  # 1 source + 1 target, embedding maps of 512x512 crops
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select")


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
                chosen = pixels[torch.randperm(pixels.numel(), generator=generator, device=generator.device)[:k]]
                rows.append(emb[b].reshape(D, -1)[:, chosen].t())
                classes.append(torch.full((chosen.numel(),), c, dtype=torch.long, device=emb.device))
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
    scores = torch.rand(pairwise.shape, generator=generator, device=pairwise.device)
    positive = torch.where(same_group, scores, -1.0).argmax(1)
    negative = torch.where(other_class, scores, -1.0).argmax(1)
    rows = torch.arange(e_t.shape[0], device=e_t.device)
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


PROFILED_STEPS = 5


def operator_times(step, device):
    """Per drsl_fast operator: calls, host ms and device ms per step (children
    included), from torch.profiler over PROFILED_STEPS steps after one."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        harness.sync(device)
    ops = [dict(op=e.key, calls=e.count / PROFILED_STEPS, host_ms=e.cpu_time_total / PROFILED_STEPS / 1e3,
                device_ms=e.device_time_total / PROFILED_STEPS / 1e3)
           for e in prof.key_averages() if e.key.startswith("drsl_fast::")]
    return sorted(ops, key=lambda op: -max(op["host_ms"], op["device_ms"]))


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

    with harness.PeakMemory(device) as memory:
        step()
    syncs = count_syncs(step, device)
    timing = harness.median_ms(step, device, spec["repeats"], spec["budget_s"], warmup=0)
    ops = operator_times(step, device) if method in ("cpu", "cuda") else []
    harness.emit(dict(spec, **timing, peak_extra_mib=memory.extra / 2**20, host_syncs=syncs, operators=ops))


def measure(spec):
    return harness.run_fresh(__file__, ["--worker", json.dumps(spec)], spec)


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


def operators_table(row):
    """Where the step of a fused backend goes, operator by operator."""
    device = row["device"].startswith("cuda")
    header = ["operator", "calls per step", "host ms per step"] + (["device ms per step"] if device else [])
    rows = [[f"`{op['op']}`", f"{op['calls']:g}", f"{op['host_ms']:.2f}"] + ([f"{op['device_ms']:.3f}"] if device
                                                                             else [])
            for op in row["operators"]]
    return (f"Where the {row['method']} backend's step goes (torch.profiler over {PROFILED_STEPS} steps; an "
            f"operator's time includes the ATen calls inside it):\n\n" + harness.markdown_table(header, rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="print only, write nothing")
    harness.add_run_arguments(parser, "mmdl_losses", "timed runs (default 7 CPU, 30 GPU)",
                              "time budget per method (default 30 CPU, 3 GPU)")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    device = harness.default_device(args.device)
    gpu = device == "cuda"
    repeats = args.repeats or (30 if gpu else 7)
    budget = args.budget_s or (3.0 if gpu else 30.0)
    fast = [b for b in harness.fast_backends(device) if b != "triton"]  # sampling has no Triton kernel
    rows = []
    for method in ["loop", "reference"] + fast:
        row = measure(dict(method=method, size=SIZE, device=device, repeats=repeats, budget_s=budget))
        rows.append(row)
        print({k: v for k, v in row.items() if k in ("method", "time_ms", "peak_extra_mib", "host_syncs", "error")},
              flush=True)
    table = markdown_table(rows)
    table += "".join("\n\n" + operators_table(r) for r in rows if r.get("operators"))
    machine = harness.device_name(device)
    print(f"\nDRSL+ loss step on {machine}\n\n{table}")
    if args.quick:
        return
    stem = harness.results_stem(args.out, "mmdl_losses", device)
    body = (f"One DRSL+ loss step (sampling, Eq. 4/5 on source and target, Eq. 6), forward + backward, at "
            f"B={SIZE['B']} (1 source + 1 target), C={SIZE['C']}, M={SIZE['M']}, D={SIZE['D']}, "
            f"{SIZE['H']}x{SIZE['W']} embedding maps, k={SIZE['k']}. Times are medians; peak extra memory is "
            f"measured on a fresh process above the inputs; host syncs are counted as described in "
            f"bench/bench_mmdl_losses.py.\n\n{table}")
    harness.write_results(stem, harness.metadata(device, size=SIZE), rows,
                          ["method", "time_ms", "min_ms", "max_ms", "peak_extra_mib", "host_syncs", "runs", "error"],
                          "DRSL losses benchmark", body)


if __name__ == "__main__":
    main()
