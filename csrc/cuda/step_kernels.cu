// CUDA kernels of the fused sampler ops: one pass over memory per evaluation.
//
//   euler:  D = D0 + w (D1 - D0) (autoguidance eq. 2, torch.lerp's rule), d = (x_hat - D)/t_hat,
//           x_next = x_hat + (t_next - t_hat) d                      (EDM Algorithm 2, lines 7-8);
//           d is stored only when out_slope is set (no Heun correction follows otherwise)
//   heun:   d' = (x_next - D')/t_next, x_out = x_hat + (t_next - t_hat)(d/2 + d'/2)     (lines 9-11)
//   churn:  x_hat' = x + sqrt(t_hat'^2 - t'^2) S_noise eps                             (line 5)
// with eps the per-image Philox noise of autoguide_fast/noise.py, generated in-kernel from the
// seeds in device memory: no separate randn launch, no host synchronisation, no allocation, so
// the kernels can be captured in a CUDA graph.
//
// Each thread handles groups of 4 consecutive elements, grid-stride. When every pointer is
// aligned for it, a group is one 16-byte (float32), 2x16-byte (float64) or 8-byte (16-bit) access;
// and when the image size is a multiple of 4, a group is exactly one Philox call (4 normals).
// The arithmetic uses the explicit round-to-nearest intrinsics of step_math.h, so it is the same
// sequence of IEEE operations as the reference's eager tensor ops (no fma contraction).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../step_math.h"
#include "step_kernels.h"

// Kernel launch; csrc/cuda/emulate_host.cpp redefines it to run the kernels on the CPU (a check of
// the indexing, vector and noise logic where no GPU is available).
#ifndef AGF_LAUNCH
#define AGF_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

// Largest element count indexed with 32-bit division. The emulator lowers it to run the 64-bit
// path, which real tensors reach only beyond 2^32 elements (too large for a host test).
#ifndef AGF_INDEX32_LIMIT
#define AGF_INDEX32_LIMIT static_cast<int64_t>(UINT32_MAX)
#endif

namespace agf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

template <typename U>
struct alignas(4 * sizeof(U)) Pack4 {
  U v[4];
};

// Network output -> state dtype, as `.to(dtype)` (16-bit types are exact in float32).
template <typename T>
__device__ __forceinline__ T to_state(float v) { return static_cast<T>(v); }
template <typename T>
__device__ __forceinline__ T to_state(double v) { return static_cast<T>(v); }
template <typename T>
__device__ __forceinline__ T to_state(__half v) { return static_cast<T>(__half2float(v)); }
template <typename T>
__device__ __forceinline__ T to_state(__nv_bfloat16 v) { return static_cast<T>(__bfloat162float(v)); }

// Loads elements i0 .. i0+3 (those below numel); one vector access when aligned and complete.
template <typename U>
__device__ __forceinline__ void load4(const U* __restrict__ ptr, int64_t i0, int64_t numel, bool vec, U out[4]) {
  if (vec && i0 + 4 <= numel) {
    const Pack4<U> pack = *reinterpret_cast<const Pack4<U>*>(ptr + i0);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = pack.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = i0 + k < numel ? ptr[i0 + k] : ptr[i0];
  }
}

template <typename U>
__device__ __forceinline__ void store4(U* __restrict__ ptr, int64_t i0, int64_t numel, bool vec, const U in[4]) {
  if (vec && i0 + 4 <= numel) {
    Pack4<U> pack;
#pragma unroll
    for (int k = 0; k < 4; ++k) pack.v[k] = in[k];
    *reinterpret_cast<Pack4<U>*>(ptr + i0) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (i0 + k < numel) ptr[i0 + k] = in[k];
    }
  }
}

// (image, element within the image); 32-bit division whenever the sizes allow (much cheaper).
__device__ __forceinline__ void image_index(int64_t i, int64_t image_numel, bool small, int64_t& image,
                                            int64_t& element) {
  if (small) {
    const uint32_t q = static_cast<uint32_t>(i) / static_cast<uint32_t>(image_numel);
    image = q;
    element = i - static_cast<int64_t>(q) * image_numel;
  } else {
    image = i / image_numel;
    element = i - image * image_numel;
  }
}

// Noise of elements i0 .. i0+3 of the flat range, rounded to T (noise.py's specification).
template <typename T>
__device__ __forceinline__ void noise4(const StepParams& p, uint32_t stream, int64_t i0, bool small, T eps[4]) {
  if ((p.image_numel & 3) == 0) {
    // i0 is a multiple of 4 and so is every image start: the group is one Philox call.
    int64_t image, element;
    image_index(i0, p.image_numel, small, image, element);
    double z[4];
    philox_normal4(p.seeds[image], static_cast<uint64_t>(element) >> 2, stream, z);
#pragma unroll
    for (int k = 0; k < 4; ++k) eps[k] = static_cast<T>(z[k]);
  } else {
    // The group may straddle two images: each element takes its own Box-Muller pair.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = i0 + k < p.numel ? i0 + k : i0;
      int64_t image, element;
      image_index(i, p.image_numel, small, image, element);
      const Words4 w = philox_group(p.seeds[image], static_cast<uint64_t>(element) >> 2, stream);
      const int pair = static_cast<int>(element & 2);
      double z_cos, z_sin;
      box_muller(w.r[pair], w.r[pair + 1], z_cos, z_sin);
      eps[k] = static_cast<T>((element & 1) ? z_sin : z_cos);
    }
  }
}

