// bf16 linear layer for CPUs: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), bf16 in and out, fp32 sums.
//
// Why: on an AVX2 CPU without AVX-512 BF16/AMX, torch's bf16 matmul multiplies one input row at a time, so verifying
// k+1 tokens costs k+1 decodes and a prefill of P tokens P of them; on a CPU with oneDNN's bf16 product, its calls
// on a few rows cost tens of microseconds each (a 135M model's decode took 40 ms through it, 18 ms here).
// Here every weight is read from memory once per call, whatever M: the weights convert to fp32 in registers
// (a bf16 is the top half of an fp32) and each converted vector is multiplied with up to 8 input rows.
// (An AVX-512 BF16 variant, vdpbf16ps on bf16 pairs, was tried on a Zen 4 EPYC: within 1 ms of this one on a 17-25 ms
// forward of the default target, so it was not kept.)
//
// Layout: the N outputs are cut into tiles of kTileN weight rows (a few KB, held in L1 while every input row passes
// over them); threads split the tiles. Inputs go in chunks of kChunkM rows (held in L2). Over a tile, the rows go in
// passes of 8 (then the 1-7 left), each pass one weight row against those rows, one accumulator per row.
// Each output element is one fp32 accumulator per vector lane over k in order, then the lanes summed in a fixed
// order, then the K % 8 tail: the result of row m does not depend on M, on the other rows, on the pass that computed
// it or on the thread split (a batch-invariant product: verifying k+1 tokens gives the logits k+1 decodes give).
#include "linear.h"

#include <ATen/Parallel.h>

#include "avx2_vec.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tempspec {
namespace {

constexpr int64_t kTileN = 4;    // weight rows per tile
constexpr int64_t kChunkM = 64;  // input rows per chunk: 64 x K fp32 stays in L2 for K up to a few thousand

// One weight row (w) against MT input rows (x fp32, row stride K) -> y[j * ldy] (bf16).
template <int MT>
TEMPSPEC_AVX2 void pass(const at::BFloat16* w, const float* x, const float* bias, int64_t K, at::BFloat16* y,
                        int64_t ldy) {
  __m256 acc[MT];
#pragma GCC unroll 8
  for (int j = 0; j < MT; ++j) acc[j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8(w + k);
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * K + k), acc[j]);
  }
  for (int j = 0; j < MT; ++j) {
    float s = lane_sum(acc[j]);
    for (int64_t t = k; t < K; ++t) s += static_cast<float>(w[t]) * x[j * K + t];
    if (bias != nullptr) s += *bias;
    y[j * ldy] = at::BFloat16(s);
  }
}

// MT input rows over the n (<= kTileN) weight rows of a tile, one weight row at a time. (Measured: on a 2-core AVX2
// EPYC two weight rows against 3 or 4 input rows ran a 49152 x 576 head 20% slower; on a 2-core Zen 4 EPYC four
// weight rows against a single input row ran it at 17 GB/s of weights, one at 37 GB/s.)
template <int MT>
TEMPSPEC_AVX2 void passes(const at::BFloat16* w, const float* x, const float* bias, int64_t K, int64_t n,
                          at::BFloat16* y, int64_t ldy) {
  for (int64_t i = 0; i < n; ++i) pass<MT>(w + i * K, x, bias == nullptr ? nullptr : bias + i, K, y + i, ldy);
}

// All `rows` input rows over one tile of n weight rows.
TEMPSPEC_AVX2 void tile(const at::BFloat16* w, const float* x, const float* bias, int64_t K, int64_t n, int64_t rows,
                        at::BFloat16* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 8 <= rows; m += 8) passes<8>(w, x + m * K, bias, K, n, y + m * ldy, ldy);
  const float* xm = x + m * K;
  at::BFloat16* ym = y + m * ldy;
  switch (rows - m) {
    case 7: passes<7>(w, xm, bias, K, n, ym, ldy); break;
    case 6: passes<6>(w, xm, bias, K, n, ym, ldy); break;
    case 5: passes<5>(w, xm, bias, K, n, ym, ldy); break;
    case 4: passes<4>(w, xm, bias, K, n, ym, ldy); break;
    case 3: passes<3>(w, xm, bias, K, n, ym, ldy); break;
    case 2: passes<2>(w, xm, bias, K, n, ym, ldy); break;
    case 1: passes<1>(w, xm, bias, K, n, ym, ldy); break;
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
