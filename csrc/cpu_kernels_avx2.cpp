// The CPU kernels compiled for AVX2 + FMA (x86-64, GCC or Clang), chosen at run time when the CPU
// has both. Hardware FMA is what makes torch.lerp's single-rounding rule cheap and vectorisable.
// System headers come first so that only this file's own (internal-linkage) code is compiled for
// the wider ISA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // Its AVX2 functions carry their own target attribute.

#define AGF_HAVE_AVX2_VARIANT 1
#define AGF_NOISE_AVX2 1  // cpu_noise.h: Philox words eight groups at a time with AVX2 intrinsics.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "cpu_kernels_impl.h"

namespace agf {
namespace {
const KernelTable& avx2_table() {
  static const KernelTable table = make_table("avx2+fma");
  return table;
}
}  // namespace
}  // namespace agf

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace agf {

const KernelTable* cpu_kernels_avx2() {
#if defined(AGF_HAVE_AVX2_VARIANT)
  // Checked before touching any AVX2-compiled code (the table's initialiser included).
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported ? &avx2_table() : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace agf
