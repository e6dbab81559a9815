// Plain-C++ description of one fused op's arguments, shared by the ATen-facing ops and by both
// kernel families (CPU and CUDA). No PyTorch types: the CUDA kernel file includes it too.
#pragma once

#include <cstdint>

namespace agf {

// Element types of the kernels. The state is float32 or float64; network outputs and the
// optional cast copy of x_next may also be float16 / bfloat16.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
constexpr int kNumStateTypes = 2;
constexpr int kNumNetTypes = 4;

// Arguments of one fused op over `numel` contiguous elements (pointers not used by an op are null).
struct StepParams {
  int64_t numel = 0;
  int64_t image_numel = 1;           // Elements per image: the noise is indexed per image.
  const void* x_hat = nullptr;       // State at t_hat (state type).
  const void* d_main = nullptr;      // D1 output (net type).
  const void* d_guide = nullptr;     // D0 output (net type); null = unguided.
  const void* slope = nullptr;       // Euler slope d (state type), Heun input.
  const void* x_next = nullptr;      // Euler prediction (state type), Heun input.
  const void* eps = nullptr;         // Explicit churn noise (state type), churn op only.
  const int64_t* seeds = nullptr;    // Per-image seeds; non-null = add the seeded churn noise.
  void* out_slope = nullptr;         // Euler slope d (state type); null = not written.
  void* out_x = nullptr;             // x_next / x_out / x_hat / noise (state type).
  void* out_cast = nullptr;          // Optional copy of out_x in cast_dtype.
  DType cast_dtype = DType::kFloat32;
  double w = 1.0;                    // Guidance weight (rounded to the state type in the kernel).
  double t_hat = 1.0;
  double t_next = 0.0;
  double scale = 0.0;                // Churn scale sqrt(t_hat'^2 - t'^2) S_noise.
  uint32_t stream = 0;               // Philox stream of the noise.
};

}  // namespace agf
