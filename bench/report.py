"""Writes the README's performance section from the benchmark results.

Reads every result set under ``--results`` (the CPU files ``*_cpu.json`` at
its top level and one folder per GPU, ``<device>/*.json``, as
bench/gpu_suite.sh writes them) and writes markdown tables per machine (the
training step with the memory model's error, fast vs reference memory, the
GTX 1080 Ti verdict, the op microbenchmarks at the realistic size, the
pseudo-label pass) and a plot of training-step peak memory
(``training_step_memory.png`` beside the markdown).

    python bench/report.py                                     # -> bench/results/PERFORMANCE.md, printed
    python bench/report.py --results bench/results --out FILE.md
"""
import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)
import bench_step_overhead as step_overhead  # noqa: E402  (its variants: which ones a result may no longer have)


def load(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def result_sets(roots: List[str]) -> Dict[str, Dict[str, Dict]]:
    """{machine label: {benchmark name: result json}} over result roots (as
    bench/results) and single device folders (as bench/results/<device>)."""
    sets: Dict[str, Dict[str, Dict]] = {}
    for root in roots:
        names = [os.path.basename(p) for p in glob.glob(os.path.join(root, "*.json"))]
        if names and not any(n.endswith("_cpu.json") for n in names):
            folders = [os.path.join(root, "")]
        else:
            folders = sorted(glob.glob(os.path.join(root, "*", "")))
        read_root(root, folders, sets)
    return sets


def read_root(root: str, folders: List[str], sets: Dict[str, Dict[str, Dict]]) -> None:
    verdict = os.path.join(root, "gtx_1080ti_verdict.md")
    if os.path.exists(verdict):
        with open(verdict) as f:
            sets.setdefault("GTX 1080 Ti (predicted by the memory model)", {})["gtx_1080ti_verdict"] = {
                "markdown": f.read()}
    for path in sorted(glob.glob(os.path.join(root, "*_cpu.json"))):
        name = os.path.basename(path)[: -len("_cpu.json")]
        data = load(path)
        if data:
            sets.setdefault("cpu", {})[name] = data
    for folder in folders:
        label = os.path.basename(os.path.dirname(folder))
        if label == "local":
            continue
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            data = load(path)
            if data:
                sets.setdefault(label, {})[os.path.basename(path)[:-5]] = data
        verdict = os.path.join(folder, "gtx_1080ti_verdict.md")
        if os.path.exists(verdict):
            with open(verdict) as f:
                sets.setdefault(label, {})["gtx_1080ti_verdict"] = {"markdown": f.read()}


def table(header: List[str], rows: List[List[object]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def training_section(data: Dict, rerun: Optional[Dict] = None) -> str:
    """The training-step table; with `rerun` (the same benchmark run again on
    the same machine, training_step_rerun.json) a second column of step times,
    so that the spread between runs shows beside each time."""
    rows = [r for r in data["results"] if "peak_mib" in r]
    setting = lambda r: (r["crop"], r["variant"], r["precision"], r["checkpointing"])  # noqa: E731
    again = {setting(r): r["time_ms"] for r in (rerun or {}).get("results", []) if "time_ms" in r}
    body = []
    for r in rows:
        error = f"{100 * r['prediction_error']:+.1f} %" if r.get("prediction_error") is not None else ""
        predicted = f"{r['predicted_mib']:.0f}" if r.get("predicted_mib") is not None else ""
        body.append([*setting(r), f"{r['peak_mib']:.0f}", predicted, error, f"{r['time_ms']:.1f}"]
                    + ([f"{again[setting(r)]:.1f}" if setting(r) in again else ""] if again else []))
    out = [f"**Training step** (`bench/bench_training_step.py`): {data.get('scale', '')}; peak = "
           f"{data.get('peak_measure', '')}." + (" The last column: the same benchmark run again minutes later on "
                                                 "the same machine." if again else ""), "",
           table(["crop", "variant", "precision", "checkpointing", "peak MiB", "predicted MiB", "model error",
                  "step ms"] + (["step ms, rerun"] if again else []), body)]
    comparison = data.get("fast_vs_reference") or []
    if comparison:
        lower = all(c["fast_lower"] for c in comparison)
        out += ["", f"Fast vs reference ops, same setting: the fast path uses "
                f"{'less memory at every setting measured' if lower else 'NOT less memory everywhere'}.", "",
                table(["crop", "precision", "checkpointing", "reference MiB", "fast MiB", "saved MiB",
                       "step speed-up"],
                      [[c["crop"], c["precision"], c["checkpointing"], f"{c['reference_mib']:.0f}",
                        f"{c['fast_mib']:.0f}", f"{c['saved_mib']:.0f}", f"{c['speedup']:.2f}x"] for c in comparison])]
    errors = [abs(r["prediction_error"]) for r in rows if r.get("prediction_error") is not None]
    if errors:
        out += ["", f"Memory model (`drsl_fast.memory_model`) against the measurements: largest error "
                f"{100 * max(errors):.1f} %, median {100 * sorted(errors)[len(errors) // 2]:.1f} %."]
    return "\n".join(out)


def overhead_section(data: Dict) -> str:
    """The paired overhead of a DRSL+ step over the DeepLab-v2 floor
    (bench/bench_step_overhead.py): one row per (crop, precision)."""
    rows, failed = {}, [r for r in data["results"] if "error" in r]
    for r in data["results"]:
        if "error" not in r:
            rows.setdefault((r["crop"], r["precision"]), {})[r["variant"]] = r

    def over(r):
        return (f"{100 * r['overhead']:+.1f} % ({100 * r['overhead_q1']:+.1f} to {100 * r['overhead_q3']:+.1f})"
                if r else "")

    others = list(dict.fromkeys(name for v in rows.values() for name in v if name != "floor"))
    baseline = {name: r.get("over", "floor") for v in rows.values() for name, r in v.items()}
    columns = ["DRSL+ over the floor" if name == "DRSL+ fast" else
               f"{name.replace('DRSL+ fast, ', '')}, over the floor" if baseline[name] == "floor" else
               f"{name.replace('DRSL+ fast, ', 'DRSL+, ')}, over the floor with the same head"
               for name in others]
    columns = [c if name in step_overhead.VARIANTS else f"{c} (a variant since removed)"
               for c, name in zip(columns, others)]
    body = [[crop, precision, f"{v['floor']['median_ms']:.1f}", f"{v['DRSL+ fast']['median_ms']:.1f}"]
            + [over(v.get(name)) for name in others]
            for (crop, precision), v in rows.items() if "floor" in v and "DRSL+ fast" in v]
    not_captured = [f"Not captured: {r['crop']} {r['precision']} {r['variant']}: {r['error']}" for r in failed]
    graphs = data.get("cuda_graphs", False)
    return "\n".join([
        f"**DRSL+ step over the floor, paired{', each step one CUDA graph' if graphs else ''}** "
        f"(`bench/bench_step_overhead.py{' --cuda-graphs' if graphs else ''}`): {data.get('scale', '')}; the "
        f"variants built in one process and timed in {data.get('rounds', '?')} alternating rounds of "
        f"{data.get('steps_per_round', '?')} steps; overhead = median over rounds of DRSL+ / floor - 1 "
        "(quartiles in brackets). The unpaired step times of the training-step table drift (by several ms on the H200) "
        "between variants timed minutes apart; this is the comparison to read.", "",
        table(["crop", "precision", "floor ms", "DRSL+ ms"] + columns, body)] + ([""] + not_captured if failed else []))


def head_convs_section(data: Dict) -> str:
    """The layer4 head's summed dilated convolutions, forward and backward
    (bench/bench_head_convs.py), autotuner off: ms per method for the
    floor's 19 channels, the embedding block's 64 and DRSL+'s 83."""
    rows = [r for r in data["results"] if not r["autotune"] and r["out_channels"] == r["used_channels"]]
    methods = list(dict.fromkeys(r.get("method", "cudnn") for r in rows))
    channels = sorted({r["out_channels"] for r in rows if r.get("method", "cudnn") != "cudnn"}) or [19, 64, 83]
    cells = {(r["crop"], r["precision"], r.get("method", "cudnn"), r["out_channels"]): r for r in rows}
    groups = list(dict.fromkeys((r["crop"], r["precision"]) for r in rows))
    header = ["crop", "precision"] + [f"{c} ch, {m}" for c in channels for m in methods]
    body = [[crop, precision] + [f"{cells[key]['time_ms']:.2f}" if key in cells else "" for key in
                                 ((crop, precision, m, c) for c in channels for m in methods)]
            for crop, precision in groups]
    return "\n".join([
        "**The head's convolutions** (`bench/bench_head_convs.py`): the four summed dilated 3x3 convolutions on "
        "layer4, forward and both gradients, ms (median; batch 2, cuDNN's autotuner off), as convolutions "
        "(cudnn) or as one matrix product (a 1x1 convolution) and a sum of the taps' planes at their offsets "
        "(gemm: the sum the network runs, `drsl_fast/models/tap_gemm.py` at the run's commit, which "
        "bench/NOTES.md names: its form has changed between runs; gemm-fold: one col2im per dilation, "
        "gemm-bmm: a batched matrix product, since removed). 19 channels: the "
        "floor's classifier; 64: the embedding block; 83: both, as DRSL+ runs them.", "", table(header, body)])


def tap_sum_section(data: Dict) -> str:
    """The shifted sum of the head's taps alone (bench/bench_tap_sum.py): ms per
    method and direction, with the Triton kernels' share of the copy bandwidth."""
    cells = {(r["crop"], r["precision"], r["channels"], r["direction"], r["method"]): r for r in data["results"]}
    keys = list(dict.fromkeys(k[:4] for k in cells))
    methods = list(dict.fromkeys(k[4] for k in cells))

    def cell(r):
        share = f" ({100 * r['copy_share']:.0f} %)" if r.get("copy_share") else ""
        return f"{r['time_ms']:.3f}{share}"

    body = [list(k) + [cell(cells[k + (m,)]) if k + (m,) in cells else "" for m in methods] for k in keys]
    return "\n".join([
        "**The shifted sum of the head's taps** (`bench/bench_tap_sum.py`): what follows the matrix product when "
        "the classifiers run as one, ms (median) with the share of the card's copy bandwidth in brackets (bytes: "
        "the taps, the sum and its gradient, each once per direction; whole calls timed, so rows under about 0.1 ms "
        "are bound by the Python launch); fold: one col2im per dilation.", "",
        table(["crop", "precision", "channels", "direction"] + [f"{m} ms" for m in methods], body)])


def overhead_runs_section(runs: List[Dict]) -> str:
    """DRSL+ over the floor in every eager paired run kept for one device
    (step_overhead, step_overhead_run2, ...): the spread between runs, which
    one run's quartiles do not show."""
    cells: Dict[tuple, Dict[int, str]] = {}
    for i, data in enumerate(runs):
        for r in data["results"]:
            if r.get("variant") == "DRSL+ fast" and "overhead" in r:
                cells.setdefault((r["crop"], r["precision"]), {})[i] = f"{100 * r['overhead']:+.1f} %"
    header = ["crop", "precision"] + [f"run {i + 1} ({data.get('rounds', '?')} rounds)" for i, data in
                                      enumerate(runs)]
    return "\n".join([
        f"**The same paired measure, run {len(runs)} times on this device** (DRSL+ over the floor, median of "
        "rounds; each run a fresh process):", "",
        table(header, [[crop, precision] + [v.get(i, "") for i in range(len(runs))]
                       for (crop, precision), v in cells.items()])])


# GTX 1080 Ti datasheet rates (fp32 FMA, memory), for the estimate of the CUDA
# backend there (the only one it runs).
GTX_1080TI_FP32_TFLOPS = 11.3
GTX_1080TI_GBS = 484.0


FAST_METHODS = ("cpu", "cuda", "cuda-fp32", "cuda-tc-backward", "cuda-tc-forward", "triton")


def rate(value: float) -> str:
    """A measured rate with three significant digits, and no exponent."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def duration(us: float) -> str:
    return f"{us:.0f} us" if us < 1000 else f"{us / 1e3:.1f} ms"


def mode_distance_section(data: Dict, ceilings: Optional[Dict] = None) -> str:
    """The realistic size's rows, speed-ups against cdist + min, achieved
    rates, the roofline from the measured ceilings and, on a GPU, the
    GTX 1080 Ti estimate of the CUDA backend."""
    realistic = [r for r in data["results"] if (r.get("size") or r).get("H") == 256
                 and (r.get("size") or r).get("W") == 256]
    rows = [r for r in realistic if "time_ms" in r]
    cdist = {r["pass"]: r["time_ms"] for r in rows if r["method"] == "cdist"}
    body = [[r["pass"], r["method"], f"{r['time_ms']:.3f}", f"{r['peak_extra_mib']:.1f}",
             f"{cdist[r['pass']] / r['time_ms']:.1f}x" if r["pass"] in cdist else "",
             f"{r['bandwidth_gbs']:.3g}" if r.get("bandwidth_gbs") is not None else "",
             f"{r['gflops']:.3g}" if r.get("gflops") is not None else ""] for r in rows]
    triton = any(r["method"].startswith("triton") for r in rows)
    out = ("**Mode distance** (`bench/bench_mode_distance.py`), B=2, D=64, C=19, M=3, 256x256 map (512x512 crop), "
           "fp32" + (" (the triton rows: the Triton kernels at the run's commit, which bench/NOTES.md names; they "
                     "have changed between runs)" if triton else "")
           + ":\n\n" + table(["pass", "method", "ms", "peak extra MiB", "vs cdist + min", "achieved GB/s",
                                "achieved GFLOP/s"], body))
    failed: Dict[tuple, List[str]] = {}  # failures, not the skips the benchmark makes by design
    for r in realistic:
        if "time_ms" not in r and not r.get("error", "").startswith("skipped"):
            failed.setdefault((r["method"], r.get("error", "no result")), []).append(r["pass"])
    if failed:
        out += "\n\nNot measured:\n\n" + "\n".join(f"- {method} ({', '.join(passes)}): {error}"
                                                   for (method, error), passes in failed.items())
    if ceilings and rows:
        lines = []
        for pass_name in ("forward", "forward+backward"):
            r = next((r for r in rows if r["pass"] == pass_name), None)
            if r is None or r.get("gflop") is None:
                continue
            fast = min((c for c in rows if c["pass"] == pass_name and c["method"] in FAST_METHODS),
                       key=lambda c: c["time_ms"], default=None)
            memory_us = r["roofline_mib"] * 2**20 / (ceilings["copy_gbs"] * 1e3)
            compute_us = r["gflop"] * 1e6 / (ceilings["fp32_tflops"] * 1e3)
            lines.append(f"- {pass_name}: {r['roofline_mib']:.1f} MiB at the measured {rate(ceilings['copy_gbs'])} GB/s "
                         f"= {duration(memory_us)}; {r['gflop']:.2f} GFLOP at torch's measured fp32 matrix "
                         f"product, {rate(ceilings['fp32_tflops'])} TFLOP/s, = {duration(compute_us)}" + (
                             f"; the fastest drsl_fast backend here, {fast['method']}, takes "
                             f"{duration(1e3 * fast['time_ms'])}." if fast else "."))
            # the fp32 kernels are the ones a GTX 1080 Ti runs: "cuda", or "cuda-fp32" in results of versions
            # whose default on GPUs with tensor cores was the tensor-core backward
            cuda = next((c for method in ("cuda-fp32", "cuda") for c in rows
                         if c["pass"] == pass_name and c["method"] == method), None)
            if cuda is not None:
                fraction = cuda["gflop"] / cuda["time_ms"] / ceilings["fp32_tflops"]  # of the fp32 peak
                estimate_ms = max(cuda["gflop"] / (GTX_1080TI_FP32_TFLOPS * fraction),
                                  cuda["roofline_mib"] * 2**20 / (GTX_1080TI_GBS * 1e6))
                lines.append(f"  GTX 1080 Ti estimate of the CUDA backend: {estimate_ms:.2f} ms (its fp32 rate, "
                             f"{GTX_1080TI_FP32_TFLOPS} TFLOP/s, at the fraction of peak achieved here, "
                             f"{100 * fraction:.0f} %, host time scaled too: an upper estimate; at least its bytes at "
                             f"{GTX_1080TI_GBS:.0f} GB/s).")
        out += "\n\nRoofline (the least time the fastest possible op could take):\n\n" + "\n".join(lines)
    return out


def losses_section(data: Dict) -> str:
    body = [[r["method"], f"{r['time_ms']:.2f}", f"{r['peak_extra_mib']:.1f}", r.get("host_syncs", "")]
            for r in data["results"] if "time_ms" in r]
    return ("**DRSL+ loss step** (`bench/bench_mmdl_losses.py`), sampling + Eq. 4/5/6, forward+backward, "
            "256x256 maps:\n\n" + table(["method", "ms", "peak extra MiB", "host syncs"], body))


def pseudo_label_section(data: Dict) -> str:
    rows = data.get("thresholds") or [r for r in data["results"] if r.get("part") == "thresholds"]
    base = next((r for r in rows if r["method"] == "generate_only" and "peak_mib" in r), {})
    body = []
    for r in rows:
        if r["method"] == "generate_only" or "time_s" not in r:
            continue
        images_per_s = r.get("images_per_s") or data.get("images", 0) / r["time_s"]
        host = r.get("host_peak_mib")
        peak = max(r["peak_mib"] - base.get("peak_mib", 0.0), 0.0)
        host = None if host is None else max(host - base.get("host_peak_mib", 0.0), 0.0)
        body.append([r["method"], f"{r['time_s']:.3g}", f"{images_per_s:.1f}", f"{peak:.1f}",
                     f"{host:.1f}" if host is not None else ""])
    return (f"**Pseudo-label pass** (`bench/bench_pseudo_labels.py`), {data.get('images', '?')} simulated target "
            "images of 19x512x1024 probabilities, class-balanced thresholds (portion 0.5); sort_all and crst_lists "
            "are the sort-and-cache ways of docs/method.md §5:\n\n"
            + table(["method", "s", "images/s", "peak extra MiB", "host peak extra MiB"], body)
            + "\n\nPeak memory is above a pass that only generates the images.")


def plot(sets: Dict[str, Dict[str, Dict]], path: str) -> Optional[str]:
    """Bars of measured peak per training-step variant, markers for the
    prediction, one panel per machine and crop."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the training-step memory plot is left out (pip install matplotlib)",
              file=sys.stderr)
        return None
    panels = []
    for label, benches in sets.items():
        data = benches.get("training_step")
        if not data:
            continue
        rows = [r for r in data["results"] if "peak_mib" in r]
        for crop in sorted({r["crop"] for r in rows}):
            panels.append((f"{data['device'].split(',')[0]}\n{crop}", [r for r in rows if r["crop"] == crop]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    colours = {"DeepLab-v2 floor": "#999999", "DRSL+ reference": "#d62728", "DRSL+ fast": "#2ca02c"}
    for ax, (title, rows) in zip(axes[0], panels):
        names = [f"{r['variant'].replace('DRSL+ ', '')}\n{r['precision']} ckpt {r['checkpointing']}" for r in rows]
        x = range(len(rows))
        ax.bar(x, [r["peak_mib"] / 1024 for r in rows], color=[colours.get(r["variant"], "#1f77b4") for r in rows])
        predicted = [(i, r["predicted_mib"] / 1024) for i, r in enumerate(rows) if r.get("predicted_mib")]
        if predicted:
            ax.scatter(*zip(*predicted), marker="_", s=400, color="black", label="memory model", zorder=3)
            ax.legend(loc="upper right")
        if "H100" in title or "GPU" in title or "NVIDIA" in title:
            ax.axhline(10.5, color="#1f77b4", linestyle="--", linewidth=1)
            ax.text(len(rows) - 0.5, 10.6, "1080 Ti: 11 GiB - 0.5 GiB", ha="right", fontsize=8, color="#1f77b4")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("peak memory of one step, GiB")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(sets: Dict[str, Dict[str, Dict]], plot_name: Optional[str]) -> str:
    out = ["## Performance", "",
           "Generated by `python bench/report.py` from `bench/results/` (JSON, CSV and markdown of every run "
           "there). GPU results come from `bash bench/gpu_suite.sh`, CPU results from the benchmark scripts run "
           "with `--device cpu`.", ""]
    if plot_name:
        out += [f"![training-step peak memory]({plot_name})", ""]
    for label, benches in sets.items():
        any_data = next(iter(benches.values()))
        machine = any_data.get("device", label)
        env = f"; torch {any_data['torch']}" if "torch" in any_data else ""
        out += [f"### {machine}{env}", ""]
        if "training_step" in benches:
            out += [training_section(benches["training_step"], benches.get("training_step_rerun")), ""]
        for name in ("step_overhead", "step_overhead_graphs"):
            if name in benches:
                out += [overhead_section(benches[name]), ""]
        if "head_convs" in benches:
            out += [head_convs_section(benches["head_convs"]), ""]
        if "tap_sum" in benches:
            out += [tap_sum_section(benches["tap_sum"]), ""]
        runs = [benches[n] for n in sorted(benches, key=lambda n: (len(n), n))
                if n == "step_overhead" or n.startswith("step_overhead_run")]
        if len(runs) > 1:
            out += [overhead_runs_section(runs), ""]
        if "gtx_1080ti_verdict" in benches:
            verdict = benches["gtx_1080ti_verdict"]["markdown"].split("\n", 2)[-1].strip()
            out += ["**GTX 1080 Ti verdict** (`python -m drsl_fast.memory_model`; its error against measured GPU "
                    "steps is in the GPU training-step table):", "", verdict, ""]
        if "ceilings" in benches:
            c = benches["ceilings"]
            gpu = "tf32_tflops" in c
            products = f"fp32 {rate(c['fp32_tflops'])}" + (
                f", tf32 {c['tf32_tflops']:.0f}, bf16 {c['bf16_tflops']:.0f}" if gpu else "")
            out += [f"**Ceilings measured on this {'card' if gpu else 'machine'}** (`bench/ceilings.py`): copy "
                    f"{rate(c['copy_gbs'])} GB/s (read + write), matrix products {products} TFLOP/s.", ""]
        if "mode_distance" in benches:
            out += [mode_distance_section(benches["mode_distance"], benches.get("ceilings")), ""]
        if "mmdl_losses" in benches:
            out += [losses_section(benches["mmdl_losses"]), ""]
        if "pseudo_labels" in benches:
            out += [pseudo_label_section(benches["pseudo_labels"]), ""]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=[RESULTS],
                        help="result roots (bench/results) or device folders (bench/results/<device>)")
    parser.add_argument("--out", default=None, help="markdown file (default <results>/PERFORMANCE.md)")
    args = parser.parse_args()
    out = args.out or os.path.join(args.results[0], "PERFORMANCE.md")
    sets = result_sets(args.results)
    png = plot(sets, os.path.join(os.path.dirname(os.path.abspath(out)), "training_step_memory.png"))
    text = render(sets, os.path.basename(png) if png else None)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
