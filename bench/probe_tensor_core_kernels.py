"""Where the time of the mode-distance kernels goes, without hardware
counters: each variant below is a copy of csrc/cuda/mode_distance.cu with one
stage left out or changed (a text edit, as in
tests/cuda_on_cpu/mutations.py), built into bench/probe_tensor_core_kernels.cu
with nvcc and timed on the same random inputs (CUDA events, medians). A
stage's cost is the difference between "as built" and the variant without
it. Variants compute wrong results on purpose: they are for timing only. A
variant whose text is no longer in the file stops the probe (update
VARIANTS); one that fails to build or run is skipped.

    python bench/probe_tensor_core_kernels.py --out DIR/tensor_core_probe   # needs a GPU and nvcc
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "mode_distance.cu"
PROBE = ROOT / "bench" / "probe_tensor_core_kernels.cu"
SHAPE = dict(B=2, D=64, C=19, M=3, P=256 * 256)  # the realistic size of bench_mode_distance.py
SCALING = [64 * 64, 128 * 128, 512 * 512]  # further pixel counts, "as built" only: time against size

FORWARD_PRODUCT = "          mma_3xtf32(acc[t], a_hi, a_lo, b_hi, b_lo);\n"
BACKWARD_PRODUCTS = ["          mma_3xtf32(acc, a_hi, a_lo, b_hi, b_lo);\n",
                     "            mma_3xtf32(mode_acc[j], a_hi, a_lo, b_hi, b_lo);\n"]
FP32_BOUNDS = "__launch_bounds__(kThreads, sizeof(acc_t) == 4 ? kFp32ForwardBlocks : 2)"
FP32_DEPTH = "static constexpr int kDepth = 8;"
WEIGHT_BATCH = "kWeightBatch = 2;"
# The fp32 forward's epilogue as the file has it (up to its min over the
# modes), and the one it replaced (commit 92b8196 and before).
EPILOGUE_FROM = "    constexpr int kClassStep = kThreads / T::kPixels;\n"
EPILOGUE_TO = "          best_mode = take ? m : best_mode;\n        }\n"
_text = SOURCE.read_text()
NEW_EPILOGUE = _text[_text.index(EPILOGUE_FROM):_text.index(EPILOGUE_TO) + len(EPILOGUE_TO)]
OLD_EPILOGUE = """    for (int i = threadIdx.x; i < classes * T::kPixels; i += kThreads) {
      const int cl = i / T::kPixels, p = i % T::kPixels;
      if (p0 + p >= P) continue;
      {
        const int64_t o = out_layout.offset(b, c0 + cl, p0 + p);
        const acc_t* d_class = dist_tile + cl * M * T::kPixels + p;
        acc_t best = d_class[0];
        int best_mode = 0;
        for (int m = 1; m < M; ++m) {
          const acc_t v = d_class[m * T::kPixels];
          if (v < best || (v != v && best == best)) {
            best = v;
            best_mode = m;
          }
        }
"""
# name -> [(text, replacement)], each text once in the file
VARIANTS = {
    "as built": [],
    "forward: refused pairs counted": [  # the count is the point: the atomics cost time of their own
        ("// Forward on tensor cores. grid",
         "#define DRSL_PROBE_REFUSED 1\n__device__ unsigned long long probe_refused = 0;\n// Forward on tensor cores. grid"),
        ("queue[atomicAdd(&queued, 1)] = static_cast<uint16_t>(i);",
         "{ queue[atomicAdd(&queued, 1)] = static_cast<uint16_t>(i); atomicAdd(&probe_refused, 1ull); }")],
    "forward: no products": [(FORWARD_PRODUCT, "")],
    "forward: no embedding loads": [(text, "for (int r = 0; r < next.kPerThread; ++r) next.value[r] = 0.01f * r;")
                                    for text in ("next.fetch(emb, emb_layout, b, 0, D, p0, P, pass_mu);",
                                                 "next.fetch(emb, emb_layout, b, d0 + kDepth, D, p0, P, pass_mu);")],
    "forward: no mode loads": [("? pass_centres[static_cast<int64_t>(k) * D + d0 + d] - pass_mu[d0 + d]",
                                "? 0.1f * static_cast<float>((k * 7 + d) % 11)")],
    "forward: no direct sums (all trusted)": [("constexpr float kTrustRatio = 0.5f;",
                                               "constexpr float kTrustRatio = 0.0f;")],
    "forward: no output stores": [(
        "  dmin[o] = best;\n  mstar[o] = static_cast<uint8_t>(best_mode);\n"
        "  if (posterior != nullptr) posterior[o] = exp_of(posterior_exponent(best, posterior_scale));\n}",
        "  if (best == -1.0f) dmin[o] = static_cast<float>(best_mode);  // never: keeps the work alive\n}")],
    "both: 1xTF32 (hi.hi only)": [("  nvcuda::wmma::mma_sync(step, a_lo, b_hi, step);\n"
                                   "  nvcuda::wmma::mma_sync(step, a_hi, b_lo, step);\n", "")],
    "both: no tf32 split (lo = hi)": [(
        "    const float x = hi.x[i], big = nvcuda::wmma::__float_to_tf32(x);\n    hi.x[i] = big;\n"
        "    lo.x[i] = nvcuda::wmma::__float_to_tf32(x - big);", "    lo.x[i] = hi.x[i];")],
    "fp32 forward: 2 blocks per SM (255 registers)": [(FP32_BOUNDS, "__launch_bounds__(kThreads, 2)")],
    "fp32 forward: 3 blocks per SM (168 registers; before on sm_90)": [(FP32_BOUNDS,
                                                                         "__launch_bounds__(kThreads, 3)")],
    "fp32 forward: 16 channels per step (before)": [(FP32_DEPTH, FP32_DEPTH.replace("8", "16"))],
    "fp32 forward: every load bounds-checked (before)": [("      if (pixels_inside && d0 + T::kDepth <= D)\n",
                                                          "      if (false)\n")],
    "fp32 forward: (class, pixel) pairs in rounds, min by branches (before)": [(NEW_EPILOGUE, OLD_EPILOGUE)],
    "fp32 forward: epilogue's class loop unrolled 2": [(
        "      for (; cl < classes; cl += kClassStep, o += o_step) {",
        "#pragma unroll 2\n      for (; cl < classes; cl += kClassStep, o += o_step) {")],
    "fp32 forward: no prefetch (each step loaded after its barrier)": [
        ("    if (D > 0) fetch(0);\n", ""),
        ("      next.park(emb_tile, kEmbRow, 1, pixels_adjacent);\n#pragma unroll\n"
         "      for (int r = 0; r < kModeLoads",
         "      fetch(d0);\n      next.park(emb_tile, kEmbRow, 1, pixels_adjacent);\n#pragma unroll\n"
         "      for (int r = 0; r < kModeLoads"),
        ("      if (d0 + T::kDepth < D) fetch(d0 + T::kDepth);\n", "")],
    "fp32 forward: no arithmetic (distances left at zero)": [(
        "            acc[i][j] += t * t;  // channels added in order 0..D-1; padding adds exact zeros",
        "            (void)t;")],
    "fp32 forward: no embedding loads": [(text, "for (int r = 0; r < next.kPerThread; ++r) next.value[r] = 0.01f * r;")
                                         for text in ("next.fetch_inside(emb, emb_layout, b, d0, p0);",
                                                      "next.fetch(emb, emb_layout, b, d0, D, p0, P);")],
    "fp32 forward: no output stores": [(
        "        dmin[o] = best;\n        mstar[o] = static_cast<uint8_t>(best_mode);\n"
        "        if (posterior != nullptr) posterior[o] = exp_of(posterior_exponent(best, posterior_scale));\n"
        "      }\n    }\n    // The next pass's",
        "        if (best == acc_t(-1)) dmin[o] = static_cast<acc_t>(best_mode);  // never: keeps the work alive\n"
        "      }\n    }\n    // The next pass's")],
    "fp32 dL/de: classes loaded one at a time": [("  constexpr int kClassBatch = 8;",
                                                   "  constexpr int kClassBatch = 1;")],
    "fp32 dL/de: every channel checked (before, but loads from shared memory)": [(
        "      if (n == kDepth)\n        grad_emb_sums<kDepth, true>(grad_dmin, mstar, o, out_layout.channel, centres,",
        "      if (false)\n        grad_emb_sums<kDepth, true>(grad_dmin, mstar, o, out_layout.channel, centres,")],
    "fp32 dL/de: each class batch loaded after the last was used (before; not sm_90)": [
        ("constexpr bool kDlDeLoadAhead = true;", "constexpr bool kDlDeLoadAhead = false;")],
    "fp32 dL/dr: weights loaded one (pixel, class) at a time (before)": [(WEIGHT_BATCH, "kWeightBatch = 1;")],
    "fp32 dL/dr: weights loaded 4 pairs at a time": [(WEIGHT_BATCH, "kWeightBatch = 4;")],
    "backward: no products": [(text, "") for text in BACKWARD_PRODUCTS],
    "backward: no embedding loads": [(
        "v = load_as<float>(emb[emb_layout.offset(b, d0 + d, q0 + p)]) - mu[d0 + d];", "v = 0.01f * (d - p);")],
    "backward: no weight loads": [("          winner = checked_mode(mstar[o], M);\n          g = grad_dmin[o];",
                                   "          winner = static_cast<int>(o % M);\n          g = 0.001f * (p - c);")],
    "backward: no weight totals": [("for (int k = 0; k < kModes; ++k) total += weights[threadIdx.x * kWeightRow + k];",
                                    "total = weights[threadIdx.x * kWeightRow];")],
}
FIELDS = ["variant", "centre_us", "forward_us", "forward_saved_us", "backward_us", "backward_saved_us",
          "backward_emb_us", "backward_modes_us", "forward_fp32_us", "backward_fp32_us",
          "refused_pairs"]


def variant_source(edits):
    text = SOURCE.read_text()
    for old, new in edits:
        if text.count(old) != 1:
            raise SystemExit(f"probe: {old[:60]!r}... is not in {SOURCE.name} once; update VARIANTS")
        text = text.replace(old, new)
    return text


def build(name, edits, work: Path, nvcc: str, arch: str, extra_flags=()) -> Path:
    folder = work / f"v{list(VARIANTS).index(name)}"
    (folder / "csrc" / "cuda").mkdir(parents=True)
    (folder / "kernels").symlink_to(ROOT / "kernels")  # the file's relative includes
    (folder / "csrc" / "cuda" / SOURCE.name).write_text(variant_source(edits))
    exe = folder / "probe"
    done = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}", *extra_flags, "-I", str(folder / "csrc" / "cuda"),
                           "-o", str(exe), str(PROBE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"did not build:\n{done.stderr[-3000:]}")
    return exe


def run(exe: Path, shape) -> dict:
    done = subprocess.run([str(exe)] + [str(shape[k]) for k in "BDCMP"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output stem (default bench/results/tensor_core_probe_cuda)")
    parser.add_argument("--arch", default=None, help="nvcc -arch (default: this GPU's, e.g. sm_90)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("probe: needs a CUDA GPU")
    arch = args.arch or "sm_%d%d" % torch.cuda.get_device_capability()
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("probe: no nvcc (set CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            builds = {name: pool.submit(build, name, edits, Path(tmp), nvcc, arch) for name, edits in VARIANTS.items()}
        rows, scaling = [], []
        for name, future in builds.items():
            try:
                exe = future.result()
                rows.append(dict(variant=name, **run(exe, SHAPE)))
                if name == "as built":
                    scaling = [dict(P=P, **run(exe, dict(SHAPE, P=P))) for P in SCALING]
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                if name == "as built":
                    raise SystemExit(f"probe: the unchanged kernels failed: {error}")
                print(f"probe: {name} skipped: {error}", file=sys.stderr)
                continue
            print(rows[-1], flush=True)
    base = rows[0]
    for row in rows:
        row["forward_saved_us"] = round(base["forward_us"] - row["forward_us"], 2)
        row["backward_saved_us"] = round(base["backward_us"] - row["backward_us"], 2)
    table = harness.markdown_table(
        ["variant", "forward us", "saved vs as built", "backward us (both gradients)", "saved vs as built",
         "backward, dL/de only", "backward, dL/dr only", "centre us", "fp32 forward us", "fp32 backward us"],
        [[r["variant"], r["forward_us"], r["forward_saved_us"], r["backward_us"], r["backward_saved_us"],
          r["backward_emb_us"], r["backward_modes_us"], r["centre_us"], r["forward_fp32_us"],
          r["backward_fp32_us"]] for r in rows])
    scaling_table = harness.markdown_table(
        ["P", "forward us", "backward us", "fp32 forward us", "fp32 backward us", "centre us"],
        [[r["P"], r["forward_us"], r["backward_us"], r["forward_fp32_us"], r["backward_fp32_us"], r["centre_us"]]
         for r in sorted(scaling + [dict(base, P=SHAPE["P"])], key=lambda r: r["P"])])
    counted = [r["refused_pairs"] for r in rows if r.get("refused_pairs", -1) >= 0]
    pairs = SHAPE["B"] * SHAPE["C"] * SHAPE["P"]
    refused = (f" One forward call refuses {counted[0]} of its {pairs} (pixel, class) pairs (the trust rule), "
               "recomputed directly." if counted else "")
    body = (f"Shape B={SHAPE['B']}, D={SHAPE['D']}, C={SHAPE['C']}, M={SHAPE['M']}, P={SHAPE['P']} (fp32, "
            "(B, D, H, W) contiguous, posterior on). Each row is csrc/cuda/mode_distance.cu with one stage left out "
            "(wrong results: timing only), built with nvcc for this GPU; medians of 7 batches of 20 launches "
            "(CUDA events), the embeddings rotated through 4 copies. The fp32 kernels (the CUDA backend's default) on "
            f"the same inputs: forward {base['forward_fp32_us']} us, backward (dL/de and the mode gradient's "
            f"partials) {base['backward_fp32_us']} us.{refused}\n\n{table}\n\n"
            "As built, against the number of pixels per image (B and the rest as above):\n\n" + scaling_table)
    harness.write_results(harness.results_stem(args.out, "tensor_core_probe", "cuda"),
                          harness.metadata("cuda", arch=arch, shape=SHAPE, scaling=scaling), rows, FIELDS,
                          "Mode-distance CUDA kernels: time by stage", body)


if __name__ == "__main__":
    main()
