// The device kernels of csrc/cuda/mode_distance.cu, mmdl_losses.cu, class_sampling.cu,
// consistency_triplets.cu and consistency_hinge.cu,
// compiled for the CPU with the stand-ins of include/, behind C entry points
// that launch them as the files' own launchers do (same kernels, grids,
// threads and scratch buffers). Loaded by __init__.py with ctypes.
#include "emulated_cuda.h"

// Found through -I: csrc/cuda/, or a copy of it (mutations.py).
#define DRSL_FAST_KERNELS_ONLY
#include "mode_distance.cu"
#include "mmdl_losses.cu"
#include "class_sampling.cu"
#include "consistency_triplets.cu"
#include "consistency_hinge.cu"

// Scratch buffers start as NaN (mode tables as 255), outputs too (__init__.py):
// an entry a kernel should write and does not shows in the results.
namespace {
using drsl_fast::PixelLayout;
namespace cu = drsl_fast::cuda;
namespace tc = drsl_fast::cuda::tensor_core;

enum Dtype { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// f<scalar_t, acc_t>() for a Dtype.
template <typename F>
void dispatch(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat32: f.template operator()<float, float>(); break;
    case kFloat64: f.template operator()<double, double>(); break;
    case kFloat16: f.template operator()<__half, float>(); break;
    case kBFloat16: f.template operator()<__nv_bfloat16, float>(); break;
    default: drsl_emu::fail(op, "unknown dtype");
  }
}

// kernel<<<grid, threads, shared_bytes>>>(args...) on the CPU.
template <typename... Params, typename... Args>
void launch(bool reverse, void (*kernel)(Params...), dim3 grid, int threads, size_t shared_bytes, Args... args) {
  drsl_emu::launch(grid, dim3(static_cast<unsigned>(threads)), shared_bytes, reverse, [&] { kernel(args...); });
}

unsigned blocks_for(int64_t n, int per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

struct Problem {
  const void* emb;
  PixelLayout emb_layout;
  const void* modes;  // (C, M, D) contiguous, in the accumulation type
  int C, M, D;
  int64_t P, B;
  PixelLayout out_layout;  // of dmin, mstar, posterior, grad_dmin
};

template <typename acc_t>
acc_t posterior_scale(double sigma) {  // as the launchers' (csrc/host.h)
  const double scale = -0.5 / sigma / sigma;
  return -scale > static_cast<double>(FLT_MAX) && sizeof(acc_t) == 4 ? -INFINITY : static_cast<acc_t>(scale);
}

// tensor_cores: the tensor-core kernel (fp32 accumulation only), else the
// fp32 one (fp64 for fp64).
template <typename scalar_t, typename acc_t>
void forward(const Problem& p, bool tensor_cores, bool reverse, void* dmin, uint8_t* mstar, void* posterior,
             double sigma) {
  const auto* emb = static_cast<const scalar_t*>(p.emb);
  const auto* modes = static_cast<const acc_t*>(p.modes);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (tensor_cores) {
      const int64_t passes = (p.C + tc::kModes / p.M - 1) / (tc::kModes / p.M);
      std::vector<float> mu(passes * p.D, NAN), mode_norm(p.C * p.M, NAN);
      launch(reverse, cu::mode_centre_kernel, dim3(static_cast<unsigned>(passes)), cu::kThreads, 0, modes,
             p.C, p.M, p.D, mu.data(), mode_norm.data());
      launch(reverse, cu::mode_distance_forward_tc_kernel<scalar_t>,
             dim3(blocks_for(p.P, tc::kPixels), static_cast<unsigned>(p.B)), cu::kThreads, 0, emb, p.emb_layout,
             modes,
             static_cast<const float*>(mu.data()), static_cast<const float*>(mode_norm.data()), p.C, p.M, p.D, p.P,
             static_cast<float*>(dmin), mstar, static_cast<float*>(posterior),
             posterior ? posterior_scale<float>(sigma) : 0.0f, p.out_layout);
      return;
    }
  }
  launch(reverse, cu::mode_distance_forward_kernel<scalar_t, acc_t>,
         dim3(blocks_for(p.P, cu::Tiling<acc_t>::kPixels), static_cast<unsigned>(p.B)), cu::kThreads, 0, emb,
         p.emb_layout, modes, p.C, p.M, p.D, p.P, static_cast<acc_t*>(dmin), mstar, static_cast<acc_t*>(posterior),
         posterior ? posterior_scale<acc_t>(sigma) : acc_t(0), p.out_layout);
}

// grad_modes (C, M, D) is the sum of the per-chunk partials over their first axis, in order.
template <typename acc_t>
void sum_partials(const std::vector<acc_t>& partial, int64_t rows, int64_t size, acc_t* out) {
  for (int64_t i = 0; i < size; ++i) {
    acc_t s = acc_t(0);
    for (int64_t r = 0; r < rows; ++r) s += partial[r * size + i];
    out[i] = s;
  }
}

template <typename scalar_t, typename acc_t>
void backward(const Problem& p, bool tensor_cores, bool reverse, const void* grad_dmin_in, const uint8_t* mstar,
              void* grad_emb_out, PixelLayout grad_layout, void* grad_modes_out) {
  const auto* emb = static_cast<const scalar_t*>(p.emb);
  const auto* modes = static_cast<const acc_t*>(p.modes);
  const auto* grad_dmin = static_cast<const acc_t*>(grad_dmin_in);
  auto* grad_emb = static_cast<scalar_t*>(grad_emb_out);
  auto* grad_modes = static_cast<acc_t*>(grad_modes_out);
  const int64_t modes_size = static_cast<int64_t>(p.C) * p.M * p.D;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (tensor_cores && p.C * p.M <= tc::kModes && p.D > 0) {
      const int64_t chunks = blocks_for(p.P, tc::kGradChunk);
      std::vector<float> mu(p.D, NAN), partial(grad_modes ? p.B * chunks * modes_size : 0, NAN);
      launch(reverse, cu::mode_centre_kernel, dim3(1), cu::kThreads, 0, modes, p.C, p.M, p.D, mu.data(),
             static_cast<float*>(nullptr));
      launch(reverse, cu::mode_distance_backward_tc_kernel<scalar_t>,
             dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(p.B)), tc::kGradThreads, 0, grad_dmin, mstar,
             p.out_layout, emb, p.emb_layout, modes, static_cast<const float*>(mu.data()), p.C, p.M, p.D, p.P,
             grad_emb, grad_layout, grad_modes ? partial.data() : nullptr);
      if (grad_modes) sum_partials(partial, p.B * chunks, modes_size, grad_modes);
      return;
    }
  }
  if (grad_emb) {
    const int64_t modes_bytes = static_cast<int64_t>(p.C) * p.M * (p.D | 1) * static_cast<int64_t>(sizeof(acc_t));
    const bool in_shared = modes_bytes <= cu::kModesSharedBytes;
    launch(reverse, cu::mode_distance_grad_emb_kernel<scalar_t, acc_t>,
           dim3(blocks_for(p.P, cu::kThreads), static_cast<unsigned>(p.B)), cu::kThreads,
           in_shared ? static_cast<size_t>(modes_bytes) : 0, grad_dmin, mstar, p.out_layout, emb, p.emb_layout, modes,
           p.C, p.M, p.D, p.P, in_shared, grad_emb, grad_layout);
  }
  if (grad_modes) {
    using Tile = cu::Tiling<acc_t>;
    const int64_t chunks = blocks_for(p.P, cu::kModeGradChunk);
    const int64_t blocks_y = blocks_for(p.C, Tile::kModes / p.M) * static_cast<int64_t>(blocks_for(p.D, Tile::kChannels));
    std::vector<acc_t> partial(p.B * chunks * modes_size, acc_t(NAN));
    if (!partial.empty())
      launch(reverse, cu::mode_distance_grad_modes_kernel<scalar_t, acc_t>,
             dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(blocks_y), static_cast<unsigned>(p.B)),
             cu::kThreads, 0, grad_dmin, mstar, p.out_layout, emb, p.emb_layout, modes, p.C, p.M, p.D, p.P,
             partial.data());
    sum_partials(partial, p.B * chunks, modes_size, grad_modes);
  }
}

