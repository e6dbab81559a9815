// Host-side launchers of the CUDA kernels (csrc/cuda/step_kernels.cu). Plain C++ and the CUDA
// runtime only, so the kernel file compiles without any PyTorch header; the ATen-facing ops are in
// csrc/cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../step_params.h"

namespace agf {
namespace cuda {

enum class StepKernel : int { kEuler = 0, kHeun = 1, kChurn = 2, kNormal = 3 };

// Launches one fused op over p.numel elements on `stream` (no synchronisation, no allocation);
// returns the launch status. `device` is the CUDA device the pointers live on.
cudaError_t launch_step(StepKernel kind, const StepParams& p, DType state, DType net, int device,
                        cudaStream_t stream);

// Philox4x32-10 of n rows: counter [n, 4], key [n, 2] (uint32 values in int64) -> out [n, 4].
cudaError_t launch_philox_words(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace agf
