"""Checks that the emulated-CUDA tests catch bugs in the mode-distance,
MMDL-loss, per-class sampling and Eq. 6 kernels: each mutation below (a barrier removed, a term dropped, an
index swapped, a rule loosened) is applied to a copy of csrc/cuda/, and the
ops' emulated tests must fail on it; the unchanged files must pass them.

    python tests/cuda_on_cpu/mutations.py            # about 25 minutes; exit status 1 if one is missed
    python tests/cuda_on_cpu/mutations.py "MMDL"     # those whose names contain MMDL
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
FILES = ("mode_distance.cu", "mmdl_losses.cu", "class_sampling.cu", "consistency_triplets.cu", "consistency_hinge.cu")

# name -> (text of a kernel file, what it becomes); each text occurs once in one file
MUTATIONS = {
    "forward: no barrier before staging": (
        "pass_mu);\n    for (int d0 = 0; d0 < D; d0 += kDepth) {\n"
        "      __syncthreads();  // the previous step's (or pass's) readers are done with the shared tiles\n",
        "pass_mu);\n    for (int d0 = 0; d0 < D; d0 += kDepth) {\n"),
    "forward: the step ahead fetched from the wrong channels": (
        "if (d0 + kDepth < D) next.fetch(emb, emb_layout, b, d0 + kDepth, D, p0, P, pass_mu);",
        "if (d0 + kDepth < D) next.fetch(emb, emb_layout, b, d0, D, p0, P, pass_mu);"),
    "forward: no barrier before the products are parked": (
        "    __syncthreads();  // the staged tiles are read; the products take their place\n", ""),
    "3xTF32: lo.hi term dropped": ("  nvcuda::wmma::mma_sync(step, a_lo, b_hi, step);\n", ""),
    "3xTF32: one truncating chain per accumulator (no per-step sums)": (
        "  Acc step;\n"
        "  nvcuda::wmma::fill_fragment(step, 0.0f);\n"
        "  nvcuda::wmma::mma_sync(step, a_lo, b_hi, step);\n"
        "  nvcuda::wmma::mma_sync(step, a_hi, b_lo, step);\n"
        "  nvcuda::wmma::mma_sync(step, a_hi, b_hi, step);\n"
        "#pragma unroll\n"
        "  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] += step.x[i];",
        "  nvcuda::wmma::mma_sync(acc, a_lo, b_hi, acc);\n"
        "  nvcuda::wmma::mma_sync(acc, a_hi, b_lo, acc);\n"
        "  nvcuda::wmma::mma_sync(acc, a_hi, b_hi, acc);\n"
        "  (void)0;"),
    "forward: every expanded minimum trusted": ("constexpr float kTrustRatio = 0.5f;",
                                                "constexpr float kTrustRatio = 0.0f;"),
    "forward: the queue read before it is complete": ("    __syncthreads();  // the queue is complete\n", ""),
    "forward: refused pairs dropped from the queue": (
        "queue[atomicAdd(&queued, 1)] = static_cast<uint16_t>(i);", "(void)queued;"),
    "mode centres: norms read the means without a barrier": (
        "    __syncthreads();\n    if (norm != nullptr && t < pass_modes)", "    if (norm != nullptr && t < pass_modes)"),
    "forward: direct sums skip a channel of each batch": (
        "          if (j0 + u < D) {", "          if (j0 + u < D && u > 0) {"),
    "forward: mode rows of 34 floats (misaligned)": ("constexpr int kModeRow = kDepth + 4;",
                                                     "constexpr int kModeRow = kDepth + 2;"),
    "forward: one channel left out of the norm": (
        "for (int d = half * (kDepth / 2); d < (half + 1) * (kDepth / 2); ++d) {",
        "for (int d = half * (kDepth / 2); d < (half + 1) * (kDepth / 2) - 1; ++d) {"),
    "backward: mode indices unchecked": ("  DRSL_DEVICE_CHECK(mstar < M);\n", ""),
    "backward: padding columns not zeroed": (
        "      weights[(i / (kModes - modes_used)) * kWeightRow + modes_used + i % (kModes - modes_used)] = 0.0f;",
        "      ;"),
    "backward: W R tile stored transposed": (
        "wmma::store_matrix_sync(product + cols * 16 * kStepCol + rows * 16,",
        "wmma::store_matrix_sync(product + rows * 16 * kStepCol + cols * 16,"),
    "backward: no barrier after W R": ("      __syncthreads();  // W R and the weight totals are complete\n", ""),
    "backward: no barrier before W^T E is parked": (
        "      __syncthreads();  // every step's tiles are read: W^T E takes their place\n", ""),
    "backward: column sums skip a pixel": ("for (int p = 0; p < kGradStep; ++p) column_sum +=",
                                           "for (int p = 0; p < kGradStep - 1; ++p) column_sum +="),
    "backward: embeddings not centred": (
        "v = load_as<float>(emb[emb_layout.offset(b, d0 + d, q0 + p)]) - mu[d0 + d];",
        "v = load_as<float>(emb[emb_layout.offset(b, d0 + d, q0 + p)]);"),
    "backward: no direct sum for non-finite gradients": ("if (!(fabsf(grad) <= FLT_MAX)) {", "if (false) {"),
    "fp32 forward: no barrier before staging": (
        "    if (D > 0) fetch(0);\n    for (int d0 = 0; d0 < D; d0 += T::kDepth) {\n"
        "      __syncthreads();  // the previous step's (or pass's) readers are done with the shared tiles\n",
        "    if (D > 0) fetch(0);\n    for (int d0 = 0; d0 < D; d0 += T::kDepth) {\n"),
    "fp32 forward: the step ahead fetched from the wrong channels": (
        "if (d0 + T::kDepth < D) fetch(d0 + T::kDepth);", "if (d0 + T::kDepth < D) fetch(d0);"),
    "fp32 dL/de: the last class of each batch left out": (
        "      if (c0 + u >= C) break;", "      if (c0 + u >= C || u == kClassBatch - 1) break;"),
    "fp32 forward: the distances parked without a barrier": (
        "    __syncthreads();  // the staged tiles are read; the distances take their place\n", ""),
    "MMDL mode gradient: a sample left out of each chunk": ("for (int j = 0; j < samples; ++j) {",
                                                           "for (int j = 1; j < samples; ++j) {"),
    "MMDL mode gradient: sign flipped": ("sum += g * (r - staged[j * width + d]);",
                                         "sum += g * (staged[j * width + d] - r);"),
    "MMDL mode gradient: no barrier before the slice is read": (
        "    __syncthreads();  // the slice is staged\n", ""),
    "MMDL mode gradient: every slice staged from the first channels": (
        "load_as<acc_t>(batch.embedding(o)[(d0 + d) * batch.L.channel])",
        "load_as<acc_t>(batch.embedding(o)[d * batch.L.channel])"),
    "MMDL mode gradient: winners not recorded": ("          class_mode[o * C + c] = winner[c];\n", ""),
    "MMDL: no barrier after the distances": ("  __syncthreads();  // every pair's dmin and mstar are in the rows\n", ""),
    "MMDL forward: samples that do not count flagged as counted": (
        "  counted[o] = batch.counts(o);\n  if (!counted[o]) {", "  counted[o] = true;\n  if (!batch.counts(o)) {"),
    "MMDL backward: no barrier before dL/de": ("  __syncthreads();  // every sample's g_c are in the rows\n", ""),
    "MMDL: a neighbour's staged sample read": ("class_dmin(static_cast<const acc_t*>(rows.emb(j)), 1,",
                                               "class_dmin(static_cast<const acc_t*>(rows.emb(j ^ 1)), 1,"),
    "MMDL backward: the triplet term dropped": ("        if (active) g += g_tri * (acc_t(c == y) - acc_t(c == s.negative));\n",
                                                ""),
    "MMDL scatter: the rows of a pixel's later samples left out": ("      sum += rows[other * D + d];\n", ""),
    "MMDL scatter: every sample writes its pixel": (
        "  if (pixel[0] != S - s) return;  // a sample before this one writes the pixel\n", ""),
    "sampling: counts not capped at k": ("const int64_t taken = run < k ? run : k;", "const int64_t taken = run;"),
    "sampling: labels read as if contiguous": (
        "label[b * stride_b + (p / W) * stride_h + (p % W) * stride_w]", "label[b * P + p]"),
    "Eq. 6 draw: group runs start one key late": ("if (sorted[mid] < g) low = mid + 1;",
                                                  "if (sorted[mid] <= g) low = mid + 1;"),
    "Eq. 6 draw: anchors without a positive not counted": ("  if (t.no_positive) atomicAdd(skipped, 1ull);\n", ""),
    "Eq. 6 draw: the labelled pixels' end left unset": ("  if (g > groups) return;", "  if (g >= groups) return;"),
    "Eq. 6 hinge backward: the gradient not divided by the triplets used": (
        "static_cast<acc_t>(*used > 1 ? *used : 1)", "acc_t(1)"),
    "Eq. 6 hinge backward: the negative's row left out": (
        "      atomicAdd(grad_source + source_grad_layout.offset(neg / m.source_pixels, d, neg % m.source_pixels),\n"
        "                w * (e_t - e_n));\n", ""),
    "Eq. 6 hinge: the margin left out": ("  h = to_positive - to_negative + beta;", "  h = to_positive - to_negative;"),
}


def emulated_tests_pass(cuda_dir: Path) -> bool:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "emulated",
               "tests/test_mode_distance.py", "tests/test_bad_inputs.py", "tests/test_mmdl_losses.py",
               "tests/test_class_sampling.py",
               "tests/test_consistency_triplets.py", "tests/test_consistency.py"]
    env = dict(os.environ, DRSL_FAST_EMULATED_CUDA_DIR=str(cuda_dir))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if "no tests ran" in done.stdout or done.returncode not in (0, 1):
        sys.exit(f"the emulated tests did not run:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.returncode == 0


def main():
    """Every mutation, or those whose names contain the first argument."""
    chosen = {name: edit for name, edit in MUTATIONS.items() if len(sys.argv) < 2 or sys.argv[1] in name}
    originals = {name: (CUDA_DIR / name).read_text() for name in FILES}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "csrc" / "cuda"
        copy.mkdir(parents=True)
        (Path(tmp) / "kernels").symlink_to(ROOT / "kernels")  # the files' relative includes
        for name, text in originals.items():
            (copy / name).write_text(text)
        if not emulated_tests_pass(copy):
            sys.exit("the unchanged kernels fail the emulated tests")
        missed = []
        for mutation, (old, new) in chosen.items():
            where = [name for name, text in originals.items() if text.count(old) == 1]
            if len(where) != 1 or sum(text.count(old) for text in originals.values()) != 1:
                sys.exit(f"{mutation}: the text to change is not in the files once; update this list")
            (copy / where[0]).write_text(originals[where[0]].replace(old, new))
            caught = not emulated_tests_pass(copy)
            (copy / where[0]).write_text(originals[where[0]])
            print(f"{'caught' if caught else 'MISSED'}: {mutation}", flush=True)
            if not caught:
                missed.append(mutation)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