// ---- mmdl_losses.cu: the fused MMDL losses and label_mode

struct Samples {  // one call's samples, as csrc/host.h's SampleProblem
  const void* emb;
  PixelLayout layout;
  const int64_t* index;
  const int64_t* label;
  const void* modes;  // (C, M, D) contiguous, in the accumulation type
  int64_t B, S, P;
  int C, M, D;
};

template <typename scalar_t, typename acc_t>
cu::SampleBatch<scalar_t, acc_t> sample_batch(const Samples& s) {
  return {static_cast<const scalar_t*>(s.emb), s.layout, s.index, s.label, static_cast<const acc_t*>(s.modes),
          s.B, s.S, s.P, s.C, s.M, s.D};
}

template <typename acc_t>
cu::LossParams<acc_t> loss_params(double sigma, double alpha, double scale) {
  return {-posterior_scale<acc_t>(sigma), acc_t(alpha), acc_t(scale)};
}

template <typename scalar_t, typename acc_t>
void losses_forward(const Samples& s, bool reverse, double sigma, double alpha, double scale, void* triplet,
                    void* ce, bool* counted) {
  const cu::SampleTiling tiling = cu::sample_tiling(s.C, s.D, sizeof(acc_t), false);
  if (tiling.samples == 0)
    return drsl_emu::fail("mmdl_losses", "too many classes for one sample's row of shared memory");
  launch(reverse, cu::mmdl_losses_forward_kernel<scalar_t, acc_t>, dim3(blocks_for(s.B * s.S, tiling.samples)),
         cu::kBlockThreads, tiling.bytes, sample_batch<scalar_t, acc_t>(s), loss_params<acc_t>(sigma, alpha, scale),
         static_cast<acc_t*>(triplet), static_cast<acc_t*>(ce), counted, tiling.samples, tiling.staged);
}

