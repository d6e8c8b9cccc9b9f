// bf16 linear layer for CPUs: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), bf16 in and out, fp32 sums.
//
// Why: on an AVX2 CPU without AVX-512 BF16/AMX, torch's bf16 matmul multiplies one input row at a time, so verifying
// k+1 tokens costs k+1 decodes and a prefill of P tokens P of them; on a CPU with oneDNN's bf16 product, its calls
// on a few rows cost tens of microseconds each (a 135M model's decode took 40 ms through it, 18 ms here).
// Here every weight is read from memory once per call, whatever M, in one of two variants chosen at run time:
//   avx512bf16  (Zen 4, Sapphire Rapids and later) vdpbf16ps multiplies the bf16 weights with bf16 input pairs as
//               they are, 32 products per instruction: on a 2-core Zen 4 the default target's 49152 x 576 output
//               head took 1.14, 2.19, 3.16 ms at 1, 5, 8 input rows, against 1.67, 2.61, 4.70 through the avx2
//               variant (benchmarks/results/linear_cpu_amd-epyc-zen4.json).
//   avx2        the weights convert to fp32 in registers (a bf16 is the top half of an fp32) and each converted
//               vector is multiplied with up to 8 fp32 input rows.
//
// A call may take several weight matrices of the same K against one input (a layer's q, k and v projections, or its
// gate and up): their tiles are split between the threads as one list, one call instead of several.
//
// Layout (both): the N outputs are cut into tiles of kTileN weight rows (a few KB, held in L1 while every input row
// passes over them); threads split the tiles. Inputs go in chunks of kChunkM rows (held in L2). Over a tile, the rows
// go in passes of 8 (then the 1-7 left), each pass one weight row against those rows, one accumulator set per row.
// (Measured: passes over two or four weight rows at once were slower on the memory-bound output head, 20% on a
// 2-core AVX2 EPYC and up to 2x on a Zen 4.) Each output element is summed in an order that depends on K alone, then
// rounded once to bf16: the result of row m does not depend on M, on the other rows, on the pass that computed it
// or on the thread split (a batch-invariant product: verifying k+1 tokens gives the logits k+1 decodes give). The
// two variants sum in different orders (and vdpbf16ps flushes denormals): their results may differ in the last bit.
#include "linear.h"

#include <ATen/Parallel.h>

#include "avx2_vec.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#define TEMPSPEC_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace tempspec {
namespace {

constexpr int64_t kTileN = 4;    // weight rows per tile
constexpr int64_t kChunkM = 64;  // input rows per chunk: 64 x K fp32 stays in L2 for K up to a few thousand

// ---- avx2: one weight row (w) against MT fp32 input rows (x, row stride K) -> y[j * ldy] (bf16). Per output: one
// fp32 accumulator per lane over k in steps of 8, the lanes summed in a fixed order, then the K % 8 tail.
template <int MT>
TEMPSPEC_AVX2 void pass_avx2(const at::BFloat16* w, const float* x, const float* bias, int64_t K, at::BFloat16* y,
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

// The sum of 16 lanes in a fixed order (the two halves added, then lane_sum). (Through memory: GCC 12's
// _mm512_reduce_add_ps warns of an uninitialized register in its own header.)
TEMPSPEC_AVX512BF16 inline float lane_sum16(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  return lane_sum(_mm256_add_ps(_mm256_load_ps(lanes), _mm256_load_ps(lanes + 8)));
}

// ---- avx512bf16: one weight row (w) against MT bf16 input rows (x, row stride K) -> y[j * ldy] (bf16). Per output:
// two sets of 16 fp32 lanes (two dependency chains), lane l of set u summing the pairs k = 32c + 2l, 32c + 2l + 1
// of the chunks c with c % 2 == u, the K % 32 tail masked to zero; then the sets added and the lanes reduced.
template <int MT>
TEMPSPEC_AVX512BF16 void pass_avx512bf16(const at::BFloat16* w, const at::BFloat16* x, const float* bias, int64_t K,
                                         at::BFloat16* y, int64_t ldy) {
  __m512 acc[2][MT];
#pragma GCC unroll 8
  for (int j = 0; j < MT; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) {
      acc[0][j] = _mm512_dpbf16_ps(acc[0][j], (__m512bh)_mm512_loadu_si512(x + j * K + k), w0);
      acc[1][j] = _mm512_dpbf16_ps(acc[1][j], (__m512bh)_mm512_loadu_si512(x + j * K + k + 32), w1);
    }
  }
  for (int u = 0; k < K; k += 32, u ^= 1) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j)
      acc[u][j] = _mm512_dpbf16_ps(acc[u][j], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + j * K + k), wv);
  }
  for (int j = 0; j < MT; ++j) {
    float s = lane_sum16(_mm512_add_ps(acc[0][j], acc[1][j]));
    if (bias != nullptr) s += *bias;
    y[j * ldy] = at::BFloat16(s);
  }
}

