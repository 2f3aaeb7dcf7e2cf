"""Where the host's time per call goes: what it costs to issue a mode-distance
forward and backward, next to the floors that any PyTorch code pays.

On the H200 a forward+backward call of the fused op took 0.58 ms while its
kernels took 0.30 ms (bench/results/NVIDIA_H200/mode_distance.md: host ms
about equal to pipelined ms, so the GPU waited on the host). This probe
splits that host time. Each case is issued ``--calls`` times back to back
without synchronising; "host us" is the time to issue one call, "per call
us" the time per call until the device is done (the larger of host and
device work, when they overlap). Medians of ``--rounds`` rounds.

Cases, at a tiny map (B = 1, 8 x 8: kernels take next to nothing, so the
time is the host's) and at the realistic one (B = 2, 256 x 256), D = 64,
C = 19, M = 3:

  one kernel            ``x * 2`` (no autograd): dispatch + one launch
  backward of k muls    ``y = x * c`` k times, ``y.sum().backward()``:
                        backward's fixed cost and its cost per node
  forward, no grad      the op under ``torch.no_grad()``
  forward, with grad    the op recording its autograd node
  backward op only      ``drsl_fast::mode_distance_backward`` called directly
  forward+backward      the op, ``(dmin * w).sum().backward()``, as
                        bench_mode_distance.py times it
  cdist forward+backward   the same with ``torch.cdist`` + min over modes
  DRSL+ loss, forward   ``DRSLLoss`` (Eq. 10: sampling, Eq. 4/5 on both
                        domains, Eq. 6) on one source and one target map:
                        on the H200 the host issues the loss after the GPU
                        has caught up with the network, so this host time
                        adds to a training step as it is
  DRSL+ loss, forward+backward   the same, with its backward
  Eq. 6 draw, torch ops   the loss's cross-domain triplet draw alone (the
                        anchors of its target samples, every source pixel)
                        as plain torch ops (``reference.consistency_triplets``,
                        what the loss ran before the fused operator)
  Eq. 6 draw, op        the same draw by ``drsl_fast::consistency_triplets``

and a ``torch.profiler`` table of one tiny forward+backward: host self time
per event (operators, autograd nodes, runtime calls); and, per DRSL+ loss
call at each map, what the profiler counts: operators (aten and drsl_fast,
nested calls included), kernel launches the host issues, and kernels, copies
and fills the device runs.

    python bench/probe_host_time.py --device cuda --out DIR/host_time
    python bench/probe_host_time.py --device cpu   # -> bench/results/host_time_cpu
"""
import argparse
import collections
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

D, C, M = 64, 19, 3
MAPS = {"tiny": (1, 8, 8), "realistic": (2, 256, 256)}
CHAIN_LENGTHS = (1, 4, 16)
COUNTED_CASES = ("DRSL+ loss, forward", "DRSL+ loss, forward+backward")


