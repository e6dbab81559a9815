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
  // Optional [w, t_hat, t_next, scale, stream] in float64, in the memory of the op's device. When
  // set, the kernels read the five values from there instead of the fields above (so one CUDA graph
  // can serve every step of a kind: the engine updates the values between replays).
  const double* scalars = nullptr;
};

// The five per-step values a kernel uses, from `scalars` when set, else from the fields. Plain
// inline code: the CUDA kernels call it on the device (AGF_HOST_DEVICE), the CPU ops on the host.
#if defined(__CUDACC__)
#define AGF_HOST_DEVICE __host__ __device__
#else
#define AGF_HOST_DEVICE
#endif

struct StepScalars {
  double w, t_hat, t_next, scale;
  uint32_t stream;
};

AGF_HOST_DEVICE inline StepScalars step_scalars(const StepParams& p) {
  if (p.scalars == nullptr) return {p.w, p.t_hat, p.t_next, p.scale, p.stream};
  const double* s = p.scalars;
  // The stream is an integer in [0, 2^32) stored exactly in a double (written so by the engine; a
  // device value cannot be checked here without a synchronisation, the CPU ops check it first).
  // Converted without undefined behaviour whatever it holds: out of range or NaN reads as 0.
  const double st = s[4];
  const uint32_t stream = (st >= 0.0 && st < 4294967296.0) ? static_cast<uint32_t>(st) : 0u;
  return {s[0], s[1], s[2], s[3], stream};
}

}  // namespace agf
