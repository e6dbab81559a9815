// Runs the CUDA kernels of step_kernels.cu on the CPU, one emulated thread after another, so that
// their indexing, vector-access, grid-stride and noise-grouping logic is tested where there is no
// GPU (tests/test_cuda_backend.py builds this file with the host compiler against the CUDA headers
// and calls it through ctypes). Not part of the extension (setup.py builds csrc/*.cpp and
// csrc/cuda/*.cu only). The arithmetic takes step_math.h's host branches: the same correctly
// rounded IEEE operations as the device intrinsics, with the host libm for log/sin/cos.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace agf_emu {

thread_local uint3 block_idx;
thread_local uint3 thread_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;
int sm_count = 1;  // Small on purpose: few resident blocks, so the grid-stride loops iterate.
int64_t index32_limit = UINT32_MAX;  // Lowered by agf_emu_set_index32_limit: the 64-bit index path.

inline cudaError_t get_last_error() { return cudaSuccess; }

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr, int) {
  *value = sm_count;
  return cudaSuccess;
}

template <typename Kernel>
auto launcher(dim3 grid, unsigned block, Kernel kernel) {
  return [=](auto... args) {
    grid_dim = grid;
    block_dim = dim3(block);
    for (unsigned b = 0; b < grid.x; ++b) {
      for (unsigned t = 0; t < block; ++t) {
        block_idx = make_uint3(b, 0, 0);
        thread_idx = make_uint3(t, 0, 0);
        kernel(args...);
      }
    }
  };
}

}  // namespace agf_emu

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define blockIdx agf_emu::block_idx
#define threadIdx agf_emu::thread_idx
#define blockDim agf_emu::block_dim
#define gridDim agf_emu::grid_dim
#define cudaGetLastError agf_emu::get_last_error
#define cudaDeviceGetAttribute agf_emu::device_get_attribute
#define AGF_LAUNCH(grid, block, stream, ...) ::agf_emu::launcher((grid), (block), __VA_ARGS__)
#define AGF_INDEX32_LIMIT ::agf_emu::index32_limit

#include "step_kernels.cu"

extern "C" {

int agf_emu_step(int kind, int state, int net, int64_t numel, int64_t image_numel, const void* x_hat,
                 const void* d_main, const void* d_guide, const void* slope, const void* x_next, const void* eps,
                 const int64_t* seeds, void* out_slope, void* out_x, void* out_cast, int cast_dtype, double w,
                 double t_hat, double t_next, double scale, uint32_t stream,
                 const double* scalars) {
  agf::StepParams p;
  p.numel = numel;
  p.image_numel = image_numel;
  p.x_hat = x_hat;
  p.d_main = d_main;
  p.d_guide = d_guide;
  p.slope = slope;
  p.x_next = x_next;
  p.eps = eps;
  p.seeds = seeds;
  p.out_slope = out_slope;
  p.out_x = out_x;
  p.out_cast = out_cast;
  p.cast_dtype = static_cast<agf::DType>(cast_dtype);
  p.w = w;
  p.t_hat = t_hat;
  p.t_next = t_next;
  p.scale = scale;
  p.stream = stream;
  p.scalars = scalars;  // Null: the fields above.
  return static_cast<int>(agf::cuda::launch_step(static_cast<agf::cuda::StepKernel>(kind), p,
                                                 static_cast<agf::DType>(state), static_cast<agf::DType>(net), 0,
                                                 nullptr));
}

// Element counts above `limit` take the kernels' 64-bit index arithmetic (default 2^32 - 1).
void agf_emu_set_index32_limit(int64_t limit) { agf_emu::index32_limit = limit; }

int agf_emu_philox(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n) {
  return static_cast<int>(agf::cuda::launch_philox_words(counter, key, out, n, nullptr));
}

}  // extern "C"
