// Compiles the device kernels alone (no ATen, no torch headers) so that a
// CUDA 11.x toolkit can check them for sm_61 (GTX 1080 Ti): .ci/check_sm61.sh
// builds this translation unit with `nvcc -arch=sm_61`. It takes the first
// half of every csrc/cuda/<op>.cu, the kernels; DRSL_FAST_KERNELS_ONLY leaves
// out the second, the ATen launchers. Every kernel is instantiated for every
// storage type the launchers use.
#define DRSL_FAST_KERNELS_ONLY
#include "../../csrc/cuda/class_sampling.cu"
#include "../../csrc/cuda/consistency_hinge.cu"
#include "../../csrc/cuda/consistency_triplets.cu"
#include "../../csrc/cuda/entropy.cu"
#include "../../csrc/cuda/mmdl_losses.cu"
#include "../../csrc/cuda/mode_distance.cu"
#include "../../csrc/cuda/pseudo_labels.cu"

namespace drsl_fast {
namespace cuda {

#define DRSL_INSTANTIATE_MODE_DISTANCE(scalar_t, acc_t)                                      \
  template __global__ void mode_distance_forward_kernel<scalar_t, acc_t>(                    \
      const scalar_t*, PixelLayout, const acc_t*, int, int, int, int64_t, acc_t*,            \
      uint8_t*, acc_t*, acc_t, PixelLayout);                                                 \
  template __global__ void mode_distance_grad_emb_kernel<scalar_t, acc_t>(                   \
      const acc_t*, const uint8_t*, PixelLayout, const scalar_t*, PixelLayout, const acc_t*, \
      int, int, int, int64_t, bool, scalar_t*, PixelLayout);                                 \
  template __global__ void mode_distance_grad_modes_kernel<scalar_t, acc_t>(                 \
      const acc_t*, const uint8_t*, PixelLayout, const scalar_t*, PixelLayout, const acc_t*, \
      int, int, int, int64_t, acc_t*);

DRSL_INSTANTIATE_MODE_DISTANCE(float, float)
DRSL_INSTANTIATE_MODE_DISTANCE(double, double)
DRSL_INSTANTIATE_MODE_DISTANCE(__half, float)
DRSL_INSTANTIATE_MODE_DISTANCE(__nv_bfloat16, float)

// DRSL losses (docs/method.md §4)
#define DRSL_INSTANTIATE_MMDL_LOSSES(scalar_t, acc_t)                                                  \
  template __global__ void mmdl_losses_forward_kernel<scalar_t, acc_t>(                                \
      SampleBatch<scalar_t, acc_t>, LossParams<acc_t>, acc_t*, acc_t*, bool*, int, bool);              \
  template __global__ void mmdl_losses_backward_kernel<scalar_t, acc_t>(                               \
      const acc_t*, const acc_t*, int64_t, SampleBatch<scalar_t, acc_t>, LossParams<acc_t>, acc_t*,    \
      acc_t*, uint8_t*, int, bool);                                                                    \
  template __global__ void claim_pixels_kernel<scalar_t, acc_t>(SampleBatch<scalar_t, acc_t>, int32_t*); \
  template __global__ void scatter_rows_kernel<scalar_t, acc_t>(                                       \
      SampleBatch<scalar_t, acc_t>, const acc_t*, const int32_t*, scalar_t*, PixelLayout);             \
  template __global__ void mmdl_losses_mode_grad_kernel<scalar_t, acc_t>(                              \
      SampleBatch<scalar_t, acc_t>, const acc_t*, const uint8_t*, acc_t*, int);                        \
  template __global__ void label_mode_kernel<scalar_t, acc_t>(SampleBatch<scalar_t, acc_t>, uint8_t*);

DRSL_INSTANTIATE_MMDL_LOSSES(float, float)
DRSL_INSTANTIATE_MMDL_LOSSES(double, double)
DRSL_INSTANTIATE_MMDL_LOSSES(__half, float)
DRSL_INSTANTIATE_MMDL_LOSSES(__nv_bfloat16, float)

// Per-class sampling (docs/method.md §4): labels of every integer dtype
#define DRSL_INSTANTIATE_CLASS_KEY(label_t)                                                                   \
  template __global__ void class_key_kernel<label_t>(const label_t*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                     int64_t, int64_t, const int64_t*, int64_t*);
DRSL_INSTANTIATE_CLASS_KEY(uint8_t)
DRSL_INSTANTIATE_CLASS_KEY(int8_t)
DRSL_INSTANTIATE_CLASS_KEY(int16_t)
DRSL_INSTANTIATE_CLASS_KEY(int32_t)
DRSL_INSTANTIATE_CLASS_KEY(int64_t)

// Eq. 6 triplet draw (docs/method.md §4): source labels of every integer dtype
template __global__ void source_group_kernel<uint8_t>(const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                                      int32_t*);
template __global__ void source_group_kernel<int8_t>(const int8_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                                     int32_t*);
template __global__ void source_group_kernel<int16_t>(const int16_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                                      int32_t*);
template __global__ void source_group_kernel<int32_t>(const int32_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                                      int32_t*);
template __global__ void source_group_kernel<int64_t>(const int64_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                                      int32_t*);

// The means that end mmdl_losses and consistency_hinge
template __global__ void flagged_means_kernel<float>(const float*, const float*, const bool*, int64_t, float*, float*,
                                                     int64_t*);
template __global__ void flagged_means_kernel<double>(const double*, const double*, const bool*, int64_t, double*,
                                                      double*, int64_t*);

// Eq. 6 hinge
#define DRSL_INSTANTIATE_CONSISTENCY_HINGE(scalar_t, acc_t)                                                    \
  template __global__ void consistency_hinge_kernel<scalar_t, acc_t>(                                        \
      HingeMaps<scalar_t>, const int64_t*, const int64_t*, const int64_t*, int64_t, acc_t, acc_t*, bool*);  \
  template __global__ void consistency_hinge_backward_kernel<scalar_t, acc_t>(                               \
      HingeMaps<scalar_t>, const int64_t*, const int64_t*, const int64_t*, int64_t, acc_t, const acc_t*,     \
      const int64_t*, acc_t*, PixelLayout, acc_t*, PixelLayout);

DRSL_INSTANTIATE_CONSISTENCY_HINGE(float, float)
DRSL_INSTANTIATE_CONSISTENCY_HINGE(double, double)
DRSL_INSTANTIATE_CONSISTENCY_HINGE(__half, float)
DRSL_INSTANTIATE_CONSISTENCY_HINGE(__nv_bfloat16, float)

// Pseudo-labels (docs/method.md §5) and entropy map (docs/method.md §7)
#define DRSL_INSTANTIATE_PSEUDO_LABELS_AND_ENTROPY(scalar_t, acc_t)                                                      \
  template __global__ void confidence_histogram_kernel<scalar_t>(const scalar_t*, PixelLayout, int,  \
                                                                 int64_t, bool, int,                 \
                                                                 unsigned long long*);               \
  template __global__ void select_labels_kernel<scalar_t>(const scalar_t*, PixelLayout, int, int64_t, \
                                                          const float*, uint8_t*);                    \
  template __global__ void entropy_map_kernel<scalar_t, acc_t>(const scalar_t*, PixelLayout, int,     \
                                                               int64_t, acc_t, acc_t*, acc_t*);       \
  template __global__ void entropy_map_backward_kernel<scalar_t, acc_t>(                              \
      const scalar_t*, PixelLayout, int, int64_t, acc_t, const acc_t*, const acc_t*, scalar_t*,       \
      PixelLayout);

DRSL_INSTANTIATE_PSEUDO_LABELS_AND_ENTROPY(float, float)
DRSL_INSTANTIATE_PSEUDO_LABELS_AND_ENTROPY(double, double)
DRSL_INSTANTIATE_PSEUDO_LABELS_AND_ENTROPY(__half, float)
DRSL_INSTANTIATE_PSEUDO_LABELS_AND_ENTROPY(__nv_bfloat16, float)

}  // namespace cuda
}  // namespace drsl_fast
