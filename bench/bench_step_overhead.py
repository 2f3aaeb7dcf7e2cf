"""What a DRSL+ training step costs over the DeepLab-v2 floor, measured as a
paired comparison: the floor, DRSL+ with the fast ops, DRSL+ with the head
convolutions run apart, and the floor and DRSL+ with the layer4 head's
dilated convolutions computed as one matrix product
(drsl_fast/models/tap_gemm.py; bench/bench_head_convs.py times them alone)
are built in one process and timed in alternating
rounds (the order rotates each round), so a drift of the machine (another
tenant on the host, clocks) falls on every variant alike. Each round times a
few steps per variant, issued back to back and synchronised at the end
(harness.host_and_pipelined_ms, as in a training loop); the overhead is
the median over rounds of (DRSL+ / floor - 1) within a round, with its
quartiles, each variant over the floor with the same head (column "over"). Peak memory is bench/bench_training_step.py's job; this script
only times.

With ``--cuda-graphs`` (a GPU only) every variant's whole step (forward,
backward, SGD) is captured once as a CUDA graph and replayed: what the steps
cost when no host time is left in them, the loss's draws coming from one
generator whose state the graph advances. A variant that cannot be captured
gets its error in its row; the others are still timed.

    python bench/bench_step_overhead.py --device cuda          # ResNet-101, 512x512 and 512x1024, fp32 and amp
    python bench/bench_step_overhead.py --device cpu           # ResNet-50 at 128x128 -> bench/results/step_overhead_cpu.*
    python bench/bench_step_overhead.py --device cuda --cuda-graphs   # each step one CUDA graph
    python bench/bench_step_overhead.py --quick                # tiny network on the CPU, prints only
"""
import argparse
import gc
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_training_step import CPU_SIZES, GPU_SIZES, QUICK_SIZES, amp_for, setting_of, training_step  # noqa: E402

VARIANTS = {"floor": dict(mmdl=False), "DRSL+ fast": dict(mmdl=True),
            "DRSL+ fast, head convs apart": dict(mmdl=True, shared_convs=False),
            "floor, head as one GEMM": dict(mmdl=False, head_as_gemm=True),
            "DRSL+ fast, head as one GEMM": dict(mmdl=True, head_as_gemm=True)}