def cases(device, map_name: str):
    """name -> a function issuing one call (no synchronisation)."""
    import torch

    import drsl_fast
    from drsl_fast import reference
    from drsl_fast.losses import DRSLLoss

    B, H, W = MAPS[map_name]
    torch.manual_seed(0)
    emb = torch.randn(B, D, H, W, device=device, requires_grad=True)
    modes = torch.randn(C, M, D, device=device, requires_grad=True)
    weights = torch.randn(B, C, H, W, device=device)
    x = torch.randn(B, D, H, W, device=device, requires_grad=True)
    backend = "cuda" if str(device).startswith("cuda") else "cpu"
    with torch.no_grad():
        saved = drsl_fast.mode_distance(emb, modes, backend=backend)
    grad_dmin = torch.randn_like(saved.dmin)

    def one_kernel():
        with torch.no_grad():
            x * 2

    def chain(k):
        def run():
            y = x
            for _ in range(k):
                y = y * 1.0001
            y.sum().backward()
            x.grad = None
        return run

    def forward_no_grad():
        with torch.no_grad():
            drsl_fast.mode_distance(emb, modes, backend=backend)

    def forward_with_grad():
        drsl_fast.mode_distance(emb, modes, backend=backend)

    def backward_op():
        torch.ops.drsl_fast.mode_distance_backward(grad_dmin, emb.detach(), modes.detach(), saved.mstar, True, True)

    def forward_backward():
        (drsl_fast.mode_distance(emb, modes, backend=backend).dmin * weights).sum().backward()
        emb.grad = modes.grad = None

    def cdist_forward_backward():
        rows = emb.permute(0, 2, 3, 1).reshape(-1, D)
        dist = torch.cdist(rows, modes.reshape(C * M, D)) ** 2
        dmin = dist.reshape(B, H, W, C, M).min(-1).values.permute(0, 3, 1, 2)
        (dmin * weights).sum().backward()
        emb.grad = modes.grad = None

    loss = DRSLLoss(C, backend=backend)
    source_labels, target_labels = (torch.randint(0, C, (1, H, W), device=device) for _ in range(2))
    generator = torch.Generator(device).manual_seed(0)

    def drsl_loss(backward: bool):
        def run():
            out = loss(modes, emb[:1], source_labels, weights.sum(), emb[-1:], target_labels, weights.sum(),
                       generator=generator)
            if backward:
                out.total.backward()
                emb.grad = modes.grad = None
        return run

    from drsl_fast.losses import label_mode, sample_per_class

    anchor_index, anchor_label = sample_per_class(target_labels, C, 300, generator).pairs()
    with torch.no_grad():
        anchor_mode = label_mode(emb[-1:], anchor_index, anchor_label, modes, backend=backend)
        every_pixel = torch.arange(H * W, device=device)[None]
        source_mode = label_mode(emb[:1], every_pixel, source_labels.reshape(1, -1), modes, backend=backend)
    draws = torch.rand((2,) + anchor_index.shape, generator=generator, device=device, dtype=torch.float64)
    draw_args = (anchor_index, anchor_label, anchor_mode, source_labels.reshape(1, -1), source_mode, draws, C, M, H * W)

    named = {"one kernel": one_kernel}
    named.update({f"backward of {k} mul{'s' * (k > 1)}": chain(k) for k in CHAIN_LENGTHS})
    named.update({"forward, no grad": forward_no_grad, "forward, with grad": forward_with_grad,
                  "backward op only": backward_op, "forward+backward": forward_backward,
                  "cdist forward+backward": cdist_forward_backward,
                  "DRSL+ loss, forward": drsl_loss(False), "DRSL+ loss, forward+backward": drsl_loss(True),
                  "Eq. 6 draw, torch ops": lambda: reference.consistency_triplets(*draw_args),
                  "Eq. 6 draw, op": lambda: torch.ops.drsl_fast.consistency_triplets(*draw_args)})
    return named, forward_backward


def time_case(function, device, calls: int, rounds: int):
    """Median over rounds of (host us per call, per-call us until the device is done)."""
    for _ in range(3):
        function()
    runs = [harness.host_and_pipelined_ms(function, device, calls) for _ in range(rounds)]
    return (1e3 * statistics.median(r["host_ms"] for r in runs),
            1e3 * statistics.median(r["pipelined_ms"] for r in runs))


