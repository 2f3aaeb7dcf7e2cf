"""The summed dilated 3x3 convolutions on the layer4 features, forward and
backward, by their number of output channels: 19 (DeepLab-v2's classifier,
all the floor has), 64 (the MMDL-FR embedding block alone), 83 (both as one
convolution per dilation, drsl_fast.models.deeplab.shared_input_convs, what
a DRSL+ step runs), and padded counts: 19 to 32, 83 to 88, 96 and 128
(padding with zero filters would take the same time as the random ones here);
and 19, 64 and 83 channels computed as one matrix product (a 1x1
convolution) and a shifted sum of its taps (drsl_fast/models/tap_gemm.py,
which the network runs with DeepLabV2.head_as_gemm): method "gemm" with the
sum the network runs (the Triton kernels on a GPU that runs them, else
fold), "gemm-fold" with one col2im per dilation; each checked against the
convolutions on the same inputs first (the largest difference of the
output and of the input's gradient, relative to the largest value of
each).

Why: the ninth H200 run's profile of the 512x512 fp32 step
(bench/results/NVIDIA_H200/training_step_profile.md and bench/NOTES.md) ran
the 83-channel convolutions at 89 TFLOP/s and the floor's 19-channel ones at
36, on tf32 kernels for 4-aligned channels, where the card's tf32 product
rate is 399. Whether an output-channel count the libraries tile better pays
for its extra filters is a measurement, made here in one process for every
count, with cuDNN's autotuner off (as the training loop runs) and on.

Each row (fp32: cuDNN's default, tf32 tensor cores; bf16: under autocast):
the four convolutions summed (batch 2: one source and one target
image, the layer4 map of the crop), the gradient of the input and of the
weights and biases, timed together (median of CUDA events); the rate counts
the FLOPs of the row's own channels (3 products of 2 N H W Cin 9 Cout each:
forward, input gradient, weight gradient) and, for the padded rows, those
of the channels that are used (19 or 83).

    python bench/bench_head_convs.py --device cuda   # -> bench/results/<device>/head_convs.*
    python bench/bench_head_convs.py --quick         # small, on the CPU; prints only
"""
import argparse
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from drsl_fast.models.deeplab import CLASSIFIER_DILATIONS  # noqa: E402
from drsl_fast.models.tap_gemm import resolve_tap_sum, summed_dilated_convs_as_gemm  # noqa: E402

CHANNELS = (19, 32, 64, 83, 88, 96, 128)
GEMM_CHANNELS = (19, 64, 83)
TAP_SUM_OF = {"gemm": "auto", "gemm-fold": "fold"}  # method -> summed_dilated_convs_as_gemm's tap_sum
USED_OF = {32: 19, 88: 83, 96: 83, 128: 83}  # a padded count: the channels that are used (19 classes; + 64 embedding)
FIELDS = ["crop", "precision", "autotune", "method", "out_channels", "used_channels", "time_ms", "tflops", "used_tflops",
          "flop_per_channel", "min_ms", "max_ms", "runs", "max_rel_diff"]


def summed_tap_method(device: str) -> str:
    """How method "gemm" sums the taps on ``device``: triton or fold."""
    return resolve_tap_sum("auto", torch.device(device))


def feature_shape(crop, depth: int, width: float):
    """(channels, h, w) of layer4 for a crop, from the network itself (on the meta device)."""
    from drsl_fast.models import DeepLabV2

    backbone = DeepLabV2(19, depth=depth, width=width).backbone.to("meta")
    return tuple(backbone(torch.empty(1, 3, *crop, device="meta")).layer4.shape[1:])


def convs_step(x, out_channels: int, dtype, method: str = "cudnn"):
    """One forward and backward of the summed dilated convolutions with
    ``out_channels`` filters each (fp32 weights, autocast to ``dtype``), as
    convolutions ("cudnn") or one matrix product (TAP_SUM_OF); the step
    returns the output and the input's gradient."""
    generator = torch.Generator(x.device).manual_seed(0)
    weights = [(0.01 * torch.randn(out_channels, x.shape[1], 3, 3, generator=generator, device=x.device))
               .requires_grad_() for _ in CLASSIFIER_DILATIONS]
    biases = [torch.zeros(out_channels, device=x.device, requires_grad=True) for _ in CLASSIFIER_DILATIONS]
    grad = torch.randn(x.shape[0], out_channels, *x.shape[2:], generator=generator, device=x.device)

    def step():
        with torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            if method in TAP_SUM_OF:
                out = summed_dilated_convs_as_gemm(x, weights, biases, CLASSIFIER_DILATIONS, TAP_SUM_OF[method])
            else:
                out = None
                for w, b, d in zip(weights, biases, CLASSIFIER_DILATIONS):
                    y = F.conv2d(x, w, b, padding=d, dilation=d)
                    out = y if out is None else out + y
        # the gradients returned, not accumulated: no extra pass over the input's gradient
        return out, torch.autograd.grad(out, [x, *weights, *biases], grad.to(out.dtype))[0]

    return step


