"""The shifted sum of the head's taps alone (Eq. 1 of
drsl_fast/models/tap_gemm.py, what follows the matrix product when the
classifiers run as one): the Triton kernels against torch's col2im (fold, one
per dilation, what a user of torch would write), forward and forward +
backward, on the taps of the layer4 map of each crop (batch 2, 4 dilations,
19 channels: the floor's classifier; 83: DRSL+'s classifier and embedding
block), fp32 and bf16.

The physical limit is memory: the forward reads the taps (B 4 C 9 H W
values) and writes the sum (B C H W); the backward reads the output's
gradient and writes the taps' gradient. Each row gives those bytes, the
achieved rate and its share of the card's copy bandwidth (bench/ceilings.py).
Each row times whole calls (CUDA events around one synchronised call, the
Python launch included): calls under about 0.1 ms are bound by that host
time, and their share of the bandwidth is not the kernel's (a profile of the
training step gives the kernels' device time).

    python bench/bench_tap_sum.py --device cuda   # -> bench/results/<device>/tap_sum.*
    python bench/bench_tap_sum.py --quick         # small, on the CPU (fold only); prints only
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_head_convs import feature_shape, load_ceilings  # noqa: E402

from drsl_fast.backends import why_unavailable  # noqa: E402
from drsl_fast.models.deeplab import CLASSIFIER_DILATIONS  # noqa: E402
from drsl_fast.models.tap_gemm import summed_taps  # noqa: E402

CHANNELS = (19, 83)
FIELDS = ["crop", "precision", "channels", "method", "direction", "time_ms", "bytes", "gbs", "copy_share",
          "min_ms", "max_ms", "runs", "max_rel_diff"]


def methods(device: str):
    return [m for m in ("triton", "fold") if m == "fold" or why_unavailable(m, torch.device(device)) is None]


def measure(device: str, crop, depth: int, width: float, precisions, repeats: int, copy_gbs=None):
    _, h, w = feature_shape(crop, depth, width)
    rows = []
    for precision, dtype in precisions:
        for channels in CHANNELS:
            generator = torch.Generator(device).manual_seed(channels)
            taps = torch.randn(2, len(CLASSIFIER_DILATIONS), channels, 9, h, w, generator=generator, device=device,
                               dtype=dtype).requires_grad_()
            grad = torch.randn(2, channels, h, w, generator=generator, device=device, dtype=dtype)
            want = None
            for method in methods(device):
                def forward():
                    with torch.no_grad():
                        return summed_taps(taps, CLASSIFIER_DILATIONS, method)

                def forward_backward():
                    return torch.autograd.grad(summed_taps(taps, CLASSIFIER_DILATIONS, method), taps, grad)[0]

                got = forward().float()
                want = got if want is None else want
                diff = float((got - want).abs().max() / want.abs().max())
                sizes = (taps.numel() + grad.numel()) * taps.element_size()
                for direction, step, nbytes in (("forward", forward, sizes), ("forward+backward", forward_backward,
                                                                               2 * sizes)):
                    timing = harness.median_ms(step, device, repeats, budget_s=5.0, warmup=3)
                    gbs = harness.bandwidth_gbs(nbytes, timing["time_ms"])
                    rows.append(dict(crop=f"{crop[0]}x{crop[1]}", precision=precision, channels=channels,
                                     method=method, direction=direction, bytes=nbytes, gbs=gbs,
                                     copy_share=gbs / copy_gbs if copy_gbs else None, max_rel_diff=diff, **timing))
                    print({k: rows[-1][k] for k in ("crop", "precision", "channels", "method", "direction",
                                                    "time_ms", "gbs")}, flush=True)
    return rows


def markdown(rows):
    return harness.markdown_table(
        ["crop", "precision", "channels", "method", "direction", "ms", "MB moved", "GB/s", "share of copy bandwidth",
         "largest difference to the first method"],
        [[r["crop"], r["precision"], r["channels"], r["method"], r["direction"], f"{r['time_ms']:.3f}",
          f"{r['bytes'] / 1e6:.1f}", f"{r['gbs']:.0f}", f"{100 * r['copy_share']:.0f} %" if r["copy_share"] else "-",
          f"{r['max_rel_diff']:.1e}"] for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_head_arguments(parser, "tap_sum", repeats=30)
    args = parser.parse_args()
    device = "cpu" if args.quick else harness.default_device(args.device)
    crops, depth, width = ([(64, 64)], 18, 0.25) if args.quick else ([(512, 512), (512, 1024)], 101, 1.0)
    precisions = [("fp32", torch.float32), ("bf16", torch.bfloat16)] if device == "cuda" else [("fp32", torch.float32)]
    stem = args.out or os.path.join(harness.RESULTS_DIR, harness.device_slug(device), "tap_sum")
    ceilings = load_ceilings(os.path.dirname(stem), device) if device == "cuda" else None
    rows = [r for crop in crops for r in measure(device, crop, depth, width, precisions,
                                                 3 if args.quick else args.repeats, (ceilings or {}).get("copy_gbs"))]
    table = markdown(rows)
    print(table)
    if args.quick:
        return
    body = (f"The taps of the layer4 map of each crop (batch 2, dilations "
            f"{', '.join(map(str, CLASSIFIER_DILATIONS))}), summed at their offsets: Triton kernels against one "
            f"col2im per dilation (fold); medians of up to {args.repeats} runs. MB moved: the taps, the sum and "
            f"its gradient read or written once each (twice for forward+backward). Copy bandwidth: "
            f"bench/ceilings.py on this card.\n\n{table}\n")
    harness.write_results(stem, harness.metadata(device), rows, FIELDS, "The shifted sum of the head's taps", body)


if __name__ == "__main__":
    main()
