// The CPU kernels of the fused ops, included by cpu_kernels_baseline.cpp and cpu_kernels_avx2.cpp.
// Everything here has internal linkage (anonymous namespace, `static` helpers) so the two copies,
// compiled for different ISAs, never get merged by the linker.
//
// Each op is one pass over memory: a chunk [begin, end) is cut into blocks small enough for L1;
// when churn noise is fused, a block never straddles two images and its noise is generated into
// a stack buffer first, so the arithmetic loop stays a straight loop the compiler vectorises.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"
#include "cpu_noise.h"
#include "step_math.h"

namespace agf {
namespace {

constexpr int64_t kBlock = 1024;

// Storage types of the 16-bit network dtypes (conversions are done on the bit patterns, so the
// kernels need no half-precision support from the compiler).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float f32_from_bits(uint32_t u) { return bit_cast<float>(u); }
inline uint32_t f32_bits(float f) { return bit_cast<uint32_t>(f); }

// float16 -> float32 is exact: re-bias the exponent of normals, scale subnormals by 2^-24
// (an exact float product), keep inf/NaN payloads.
inline float half_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
  const uint32_t special = 0x7f800000u | (mantissa << 13);
  const uint32_t subnormal = f32_bits(static_cast<float>(static_cast<int32_t>(mantissa)) * 0x1p-24f);
  const uint32_t magnitude = exponent == 0 ? subnormal : (exponent == 31 ? special : normal);
  return f32_from_bits(sign | magnitude);
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// float32 -> float16 with round-to-nearest-even (as c10::Half): NaN -> quiet NaN keeping the sign.
inline uint16_t f32_to_half(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf.
  if (a < 0x38800000u) {
    // Below 2^-14: a half subnormal m 2^-24; v 2^24 is exact, adding and removing 2^23 rounds it
    // to the nearest integer, ties to even.
    const float scaled = f32_from_bits(a) * 0x1p24f;
    const float rounded = (scaled + 0x1p23f) - 0x1p23f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rounded));
  }
  const uint32_t odd = (a >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((a + 0xfffu + odd - (112u << 23)) >> 13));
}

// float32 -> bfloat16 with round-to-nearest-even (as c10::BFloat16): NaN -> 0x7fc0.
inline uint16_t f32_to_bf16(float f) {
  if (f != f) return 0x7fc0u;
  const uint32_t u = f32_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Network output -> state dtype, as the reference's `.to(dtype)` (16-bit types go through float32,
// which is exact).
template <typename T>
inline T to_state(float v) {
  return static_cast<T>(v);
}
template <typename T>
inline T to_state(double v) {
  return static_cast<T>(v);
}
template <typename T>
inline T to_state(Half v) {
  return static_cast<T>(half_to_f32(v.bits));
}
template <typename T>
inline T to_state(BFloat16 v) {
  return static_cast<T>(bf16_to_f32(v.bits));
}

enum GuideMode : int { kUnguided = 0, kBaseD0 = 1, kBaseD1 = 2 };

template <typename T, int kMode, typename N>
inline T denoised(const N* __restrict d1, const N* __restrict d0, int64_t i, LerpCoeff<T> lc) {
  if constexpr (kMode == kUnguided) {
    return to_state<T>(d1[i]);
  } else {
    lc.from_d0 = kMode == kBaseD0;  // Constant per instantiation: the loop has no select.
    return guided_denoiser(to_state<T>(d0[i]), to_state<T>(d1[i]), lc);
  }
}

template <typename T>
int guide_mode(const StepParams& p, LerpCoeff<T>& lc) {
  lc = lerp_coeff(static_cast<T>(p.w));
  if (p.d_guide == nullptr) return kUnguided;
  return lc.from_d0 ? kBaseD0 : kBaseD1;
}

// Noise of elements [e0, e0 + n) of one image (n <= kBlock), rounded to T (noise.py's
// specification): the words of every group the range touches, their Box-Muller pairs, then each
// element picks lane e % 4 of group e / 4 (lanes 0, 1 from words 0, 1; lanes 2, 3 from words 2, 3).
constexpr int64_t kBlockGroups = kBlock / 4 + 2;

template <typename T>
void fill_noise(int64_t seed, uint32_t stream, int64_t e0, int64_t n, T* __restrict eps) {
  alignas(64) uint32_t words[4][kBlockGroups];
  alignas(64) double z[4][kBlockGroups];
  const uint64_t g0 = static_cast<uint64_t>(e0) >> 2;
  const int64_t groups = static_cast<int64_t>(((static_cast<uint64_t>(e0 + n) + 3) >> 2) - g0);
  philox_words_block(seed, stream, g0, groups, words[0], words[1], words[2], words[3]);
  box_muller_block(words[0], words[1], z[0], z[1], groups);
  box_muller_block(words[2], words[3], z[2], z[3], groups);
  const int64_t first = e0 & 3;  // Lane of element e0 in group g0.
  int64_t i = 0;
  if (first == 0) {  // Whole groups: four lanes interleaved, a loop the compiler vectorises.
    for (; i + 4 <= n; i += 4) {
      const int64_t j = i >> 2;
      eps[i] = static_cast<T>(z[0][j]);
      eps[i + 1] = static_cast<T>(z[1][j]);
      eps[i + 2] = static_cast<T>(z[2][j]);
      eps[i + 3] = static_cast<T>(z[3][j]);
    }
  }
  for (; i < n; ++i) {
    const int64_t e = first + i;
    eps[i] = static_cast<T>(z[e & 3][e >> 2]);
  }
}

// Runs body(i0, n, eps) over [begin, end) in blocks; with seeds, eps holds the block's noise.
template <typename T, typename Body>
void for_blocks(const StepParams& p, int64_t begin, int64_t end, Body&& body) {
  alignas(64) T eps[kBlock];
  for (int64_t i0 = begin; i0 < end;) {
    int64_t n = std::min(kBlock, end - i0);
    if (p.seeds != nullptr) {
      const int64_t image = i0 / p.image_numel;
      const int64_t e0 = i0 - image * p.image_numel;
      n = std::min(n, p.image_numel - e0);
      fill_noise<T>(p.seeds[image], p.stream, e0, n, eps);
      body(i0, n, static_cast<const T*>(eps));
    } else {
      body(i0, n, static_cast<const T*>(nullptr));
    }
    i0 += n;
  }
}

template <typename T>
void cast_block(const T* __restrict src, void* dst, int64_t i0, int64_t n, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: {
      float* __restrict out = static_cast<float*>(dst) + i0;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
      break;
    }
    case DType::kFloat64: {
      double* __restrict out = static_cast<double*>(dst) + i0;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(src[i]);
      break;
    }
    case DType::kFloat16: {  // float64 goes through float32 first, as c10::Half(double) does.
      uint16_t* __restrict out = static_cast<uint16_t*>(dst) + i0;
      for (int64_t i = 0; i < n; ++i) out[i] = f32_to_half(static_cast<float>(src[i]));
      break;
    }
    case DType::kBFloat16: {
      uint16_t* __restrict out = static_cast<uint16_t*>(dst) + i0;
      for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(static_cast<float>(src[i]));
      break;
    }
  }
}