// The two variants as types: Input is the element type of x as the pass reads it, pass<MT> the pass.
struct Avx2 {
  using Input = float;
  template <int MT>
  static void pass(const at::BFloat16* w, const float* x, const float* bias, int64_t K, at::BFloat16* y, int64_t ldy) {
    pass_avx2<MT>(w, x, bias, K, y, ldy);
  }
};

struct Avx512Bf16 {
  using Input = at::BFloat16;
  template <int MT>
  static void pass(const at::BFloat16* w, const at::BFloat16* x, const float* bias, int64_t K, at::BFloat16* y,
                   int64_t ldy) {
    pass_avx512bf16<MT>(w, x, bias, K, y, ldy);
  }
};

// MT input rows over the n (<= kTileN) weight rows of a tile, one weight row at a time.
template <class V, int MT>
void passes(const at::BFloat16* w, const typename V::Input* x, const float* bias, int64_t K, int64_t n,
            at::BFloat16* y, int64_t ldy) {
  for (int64_t i = 0; i < n; ++i) V::template pass<MT>(w + i * K, x, bias == nullptr ? nullptr : bias + i, K, y + i, ldy);
}

// All `rows` input rows over one tile of n weight rows.
template <class V>
void tile(const at::BFloat16* w, const typename V::Input* x, const float* bias, int64_t K, int64_t n, int64_t rows,
          at::BFloat16* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 8 <= rows; m += 8) passes<V, 8>(w, x + m * K, bias, K, n, y + m * ldy, ldy);
  const typename V::Input* xm = x + m * K;
  at::BFloat16* ym = y + m * ldy;
  switch (rows - m) {
    case 7: passes<V, 7>(w, xm, bias, K, n, ym, ldy); break;
    case 6: passes<V, 6>(w, xm, bias, K, n, ym, ldy); break;
    case 5: passes<V, 5>(w, xm, bias, K, n, ym, ldy); break;
    case 4: passes<V, 4>(w, xm, bias, K, n, ym, ldy); break;
    case 3: passes<V, 3>(w, xm, bias, K, n, ym, ldy); break;
    case 2: passes<V, 2>(w, xm, bias, K, n, ym, ldy); break;
    case 1: passes<V, 1>(w, xm, bias, K, n, ym, ldy); break;
    default: break;
  }
}

// One weight matrix of a call: w [N, K], bias [N] fp32 or nullptr, its output y [M, N].
struct Part {
  const at::BFloat16* w;
  const float* bias;
  int64_t N;
  at::BFloat16* y;
};

template <class V>
void run(const std::vector<Part>& parts, const typename V::Input* x, int64_t M, int64_t K) {
  std::vector<int64_t> first(parts.size() + 1, 0);  // the tiles of part p: [first[p], first[p + 1])
  for (size_t p = 0; p < parts.size(); ++p) first[p + 1] = first[p] + (parts[p].N + kTileN - 1) / kTileN;
  // about 64K multiply-adds per task, so small layers do not pay for threads they cannot use
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, kTileN * K * std::min(M, kChunkM)));
  at::parallel_for(0, first.back(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kChunkM) {
      const int64_t rows = std::min(kChunkM, M - m0);
      size_t p = 0;
      for (int64_t t = begin; t < end; ++t) {
        while (t >= first[p + 1]) ++p;
        const Part& part = parts[p];
        const int64_t n0 = (t - first[p]) * kTileN;
        tile<V>(part.w + n0 * K, x + m0 * K, part.bias == nullptr ? nullptr : part.bias + n0, K,
                std::min(kTileN, part.N - n0), rows, part.y + m0 * part.N + n0, part.N);
      }
    }
  });
}

bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

}  // namespace

bool linear_bf16_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

std::string linear_bf16_cpu_isa() {
  return cpu_has_avx512bf16() ? "avx512bf16" : (linear_bf16_cpu_supported() ? "avx2" : "");
}

std::vector<at::Tensor> linear_bf16_cpu_many(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                             const std::vector<c10::optional<at::Tensor>>& biases,
                                             const std::string& isa) {
  TORCH_CHECK(linear_bf16_cpu_supported(), "linear_bf16_cpu needs a CPU with AVX2 and FMA");
  const std::string best = linear_bf16_cpu_isa();
  const std::string use = isa.empty() ? best : isa;
  TORCH_CHECK(use == "avx2" || (use == "avx512bf16" && best == "avx512bf16"), "linear_bf16_cpu: isa ", isa,
              " is not one this CPU runs (it runs avx2", best == "avx512bf16" ? " and avx512bf16)" : ")");
  TORCH_CHECK(!weights.empty(), "linear_bf16_cpu: no weight");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), "linear_bf16_cpu: ", biases.size(), " biases for ",
              weights.size(), " weights");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "linear_bf16_cpu: x must be a bfloat16 CPU tensor");
  for (size_t p = 0; p < weights.size(); ++p) {
    const at::Tensor& w = weights[p];
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16, "linear_bf16_cpu: weight ", p,
                " must be a bfloat16 CPU tensor, got ", w.scalar_type(), " on ", w.device());
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "linear_bf16_cpu: weight ", p, " must be a contiguous [N, K], got ",
                w.sizes(), w.dim() == 2 ? " (not contiguous)" : "");
    TORCH_CHECK(w.size(1) == weights[0].size(1), "linear_bf16_cpu: every weight must have the same K: weight ", p,
                " has K = ", w.size(1), ", weight 0 has ", weights[0].size(1));
  }
  const int64_t K = weights[0].size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "linear_bf16_cpu: x's last dimension must be ", K);
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  std::vector<at::Tensor> outs, fp32_biases;
  std::vector<Part> parts;
  for (size_t p = 0; p < weights.size(); ++p) {
    const int64_t N = weights[p].size(0);
    const float* b = nullptr;
    if (!biases.empty() && biases[p].has_value() && biases[p]->defined()) {
      const at::Tensor& bias = *biases[p];
      TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N && bias.device().is_cpu(), "linear_bf16_cpu: bias ", p,
                  " must be a CPU tensor [", N, "] (its weight's N), got ", bias.sizes(), " on ", bias.device());
      fp32_biases.push_back(bias.to(at::kFloat).contiguous());
      b = fp32_biases.back().data_ptr<float>();
    }
    outs.push_back(at::empty({M, N}, x.options()));
    if (M > 0 && N > 0) parts.push_back({weights[p].data_ptr<at::BFloat16>(), b, N, outs.back().data_ptr<at::BFloat16>()});
  }
  if (!parts.empty()) {
    if (use == "avx512bf16") {
      const at::Tensor xb = x2.contiguous();
      run<Avx512Bf16>(parts, xb.data_ptr<at::BFloat16>(), M, K);
    } else {
      const at::Tensor xf = x2.to(at::kFloat).contiguous();
      run<Avx2>(parts, xf.data_ptr<float>(), M, K);
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  for (size_t p = 0; p < outs.size(); ++p) {
    shape.back() = weights[p].size(0);
    outs[p] = outs[p].view(shape);
  }
  return outs;
}

at::Tensor linear_bf16_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const std::string& isa) {
  return linear_bf16_cpu_many(x, {weight}, {bias}, isa)[0];
}

}  // namespace tempspec
