// AVX2 helpers shared by the CPU kernels (csrc/linear_cpu.cpp, csrc/attention_cpu.cpp). Every function carries the
// avx2/fma target attribute, so the files that include this build for any x86-64 and check the CPU at run time.
#pragma once
#include <ATen/ATen.h>

#include <immintrin.h>

#define TEMPSPEC_AVX2 __attribute__((target("avx2,fma")))

namespace tempspec {

// 8 fp32 lanes from 8 floats, or from 8 bf16 (a bf16 is the top half of an fp32: zero-extend, shift left by 16).
TEMPSPEC_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

TEMPSPEC_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// The sum of the 8 lanes, always in the same order ((0+4) + (2+6)) + ((1+5) + (3+7)).
TEMPSPEC_AVX2 inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace tempspec