// ---- Euler: D = lerp(D0, D1, w); d = (x_hat - D)/t_hat; x_next = x_hat + (t_next - t_hat) d ----
// kWriteD = false (no out_slope): d is only an intermediate of x_next and is never stored.
template <typename T, typename N, int kMode, bool kChurn, bool kWriteD>
void euler_block(const StepParams& p, int64_t i0, int64_t n, const T* __restrict eps, LerpCoeff<T> lc) {
  const T* __restrict x = static_cast<const T*>(p.x_hat) + i0;
  const N* __restrict d1 = static_cast<const N*>(p.d_main) + i0;
  const N* __restrict d0 = kMode == kUnguided ? nullptr : static_cast<const N*>(p.d_guide) + i0;
  T* __restrict slope = kWriteD ? static_cast<T*>(p.out_slope) + i0 : nullptr;
  T* __restrict out = static_cast<T*>(p.out_x) + i0;
  const T t_hat = static_cast<T>(p.t_hat);
  const T dt = sub_rn(static_cast<T>(p.t_next), t_hat);
  const T scale = static_cast<T>(p.scale);
  for (int64_t i = 0; i < n; ++i) {
    const T d = euler_slope(x[i], denoised<T, kMode>(d1, d0, i, lc), t_hat);
    T x_next = euler_update(x[i], d, dt);
    if constexpr (kChurn) x_next = churn_update(x_next, scale, eps[i]);
    if constexpr (kWriteD) slope[i] = d;
    out[i] = x_next;
  }
}

template <typename T, typename N, bool kChurn, bool kWriteD>
void euler_block_mode(const StepParams& p, int mode, int64_t i0, int64_t n, const T* eps, LerpCoeff<T> lc) {
  if (mode == kUnguided) euler_block<T, N, kUnguided, kChurn, kWriteD>(p, i0, n, eps, lc);
  else if (mode == kBaseD0) euler_block<T, N, kBaseD0, kChurn, kWriteD>(p, i0, n, eps, lc);
  else euler_block<T, N, kBaseD1, kChurn, kWriteD>(p, i0, n, eps, lc);
}

template <typename T, typename N>
void euler_chunk(const StepParams& p, int64_t begin, int64_t end) {
  LerpCoeff<T> lc;
  const int mode = guide_mode<T>(p, lc);
  const bool write_d = p.out_slope != nullptr;
  for_blocks<T>(p, begin, end, [&](int64_t i0, int64_t n, const T* eps) {
    if (eps != nullptr) {
      if (write_d) euler_block_mode<T, N, true, true>(p, mode, i0, n, eps, lc);
      else euler_block_mode<T, N, true, false>(p, mode, i0, n, eps, lc);
    } else {
      if (write_d) euler_block_mode<T, N, false, true>(p, mode, i0, n, eps, lc);
      else euler_block_mode<T, N, false, false>(p, mode, i0, n, eps, lc);
    }
    if (p.out_cast != nullptr) cast_block<T>(static_cast<const T*>(p.out_x) + i0, p.out_cast, i0, n, p.cast_dtype);
  });
}

