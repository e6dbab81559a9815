// Interface between the ATen-facing CPU ops (cpu_ops.cpp) and the CPU kernels, which are plain
// C++ over raw pointers so that they can be compiled twice: once for the baseline x86-64 ISA and
// once for AVX2+FMA (selected at run time). Without hardware FMA, std::fma in torch.lerp's rule
// is a library call per element and the loops cannot vectorise.
#pragma once

#include <cstdint>

#include "step_params.h"

namespace agf {

// Processes elements [begin, end) of the flat range.
using ChunkFn = void (*)(const StepParams&, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;
  ChunkFn euler[kNumStateTypes][kNumNetTypes];  // [state][net]
  ChunkFn heun[kNumStateTypes][kNumNetTypes];
  ChunkFn churn[kNumStateTypes];                // x + scale * eps, eps explicit or seeded.
  ChunkFn normal[kNumStateTypes];               // Seeded noise only (out_x = eps).
};

const KernelTable& cpu_kernels_baseline();
// nullptr when this build has no AVX2 variant (non-x86, non-GCC/Clang) or the CPU lacks AVX2/FMA.
const KernelTable* cpu_kernels_avx2();

}  // namespace agf