// Optional copy of x_next in the networks' input dtype (c10's conversions: RN, via float32).
template <typename T>
__device__ __forceinline__ void store_cast4(const StepParams& p, int64_t i0, const T x[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t i = i0 + k;
    if (i >= p.numel) break;
    switch (p.cast_dtype) {
      case DType::kFloat32: static_cast<float*>(p.out_cast)[i] = static_cast<float>(x[k]); break;
      case DType::kFloat64: static_cast<double*>(p.out_cast)[i] = static_cast<double>(x[k]); break;
      case DType::kFloat16: static_cast<__half*>(p.out_cast)[i] = __float2half(static_cast<float>(x[k])); break;
      case DType::kBFloat16:
        static_cast<__nv_bfloat16*>(p.out_cast)[i] = __float2bfloat16(static_cast<float>(x[k]));
        break;
    }
  }
}

template <typename T, typename N, bool kGuided>
__device__ __forceinline__ void load_denoised(const StepParams& p, int64_t i0, bool vec, LerpCoeff<T> lc, T D[4]) {
  N d1[4];
  load4(static_cast<const N*>(p.d_main), i0, p.numel, vec, d1);
  if constexpr (kGuided) {
    N d0[4];
    load4(static_cast<const N*>(p.d_guide), i0, p.numel, vec, d0);
#pragma unroll
    for (int k = 0; k < 4; ++k) D[k] = guided_denoiser(to_state<T>(d0[k]), to_state<T>(d1[k]), lc);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) D[k] = to_state<T>(d1[k]);
  }
}

template <typename T, typename N, bool kGuided>
__global__ void __launch_bounds__(kThreads) euler_kernel(const StepParams p, bool vec, bool small) {
  const StepScalars s = step_scalars(p);  // Five loads per thread from device memory when p.scalars is set.
  const LerpCoeff<T> lc = lerp_coeff(static_cast<T>(s.w));
  const T t_hat = static_cast<T>(s.t_hat);
  const T dt = sub_rn(static_cast<T>(s.t_next), t_hat);
  const T scale = static_cast<T>(s.scale);
  const int64_t groups = (p.numel + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * g;
    T x[4], D[4], d[4], x_next[4];
    load4(static_cast<const T*>(p.x_hat), i0, p.numel, vec, x);
    load_denoised<T, N, kGuided>(p, i0, vec, lc, D);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      d[k] = euler_slope(x[k], D[k], t_hat);
      x_next[k] = euler_update(x[k], d[k], dt);
    }
    if (p.seeds != nullptr) {
      T eps[4];
      noise4(p, s.stream, i0, small, eps);
#pragma unroll
      for (int k = 0; k < 4; ++k) x_next[k] = churn_update(x_next[k], scale, eps[k]);
    }
    if (p.out_slope != nullptr) store4(static_cast<T*>(p.out_slope), i0, p.numel, vec, d);  // Uniform branch.
    store4(static_cast<T*>(p.out_x), i0, p.numel, vec, x_next);
    if (p.out_cast != nullptr) store_cast4(p, i0, x_next);
  }
}

template <typename T, typename N, bool kGuided>
__global__ void __launch_bounds__(kThreads) heun_kernel(const StepParams p, bool vec, bool small) {
  const StepScalars s = step_scalars(p);
  const LerpCoeff<T> lc = lerp_coeff(static_cast<T>(s.w));
  const T t_next = static_cast<T>(s.t_next);
  const T dt = sub_rn(t_next, static_cast<T>(s.t_hat));
  const T scale = static_cast<T>(s.scale);
  const int64_t groups = (p.numel + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * g;
    T x[4], d[4], x_next[4], D[4], out[4];
    load4(static_cast<const T*>(p.x_hat), i0, p.numel, vec, x);
    load4(static_cast<const T*>(p.slope), i0, p.numel, vec, d);
    load4(static_cast<const T*>(p.x_next), i0, p.numel, vec, x_next);
    load_denoised<T, N, kGuided>(p, i0, vec, lc, D);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = heun_update(x[k], d[k], x_next[k], D[k], t_next, dt);
    if (p.seeds != nullptr) {
      T eps[4];
      noise4(p, s.stream, i0, small, eps);
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = churn_update(out[k], scale, eps[k]);
    }
    store4(static_cast<T*>(p.out_x), i0, p.numel, vec, out);
  }
}

