"""bench/bench_head_convs.py, the head's convolutions timed by their number of
output channels: a quick run on the CPU, so that a lent GPU's time is not
what finds a broken script, and the FLOP count it rates them by."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_head_convs as head_convs  # noqa: E402


def test_a_quick_run_times_every_channel_count():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_head_convs.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| 64x64 | fp32 | off |")]
    assert [(cells[4].strip(), int(cells[5])) for cells in rows] == (
        [("cudnn", c) for c in head_convs.CHANNELS] + [(m, c) for m in head_convs.TAP_SUM_OF for c in head_convs.GEMM_CHANNELS])
    for cells in rows:  # the matrix product agrees with the convolutions (fp32 on the CPU)
        assert (float(cells[11]) < 1e-5) if cells[4].strip() in head_convs.TAP_SUM_OF else not cells[11].strip()


def test_the_rate_counts_three_products_per_dilation():
    benchmark = torch.backends.cudnn.benchmark
    rows = head_convs.measure("cpu", (64, 64), 18, 0.25, [("fp32", None)], (False,), repeats=1)
    assert torch.backends.cudnn.benchmark == benchmark  # the autotuner's setting restored
    channels, h, w = head_convs.feature_shape((64, 64), 18, 0.25)
    one_product = 2 * 2 * h * w * channels * 9  # batch 2, per output channel
    used = {19: 19, 32: 19, 64: 64, 83: 83, 88: 83, 96: 83, 128: 83}  # padded filters are not work done
    assert [r["used_channels"] for r in rows] == [used[c] for c in head_convs.CHANNELS
                                                  + len(head_convs.TAP_SUM_OF) * head_convs.GEMM_CHANNELS]
    for r in rows:
        assert r["flop_per_channel"] == 3 * 4 * one_product
        assert abs(r["used_tflops"] - r["tflops"] * r["used_channels"] / r["out_channels"]) < 1e-12 * r["tflops"]


def test_the_report_puts_each_method_beside_the_convolutions():
    import report

    def row(method, channels, ms, autotune=False, used=None):
        return dict(crop="512x512", precision="fp32", autotune=autotune, method=method, out_channels=channels,
                    used_channels=used or channels, time_ms=ms)

    results = [row("cudnn", 19, 3.0), row("cudnn", 83, 4.8), row("cudnn", 96, 4.6, used=83),
               row("cudnn", 83, 9.9, autotune=True), row("gemm", 19, 1.1), row("gemm", 83, 2.2)]
    lines = report.head_convs_section(dict(results=results)).splitlines()
    assert "| crop | precision | 19 ch, cudnn | 19 ch, gemm | 83 ch, cudnn | 83 ch, gemm |" in lines
    assert "| 512x512 | fp32 | 3.00 | 1.10 | 4.80 | 2.20 |" in lines  # padded rows and the autotuner's left out