// The backward; with grad_emb (the zeroed embedding gradient, laid out as
// grad_layout) the per-sample rows are written into it as the launcher's
// scatter_rows does (pixels claimed, then a thread per (sample, channel)).
template <typename scalar_t, typename acc_t>
void losses_backward(const Samples& s, bool reverse, double sigma, double alpha, double scale,
                     const void* grad_triplet, const void* grad_ce, int64_t grad_stride, void* grad_emb,
                     PixelLayout grad_layout, void* grad_modes) {
  const auto batch = sample_batch<scalar_t, acc_t>(s);
  const int64_t n = s.B * s.S, table = grad_modes ? n * s.C : 0;
  std::vector<acc_t> class_grad(table, acc_t(NAN));
  std::vector<uint8_t> class_mode(table, 255);
  std::vector<acc_t> rows(grad_emb ? n * s.D : 0, acc_t(NAN));
  const cu::SampleTiling tiling = cu::sample_tiling(s.C, s.D, sizeof(acc_t), true);
  if (tiling.samples == 0)
    return drsl_emu::fail("mmdl_losses_backward", "too many classes for one sample's row of shared memory");
  launch(reverse, cu::mmdl_losses_backward_kernel<scalar_t, acc_t>, dim3(blocks_for(n, tiling.samples)),
         cu::kBlockThreads, tiling.bytes, static_cast<const acc_t*>(grad_triplet), static_cast<const acc_t*>(grad_ce),
         grad_stride, batch, loss_params<acc_t>(sigma, alpha, scale), grad_emb ? rows.data() : nullptr,
         grad_modes ? class_grad.data() : nullptr, grad_modes ? class_mode.data() : nullptr, tiling.samples,
         tiling.staged);
  if (grad_emb != nullptr && n * s.D > 0) {
    std::vector<int32_t> claim(2 * s.B * s.P, 0);
    launch(reverse, cu::claim_pixels_kernel<scalar_t, acc_t>, dim3(blocks_for(n, cu::kSampleThreads)),
           cu::kSampleThreads, 0, batch, claim.data());
    launch(reverse, cu::scatter_rows_kernel<scalar_t, acc_t>, dim3(blocks_for(n * s.D, cu::kScatterThreads)),
           cu::kScatterThreads, 0, batch, static_cast<const acc_t*>(rows.data()),
           static_cast<const int32_t*>(claim.data()), static_cast<scalar_t*>(grad_emb), grad_layout);
  }
  if (grad_modes == nullptr) return;
  const int64_t chunks = blocks_for(n, cu::kModeGradSamples), size = static_cast<int64_t>(s.C) * s.M * s.D;
  std::vector<acc_t> partial(chunks * size, acc_t(NAN));
  const int slice = cu::mode_grad_slice(s.D, sizeof(acc_t));
  launch(reverse, cu::mmdl_losses_mode_grad_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(chunks)),
         cu::kModeGradThreads, cu::kModeGradSamples * slice * sizeof(acc_t), batch,
         static_cast<const acc_t*>(class_grad.data()), static_cast<const uint8_t*>(class_mode.data()),
         partial.data(), slice);
  sum_partials(partial, chunks, size, static_cast<acc_t*>(grad_modes));
}

