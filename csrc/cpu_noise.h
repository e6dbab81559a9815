// The seeded noise of the CPU kernels, one block of elements at a time, in straight loops the
// compiler vectorises (no libm calls, no branches). Same specification as step_math.h and
// autoguide_fast/noise.py: Philox4x32-10 words per group of four elements, uniforms
// u = ((r >> 8) + 1) 2^-24, and the Box-Muller pair (sqrt(-2 ln u_a) cos θ, sqrt(-2 ln u_a) sin θ)
// with θ = 2π u_b, in float64, each product rounded as the reference rounds it. Only ln, sin and
// cos differ from the reference's library calls: branch-free polynomials accurate to about one
// unit in the last place of float64 (an exhaustive check over every u of the specification is in
// tests/test_cpp_backend.py), so the noise rounded to float32 equals the reference's but for a
// value that lies within an ulp of float64 of a float32 rounding boundary.
//
// Included by cpu_kernels_impl.h (compiled once per ISA, internal linkage).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "step_math.h"

namespace agf {
namespace {

// The bits of a value as another type of the same size (C++20's std::bit_cast).
template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}
inline uint64_t f64_bits(double v) { return bit_cast<uint64_t>(v); }
inline double f64_from_bits(uint64_t u) { return bit_cast<double>(u); }

// c[0] + z (c[1] + z (... + z c[N-1])), evaluated innermost first (Horner).
template <int N>
inline double horner(double z, const double (&c)[N]) {
  double p = c[N - 1];
  for (int k = N - 2; k >= 0; --k) p = c[k] + z * p;
  return p;
}

// ln u for a positive normal u. u = 2^k f with f in [sqrt(1/2), sqrt(2)), found on the bits: adding
// kLogShift carries into the exponent exactly when the mantissa is >= sqrt(2). With f1 = f - 1
// (exact) and s = f1 / (2 + f1), ln f = 2 atanh(s) = 2s + s P(s^2), P(z) = sum_k 2 z^k / (2k + 1),
// and 2s = f1 - s f1, so ln f = f1 - s (f1 - P): the leading term is exact and the rounding errors
// sit in a correction at most a quarter of the result. |s| <= 0.1716, so ten terms of P reach
// 2^-55 relative. k ln 2 is added as k LN2_HI (exact: 32 significant bits) + k LN2_LO.
inline double noise_log(double u) {
  constexpr uint64_t kLogShift = 0x00095F619980C433ull;  // 1.0's bits - the bits of sqrt(1/2).
  constexpr uint64_t kOne = 0x3FF0000000000000ull;
  constexpr double kLn2Hi = 0x1.62e42ffp-1;
  constexpr double kLn2Lo = -0x1.718432a1b0e26p-35;
  const uint64_t t = f64_bits(u) + kLogShift;
  // k = biased exponent of t - 1023, as a double without an int64 -> double conversion: the
  // exponent field (< 2^52) ORed into 2^52's bits is exactly 2^52 + field.
  const double k = f64_from_bits(0x4330000000000000ull | (t >> 52)) - (0x1p52 + 1023.0);
  const double f = f64_from_bits((t & 0x000FFFFFFFFFFFFFull) - kLogShift + kOne);
  const double f1 = f - 1.0;
  const double s = f1 / (2.0 + f1);
  const double z = s * s;
  constexpr double kP[] = {2.0 / 3, 2.0 / 5, 2.0 / 7, 2.0 / 9, 2.0 / 11, 2.0 / 13, 2.0 / 15, 2.0 / 17, 2.0 / 19, 2.0 / 21};
  const double p = z * horner(z, kP);
  const double ln_f = f1 - s * (f1 - p);
  return k * kLn2Hi + (ln_f + k * kLn2Lo);
}

// sin θ and cos θ for 0 <= θ <= 2π (rounded up by at most an ulp). θ = q π/2 + r with q the
// nearest integer to θ 2/π (0..4, read off the bits of θ 2/π + 1.5 2^52) and r in [-π/4, π/4]
// formed in three parts (Cody-Waite): q P1 and q P2 are exact (33-bit parts of π/2) and θ - q P1
// is exact (Sterbenz), so r carries ~2^-100 absolute error. sin r and cos r by their Taylor series
// to r^17 and r^18 (truncation below 2^-56 relative), then the quadrant swaps and signs them.
inline void noise_sincos(double theta, double& sin_out, double& cos_out) {
  constexpr double kTwoOverPi = 0x1.45f306dc9c883p-1;
  constexpr double kRound = 0x1.8p52;  // Adding it rounds a value below 2^51 to an integer.
  constexpr double kPio2_1 = 0x1.921fb544p+0;
  constexpr double kPio2_2 = 0x1.0b4611a6p-34;
  constexpr double kPio2_3 = 0x1.3198a2e037073p-69;
  const double shifted = theta * kTwoOverPi + kRound;
  const uint64_t q = f64_bits(shifted) & 3u;  // The integer's low bits (quadrant mod 4).
  const double qd = shifted - kRound;
  const double r = ((theta - qd * kPio2_1) - qd * kPio2_2) - qd * kPio2_3;
  const double z = r * r;
  // sin r = r + r z S(z), S(z) = -1/3! + z/5! - ... + z^7/17!
  constexpr double kS[] = {-1.0 / 6, 1.0 / 120, -1.0 / 5040, 1.0 / 362880, -1.0 / 39916800, 1.0 / 6227020800.0,
                           -1.0 / 1307674368000.0, 1.0 / 355687428096000.0};
  const double sin_r = r + r * (z * horner(z, kS));
  // cos r = 1 - z/2 + z^2 C(z), C(z) = 1/4! - z/6! + ... - z^7/18!
  constexpr double kC[] = {1.0 / 24, -1.0 / 720, 1.0 / 40320, -1.0 / 3628800, 1.0 / 479001600.0,
                           -1.0 / 87178291200.0, 1.0 / 20922789888000.0, -1.0 / 6402373705728000.0};
  const double pc = horner(z, kC);
  const double half_z = 0.5 * z;
  const double one_minus = 1.0 - half_z;
  // (1 - one_minus) - half_z is the rounding error of one_minus (exact: Sterbenz, z/2 <= 0.31).
  const double cos_r = one_minus + (((1.0 - one_minus) - half_z) + (z * z) * pc);
  // θ = q π/2 + r: an odd q swaps sin and cos; sin θ = -(...) for q = 2, 3, cos θ = -(...) for q = 1, 2.
  const bool swap = (q & 1u) != 0;
  const double s = swap ? cos_r : sin_r;
  const double c = swap ? sin_r : cos_r;
  const double sign_s = (q & 2u) ? -1.0 : 1.0;
  const double sign_c = ((q + 1u) & 2u) ? -1.0 : 1.0;
  sin_out = sign_s * s;
  cos_out = sign_c * c;
}

// Words of groups g0 .. g0 + n - 1 of the image with this seed, one array per word.
inline void philox_words_scalar(int64_t seed, uint32_t stream, uint64_t g0, int64_t n, uint32_t* __restrict r0,
                                uint32_t* __restrict r1, uint32_t* __restrict r2, uint32_t* __restrict r3) {
  for (int64_t j = 0; j < n; ++j) {
    const Words4 w = philox_group(seed, g0 + static_cast<uint64_t>(j), stream);
    r0[j] = w.r[0];
    r1[j] = w.r[1];
    r2[j] = w.r[2];
    r3[j] = w.r[3];
  }
}

#if defined(AGF_NOISE_AVX2)
// hi and lo words of m * c in each of eight 32-bit lanes: vpmuludq multiplies the even lanes
// (32 x 32 -> 64 bits), the odd lanes after a shift; the halves are blended back into place.
// (The compiler's own vectorisation of philox_group keeps one group per 64-bit lane, half as many.)
inline void mulhilo32x8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(m, c);
  const __m256i odd = _mm256_mul_epu32(m, _mm256_srli_epi64(c, 32));
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256i splat32(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// philox_words_scalar, eight groups at a time (the same Philox4x32-10 rounds of step_math.h).
inline void philox_words_block(int64_t seed, uint32_t stream, uint64_t g0, int64_t n, uint32_t* __restrict r0,
                               uint32_t* __restrict r1, uint32_t* __restrict r2, uint32_t* __restrict r3) {
  // A block whose counter's high word changes inside it (past 2^34 elements of one image) is left
  // to the scalar loop: in the vector one the high word is the same in every lane.
  if (n <= 0 || (g0 >> 32) != ((g0 + static_cast<uint64_t>(n) - 1) >> 32)) {
    philox_words_scalar(seed, stream, g0, n, r0, r1, r2, r3);
    return;
  }
  const uint64_t key = static_cast<uint64_t>(seed);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    __m256i c0 = _mm256_add_epi32(splat32(static_cast<uint32_t>(g)), lanes);  // No carry: see above.
    __m256i c1 = splat32(static_cast<uint32_t>(g >> 32));
    __m256i c2 = splat32(stream);
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      if (round > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo32x8(splat32(kPhiloxM0), c0, hi0, lo0);
      mulhilo32x8(splat32(kPhiloxM1), c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), splat32(k0));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), splat32(k1));
      c1 = lo1;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1 + j), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r2 + j), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r3 + j), c3);
  }
  philox_words_scalar(seed, stream, g0 + static_cast<uint64_t>(j), n - j, r0 + j, r1 + j, r2 + j, r3 + j);
}
#else
inline void philox_words_block(int64_t seed, uint32_t stream, uint64_t g0, int64_t n, uint32_t* __restrict r0,
                               uint32_t* __restrict r1, uint32_t* __restrict r2, uint32_t* __restrict r3) {
  philox_words_scalar(seed, stream, g0, n, r0, r1, r2, r3);
}
#endif

// The Box-Muller pairs of n word pairs (step_math.h's box_muller, with the polynomials above).
inline void box_muller_block(const uint32_t* __restrict ra, const uint32_t* __restrict rb, double* __restrict z_cos,
                             double* __restrict z_sin, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    // (r >> 8) + 1 <= 2^24 fits an int32: a conversion the vector units have.
    const double ua = static_cast<double>(static_cast<int32_t>((ra[j] >> 8) + 1u)) * 0x1p-24;
    const double ub = static_cast<double>(static_cast<int32_t>((rb[j] >> 8) + 1u)) * 0x1p-24;
    const double radius = std::sqrt(-2.0 * noise_log(ua));
    const double theta = 6.283185307179586 * ub;  // 2*math.pi as a Python float.
    double s, c;
    noise_sincos(theta, s, c);
    z_cos[j] = radius * c;
    z_sin[j] = radius * s;
  }
}

}  // namespace
}  // namespace agf