// churn (kNoiseOnly = false): x + scale eps; philox_normal (true): eps alone.
template <typename T, bool kNoiseOnly>
__global__ void __launch_bounds__(kThreads) churn_kernel(const StepParams p, bool vec, bool small) {
  const T scale = static_cast<T>(p.scale);
  const int64_t groups = (p.numel + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * g;
    T eps[4], out[4];
    if (p.seeds != nullptr) {
      noise4(p, p.stream, i0, small, eps);
    } else {
      load4(static_cast<const T*>(p.eps), i0, p.numel, vec, eps);
    }
    if constexpr (kNoiseOnly) {
      store4(static_cast<T*>(p.out_x), i0, p.numel, vec, eps);
    } else {
      T x[4];
      load4(static_cast<const T*>(p.x_hat), i0, p.numel, vec, x);
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = churn_update(x[k], scale, eps[k]);
      store4(static_cast<T*>(p.out_x), i0, p.numel, vec, out);
    }
  }
}

__global__ void philox_words_kernel(const int64_t* __restrict__ counter, const int64_t* __restrict__ key,
                                    int64_t* __restrict__ out, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const Words4 w = philox4x32_10(static_cast<uint32_t>(counter[4 * i]), static_cast<uint32_t>(counter[4 * i + 1]),
                                 static_cast<uint32_t>(counter[4 * i + 2]), static_cast<uint32_t>(counter[4 * i + 3]),
                                 static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1]));
#pragma unroll
  for (int k = 0; k < 4; ++k) out[4 * i + k] = static_cast<int64_t>(w.r[k]);
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
size_t element_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    default: return 2;
  }
}

// One 4-element access per pointer needs 4 x element-size alignment.
bool aligned(const void* ptr, size_t elem) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % (4 * elem) == 0;
}

// Multiprocessor count, queried once per device (an attribute query: no synchronisation, allowed
// during graph capture, but not free).
int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 132;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();  // Do not let the failed query surface as the launch's error.
      n = 132;
    }
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T, typename N>
void launch_typed(StepKernel kind, const StepParams& p, dim3 grid, cudaStream_t stream, bool vec, bool small) {
  const bool guided = p.d_guide != nullptr;
  switch (kind) {
    case StepKernel::kEuler:
      if (guided) AGF_LAUNCH(grid, kThreads, stream, euler_kernel<T, N, true>)(p, vec, small);
      else AGF_LAUNCH(grid, kThreads, stream, euler_kernel<T, N, false>)(p, vec, small);
      break;
    case StepKernel::kHeun:
      if (guided) AGF_LAUNCH(grid, kThreads, stream, heun_kernel<T, N, true>)(p, vec, small);
      else AGF_LAUNCH(grid, kThreads, stream, heun_kernel<T, N, false>)(p, vec, small);
      break;
    case StepKernel::kChurn: AGF_LAUNCH(grid, kThreads, stream, churn_kernel<T, false>)(p, vec, small); break;
    case StepKernel::kNormal: AGF_LAUNCH(grid, kThreads, stream, churn_kernel<T, true>)(p, vec, small); break;
  }
}

template <typename T>
void launch_state(StepKernel kind, const StepParams& p, DType net, dim3 grid, cudaStream_t stream, bool vec,
                  bool small) {
  switch (net) {
    case DType::kFloat32: launch_typed<T, float>(kind, p, grid, stream, vec, small); break;
    case DType::kFloat64: launch_typed<T, double>(kind, p, grid, stream, vec, small); break;
    case DType::kFloat16: launch_typed<T, __half>(kind, p, grid, stream, vec, small); break;
    case DType::kBFloat16: launch_typed<T, __nv_bfloat16>(kind, p, grid, stream, vec, small); break;
  }
}

}  // namespace

cudaError_t launch_step(StepKernel kind, const StepParams& p, DType state, DType net, int device,
                        cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const size_t s = element_size(state);
  const size_t n = element_size(net);
  bool vec = aligned(p.x_hat, s) && aligned(p.slope, s) && aligned(p.x_next, s) && aligned(p.eps, s) &&
             aligned(p.out_slope, s) && aligned(p.out_x, s);
  if (kind == StepKernel::kEuler || kind == StepKernel::kHeun) {
    vec = vec && aligned(p.d_main, n) && aligned(p.d_guide, n);
  }
  const bool small = p.numel <= AGF_INDEX32_LIMIT;
  const int64_t groups = (p.numel + 3) / 4;
  const int64_t wanted = (groups + kThreads - 1) / kThreads;
  // Enough resident blocks to saturate memory; the grid-stride loop covers the rest.
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * (2048 / kThreads) * 4;
  const dim3 grid(static_cast<unsigned>(wanted < cap ? wanted : cap));
  if (state == DType::kFloat32) launch_state<float>(kind, p, net, grid, stream, vec, small);
  else launch_state<double>(kind, p, net, grid, stream, vec, small);
  return cudaGetLastError();
}

cudaError_t launch_philox_words(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads));
  AGF_LAUNCH(grid, kThreads, stream, philox_words_kernel)(counter, key, out, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace agf
