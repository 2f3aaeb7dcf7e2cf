"""The two ceilings of this machine, measured (the roofline's denominators):
copy bandwidth (bytes read plus written) and the rate of a large matrix
product in fp32 (exact: CUDA cores on a GPU), on a GPU also tf32 and bf16
(tensor cores); each the median of repeated timings on random data (CUDA
events on a GPU, the wall clock on the CPU, with torch's threads).

    python bench/ceilings.py --out DIR       # GPU -> DIR/ceilings.json and .md
    python bench/ceilings.py --device cpu    # -> bench/results/ceilings_cpu.json and .md
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# bytes copied and product sizes: far above the caches (50 MiB L2 on an H100),
# yet quick on two CPU cores
COPY_BYTES = {"cuda": 2 * 2**30, "cpu": 512 * 2**20}
MATMUL_N = {"cuda": 8192, "cpu": 2048}


def median_ms(fn, device, repeats):
    """Median of ``fn`` over ``repeats`` runs after 3 warm-ups."""
    return harness.median_ms(fn, device, repeats, budget_s=float("inf"), warmup=3)["time_ms"]


def copy_gbs(device):
    src = torch.randn(COPY_BYTES[device] // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES[device] / median_ms(lambda: dst.copy_(src), device, 20) / 1e6


def matmul_tflops(device, dtype, tf32=False):
    n = MATMUL_N[device]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    try:
        return 2 * n**3 / median_ms(lambda: a @ b, device, 10) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def measure(device):
    result = dict(device=harness.device_name(device), torch=torch.__version__, command=harness.command_line(),
                  copy_gbs=copy_gbs(device), fp32_tflops=matmul_tflops(device, torch.float32))
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result.update(multiprocessors=props.multi_processor_count,
                      l2_mib=getattr(props, "L2_cache_size", 0) / 2**20,
                      tf32_tflops=matmul_tflops(device, torch.float32, tf32=True),
                      bf16_tflops=matmul_tflops(device, torch.bfloat16))
    return result


def markdown(result):
    where = "device-to-device" if "multiprocessors" in result else "host memory"
    lines = [f"# Ceilings of {result['device']}", "", "| quantity | measured |", "|---|---|",
             f"| {where} copy (read + write) | {result['copy_gbs']:.1f} GB/s |",
             f"| fp32 matrix product{' (CUDA cores)' if 'tf32_tflops' in result else ''} | "
             f"{result['fp32_tflops']:.3g} TFLOP/s |"]
    if "tf32_tflops" in result:
        lines += [f"| tf32 matrix product (tensor cores) | {result['tf32_tflops']:.0f} TFLOP/s |",
                  f"| bf16 matrix product (tensor cores) | {result['bf16_tflops']:.0f} TFLOP/s |",
                  f"| multiprocessors, L2 | {result['multiprocessors']}, {result['l2_mib']:.0f} MiB |"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None,
                        help="folder (default: bench/results/<device>/ on a GPU, bench/results/ on the CPU)")
    args = parser.parse_args()
    device = harness.default_device(args.device)
    result = measure(device)
    out = args.out or (os.path.join(harness.RESULTS_DIR, harness.device_slug(device)) if device == "cuda"
                       else harness.RESULTS_DIR)
    stem = os.path.join(out, "ceilings" if device == "cuda" else "ceilings_cpu")
    os.makedirs(out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
