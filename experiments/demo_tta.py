"""Test-time augmentation on the demo (docs/method.md §9): mIoU on target val
and pseudo-label accuracy with and without TTA, and the cost of the
pseudo-label pass (images/s, peak memory), for the source model and the last
DRSL+ model of a finished demo run; optionally the peak memory of one
ResNet-101 forward at 1024x2048 whole and in sliding windows.

    python experiments/demo_tta.py              # runs/demo, a finished demo -> experiments/results/demo_tta.{json,md}
    python experiments/demo_tta.py --run runs/demo --windows   # also the ResNet-101 window check (minutes)

The views are the defaults of ``inference.*`` (scales 0.75, 1, 1.25, each also
mirrored), chosen before any measurement. The pseudo-label pass of a model is
the one that model starts a round with: round 1 (portion 0.2) for the source
model, round 3 (portion 0.3) for DRSL+ after round 2; its labels are written
under a temporary folder. Peak memory is this process's resident-set
high-water mark above its size before the pass (Linux /proc), on the CPU.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from drsl_fast.models import DeepLabV2
from drsl_fast.sliding_window import sliding_window_logits
from drsl_fast.train.evaluate import evaluate, main_protocol
from drsl_fast.train.inference import views
from drsl_fast.train.label_pass import make_pseudo_labels
from drsl_fast.train.log import quiet_log
from drsl_fast.train.settings import Settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_runs  # noqa: E402

MODELS = (("source only", "source", 0), ("DRSL+ round 2", "drsl_plus/round_2", 2))
MIB = 2 ** 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(function):
    """(result, seconds, peak resident memory above the start in MiB) of ``function()``."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := current RSS
    before = rss_bytes()
    began = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - began
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    return result, seconds, (peak - before) / MIB


def cpu_name() -> str:
    with open("/proc/cpuinfo") as handle:
        return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                    platform.machine())


def model_rows(run: str, config, runtime, scratch: str):
    rows = []
    log = quiet_log()
    plain = Settings.of(config)
    for title, stage, round_index in MODELS:
        network = demo_runs.trained_stage(run, stage, plain)
        row = {"model": title, "weights": os.path.join(run, stage, "model.pt")}
        for tta in (False, True):
            key = "tta" if tta else "single"
            reports, seconds, _ = measured(lambda: evaluate(runtime, plain, network, log, title, tta=tta))
            row[f"miou_{key}"] = 100 * reports[main_protocol(plain.data)].miou
            row[f"evaluate_s_{key}"] = seconds
            settings = Settings.of(dict(config, pseudo_labels=dict(config["pseudo_labels"], tta=tta)))
            directory = os.path.join(scratch, stage.replace("/", "_"), key)
            summary, seconds, peak = measured(
                lambda: make_pseudo_labels(runtime, settings, network, directory, round_index, log))
            row[f"pseudo_{key}"] = {"portion": summary["portion"], "accuracy": 100 * summary["accuracy"],
                                    "coverage": 100 * summary["coverage"], "seconds": seconds,
                                    "images_per_s": summary["images"] / seconds, "peak_mib": peak}
            print(f"{title} {key}: mIoU {row[f'miou_{key}']:.1f}, pseudo-labels {row[f'pseudo_{key}']}", flush=True)
        rows.append(row)
    return rows


def window_rows():
    """One forward of DeepLab-v2 ResNet-101 (random weights, fp32) on a
    1024x2048 image: whole, and in 512x1024 windows."""
    network = DeepLabV2(19, depth=101).eval()
    image = torch.randn(1, 3, 1024, 2048)

    def forward(x):
        return network(x).logits

    rows = []
    for name, call in (("whole 1024x2048", lambda: forward(image)),
                       ("windows 512x1024, overlap 0",
                        lambda: sliding_window_logits(forward, image, (512, 1024), 0.0))):
        with torch.no_grad():
            _, seconds, peak = measured(call)
        rows.append({"input": name, "seconds": seconds, "peak_mib": peak})
        print(rows[-1], flush=True)
    return rows


def markdown(result) -> str:
    lines = [
        "# Test-time augmentation on the demo",
        "",
        f"`{result['command']}` on {result['machine']}, {result['threads']} threads, torch {result['torch']}; "
        f"run `{result['run']}` (seed {result['seed']}; its source model scores "
        f"{result['models'][0]['miou_single']:.1f} mIoU single-scale); TTA views {result['views']}.",
        "",
        "| model | mIoU single-scale | mIoU TTA | pseudo-label portion | accuracy % single | accuracy % TTA "
        "| coverage % single | coverage % TTA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["models"]:
        single, tta = row["pseudo_single"], row["pseudo_tta"]
        lines.append(f"| {row['model']} | {row['miou_single']:.1f} | {row['miou_tta']:.1f} | {single['portion']:.2f} "
                     f"| {single['accuracy']:.1f} | {tta['accuracy']:.1f} | {single['coverage']:.1f} "
                     f"| {tta['coverage']:.1f} |")
    lines += ["", "The pseudo-label pass (two passes over the target training images, labels written as PNGs):", "",
              "| model | views | s | images/s | peak memory MiB |", "|---|---|---|---|---|"]
    for row in result["models"]:
        for key, name in (("pseudo_single", "1"), ("pseudo_tta", "6 (TTA)")):
            p = row[key]
            lines.append(f"| {row['model']} | {name} | {p['seconds']:.1f} | {p['images_per_s']:.1f} "
                         f"| {p['peak_mib']:.0f} |")
    if result.get("windows"):
        lines += ["", "DeepLab-v2 ResNet-101 (random weights, fp32, CPU), one forward of a 1024x2048 image:", "",
                  "| input | s | peak memory MiB |", "|---|---|---|"]
        lines += [f"| {w['input']} | {w['seconds']:.1f} | {w['peak_mib']:.0f} |" for w in result["windows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a finished demo run (make demo)")
    parser.add_argument("--out", default="experiments/results/demo_tta", help="results path without extension")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", action="store_true", help="also the ResNet-101 sliding-window check")
    args = parser.parse_args(argv)
    config, settings, runtime = demo_runs.open_run(args.run, args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        config["output_dir"] = scratch
        rows = model_rows(args.run, config, runtime, scratch)
    result = {
        "command": "python experiments/demo_tta.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": cpu_name(), "threads": args.threads,
        "torch": torch.__version__, "run": args.run, "seed": config["seed"],
        "views": views(settings.inference, True),
        "models": rows, "windows": window_rows() if args.windows else None,
    }
    with open(args.out + ".json", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as handle:
        handle.write(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