template <typename scalar_t, typename acc_t>
void launch_label_mode(const Samples& s, bool reverse, uint8_t* mode) {
  launch(reverse, cu::label_mode_kernel<scalar_t, acc_t>, dim3(blocks_for(s.B * s.S, cu::kSampleThreads)),
         cu::kSampleThreads, 0, sample_batch<scalar_t, acc_t>(s), mode);
}

// The arguments of the consistency_hinge kernels (their tensors as the CUDA launcher lays them out).
struct HingeArgs {
  const void *target, *source;
  const int64_t *target_layout, *source_layout;
  int64_t target_pixels, target_flat, source_pixels, source_flat;
  int D;
  const int64_t *anchor, *positive, *negative;
  int64_t T;
  double beta;

  template <typename scalar_t>
  cu::HingeMaps<scalar_t> maps() const {
    return {static_cast<const scalar_t*>(target), {target_layout[0], target_layout[1], target_layout[2]},
            target_pixels, target_flat, static_cast<const scalar_t*>(source),
            {source_layout[0], source_layout[1], source_layout[2]}, source_pixels, source_flat, D};
  }
};

const char* finish() {
  static std::string message;
  message = drsl_emu::first_error;
  drsl_emu::first_error.clear();
  return message.empty() ? nullptr : message.c_str();
}
}  // namespace

