"""bench/bench_tap_sum.py, the shifted sum of the head's taps timed alone: a
quick run on the CPU (so that a lent GPU's time is not what finds a broken
script), and the bytes it rates each method by."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_tap_sum as tap_sum  # noqa: E402


def test_a_quick_run_times_both_directions_of_every_channel_count():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_tap_sum.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0, run.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in run.stdout.splitlines()
            if line.startswith("| 64x64 | fp32 |")]
    assert [(int(r[2]), r[3], r[4]) for r in rows] == [
        (c, "fold", d) for c in tap_sum.CHANNELS for d in ("forward", "forward+backward")]


def test_every_method_agrees_and_the_bytes_are_the_taps_and_the_sum(monkeypatch):
    monkeypatch.setattr(tap_sum.harness, "median_ms", lambda *args, **kwargs: dict(time_ms=1.0))
    rows = tap_sum.measure("cpu", (64, 64), 18, 0.25, [("fp32", torch.float32)], repeats=1, copy_gbs=100.0)
    _, h, w = tap_sum.feature_shape((64, 64), 18, 0.25)
    assert {r["method"] for r in rows} == set(tap_sum.methods("cpu"))
    for r in rows:
        one_pass = 4 * 2 * r["channels"] * h * w * (4 * 9 + 1)  # fp32, batch 2: the taps (4 dilations) and the sum
        assert r["bytes"] == one_pass * (1 if r["direction"] == "forward" else 2)
        assert r["gbs"] == r["bytes"] / 1e6 and r["copy_share"] == r["gbs"] / 100.0
        assert r["max_rel_diff"] < 1e-6


def test_the_report_puts_both_methods_side_by_side():
    import report

    def row(method, direction, ms, share=None):
        return dict(crop="512x512", precision="fp32", channels=83, method=method, direction=direction, time_ms=ms,
                    copy_share=share)

    lines = report.tap_sum_section(dict(results=[row("triton", "forward", 0.1, 0.24), row("fold", "forward", 2.0),
                                                 row("triton", "forward+backward", 0.4, 0.13)])).splitlines()
    assert "| crop | precision | channels | direction | triton ms | fold ms |" in lines
    assert "| 512x512 | fp32 | 83 | forward | 0.100 (24 %) | 2.000 |" in lines
    assert "| 512x512 | fp32 | 83 | forward+backward | 0.400 (13 %) |  |" in lines
