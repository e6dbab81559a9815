// Per-element math of one sampler step and the seeded noise generator, shared by the C++ (CPU)
// and CUDA kernels so that both compute exactly the same sequence of IEEE operations.
//
// Bit-exactness with the reference (autoguide_fast.reference.edm_sampler) rests on three rules:
//   * every operation is rounded once, in the state dtype T, in the reference's order; on the
//     device the explicit round-to-nearest intrinsics (__fadd_rn, ...) keep nvcc from contracting
//     a*b+c into an fma, on the host the CPU sources are built with -ffp-contract=off;
//   * the guided combination uses torch.lerp's rule (one fma, branch on |w| < 1/2);
//   * the scalars (t_hat, t_next, w, the churn scale) are rounded to T first, and the step size
//     t_next - t_hat is formed in T, exactly as the reference's 0-dim tensor arithmetic does.
// This header has no dependency on PyTorch: it is included by the CUDA kernel file, which is
// compiled with nothing but the CUDA runtime headers.
#pragma once

#include <cmath>
#include <cstdint>

// Internal linkage on the host: the CPU kernels are compiled twice (baseline and AVX2+FMA), and
// an inline function shared between the two translation units could be merged by the linker
// into the AVX2 copy and then run on a CPU without AVX2.
#if defined(__CUDACC__)
#define AGF_HD static __host__ __device__ __forceinline__
#else
#define AGF_HD static inline
#endif

namespace agf {

// ---------------------------------------------------------------------------------------------
// Correctly rounded single operations.
// ---------------------------------------------------------------------------------------------
AGF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
AGF_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
AGF_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
AGF_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
AGF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AGF_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
// True IEEE division (never a reciprocal multiply, which the reference's torch.div is not).
AGF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
AGF_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
AGF_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
AGF_HD double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// ---------------------------------------------------------------------------------------------
// Guided denoiser, autoguidance eq. 2: D_w = D0 + w (D1 - D0) = torch.lerp(D0, D1, w).
// torch.lerp rounds once: fma(w, D1 - D0, D0) for |w| < 1/2, else fma(w - 1, D1 - D0, D1), which
// is exact at both ends (w = 0 gives D0, w = 1 gives D1). The kernels hoist the branch: the
// caller passes coeff = w or w - 1 and picks the base operand once per launch.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct LerpCoeff {
  T coeff;      // w when |w| < 1/2, else w - 1 (formed in T, as torch does).
  bool from_d0; // Base operand: D0 when |w| < 1/2, else D1.
};

template <typename T>
AGF_HD LerpCoeff<T> lerp_coeff(T w) {
  const bool small = (w < T(0) ? -w : w) < T(0.5);
  return LerpCoeff<T>{small ? w : sub_rn(w, T(1)), small};
}

template <typename T>
AGF_HD T guided_denoiser(T d0, T d1, LerpCoeff<T> lc) {
  return fma_rn(lc.coeff, sub_rn(d1, d0), lc.from_d0 ? d0 : d1);
}

// EDM Algorithm 2, lines 7-8: d = (x_hat - D) / t_hat;  x_next = x_hat + (t_next - t_hat) d.
// `dt` is t_next - t_hat already rounded to T.
template <typename T>
AGF_HD T euler_slope(T x_hat, T denoised, T t_hat) {
  return div_rn(sub_rn(x_hat, denoised), t_hat);
}
template <typename T>
AGF_HD T euler_update(T x_hat, T slope, T dt) {
  return add_rn(x_hat, mul_rn(dt, slope));
}

// EDM Algorithm 2, lines 9-11: d' = (x_next - D') / t_next;
// x_out = x_hat + (t_next - t_hat) (d/2 + d'/2), the halves taken separately as the reference does.
template <typename T>
AGF_HD T heun_update(T x_hat, T slope, T x_next, T denoised, T t_next, T dt) {
  const T slope2 = div_rn(sub_rn(x_next, denoised), t_next);
  return add_rn(x_hat, mul_rn(dt, add_rn(mul_rn(T(0.5), slope), mul_rn(T(0.5), slope2))));
}

// EDM Algorithm 2, line 5: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps, with scale = that
// product already rounded to T and eps already rounded to T.
template <typename T>
AGF_HD T churn_update(T x, T scale, T eps) {
  return add_rn(x, mul_rn(scale, eps));
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11) and the Box-Muller transform of autoguide_fast/noise.py.
// Key = the image seed mod 2^64 (k0 low word, k1 high word); counter = (g lo, g hi, stream, 0)
// for group g = e / 4 of the image's row-major element e; one call gives elements 4g .. 4g+3.
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct Words4 {
  uint32_t r[4];
};

AGF_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

AGF_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;  // uint32 arithmetic wraps mod 2^32, as the specification requires.
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words4{{c0, c1, c2, c3}};
}

// Words r0..r3 of group g of the image with this seed, on the given stream.
AGF_HD Words4 philox_group(int64_t seed, uint64_t group, uint32_t stream) {
  const uint64_t key = static_cast<uint64_t>(seed);  // Two's complement = seed mod 2^64.
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), stream, 0u,
                       static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

// u = ((r >> 8) + 1) 2^-24: exact in float32, in (0, 1], so log(u) is finite.
AGF_HD double philox_uniform(uint32_t r) {
  return static_cast<double>((r >> 8) + 1u) * 0x1p-24;
}

// Box-Muller in float64 with the reference's rounding order: radius = sqrt(-2 ln u_a),
// theta = (2 pi) u_b; the pair (radius cos theta, radius sin theta).
AGF_HD void box_muller(uint32_t ra, uint32_t rb, double& z_cos, double& z_sin) {
  const double ua = philox_uniform(ra);
  const double ub = philox_uniform(rb);
  const double radius = sqrt(mul_rn(-2.0, log(ua)));
  const double theta = mul_rn(6.283185307179586, ub);  // 2*math.pi as a Python float.
  double s, c;
#if defined(__CUDA_ARCH__)
  sincos(theta, &s, &c);
#else
  s = std::sin(theta);
  c = std::cos(theta);
#endif
  z_cos = mul_rn(radius, c);
  z_sin = mul_rn(radius, s);
}

// The four standard normals of group g, in element order 4g .. 4g+3 (float64, unrounded).
AGF_HD void philox_normal4(int64_t seed, uint64_t group, uint32_t stream, double z[4]) {
  const Words4 w = philox_group(seed, group, stream);
  box_muller(w.r[0], w.r[1], z[0], z[1]);
  box_muller(w.r[2], w.r[3], z[2], z[3]);
}

}  // namespace agf
