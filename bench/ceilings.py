"""The two ceilings of this GPU, measured (the roofline's denominators):
device-to-device copy bandwidth (bytes read plus written) and the rate of a
large matrix product in fp32 (exact, CUDA cores), tf32 and bf16 (tensor
cores), each the median of CUDA-event timings on random data.

    python bench/ceilings.py --out DIR     # -> DIR/ceilings.json and .md
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def median_ms(fn, repeats=20):
    """CUDA-event median of ``fn`` over ``repeats`` runs after 3 warm-ups."""
    return harness.median_ms(fn, "cuda", repeats, budget_s=float("inf"), warmup=3)["time_ms"]


def copy_gbs(nbytes=2 * 2**30):
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src)) / 1e6


def matmul_tflops(dtype, tf32, n=8192):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    try:
        return 2 * n**3 / median_ms(lambda: a @ b, repeats=10) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    result = dict(device=props.name, multiprocessors=props.multi_processor_count,
                  l2_mib=getattr(props, "L2_cache_size", 0) / 2**20, copy_gbs=copy_gbs(),
                  fp32_tflops=matmul_tflops(torch.float32, False), tf32_tflops=matmul_tflops(torch.float32, True),
                  bf16_tflops=matmul_tflops(torch.bfloat16, False))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ceilings.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# Ceilings of {result['device']}", "", "| quantity | measured |", "|---|---|",
             f"| device-to-device copy (read + write) | {result['copy_gbs']:.0f} GB/s |",
             f"| fp32 matrix product (CUDA cores) | {result['fp32_tflops']:.1f} TFLOP/s |",
             f"| tf32 matrix product (tensor cores) | {result['tf32_tflops']:.0f} TFLOP/s |",
             f"| bf16 matrix product (tensor cores) | {result['bf16_tflops']:.0f} TFLOP/s |",
             f"| multiprocessors, L2 | {result['multiprocessors']}, {result['l2_mib']:.0f} MiB |"]
    with open(os.path.join(args.out, "ceilings.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
