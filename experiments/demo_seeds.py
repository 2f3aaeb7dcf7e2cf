"""The demo over several seeds: the mIoU of every row of the demo's ablation
on the synthetic target val split, mean and spread (sample standard
deviation), each row's gain per seed over source only (and over the
no-pseudo-label control when it runs), and the pseudo-label accuracy per round.

    python experiments/demo_seeds.py --seeds 0 1 2 3 4 --out experiments/results/demo_ablation
    python experiments/demo_seeds.py --seeds 0 1 2 key=value ...   # the demo with changes

Each seed is a full `drsl run --config demo seed=S` (model init, sample order
and loss sampling change; the synthetic pair stays the same), timed.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_runs  # noqa: E402

CONTROL = "no pseudo-labels (control)"


def run_seed(seed: int, overrides, runs_dir: str) -> dict:
    out = os.path.join(runs_dir, f"demo_seed_{seed}")
    subprocess.run(["rm", "-rf", out], check=True)
    start = time.perf_counter()
    results = demo_runs.run_demo(out, seed, overrides)
    seconds = time.perf_counter() - start
    row = {"seed": seed, "seconds": seconds, "source only": results["source_only"]["miou"]}
    for title, rounds in results["methods"].items():
        row[title] = rounds[-1]["miou"]
        row[f"{title} pseudo-label accuracy"] = [r["pseudo_label_accuracy"] for r in rounds]
    return row


def label_accuracy_lines(rows) -> list:
    """Mean pseudo-label accuracy per round of each method that makes pseudo-labels."""
    lines = []
    for key in rows[0]:
        if key.endswith(" pseudo-label accuracy") and rows[0][key][0] is not None:
            means = [statistics.mean(r[key][k] for r in rows) for k in range(len(rows[0][key]))]
            lines.append(f"- {key}, per round (mean over seeds): " + ", ".join(f"{m:.1f} %" for m in means))
    return lines


def plot(rows, methods, gains, path: str) -> None:
    """Left: each row's mIoU per seed (dots) and mean (bar); right: the
    per-seed gains over source only and over the control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, m in enumerate(methods):
        values = [r[m] for r in rows]
        left.bar(i, statistics.mean(values), color="lightsteelblue")
        left.plot([i] * len(values), values, "o", color="black", markersize=3)
    left.set_xticks(range(len(methods)), methods, rotation=25, ha="right", fontsize=8)
    left.set(ylabel="mIoU on target val (%)", title=f"{len(rows)} seeds")
    names = list(gains)
    for i, name in enumerate(names):
        right.plot([i] * len(gains[name]), gains[name], "o", color="black", markersize=3)
        right.plot(i, statistics.mean(gains[name]), "_", color="red", markersize=14)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    right.set(ylabel="mIoU difference (points)", title="per seed (dots) and mean (red)")
    for axis in (left, right):
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--out", default=os.path.join(demo_runs.RESULTS_DIR, "demo_seeds"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    rows = [run_seed(seed, args.overrides, args.runs_dir) for seed in args.seeds]
    methods = [k for k in rows[0] if k not in ("seed", "seconds") and not k.endswith("accuracy")]
    summary = {m: {"mean": statistics.mean(r[m] for r in rows),
                   "std": statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0} for m in methods}
    gains = {f"{m} minus source only": [r[m] - r["source only"] for r in rows] for m in methods if m != "source only"}
    if CONTROL in methods:  # what the pseudo-labels add beyond source training with the same ISA
        gains.update({f"{m} minus the control": [r[m] - r[CONTROL] for r in rows]
                      for m in methods if m not in ("source only", CONTROL)})
    lines = ["| seed | " + " | ".join(methods) + " | wall time (s) |", "|---" * (len(methods) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[m]:.1f}" for m in methods) + f" | {r['seconds']:.0f} |")
    lines.append("| mean ± std | " + " | ".join(f"{summary[m]['mean']:.1f} ± {summary[m]['std']:.1f}"
                                              for m in methods) + " | |")
    table = "\n".join(lines)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    text = (f"# Demo over seeds\n\nmIoU (%) on the synthetic target val split after the last round; "
            f"`python experiments/demo_seeds.py {' '.join(sys.argv[1:])}` on {machine}.\n\n{table}\n\n"
            + "\n".join(f"- {m}, per seed: {', '.join(f'{g:+.1f}' for g in gains[m])} "
                        f"(mean {statistics.mean(gains[m]):+.1f})" for m in gains) + "\n"
            + "\n".join(label_accuracy_lines(rows)) + "\n")
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as handle:
        json.dump({"rows": rows, "summary": summary, "gains": gains, "machine": machine}, handle, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as handle:
        handle.write(text)
    plot(rows, methods, gains, args.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