// ---- Heun: d' = (x_next - D')/t_next; x_out = x_hat + (t_next - t_hat)(d/2 + d'/2) ----
template <typename T, typename N, int kMode, bool kChurn>
void heun_block(const StepParams& p, int64_t i0, int64_t n, const T* __restrict eps, LerpCoeff<T> lc) {
  const T* __restrict x = static_cast<const T*>(p.x_hat) + i0;
  const T* __restrict slope = static_cast<const T*>(p.slope) + i0;
  const T* __restrict x_next = static_cast<const T*>(p.x_next) + i0;
  const N* __restrict d1 = static_cast<const N*>(p.d_main) + i0;
  const N* __restrict d0 = kMode == kUnguided ? nullptr : static_cast<const N*>(p.d_guide) + i0;
  T* __restrict out = static_cast<T*>(p.out_x) + i0;
  const T t_next = static_cast<T>(p.t_next);
  const T dt = sub_rn(t_next, static_cast<T>(p.t_hat));
  const T scale = static_cast<T>(p.scale);
  for (int64_t i = 0; i < n; ++i) {
    T x_out = heun_update(x[i], slope[i], x_next[i], denoised<T, kMode>(d1, d0, i, lc), t_next, dt);
    if constexpr (kChurn) x_out = churn_update(x_out, scale, eps[i]);
    out[i] = x_out;
  }
}

template <typename T, typename N>
void heun_chunk(const StepParams& p, int64_t begin, int64_t end) {
  LerpCoeff<T> lc;
  const int mode = guide_mode<T>(p, lc);
  for_blocks<T>(p, begin, end, [&](int64_t i0, int64_t n, const T* eps) {
    if (eps != nullptr) {
      if (mode == kUnguided) heun_block<T, N, kUnguided, true>(p, i0, n, eps, lc);
      else if (mode == kBaseD0) heun_block<T, N, kBaseD0, true>(p, i0, n, eps, lc);
      else heun_block<T, N, kBaseD1, true>(p, i0, n, eps, lc);
    } else {
      if (mode == kUnguided) heun_block<T, N, kUnguided, false>(p, i0, n, eps, lc);
      else if (mode == kBaseD0) heun_block<T, N, kBaseD0, false>(p, i0, n, eps, lc);
      else heun_block<T, N, kBaseD1, false>(p, i0, n, eps, lc);
    }
  });
}

// ---- Churn: x_hat = x + scale eps (eps explicit, or seeded) ----
template <typename T>
void churn_chunk(const StepParams& p, int64_t begin, int64_t end) {
  for_blocks<T>(p, begin, end, [&](int64_t i0, int64_t n, const T* eps) {
    const T* __restrict x = static_cast<const T*>(p.x_hat) + i0;
    const T* __restrict e = eps != nullptr ? eps : static_cast<const T*>(p.eps) + i0;
    T* __restrict out = static_cast<T*>(p.out_x) + i0;
    const T scale = static_cast<T>(p.scale);
    for (int64_t i = 0; i < n; ++i) out[i] = churn_update(x[i], scale, e[i]);
  });
}

// ---- Seeded noise alone ----
template <typename T>
void normal_chunk(const StepParams& p, int64_t begin, int64_t end) {
  // Always with seeds (prepare_normal requires them), so eps is never null here.
  for_blocks<T>(p, begin, end, [&](int64_t i0, int64_t n, const T* eps) {
    if (eps != nullptr) std::memcpy(static_cast<T*>(p.out_x) + i0, eps, static_cast<size_t>(n) * sizeof(T));
  });
}

KernelTable make_table(const char* isa) {
  KernelTable t{};
  t.isa = isa;
  t.euler[0][0] = &euler_chunk<float, float>;
  t.euler[0][1] = &euler_chunk<float, double>;
  t.euler[0][2] = &euler_chunk<float, Half>;
  t.euler[0][3] = &euler_chunk<float, BFloat16>;
  t.euler[1][0] = &euler_chunk<double, float>;
  t.euler[1][1] = &euler_chunk<double, double>;
  t.euler[1][2] = &euler_chunk<double, Half>;
  t.euler[1][3] = &euler_chunk<double, BFloat16>;
  t.heun[0][0] = &heun_chunk<float, float>;
  t.heun[0][1] = &heun_chunk<float, double>;
  t.heun[0][2] = &heun_chunk<float, Half>;
  t.heun[0][3] = &heun_chunk<float, BFloat16>;
  t.heun[1][0] = &heun_chunk<double, float>;
  t.heun[1][1] = &heun_chunk<double, double>;
  t.heun[1][2] = &heun_chunk<double, Half>;
  t.heun[1][3] = &heun_chunk<double, BFloat16>;
  t.churn[0] = &churn_chunk<float>;
  t.churn[1] = &churn_chunk<double>;
  t.normal[0] = &normal_chunk<float>;
  t.normal[1] = &normal_chunk<double>;
  return t;
}

}  // namespace
}  // namespace agf