def profiled_events(function, device, calls: int):
    """The profiler's events of ``calls`` calls, after 3 unprofiled ones."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    for _ in range(3):
        function()
    harness.sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            function()
        harness.sync(device)
    return prof.events()


def call_counts(function, device, calls: int):
    """Per call: operators (aten:: and drsl_fast:: events, nested calls
    included), kernel launches issued by the host, and device activities
    (kernels, copies, fills; not the GPU ranges of record_function), counted
    as bench/profile_training_step.py counts them."""
    import torch

    events = profiled_events(function, device, calls)
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                 and not getattr(e, "is_user_annotation", False)]
    on_host = [e for e in events if e.device_type != torch.autograd.DeviceType.CUDA]
    return dict(operators=sum(e.name.startswith(harness.OPERATOR_NAMESPACES) for e in on_host) / calls,
                launches=sum(e.name in harness.LAUNCH_CALLS for e in on_host) / calls, device=len(on_device) / calls)


def profile_table(function, device, calls: int, top: int):
    """Host self time per profiler event (us per call) of ``calls`` calls, the largest ``top``."""
    import torch

    totals = collections.defaultdict(lambda: [0.0, 0])
    for event in profiled_events(function, device, calls):
        if event.device_type == torch.autograd.DeviceType.CUDA:
            continue
        entry = totals[event.name[:90]]
        entry[0] += event.self_cpu_time_total / calls
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    return [dict(event=name, self_us=us, count=count / calls) for name, (us, count) in ranked[:top]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--calls", type=int, default=50, help="calls issued back to back per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--top", type=int, default=20, help="profiler events listed")
    parser.add_argument("--out", default=None, help="output stem (default bench/results/host_time_<device>)")
    args = parser.parse_args()

    import torch

    device = harness.default_device(args.device)
    if device == "cpu":
        torch.set_num_threads(1)  # the host's own cost; thread-pool wake-ups are not what this probes
    harness.warm_up_runtime(device)
    rows, counts, tiny_step = [], [], None
    for map_name in MAPS if device == "cuda" else ["tiny"]:  # the CPU's realistic calls are its kernels' time
        named, step = cases(device, map_name)
        tiny_step = tiny_step or step
        for name, function in named.items():
            host_us, per_call_us = time_case(function, device, args.calls, args.rounds)
            rows.append(dict(map=map_name, case=name, host_us=host_us, per_call_us=per_call_us))
            print(f"{map_name:9s} {name:26s} host {host_us:9.1f} us   per call {per_call_us:9.1f} us", flush=True)
        for name in COUNTED_CASES:
            counts.append(dict(map=map_name, case=name, **call_counts(named[name], device, 5)))
    events = profile_table(tiny_step, device, args.calls, args.top)

    B, H, W = MAPS["realistic"]
    body = (f"Host us: the time to issue one call, {args.calls} calls back to back without synchronising; per "
            f"call us: the time per call until the device is done. Medians of {args.rounds} rounds. D = {D}, "
            f"C = {C}, M = {M}; the tiny map is B = 1, 8 x 8, the realistic one B = {B}, {H} x {W}."
            + (" One CPU thread." if device == "cpu" else "") + "\n\n"
            + harness.markdown_table(
                ["map", "case", "host us", "per call us"],
                [(r["map"], r["case"], f"{r['host_us']:.1f}", f"{r['per_call_us']:.1f}") for r in rows])
            + "\n\n### Per DRSL+ loss call, as torch.profiler counts them\n\n"
            + "Operators: aten and drsl_fast events, nested calls included; kernel launches: the host's launch "
            "calls; device activities: kernels, copies and fills.\n\n"
            + harness.markdown_table(
                ["map", "case", "operators", "kernel launches", "device activities"],
                [(c["map"], c["case"], f"{c['operators']:g}", f"{c['launches']:g}", f"{c['device']:g}")
                 for c in counts])
            + "\n\n### One tiny forward+backward under torch.profiler (host self time per call)\n\n"
            + harness.markdown_table(["event", "self us", "calls"],
                                     [(f"`{e['event']}`", f"{e['self_us']:.1f}", f"{e['count']:g}") for e in events]))
    stem = harness.results_stem(args.out, "host_time", device)
    harness.write_results(stem, harness.metadata(device), rows, ["map", "case", "host_us", "per_call_us"],
                          "Host time per call", body, extra_json=dict(profile=events, counts=counts))


if __name__ == "__main__":
    main()
