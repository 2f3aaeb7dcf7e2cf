"""bench/bench_step_overhead.py, the paired measure of the DRSL+ step's cost
over the DeepLab-v2 floor: its arithmetic on made-up times (a drift of the
machine between rounds cancels; the order of the variants rotates), and a
quick run of the script on the CPU, so that a lent GPU's time is not what
finds a broken script."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_step_overhead as overhead  # noqa: E402

BASE = dict(crop=[512, 1024], amp=None)


def test_a_drift_shared_by_the_round_cancels():
    # the machine slows down 3x over the rounds; DRSL+ always costs 8 % over the floor in its round
    floor = [40.0, 60.0, 120.0, 45.0, 80.0]
    times = {"floor": floor, "DRSL+ fast": [1.08 * f for f in floor], "apart": [1.2 * f for f in floor]}
    rows = {r["variant"]: r for r in overhead.overhead_rows(times, BASE, steps=3)}
    assert "overhead" not in rows["floor"] and rows["floor"]["median_ms"] == 60.0
    for name, expected in (("DRSL+ fast", 0.08), ("apart", 0.2)):
        r = rows[name]
        assert r["overhead"] == pytest.approx(expected)
        assert r["overhead_q1"] == pytest.approx(expected) and r["overhead_q3"] == pytest.approx(expected)
        assert r["rounds"] == 5 and r["steps_per_round"] == 3 and r["crop"] == "512x1024" and r["precision"] == "fp32"


def test_the_quartiles_are_those_of_the_paired_ratios():
    times = {"floor": [10.0, 10.0, 10.0, 10.0], "DRSL+ fast": [11.0, 12.0, 10.5, 13.0]}
    (_, drsl) = overhead.overhead_rows(times, BASE, steps=1)
    assert drsl["overhead"] == pytest.approx(0.15)  # median of 0.05, 0.1, 0.2, 0.3
    assert drsl["overhead_q1"] < drsl["overhead"] < drsl["overhead_q3"]


def test_a_variant_with_another_head_is_paired_with_the_floor_with_that_head():
    floor = [40.0, 60.0, 120.0]
    gemm_floor = [0.9 * f for f in floor]
    times = {"floor": floor, "floor, head as one GEMM": gemm_floor,
             "DRSL+ fast, head as one GEMM": [1.1 * f for f in gemm_floor]}
    rows = {r["variant"]: r for r in overhead.overhead_rows(times, BASE, steps=3)}
    assert rows["floor, head as one GEMM"]["over"] == "floor"
    assert rows["floor, head as one GEMM"]["overhead"] == pytest.approx(-0.1)
    assert rows["DRSL+ fast, head as one GEMM"]["over"] == "floor, head as one GEMM"
    assert rows["DRSL+ fast, head as one GEMM"]["overhead"] == pytest.approx(0.1)


def test_rounds_rotate_the_order():
    calls = []
    steps_of = {name: (lambda name=name: calls.append(name)) for name in ("floor", "a", "b")}
    times = overhead.timed_rounds(steps_of, "cpu", rounds=3, steps=1)
    assert calls == ["floor", "a", "b", "a", "b", "floor", "b", "floor", "a"]
    assert {name: len(t) for name, t in times.items()} == {"floor": 3, "a": 3, "b": 3}


def test_quick_run():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_step_overhead.py"), "--quick",
                           "--rounds", "2", "--steps", "1", "--warmup", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| 64x64")]
    variants = len(overhead.VARIANTS)
    assert len(table) == 2 * variants  # every variant in fp32 and bf16
    assert sum("%" in line for line in table) == 2 * (variants - 1)  # an overhead for every variant but the floors


TINY = dict(depth=18, width=0.125, crop=[32, 32])


def test_a_variant_that_cannot_be_captured_is_reported_not_raised():
    # no CUDA here: every capture fails, and each variant says why in its row
    rows = overhead.measure(dict(TINY, amp=None), "cpu", rounds=1, steps=1, warmup=1, cuda_graphs=True)
    assert [r["variant"] for r in rows] == list(overhead.VARIANTS)
    assert all("error" in r and "median_ms" not in r for r in rows)


def test_a_step_drawing_from_one_generator():
    # the form a CUDA graph captures: draws from one generator, autocast without its weight cache
    import torch
    from bench_training_step import setting_of, training_step

    setting = setting_of(dict(setting=dict(TINY, amp="bf16", mmdl=True, ops="fast", checkpointing=False)))
    generator = torch.Generator().manual_seed(0)
    step = training_step(setting, torch.device("cpu"), torch.bfloat16, generator)
    before = generator.get_state()
    step()
    assert not torch.equal(generator.get_state(), before)  # the loss drew from it


def test_the_report_lists_every_paired_run_side_by_side():
    import report

    def run(rounds, overheads):
        results = [dict(crop=crop, precision=precision, variant="floor", median_ms=40.0)
                   for (crop, precision) in overheads]
        results += [dict(crop=crop, precision=precision, variant="DRSL+ fast", median_ms=44.0, overhead=o)
                    for (crop, precision), o in overheads.items()]
        return dict(rounds=rounds, results=results)

    first = run(15, {("512x512", "fp32"): 0.085, ("512x1024", "fp32"): 0.066})
    second = run(25, {("512x512", "fp32"): 0.104})  # one crop only
    lines = report.overhead_runs_section([first, second]).splitlines()
    assert "| crop | precision | run 1 (15 rounds) | run 2 (25 rounds) |" in lines
    assert "| 512x512 | fp32 | +8.5 % | +10.4 % |" in lines
    assert "| 512x1024 | fp32 | +6.6 % |  |" in lines
