"""Hardware counters of the fp32 mode-distance kernels (the CUDA backend's
default): Nsight Compute on the probe executable of
bench/probe_tensor_core_kernels.py, built from csrc/cuda/mode_distance.cu as it
stands (with -lineinfo), at the realistic shape. One profiled launch of each
kernel (after three unprofiled ones), the clocks left alone. Writes, per
kernel, the report (.ncu-rep), its details page, its raw metrics (.csv) and its
SASS with the warp-stall samples of each instruction (.sass.csv.gz), and a
summary table: time, throughput, occupancy, instructions issued, and where
the warps wait. Then, from the SASS alone (so it reruns without a GPU on a
committed folder), where each kernel's instructions and warp samples go: the
code split into runs of consecutive instructions that executed equally often
(a loop body, a branch's side, a prologue), the largest runs with their share
of the instructions issued and of the warp samples, their main opcodes, and
what their warps waited on.

    python bench/ncu_mode_distance.py --out DIR/ncu      # needs a GPU, nvcc and ncu
    python bench/ncu_mode_distance.py --regions DIR/ncu  # the SASS tables again, from DIR's .sass.csv.gz
"""
import argparse
import collections
import csv
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import probe_tensor_core_kernels as probe  # noqa: E402

KERNELS = ["mode_distance_forward_kernel", "mode_distance_grad_emb_kernel", "mode_distance_grad_modes_kernel"]
SUMMARY = [  # (column, raw metric)
    ("time us", "gpu__time_duration.sum"),
    ("SM clock GHz", "sm__cycles_elapsed.avg.per_second"),
    ("compute % of peak", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("memory % of peak", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM % of peak", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM MB read", "dram__bytes_read.sum"),
    ("DRAM MB written", "dram__bytes_write.sum"),
    ("issue slots busy %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("FP32 pipe %", "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("achieved occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("registers", "launch__registers_per_thread"),
    ("blocks per SM", "launch__occupancy_limit_registers"),
    ("warp instructions (M)", "smsp__inst_executed.sum"),
    ("shared store conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"),
    ("shared load conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"),
]
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")


def ncu_binary() -> str:
    found = shutil.which("ncu")
    if found:
        return found
    for candidate in sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu")) + [Path("/usr/local/cuda/bin/ncu")]:
        if candidate.exists():
            return str(candidate)
    raise SystemExit("ncu_mode_distance: no ncu on PATH")


def raw_metrics(ncu: str, report: Path) -> dict:
    """The report's raw page as {metric: value} (one profiled launch)."""
    text = subprocess.run([ncu, "-i", str(report), "--page", "raw", "--csv", "--print-units", "base"],
                          capture_output=True, text=True, check=True).stdout
    rows = list(csv.reader(io.StringIO(text)))
    header, values = rows[0], rows[-1]  # header, units, then one row per launch
    return dict(zip(header, values))


def number(text) -> float:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return float("nan")


def summary_row(kernel: str, metrics: dict) -> dict:
    row = dict(kernel=kernel)
    for column, metric in SUMMARY:
        value = number(metrics.get(metric, "nan"))
        if metric == "gpu__time_duration.sum":
            value /= 1e3  # ns -> us
        elif metric == "sm__cycles_elapsed.avg.per_second":
            value /= 1e9
        elif metric.startswith("dram__bytes"):
            value /= 1e6
        elif metric == "smsp__inst_executed.sum":
            value /= 1e6
        row[column] = round(value, 3)
    stalls = {m.group(1): number(v) for k, v in metrics.items() if (m := STALL.fullmatch(k))}
    top = sorted(((v, k) for k, v in stalls.items() if v == v and v > 0), reverse=True)[:6]
    row["warp waits per issued instruction (cycles), largest"] = ", ".join(f"{k} {v:.2f}" for v, k in top)
    return row


def sass_rows(path: Path) -> list:
    """Per SASS instruction of the source page: text, times executed (warp
    instructions), warp samples, and samples by stall reason."""
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    header = rows[1]  # rows[0] names the kernel
    at = {name: i for i, name in enumerate(header)}
    stalls = {name[len("stall_"):]: i for name, i in at.items()
              if name.startswith("stall_") and "Not Issued" not in name}
    out = []
    for row in rows[2:]:
        if len(row) < len(header):
            continue
        out.append(dict(text=row[at["Source"]].strip(), executed=int(row[at["Instructions Executed"]] or 0),
                        samples=int(row[at["Warp Stall Sampling (All Samples)"]] or 0),
                        stalls={k: int(row[i] or 0) for k, i in stalls.items()}))
    return out


def opcode(text: str) -> str:
    words = text.split()
    if words and words[0].startswith("@"):  # a predicate guard
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def regions(rows: list, share: float = 0.01) -> list:
    """Runs of consecutive instructions with the same execution count, those
    holding at least `share` of the instructions issued or of the samples."""
    runs = []
    for i, row in enumerate(rows):
        if runs and runs[-1]["count"] == row["executed"]:
            run = runs[-1]
        else:
            run = dict(first=i, count=row["executed"], length=0, executed=0, samples=0,
                       opcodes=collections.Counter(), stalls=collections.Counter())
            runs.append(run)
        run["last"] = i
        run["length"] += 1
        run["executed"] += row["executed"]
        run["samples"] += row["samples"]
        run["opcodes"][opcode(row["text"])] += 1
        run["stalls"].update(row["stalls"])
    executed = sum(r["executed"] for r in rows) or 1
    samples = sum(r["samples"] for r in rows) or 1
    for run in runs:
        run["executed_share"] = run["executed"] / executed
        run["samples_share"] = run["samples"] / samples
    return [r for r in runs if r["executed_share"] >= share or r["samples_share"] >= share]


def regions_table(kernel: str, rows: list) -> str:
    executed = sum(r["executed"] for r in rows)
    lines = [f"### {kernel}: {executed / 1e6:.1f} M warp instructions, {sum(r['samples'] for r in rows)} warp samples",
             ""]
    table = []
    for run in regions(rows):
        waits = sum(run["stalls"].values()) or 1
        table.append([f"{run['first']}-{run['last']}", run["length"], run["count"],
                      f"{100 * run['executed_share']:.1f}", f"{100 * run['samples_share']:.1f}",
                      ", ".join(f"{k} {v}" for k, v in run["opcodes"].most_common(4)),
                      ", ".join(f"{k} {100 * v / waits:.0f} %" for k, v in run["stalls"].most_common(3))])
    lines.append(harness.markdown_table(
        ["SASS lines", "instructions", "times each ran (warps)", "% of instructions issued", "% of warp samples",
         "main opcodes", "samples by state (largest)"], table))
    return "\n".join(lines)


def write_regions(out: Path) -> None:
    parts = [regions_table(kernel, sass_rows(out / f"{kernel}.sass.csv.gz")) for kernel in KERNELS
             if (out / f"{kernel}.sass.csv.gz").exists()]
    (out / "sass_regions.md").write_text(
        "# Mode-distance fp32 kernels: where the instructions and the warp samples go\n\n"
        "From each kernel's SASS with Nsight Compute's per-instruction counts (`.sass.csv.gz`): the code in runs of "
        "consecutive instructions that ran equally often (a loop body, a branch's side), the runs that hold at least "
        "1 % of the instructions issued or of the warp samples. 'selected' is a warp issuing, 'not_selected' one "
        "ready while another issued; the rest are stalls (Nsight Compute's names). Command: "
        f"`python bench/ncu_mode_distance.py --regions {out}`.\n\n" + "\n\n".join(parts) + "\n")
    print(f"wrote {out / 'sass_regions.md'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (profiles on this machine's GPU)")
    parser.add_argument("--regions", help="a folder written by --out: its SASS tables again, no GPU needed")
    args = parser.parse_args()
    if args.regions:
        return write_regions(Path(args.regions))
    if not args.out:
        parser.error("--out or --regions")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("ncu_mode_distance: needs a CUDA GPU")
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    ncu = ncu_binary()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = [str(probe.SHAPE[k]) for k in "BDCMP"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = probe.build("as built", [], Path(tmp), nvcc, arch, extra_flags=["-lineinfo"])
        for kernel in KERNELS:
            report = out / kernel
            command = [ncu, "--clock-control", "none", "--set", "full", "--import-source", "yes",
                       "-k", f"regex:{kernel}", "--launch-skip", "3", "--launch-count", "1",
                       "-f", "-o", str(report), str(exe)] + shape
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            (out / f"{kernel}.log").write_text(done.stdout + done.stderr)
            rep = report.with_suffix(".ncu-rep")
            if done.returncode != 0 or not rep.exists():
                print(f"ncu_mode_distance: {kernel}: ncu failed (see {kernel}.log)\n{done.stderr[-2000:]}",
                      file=sys.stderr)
                continue
            for page, suffix, extra in [("details", ".details.txt", ["--print-details", "all"]),
                                        ("source", ".sass.csv", ["--csv", "--print-source", "sass"])]:
                shown = subprocess.run([ncu, "-i", str(rep), "--page", page] + extra, capture_output=True, text=True)
                if suffix == ".sass.csv":
                    with gzip.open(out / f"{kernel}.sass.csv.gz", "wt") as f:
                        f.write(shown.stdout)
                else:
                    (out / f"{kernel}{suffix}").write_text(shown.stdout + shown.stderr)
            metrics = raw_metrics(ncu, rep)
            with open(out / f"{kernel}.raw.csv", "w", newline="") as f:
                csv.writer(f).writerows(sorted(metrics.items()))
            rows.append(summary_row(kernel, metrics))
            print(rows[-1], flush=True)
    if not rows:
        raise SystemExit("ncu_mode_distance: no kernel profiled")
    fields = ["kernel"] + [c for c, _ in SUMMARY] + ["warp waits per issued instruction (cycles), largest"]
    table = harness.markdown_table(fields, [[r[f] for f in fields] for r in rows])
    body = (f"Shape B={probe.SHAPE['B']}, D={probe.SHAPE['D']}, C={probe.SHAPE['C']}, M={probe.SHAPE['M']}, "
            f"P={probe.SHAPE['P']} (fp32, (B, D, H, W) contiguous, posterior on), the probe executable's inputs. "
            "Nsight Compute, full section set, clocks not fixed (`--clock-control none`), one launch of each kernel "
            "after three unprofiled ones; times under the profiler's replay, so not the benchmark's. The last "
            "column: the warp-state sampler's average cycles a warp waits per instruction it issues, by reason.\n\n"
            + table)
    harness.write_results(str(out / "summary"), harness.metadata("cuda", arch=arch, shape=probe.SHAPE), rows, fields,
                          "Mode-distance fp32 kernels: hardware counters", body)
    write_regions(out)


if __name__ == "__main__":
    main()
