"""Hardware counters of the fp32 mode-distance kernels (the CUDA backend's
default): Nsight Compute on the probe executable of
bench/probe_tensor_core_kernels.py, built from csrc/cuda/mode_distance.cu as it
stands (with -lineinfo), at the realistic shape. One profiled launch of each
kernel (after three unprofiled ones), the clocks left alone. Writes, per
kernel, the report (.ncu-rep), its details page, its raw metrics (.csv) and its
SASS with the warp-stall samples of each instruction (.sass.csv), and a
summary table: time, throughput, occupancy, instructions issued, and where
the warps wait.

    python bench/ncu_mode_distance.py --out DIR/ncu   # needs a GPU, nvcc and ncu
"""
import argparse
import csv
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
