// AVX-512 helpers shared by the CPU kernels' avx512bf16 variants (csrc/linear_cpu.cpp, csrc/prefill_attention_cpu.cpp).
// Every function carries the avx512f/bw/bf16 target attribute: callers check the CPU at run time (cpu_has_avx512bf16).
#pragma once
#include "avx2_vec.h"

#define TEMPSPEC_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace tempspec {

// 16 fp32 lanes -> 16 bf16 at y, rounded as at::BFloat16 rounds: store8 (avx2_vec.h) of each half. (The halves go
// through memory: GCC 12's 512-to-256-bit extracts start from an undefined register and warn of it.)
TEMPSPEC_AVX512BF16 inline void store16(at::BFloat16* y, __m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  store8(y, _mm256_load_ps(lanes));
  store8(y + 8, _mm256_load_ps(lanes + 8));
}

// exp of 16 lanes: exp8's arithmetic (avx2_vec.h, Cephes' expf, about 1 ulp over the clamped range [-87.3, 88.3]).
TEMPSPEC_AVX512BF16 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

}  // namespace tempspec
