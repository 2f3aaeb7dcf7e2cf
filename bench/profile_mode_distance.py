"""Where the time of one mode-distance forward+backward goes, per GPU kernel
(torch.profiler), for every fast backend and torch.cdist + min, at the
realistic size (B=2, D=64, C=19, M=3, 256x256, fp32).

    python bench/profile_mode_distance.py --out DIR    # -> DIR/mode_distance_kernels.md
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_mode_distance  # noqa: E402

STEPS = 20


def kernel_table(method: str) -> str:
    size = bench_mode_distance.REALISTIC
    B, D, C, M, H, W = (size[k] for k in ("B", "D", "C", "M", "H", "W"))
    fn = bench_mode_distance.build_method(method, "cuda")
    emb = torch.randn(B, D, H, W, device="cuda", requires_grad=True)
    modes = torch.randn(C, M, D, device="cuda", requires_grad=True)
    weights = torch.randn(B, H, W, C, device="cuda")

    def step():
        out = fn(emb, modes)
        if out.shape[1] == C and out.dim() == 4 and out.shape[-1] != C:
            out = out.permute(0, 2, 3, 1)
        (out * weights).sum().backward()
        emb.grad = modes.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.count // STEPS, e.device_time_total / STEPS) for e in prof.key_averages()
            if e.device_time_total > 0 and e.count >= STEPS]
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    lines = [f"**{method}**: {total:.0f} us of kernel time per forward+backward", "",
             "| kernel | launches per step | us per step |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {count} | {us:.1f} |" for name, count, us in rows[:12]]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sections = [f"# Mode distance forward+backward per kernel on {torch.cuda.get_device_name()}", ""]
    for method in ("cdist", "cuda", "triton"):
        try:
            sections += [kernel_table(method), ""]
        except Exception as exc:  # one method's failure must not lose the others
            sections += [f"**{method}**: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", ""]
    text = "\n".join(sections)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mode_distance_kernels.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