BASELINE = {"floor, head as one GEMM": "floor", "DRSL+ fast, head as one GEMM": "floor, head as one GEMM"}
FIELDS = ["crop", "precision", "variant", "median_ms", "over", "overhead", "overhead_q1", "overhead_q3", "rounds",
          "steps_per_round", "error"]


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def measure(base, device, rounds: int, steps: int, warmup: int, cuda_graphs: bool = False):
    """Rows for one (crop, precision): each variant's median ms per step and
    its overhead over the floor, paired by round."""
    import torch

    from drsl_fast.memory_model import amp_dtype

    harness.warm_up_runtime(torch.device(device))
    steps_of, failed = {}, {}
    for name, extra in VARIANTS.items():
        setting = setting_of(dict(setting=dict(base, ops="fast", checkpointing=False, **extra)))
        torch.manual_seed(0)
        generator = torch.Generator(device).manual_seed(0) if cuda_graphs else None
        step = training_step(setting, torch.device(device), amp_dtype(setting.amp), generator)
        try:
            steps_of[name] = graphed(step, generator, warmup) if cuda_graphs else step
        except Exception as exc:  # reported in the variant's row; the others are still timed
            failed[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        for _ in range(0 if cuda_graphs else warmup):
            step()
    times = timed_rounds(steps_of, device, rounds, steps) if "floor" in steps_of else {}
    del steps_of
    gc.collect()
    rows = overhead_rows(times, base, steps) if times else []
    crop, precision = f"{base['crop'][0]}x{base['crop'][1]}", base["amp"] or "fp32"
    return rows + [dict(crop=crop, precision=precision, variant=name, error=error) for name, error in failed.items()]


def graphed(step, generator, warmup: int):
    """``step`` captured as one CUDA graph, after ``warmup`` eager steps on a
    side stream (they create the momentum buffers and load the kernel
    libraries, as a capture needs); returns its replay, which holds ``step``
    too: the graph reads the network, optimizer state and batch that the
    closure owns, and freeing them would hand their memory to the next
    variant while the graph still points at it."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()
    graph.replay()

    def replay():
        graph.replay()

    replay.keeps_alive = step
    return replay


def timed_rounds(steps_of, device, rounds: int, steps: int):
    """{variant: [ms per step, one per round]}: each round times every
    variant once, starting one variant later than the round before."""
    names = list(steps_of)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(harness.host_and_pipelined_ms(steps_of[name], device, steps)["pipelined_ms"])
    return times


def overhead_rows(times, base, steps: int):
    """One row per variant: its median ms per step and, beside its floor's
    (BASELINE, else "floor"), the quartiles over rounds of (its time / the
    floor's - 1) in the same round."""
    rows = []
    for name, own in times.items():
        row = dict(crop=f"{base['crop'][0]}x{base['crop'][1]}", precision=base["amp"] or "fp32", variant=name,
                   median_ms=statistics.median(own), rounds=len(own), steps_per_round=steps)
        over = BASELINE.get(name, "floor")
        if name != "floor" and over in times:
            ratios = [t / f - 1 for t, f in zip(own, times[over])]
            row["over"] = over
            row["overhead_q1"], row["overhead"], row["overhead_q3"] = quartiles(ratios)
        rows.append(row)
    return rows


def markdown(rows):
    def pct(r, key):
        return f"{100 * r[key]:+.1f} %" if key in r else ""

    return harness.markdown_table(
        ["crop", "precision", "variant", "ms per step (median)", "over", "overhead (median of rounds)",
         "quartiles"],
        [[r["crop"], r["precision"], r["variant"], f"failed: {r['error'][:80]}", "", "", ""] if "error" in r else
         [r["crop"], r["precision"], r["variant"], f"{r['median_ms']:.1f}", r.get("over", ""), pct(r, "overhead"),
          f"{pct(r, 'overhead_q1')} to {pct(r, 'overhead_q3')}" if "overhead" in r else ""] for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 x0.25 at 64x64, 3 rounds; print only")
    parser.add_argument("--crops", nargs="+", default=None, metavar="HxW")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 15 GPU, 10 CPU; 3 with --quick)")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round (synchronised at its end)")
    parser.add_argument("--warmup", type=int, default=3, help="steps per variant before the rounds")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--cuda-graphs", action="store_true", help="each variant's step captured as one CUDA graph")
    parser.add_argument("--out", default=None, help="output stem (default bench/results/step_overhead_<device>)")
    args = parser.parse_args()

    device = harness.default_device(args.device)
    gpu = device == "cuda"
    if args.cuda_graphs and not gpu:
        parser.error("--cuda-graphs needs a CUDA device")
    sizes = dict(QUICK_SIZES if args.quick else GPU_SIZES if gpu else CPU_SIZES)
    if args.crops:
        sizes["crops"] = [tuple(int(v) for v in c.lower().split("x")) for c in args.crops]
    rounds = args.rounds or (3 if args.quick else 15 if gpu else 10)
    amp = amp_for(device)
    rows = []
    for crop in sizes["crops"]:
        for precision in (None, amp):
            base = dict(depth=sizes["depth"], width=sizes["width"], crop=list(crop), amp=precision)
            for row in measure(base, device, rounds, args.steps, args.warmup, args.cuda_graphs):
                rows.append(row)
                shown = (f"failed: {row['error']}" if "error" in row else f"{row['median_ms']:8.1f} ms"
                         + (f" {100 * row['overhead']:+6.1f} %" if "overhead" in row else ""))
                print(f"{row['crop']} {row['precision']:5s} {row['variant']:30s} {shown}", flush=True)
    scale = (f"ResNet-{sizes['depth']}" + (f" x{sizes['width']}" if sizes["width"] != 1 else "") + ", crops "
             + ", ".join(f"{h}x{w}" for h, w in sizes["crops"]))
    table = markdown(rows)
    print(f"\n{scale}\n\n{table}")
    if args.quick:
        return
    stem = harness.results_stem(args.out, "step_overhead", device)
    meta = harness.metadata(device, scale=scale, rounds=rounds, steps_per_round=args.steps, amp=amp,
                            cuda_graphs=args.cuda_graphs)
    graphs = " Each step captured as one CUDA graph and replayed." if args.cuda_graphs else ""
    body = (f"One training step (1 source + 1 target image, backward, SGD with momentum; fast ops, no "
            f"checkpointing), {scale}, amp = {amp}.{graphs} The variants of a (crop, precision) are built in one "
            f"process and timed in {rounds} alternating rounds of {args.steps} steps each, synchronised at the end; "
            f"overhead: median over rounds of the round's DRSL+ / floor - 1, with its quartiles.\n\n{table}\n")
    harness.write_results(stem, meta, rows, FIELDS, "DRSL+ step over the DeepLab-v2 floor, paired", body)


if __name__ == "__main__":
    main()