def measure(device: str, crop, depth: int, width: float, precisions, autotunes, repeats: int):
    channels, h, w = feature_shape(crop, depth, width)
    x = torch.randn(2, channels, h, w, device=device, requires_grad=True)
    flop_per_channel = 3 * len(CLASSIFIER_DILATIONS) * 2 * x.shape[0] * h * w * channels * 9
    rows = []
    previous = torch.backends.cudnn.benchmark
    try:
        for precision, dtype in precisions:
            for autotune in autotunes:
                torch.backends.cudnn.benchmark = autotune
                rows += [measure_one(x, crop, precision, dtype, autotune, out_channels, flop_per_channel, device,
                                     repeats) for out_channels in CHANNELS]
                rows += [measure_one(x, crop, precision, dtype, autotune, out_channels, flop_per_channel, device,
                                     repeats, method) for method in TAP_SUM_OF for out_channels in GEMM_CHANNELS]
    finally:
        torch.backends.cudnn.benchmark = previous
    return rows


def measure_one(x, crop, precision: str, dtype, autotune: bool, out_channels: int, flop_per_channel: int, device,
                repeats: int, method: str = "cudnn"):
    """One row: the convolutions with ``out_channels`` filters, timed; for a
    matrix product, first compared with the convolutions."""
    step = convs_step(x, out_channels, dtype, method)
    extra = {}
    if method in TAP_SUM_OF:
        pairs = zip(step(), convs_step(x, out_channels, dtype)())
        extra["max_rel_diff"] = max(float((a - b).abs().max() / b.abs().max())
                                    for a, b in ((a.detach().float(), b.detach().float()) for a, b in pairs))
    timing = harness.median_ms(step, device, repeats, budget_s=10.0, warmup=3)
    used = USED_OF.get(out_channels, out_channels)
    row = dict(crop=f"{crop[0]}x{crop[1]}", precision=precision, autotune=autotune, method=method,
               out_channels=out_channels, **extra,
               used_channels=used, flop_per_channel=flop_per_channel, **timing,
               tflops=flop_per_channel * out_channels / timing["time_ms"] / 1e9,
               used_tflops=flop_per_channel * used / timing["time_ms"] / 1e9)
    print({k: row[k] for k in ("crop", "precision", "autotune", "method", "out_channels", "time_ms", "max_rel_diff")
           if k in row}, flush=True)
    return row


def markdown(rows, ceilings):
    def ceiling(precision):
        key = "bf16_tflops" if precision == "bf16" else "tf32_tflops"
        return ceilings.get(key) if ceilings else None

    def floor_ms(r):
        rate = ceiling(r["precision"])
        return f"{r['flop_per_channel'] * r['used_channels'] / rate / 1e9:.3f}" if rate else "-"

    return harness.markdown_table(
        ["crop", "precision", "cuDNN autotuner", "method", "output channels", "used", "ms", "TFLOP/s",
         "TFLOP/s of used channels", "ms at the product rate (used channels)", "largest difference to cudnn"],
        [[r["crop"], r["precision"], "on" if r["autotune"] else "off", r.get("method", "cudnn"), r["out_channels"],
          r["used_channels"], f"{r['time_ms']:.3f}", f"{r['tflops']:.1f}", f"{r['used_tflops']:.1f}", floor_ms(r),
          f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""] for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_head_arguments(parser, "head_convs", repeats=20)
    args = parser.parse_args()
    device = "cpu" if args.quick else harness.default_device(args.device)
    gpu = device == "cuda"
    if args.quick:
        crops, depth, width, repeats = [(64, 64)], 18, 0.25, 3
    else:
        crops, depth, width, repeats = [(512, 512), (512, 1024)], 101, 1.0, args.repeats
    precisions = [("fp32", None), ("bf16", torch.bfloat16)] if gpu else [("fp32", None)]
    autotunes = (False, True) if gpu else (False,)
    rows = [r for crop in crops for r in measure(device, crop, depth, width, precisions, autotunes, repeats)]
    stem = args.out or os.path.join(harness.RESULTS_DIR, harness.device_slug(device), "head_convs")
    ceilings = load_ceilings(os.path.dirname(stem), device)
    table = markdown(rows, ceilings)
    print(table)
    if args.quick:
        return
    body = (f"ResNet-{depth}'s layer4 map of each crop, batch 2; the four dilated 3x3 convolutions "
            f"(dilations {', '.join(map(str, CLASSIFIER_DILATIONS))}) summed, forward and both gradients, timed "
            f"together; medians of up to {repeats} runs. 19 output channels: the floor's classifier; 64: the "
            f"embedding block alone; 83: both as one convolution (a DRSL+ step); 32: 19 padded, 88, 96, 128: "
            f"83 padded (used: the channels that count as work); methods gemm and gemm-fold: one matrix "
            f"product (a 1x1 convolution) and the shifted sum of its taps, gemm's as the network runs it "
            f"({'Triton kernels' if summed_tap_method(device) == 'triton' else 'fold'}), gemm-fold's as one "
            f"col2im per dilation, with the largest difference to the convolutions relative to the largest "
            f"value. Product rate: bench/ceilings.py's tf32 or bf16 rate on this card.\n\n{table}\n")
    harness.write_results(stem, harness.metadata(device, depth=depth, width=width), rows, FIELDS,
                          "Head convolutions by output channels", body)


def load_ceilings(folder: str, device: str):
    """This card's bench/ceilings.py results: in ``folder`` (a GPU suite's run
    that measured them), else among the committed results of this device."""
    for path in (os.path.join(folder, "ceilings.json"),
                 os.path.join(harness.RESULTS_DIR, harness.device_slug(device), "ceilings.json")):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return None


if __name__ == "__main__":
    main()
