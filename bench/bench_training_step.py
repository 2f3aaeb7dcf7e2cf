"""Benchmark of one DRSL+ training step as the pipeline runs it
(``drsl_fast.train.loop.step_loss``): 1 source + 1 target image through
DeepLab-v2 and the MMDL-FR head, segmentation losses, every Eq. 10 loss,
backward and an SGD step with momentum (and a gradient scaler in fp16).

Variants (on the CPU each in a fresh process, since its RSS high-water mark
cannot be reset; on a GPU one process per crop, ``max_memory_allocated``
reset and the previous variant freed between variants):
  reference / fast   the DRSL loss's ops: the pure-PyTorch oracles
                     (DRSL_FAST_BACKEND=reference) or the fused backends
  fp32 / amp         autocast in bf16 where the GPU has it, else fp16 with a
                     gradient scaler; bf16 on the CPU
  checkpointing      backbone checkpointing off / on
  floor              plain DeepLab-v2, segmentation loss only (no MMDL head)
  head convs apart   fast ops without checkpointing, the MMDL-FR embedding
                     block run apart from the classifier rather than with it
                     (one convolution per dilation, the default): both in one run

Weights are random (nothing is downloaded); images and labels are random,
every class present, so the losses sample their full N = 300 per class.
Peak memory is ``torch.cuda.max_memory_allocated`` over two warm-up steps
(the second has momentum buffers and the previous gradients live, as in
training) on a GPU, and the RSS high-water mark above the process's state
before the model was built on the CPU. Step time is the median of the
following steps. Every row also carries the peak that
``drsl_fast.memory_model`` predicts for it, and the error.

Default sizes: GPU, ResNet-101 at 512x512 and 512x1024 crops (the paper's
setting); CPU, a ResNet-50 at 128x128 (ResNet-101 at full crops takes minutes
per step on a few cores), stated in the output.

    python bench/bench_training_step.py                # -> bench/results/training_step_<device>.*
    python bench/bench_training_step.py --quick        # tiny network, prints only
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

GPU_SIZES = dict(depth=101, width=1.0, crops=[(512, 512), (512, 1024)])
CPU_SIZES = dict(depth=50, width=1.0, crops=[(128, 128)])
BACKEND_VARIABLE = "DRSL_FAST_BACKEND"
QUICK_SIZES = dict(depth=18, width=0.25, crops=[(64, 64)])
FIELDS = ["variant", "ops", "precision", "checkpointing", "depth", "width", "crop", "peak_mib", "resident_mib",
          "predicted_mib", "prediction_error", "time_ms", "min_ms", "max_ms", "runs", "error"]


def amp_for(device: str) -> str:
    import torch

    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def variants(sizes, amp: str):
    """Every (setting, label) the benchmark measures, floors first per crop."""
    for crop in sizes["crops"]:
        base = dict(depth=sizes["depth"], width=sizes["width"], crop=list(crop))
        for precision in (None, amp):
            yield dict(base, mmdl=False, amp=precision, checkpointing=False, ops="fast")
        for ops in ("reference", "fast"):
            for precision in (None, amp):
                for checkpointing in (False, True):
                    yield dict(base, mmdl=True, amp=precision, checkpointing=checkpointing, ops=ops)
        for precision in (None, amp):
            yield dict(base, mmdl=True, amp=precision, checkpointing=False, ops="fast", shared_convs=False)


def setting_of(spec):
    from drsl_fast.memory_model import StepSetting

    s = spec["setting"]
    return StepSetting(depth=s["depth"], width=s["width"], crop=tuple(s["crop"]), amp=s["amp"],
                       checkpointing=s["checkpointing"], ops=s["ops"], mmdl=s["mmdl"],
                       shared_convs=s.get("shared_convs", True),
                       head_as_gemm=s.get("head_as_gemm", False))


def measure(spec):
    """One variant: two warm-up steps measured for memory, then timed steps."""
    if spec["setting"]["ops"] == "reference":
        os.environ[BACKEND_VARIABLE] = "reference"
    else:
        os.environ.pop(BACKEND_VARIABLE, None)
    import torch

    from drsl_fast.memory_model import amp_dtype

    device = torch.device(spec["device"])
    setting = setting_of(spec)
    dtype = amp_dtype(setting.amp)
    harness.warm_up_runtime(device)
    warm_up_step(setting, device, dtype)
    torch.manual_seed(0)
    baseline = harness.current_rss_bytes()
    # on a GPU: what earlier variants of this process left allocated (should be ~0), counted in the peak
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    step = training_step(setting, device, dtype)

    with harness.PeakMemory(device) as memory:
        for _ in range(2):
            step()
    peak = memory.total if device.type == "cuda" else memory.total - baseline
    timing = harness.median_ms(step, device, spec["repeats"], spec["budget_s"], warmup=0)
    from drsl_fast.backends import resolve

    return dict(spec, peak_mib=peak / harness.MIB, resident_mib=resident / harness.MIB,
                backend=resolve(None, device), **timing)


def training_step(setting, device, dtype, generator=None):
    """A closure running one training step of ``setting`` (forward through
    ``step_loss``, backward, SGD with momentum) on a freshly built network and
    a fixed simulated batch; the loss draws of step i use seed i, or come from
    ``generator`` when one is given (then autocast keeps no cache of cast
    weights, as a CUDA graph capture of the step requires). Its phases
    run under ``record_function`` ranges named step/forward (with
    step/network and step/drsl_loss inside), step/backward and step/optimizer."""
    import contextlib

    import torch
    from torch.profiler import record_function

    from drsl_fast.memory_model import simulated_batch, step_network
    from drsl_fast.train.loop import drsl_loss, step_loss

    network, settings = step_network(setting)
    network = network.to(device)
    optimizer = torch.optim.SGD(network.parameter_groups(5e-5), lr=5e-5, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = drsl_loss(settings.loss, settings.data.num_classes, settings.model.sigma, consistency=True)
    source, target = simulated_batch(setting, device)
    model, loss = annotated(network, "step/network"), annotated(loss_fn, "step/drsl_loss")
    iteration = [0]

    def step():
        draws = generator or torch.Generator(device).manual_seed(iteration[0])
        iteration[0] += 1
        autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=generator is None) if dtype is not None
                    else contextlib.nullcontext())
        with autocast, record_function("step/forward"):
            total, _ = step_loss(model, network, loss, source, target, draws)
        optimizer.zero_grad(set_to_none=True)
        with record_function("step/backward"):
            scaler.scale(total).backward()
        with record_function("step/optimizer"):
            scaler.step(optimizer)
            scaler.update()

    return step


def annotated(function, name: str):
    """``function`` called inside ``record_function(name)``: its operators are
    attributed to ``name`` in a profile (bench/profile_training_step.py)."""
    from torch.profiler import record_function

    def call(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return call


def warm_up_step(setting, device, dtype) -> None:
    """One step of the same code path on a tiny network and crop, so the
    modules and kernel libraries it loads lazily (extension ops, their fake
    kernels, oneDNN primitives) are resident before the RSS baseline."""
    import contextlib
    import gc
    from dataclasses import replace

    import torch

    from drsl_fast.memory_model import simulated_batch, step_network
    from drsl_fast.train.loop import drsl_loss, step_loss

    tiny = replace(setting, depth=18, width=0.125, crop=(32, 32))
    network, settings = step_network(tiny)
    network = network.to(device)
    source, target = simulated_batch(tiny, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        loss_fn = drsl_loss(settings.loss, settings.data.num_classes, settings.model.sigma, consistency=True)
        total, _ = step_loss(network, network, loss_fn, source, target,
                             torch.Generator(device).manual_seed(0))
    total.backward()
    del network, source, target, total
    gc.collect()
    harness.sync(device)


def predicted_mib(setting_dict, device):
    """Worker for the memory model, run beside the measurements on one CPU
    thread: it runs the loss on the CPU at full size, and with a thread per
    core in each of its workers it took the cores that the timed steps' host
    thread needs (on the H200, the host-bound 512x512 DRSL+ steps ranged from
    55 to 116 ms between two runs of this benchmark; bench/NOTES.md)."""
    import torch

    from drsl_fast.memory_model import StepSetting, predict_step_peak

    torch.set_num_threads(1)

    s = dict(setting_dict, crop=tuple(setting_dict["crop"]))
    return predict_step_peak(StepSetting(**s), device).peak_bytes / harness.MIB


def label(s):
    if not s["mmdl"]:
        return "DeepLab-v2 floor"
    return f"DRSL+ {s['ops']}" + ("" if s.get("shared_convs", True) else ", head convs apart")


def row_of(result, amp):
    s = result["setting"]
    row = dict(result, variant=label(s), ops=s["ops"] if s["mmdl"] else "-", precision=s["amp"] or "fp32",
               checkpointing="on" if s["checkpointing"] else "off", depth=s["depth"], width=s["width"],
               crop=f"{s['crop'][0]}x{s['crop'][1]}")
    if "predicted_mib" in row and "peak_mib" in row:
        row["prediction_error"] = (row["predicted_mib"] - row["peak_mib"]) / row["peak_mib"]
    return row


def markdown(rows):
    def fmt(r, key, spec):
        return format(r[key], spec) if key in r else ""

    body = []
    for r in rows:
        if "error" in r:
            body.append([r["crop"], r["variant"], r["precision"], r["checkpointing"], f"failed: {r['error'][:60]}",
                         "", "", ""])
            continue
        error = f"{100 * r['prediction_error']:+.1f} %" if "prediction_error" in r else ""
        body.append([r["crop"], r["variant"], r["precision"], r["checkpointing"], fmt(r, "peak_mib", ".0f"),
                     fmt(r, "predicted_mib", ".0f"), error, fmt(r, "time_ms", ".1f")])
    return harness.markdown_table(["crop", "variant", "precision", "checkpointing", "peak MiB", "predicted MiB",
                                   "prediction error", "step ms (median)"], body)


def fast_vs_reference(rows):
    """For every (crop, precision, checkpointing): fast peak < reference peak?"""
    lines = []
    keyed = {(r["crop"], r["precision"], r["checkpointing"], r["ops"]): r for r in rows
             if "peak_mib" in r and r["setting"].get("shared_convs", True)}
    for (crop, precision, ckpt, ops), r in keyed.items():
        if ops != "fast" or (crop, precision, ckpt, "reference") not in keyed:
            continue
        ref = keyed[(crop, precision, ckpt, "reference")]
        saved = ref["peak_mib"] - r["peak_mib"]
        lines.append(dict(crop=crop, precision=precision, checkpointing=ckpt, reference_mib=ref["peak_mib"],
                          fast_mib=r["peak_mib"], saved_mib=saved, fast_lower=saved > 0,
                          speedup=ref["time_ms"] / r["time_ms"]))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="ResNet-18 x0.25 at 64x64, five variants, 2 timed steps; print only")
    parser.add_argument("--depth", type=int, default=None, help="ResNet depth (default: 101 on GPU, 50 on CPU)")
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--crops", nargs="+", default=None, metavar="HxW",
                        help="crops (default: 512x512 512x1024 on GPU, 128x128 on CPU)")
    parser.add_argument("--no-prediction", action="store_true", help="skip the memory model")
    harness.add_run_arguments(parser, "training_step", "timed steps (default 20 GPU, 3 CPU)",
                              "time budget per variant (default 4 GPU, 60 CPU)")
    args = parser.parse_args()
    if args.worker:
        return harness.serve(measure, json.loads(args.worker))

    device = harness.default_device(args.device)
    gpu = device == "cuda"
    sizes = dict(QUICK_SIZES if args.quick else GPU_SIZES if gpu else CPU_SIZES)
    if args.depth:
        sizes["depth"] = args.depth
    if args.width:
        sizes["width"] = args.width
    if args.crops:
        sizes["crops"] = [tuple(int(v) for v in c.lower().split("x")) for c in args.crops]
    repeats = args.repeats or (2 if args.quick else 20 if gpu else 3)
    budget = args.budget_s or (4.0 if gpu else 60.0)
    amp = amp_for(device)
    settings = list(variants(sizes, amp))
    if args.quick:  # in fp32 the floor, each kind of ops and the head convs apart; and the leanest setting
        leanest = [s for s in settings if s["mmdl"] and s["ops"] == "fast" and s["amp"] and s["checkpointing"]]
        settings = [s for s in settings if s["amp"] is None and not s["checkpointing"]] + leanest

    # The memory model runs on the host's CPU: beside the GPU measurements, after the CPU ones.
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(4, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) if gpu else None
    predictions = {}
    if pool and not args.no_prediction:
        predictions = {i: pool.submit(predicted_mib, s, device) for i, s in enumerate(settings)}
    specs = [dict(setting=s, device=device, repeats=repeats, budget_s=budget) for s in settings]
    results = []
    for crop in sizes["crops"]:  # on a GPU one process per crop (saves the start-up of each variant)
        group = [spec for spec in specs if spec["setting"]["crop"] == list(crop)]
        for spec, result in zip(group, harness.measure_all(__file__, group, one_process=gpu)):
            results.append(result)
            s = spec["setting"]
            shown = (f"{result['peak_mib']:8.0f} MiB {result['time_ms']:9.1f} ms" if "peak_mib" in result
                     else result["error"])
            print(f"{s['crop'][0]}x{s['crop'][1]} {label(s):18s} {s['amp'] or 'fp32':5s} "
                  f"ckpt={'on ' if s['checkpointing'] else 'off'} {shown}", flush=True)
    for i, (s, result) in enumerate(zip(settings, results)):
        if args.no_prediction:
            break
        try:
            result["predicted_mib"] = predictions[i].result() if pool else predicted_mib(s, device)
        except Exception as exc:  # a model failure must not lose the measurements
            result["prediction_failure"] = f"{type(exc).__name__}: {exc}"
    if pool:
        pool.shutdown()
    rows = [row_of(r, amp) for r in results]
    comparison = fast_vs_reference(rows)
    machine = harness.device_name(device)
    scale = (f"ResNet-{sizes['depth']}" + (f" x{sizes['width']}" if sizes["width"] != 1 else "") + ", crops "
             + ", ".join(f"{h}x{w}" for h, w in sizes["crops"]))
    if not gpu:
        scale += " (a reduced setting for the CPU; the paper's is ResNet-101 at 512x512 / 512x1024 on a GPU)"
    table = markdown(rows)
    verdict = ("fast ops use less memory than the reference at every setting measured"
               if comparison and all(c["fast_lower"] for c in comparison)
               else "fast ops do NOT use less memory than the reference everywhere: see the table")
    print(f"\nDRSL+ training step on {machine}: {scale}\n\n{table}\n\n{verdict}")
    if args.quick:
        return
    stem = harness.results_stem(args.out, "training_step", device)
    meta = harness.metadata(device, scale=scale, depth=sizes["depth"], width=sizes["width"],
                            crops=sizes["crops"], amp=amp,
                            peak_measure="max_memory_allocated" if gpu else "RSS high-water above the pre-model RSS")
    body = (f"One DRSL+ step (1 source + 1 target image, Eq. 10, backward, SGD with momentum) as "
            f"`drsl_fast.train.loop.step_loss` runs it; {scale}; amp = {amp}. Peak memory: "
            f"{meta['peak_measure']} over two warm-up steps; step time: median of the following steps; "
            f"predicted: `drsl_fast.memory_model`. {verdict}.\n\n{table}\n")
    harness.write_results(stem, meta, rows, FIELDS, "DRSL+ training-step benchmark", body,
                          extra_json=dict(fast_vs_reference=comparison))


if __name__ == "__main__":
    main()
