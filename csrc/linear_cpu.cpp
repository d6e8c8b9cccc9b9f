// bf16 linear layer for CPUs whose PyTorch build has no fast bf16 matrix product (AVX2 without AVX-512 BF16/AMX).
//
// y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), bf16 in and out, fp32 products and sums. There, torch's bf16 matmul
// multiplies one input row at a time, so verifying k+1 tokens costs k+1 decodes and a prefill of P tokens P of them.
// Here every weight is read from memory once per call, whatever M: the weights convert to fp32 in registers
// (a bf16 is the top half of an fp32) and each converted vector is multiplied with up to 8 input rows.
//
// Layout: the N outputs are cut into tiles of kTileN weight rows (a few KB, held in L1 while every input row passes
// over them); threads split the tiles. Inputs go in chunks of kChunkM rows (fp32, held in L2). Over a tile, the
// rows go in passes of 8 (then the 1-7 left), each pass multiplying NT weight rows at once with NT x MT accumulators:
// one weight row against up to 8 input rows, or 4 weight rows against a single input row. (Measured on a 2-core
// AVX2 EPYC: two weight rows against 3 or 4 input rows ran a 49152 x 576 head 20% slower than one at a time.)
// Each output element is one fp32 accumulator per vector lane over k in order, then the lanes summed in a fixed
// order, then the K % 8 tail: the result of row m does not depend on M, on the other rows, on the pass that computed
// it or on the thread split (a batch-invariant product: verifying k+1 tokens gives the logits k+1 decodes give).
#include "linear.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tempspec {
namespace {

constexpr int64_t kTileN = 4;    // weight rows per tile
constexpr int64_t kChunkM = 64;  // input rows per chunk: 64 x K fp32 stays in L2 for K up to a few thousand

#define TEMPSPEC_AVX2 __attribute__((target("avx2,fma")))

TEMPSPEC_AVX2 inline __m256 load_bf16x8(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

TEMPSPEC_AVX2 inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NT weight rows (w, row stride K) times MT input rows (x fp32, row stride K) -> y[j * ldy + i] (bf16).
template <int NT, int MT>
TEMPSPEC_AVX2 void pass(const at::BFloat16* w, const float* x, const float* bias, int64_t K, at::BFloat16* y,
                        int64_t ldy) {
  __m256 acc[NT][MT];
#pragma GCC unroll 8
  for (int i = 0; i < NT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NT];
#pragma GCC unroll 8
    for (int i = 0; i < NT; ++i) wv[i] = load_bf16x8(w + i * K + k);
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * K + k);
#pragma GCC unroll 8
      for (int i = 0; i < NT; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < NT; ++i) {
    for (int j = 0; j < MT; ++j) {
      float s = lane_sum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += static_cast<float>(w[i * K + t]) * x[j * K + t];
      if (bias != nullptr) s += bias[i];
      y[j * ldy + i] = at::BFloat16(s);
    }
  }
}

// MT input rows over `n` (<= kTileN) weight rows, NT at a time.
template <int NT, int MT>
TEMPSPEC_AVX2 void passes(const at::BFloat16* w, const float* x, const float* bias, int64_t K, int64_t n,
                          at::BFloat16* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + NT <= n; i += NT) pass<NT, MT>(w + i * K, x, bias == nullptr ? nullptr : bias + i, K, y + i, ldy);
  for (; i < n; ++i) pass<1, MT>(w + i * K, x, bias == nullptr ? nullptr : bias + i, K, y + i, ldy);
}

// All `rows` input rows over one tile of n weight rows.
TEMPSPEC_AVX2 void tile(const at::BFloat16* w, const float* x, const float* bias, int64_t K, int64_t n, int64_t rows,
                        at::BFloat16* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 8 <= rows; m += 8) passes<1, 8>(w, x + m * K, bias, K, n, y + m * ldy, ldy);
  const float* xm = x + m * K;
  at::BFloat16* ym = y + m * ldy;
  switch (rows - m) {
    case 7: passes<1, 7>(w, xm, bias, K, n, ym, ldy); break;
    case 6: passes<1, 6>(w, xm, bias, K, n, ym, ldy); break;
    case 5: passes<1, 5>(w, xm, bias, K, n, ym, ldy); break;
    case 4: passes<1, 4>(w, xm, bias, K, n, ym, ldy); break;
    case 3: passes<1, 3>(w, xm, bias, K, n, ym, ldy); break;
    case 2: passes<1, 2>(w, xm, bias, K, n, ym, ldy); break;
    case 1: passes<4, 1>(w, xm, bias, K, n, ym, ldy); break;
    default: break;
  }
}

TEMPSPEC_AVX2 void linear_avx2(const at::BFloat16* w, const float* x, const float* bias, int64_t M, int64_t N,
                               int64_t K, at::BFloat16* y) {
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  // about 64K multiply-adds per task, so small layers do not pay for threads they cannot use
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, kTileN * K * std::min(M, kChunkM)));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kChunkM) {
      const int64_t rows = std::min(kChunkM, M - m0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTileN;
        tile(w + n0 * K, x + m0 * K, bias == nullptr ? nullptr : bias + n0, K, std::min(kTileN, N - n0), rows,
             y + m0 * N + n0, N);
      }
    }
  });
}

}  // namespace

bool linear_bf16_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

at::Tensor linear_bf16_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(linear_bf16_cpu_supported(), "linear_bf16_cpu needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_bf16_cpu: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "linear_bf16_cpu: x and weight must be bfloat16");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "linear_bf16_cpu: weight must be a contiguous [N, K]");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "linear_bf16_cpu: x's last dimension must be ", K);
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(), "linear_bf16_cpu: bias must be [N]");
    bf = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    linear_avx2(weight.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), bf.defined() ? bf.data_ptr<float>() : nullptr,
                M, N, K, y.data_ptr<at::BFloat16>());
  }
  return y.view(out_shape);
}

}  // namespace tempspec