extern "C" {

// The kernels' __shared__ variables (addresses and sizes), to refill before every block.
void set_shared_regions(void* const* addresses, const int64_t* sizes, int64_t n) {
  drsl_emu::shared_regions.clear();
  for (int64_t i = 0; i < n; ++i) drsl_emu::shared_regions.emplace_back(addresses[i], static_cast<size_t>(sizes[i]));
}

// Both return null, or the first error the emulation found.
const char* mode_distance_forward(int dtype, int tensor_cores, int reverse, const void* emb, const int64_t* emb_layout,
                                  const void* modes, int C, int M, int D, int64_t P, int64_t B,
                                  const int64_t* out_layout, void* dmin, uint8_t* mstar, void* posterior,
                                  double sigma) {
  const Problem p{emb, {emb_layout[0], emb_layout[1], emb_layout[2]}, modes, C, M, D, P, B,
                  {out_layout[0], out_layout[1], out_layout[2]}};
  dispatch(dtype, "mode_distance_forward", [&]<typename scalar_t, typename acc_t>() {
    forward<scalar_t, acc_t>(p, tensor_cores != 0, reverse, dmin, mstar, posterior, sigma);
  });
  return finish();
}

const char* mode_distance_backward(int dtype, int tensor_cores, int reverse, const void* emb,
                                   const int64_t* emb_layout, const void* modes, int C, int M, int D, int64_t P,
                                   int64_t B, const int64_t* out_layout, const void* grad_dmin, const uint8_t* mstar,
                                   void* grad_emb, const int64_t* grad_layout, void* grad_modes) {
  const Problem p{emb, {emb_layout[0], emb_layout[1], emb_layout[2]}, modes, C, M, D, P, B,
                  {out_layout[0], out_layout[1], out_layout[2]}};
  const PixelLayout g{grad_layout[0], grad_layout[1], grad_layout[2]};
  dispatch(dtype, "mode_distance_backward", [&]<typename scalar_t, typename acc_t>() {
    backward<scalar_t, acc_t>(p, tensor_cores, reverse, grad_dmin, mstar, grad_emb, g, grad_modes);
  });
  return finish();
}

const char* mmdl_losses_forward(int dtype, int reverse, const void* emb, const int64_t* layout, const int64_t* index,
                                const int64_t* label, const void* modes, int64_t B, int64_t S, int64_t P, int C,
                                int M, int D, double sigma, double alpha, double scale, void* triplet, void* ce,
                                bool* counted) {
  const Samples s{emb, {layout[0], layout[1], layout[2]}, index, label, modes, B, S, P, C, M, D};
  dispatch(dtype, "mmdl_losses", [&]<typename scalar_t, typename acc_t>() {
    losses_forward<scalar_t, acc_t>(s, reverse, sigma, alpha, scale, triplet, ce, counted);
  });
  return finish();
}

const char* mmdl_losses_backward(int dtype, int reverse, const void* emb, const int64_t* layout,
                                 const int64_t* index, const int64_t* label, const void* modes, int64_t B, int64_t S,
                                 int64_t P, int C, int M, int D, double sigma, double alpha, double scale,
                                 const void* grad_triplet, const void* grad_ce, int64_t grad_stride,
                                 void* grad_emb, const int64_t* grad_layout, void* grad_modes) {
  const Samples s{emb, {layout[0], layout[1], layout[2]}, index, label, modes, B, S, P, C, M, D};
  const PixelLayout gl{grad_layout[0], grad_layout[1], grad_layout[2]};
  dispatch(dtype, "mmdl_losses_backward", [&]<typename scalar_t, typename acc_t>() {
    losses_backward<scalar_t, acc_t>(s, reverse, sigma, alpha, scale, grad_triplet, grad_ce, grad_stride, grad_emb,
                                     gl, grad_modes);
  });
  return finish();
}

const char* label_mode(int dtype, int reverse, const void* emb, const int64_t* layout, const int64_t* index,
                       const int64_t* label, const void* modes, int64_t B, int64_t S, int64_t P, int C, int M, int D,
                       uint8_t* mode) {
  const Samples s{emb, {layout[0], layout[1], layout[2]}, index, label, modes, B, S, P, C, M, D};
  dispatch(dtype, "label_mode",
           [&]<typename scalar_t, typename acc_t>() { launch_label_mode<scalar_t, acc_t>(s, reverse, mode); });
  return finish();
}

// sample_per_class in the launcher's three steps; the stable sort between the
// two kernels is the caller's (torch.sort, as the launcher's at::sort). Labels
// of the integer dtype label_dtype (0 uint8, 1 int8, 2 int16, 3 int32, 4 int64), read with their strides.
const char* sample_class_keys(int reverse, int label_dtype, const void* label, const int64_t* strides, int64_t B,
                              int64_t W, int64_t P, int64_t C, const int64_t* key, int64_t* sort_key) {
  const auto keys = [&]<typename label_t>() {
    launch(reverse, cu::class_key_kernel<label_t>, dim3(blocks_for(B * P, cu::kSamplingThreads)),
           cu::kSamplingThreads, 0, static_cast<const label_t*>(label), strides[0], strides[1], strides[2], W, B * P,
           P, C, key, sort_key);
  };
  switch (label_dtype) {
    case 0: keys.template operator()<uint8_t>(); break;
    case 1: keys.template operator()<int8_t>(); break;
    case 2: keys.template operator()<int16_t>(); break;
    case 3: keys.template operator()<int32_t>(); break;
    case 4: keys.template operator()<int64_t>(); break;
    default: drsl_emu::fail("sample_per_class", "unknown label dtype");
  }
  return finish();
}

const char* sample_classes(int reverse, const int64_t* sorted, const int64_t* order, int64_t B, int64_t P, int64_t C,
                           int64_t k, int64_t* index, int64_t* count) {
  launch(reverse, cu::class_sample_kernel, dim3(blocks_for(B * C * k, cu::kSamplingThreads)), cu::kSamplingThreads, 0,
         sorted, order, B, P, C, k, index, count);
  return finish();
}

// consistency_triplets in the launcher's three steps; the stable sort between
// the first two is the caller's (torch.sort, as the launcher's at::sort).
const char* consistency_source_groups(int reverse, const int64_t* label, const uint8_t* mode, int64_t n, int64_t C,
                                      int64_t M, int32_t* key) {
  launch(reverse, cu::source_group_kernel<int64_t>, dim3(blocks_for(n, cu::kTripletThreads)), cu::kTripletThreads, 0,
         label, mode, n, C, M, key);
  return finish();
}

const char* consistency_group_starts(int reverse, const int32_t* sorted, int64_t n, int64_t groups, int64_t* start) {
  launch(reverse, cu::group_start_kernel, dim3(blocks_for(groups + 1, cu::kTripletThreads)), cu::kTripletThreads, 0,
         sorted, n, groups, start);
  return finish();
}

const char* consistency_triplets(int reverse, const int64_t* index, const int64_t* label, const uint8_t* mode,
                                 const double* draws, int64_t anchors, int64_t S, const int64_t* start,
                                 const int64_t* order, int64_t C, int64_t M, int64_t target_pixels, int64_t* anchor,
                                 int64_t* positive, int64_t* negative, bool* valid, int64_t* skipped) {
  launch(reverse, cu::consistency_triplets_kernel, dim3(blocks_for(anchors, cu::kTripletThreads)),
         cu::kTripletThreads, 0, index, label, mode, draws, anchors, S, start, order, C, M, target_pixels, anchor,
         positive, negative, valid, reinterpret_cast<unsigned long long*>(skipped));
  return finish();
}

// flagged_means_kernel (kernels/cuda/flagged_means.cuh): one block; a or b may be null.
const char* flagged_means(int dtype, int reverse, const void* a, const void* b, const bool* flagged, int64_t n,
                          void* mean_a, void* mean_b, int64_t* count) {
  dispatch(dtype, "flagged_means", [&]<typename scalar_t, typename acc_t>() {
    launch(reverse, cu::flagged_means_kernel<acc_t>, dim3(1), cu::kMeanThreads, 0, static_cast<const acc_t*>(a),
           static_cast<const acc_t*>(b), flagged, n, static_cast<acc_t*>(mean_a), static_cast<acc_t*>(mean_b), count);
  });
  return finish();
}

// consistency_hinge: the per-triplet hinges and flags (the caller sums them), and the backward.
const char* consistency_hinge_forward(int dtype, int reverse, const HingeArgs* a, void* hinge, bool* counted) {
  dispatch(dtype, "consistency_hinge", [&]<typename scalar_t, typename acc_t>() {
    launch(reverse, cu::consistency_hinge_kernel<scalar_t, acc_t>, dim3(blocks_for(a->T, cu::kHingeThreads)),
           cu::kHingeThreads, 0, a->maps<scalar_t>(), a->anchor, a->positive, a->negative, a->T,
           static_cast<acc_t>(a->beta), static_cast<acc_t*>(hinge), counted);
  });
  return finish();
}

const char* consistency_hinge_backward(int dtype, int reverse, const HingeArgs* a, const void* grad,
                                       const int64_t* used, void* grad_target, const int64_t* target_grad_layout,
                                       void* grad_source, const int64_t* source_grad_layout) {
  const PixelLayout gt{target_grad_layout[0], target_grad_layout[1], target_grad_layout[2]};
  const PixelLayout gs{source_grad_layout[0], source_grad_layout[1], source_grad_layout[2]};
  dispatch(dtype, "consistency_hinge_backward", [&]<typename scalar_t, typename acc_t>() {
    launch(reverse, cu::consistency_hinge_backward_kernel<scalar_t, acc_t>, dim3(blocks_for(a->T, cu::kHingeThreads)),
           cu::kHingeThreads, 0, a->maps<scalar_t>(), a->anchor, a->positive, a->negative, a->T,
           static_cast<acc_t>(a->beta), static_cast<const acc_t*>(grad), used, static_cast<acc_t*>(grad_target), gt,
           static_cast<acc_t*>(grad_source), gs);
  });
  return finish();
}
}
