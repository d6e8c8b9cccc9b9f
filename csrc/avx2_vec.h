// AVX2 helpers shared by the CPU kernels (csrc/linear_cpu.cpp, csrc/attention_cpu.cpp, csrc/layer_ops_cpu.cpp).
// Every function carries the avx2/fma target attribute, so the files that include this build for any x86-64 and check
// the CPU at run time.
#pragma once
#include <ATen/ATen.h>

#include <immintrin.h>

#include <type_traits>

#define TEMPSPEC_AVX2 __attribute__((target("avx2,fma")))

namespace tempspec {

// 8 fp32 lanes from 8 floats, or from 8 bf16 (a bf16 is the top half of an fp32: zero-extend, shift left by 16).
TEMPSPEC_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

TEMPSPEC_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// The bit patterns of 8 fp32 lanes rounded to bf16 as at::BFloat16's conversion rounds (to nearest, ties to even; NaN
// to the quiet NaN 0x7FC0), the low 16 bits zero: as fp32 they are the rounded values.
TEMPSPEC_AVX2 inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, bias), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
}

// 8 fp32 lanes as a T holds them (T = float: themselves; bf16: rounded), what torch stores between two operators.
template <typename T>
TEMPSPEC_AVX2 inline __m256 rounded8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return _mm256_castsi256_ps(bf16_bits8(v));
  }
}

// Stores 8 fp32 lanes as 8 floats, or as 8 bf16 rounded as rounded8 rounds.
TEMPSPEC_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

TEMPSPEC_AVX2 inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i b = _mm256_srli_epi32(bf16_bits8(v), 16);  // 0..0xFFFF: packus keeps them as they are
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

// The sum of the 8 lanes, always in the same order ((0+4) + (2+6)) + ((1+5) + (3+7)).
TEMPSPEC_AVX2 inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp of 8 lanes (Cephes' expf: x = n ln2 + f with |f| <= ln2 / 2, exp(f) by a degree-6 polynomial, 2^n put in the
// exponent bits; about 1 ulp over the clamped range [-87.3, 88.3], what softmax (x <= 0) and SiLU use).
// Inputs below -87.3 give about 1e-38, above 88.3 about 2e38.
TEMPSPEC_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

}  // namespace tempspec
