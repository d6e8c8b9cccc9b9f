// bf16 linear layer for CPUs: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), bf16 in and out, fp32 sums.
//
// Why: on an AVX2 CPU without AVX-512 BF16/AMX, torch's bf16 matmul multiplies one input row at a time, so verifying
// k+1 tokens costs k+1 decodes and a prefill of P tokens P of them; on a CPU with oneDNN's bf16 product, its calls
// on a few rows cost tens of microseconds each (a 135M model's decode took 40 ms through it, 18 ms here).
// Here every weight is read from memory once per call, whatever M, in one of two variants chosen at run time:
//   avx512bf16  (Zen 4, Sapphire Rapids and later) on weights packed once (linear_bf16_cpu_pack): tiles of 32
//               outputs whose (k, k + 1) pairs sit side by side, so that one vdpbf16ps multiplies an input pair,
//               broadcast, with the pairs of 16 outputs and adds to their 16 fp32 accumulators. A tile is one
//               contiguous stream; 2 x MT accumulators (MT <= 8 input rows per pass) stay in registers, and nothing is
//               reduced across lanes at the end. On a 2-core Zen 4 the default target's layers and head took the same
//               time as the row-major pass this replaced at 1 input row and 1.1-1.6x less at 5-24 rows (whole
//               forwards, old and new kernel alternating in one process), and they beat oneDNN at every size up to 512
//               rows (tempspec_engine/linear.py, ONEDNN_CROSSOVER_ROWS).
//   avx2        the weights convert to fp32 in registers (a bf16 is the top half of an fp32) and each converted
//               vector is multiplied with up to 8 fp32 input rows, one weight row at a time.
//
// A call may take several weight matrices of the same K against one input (a layer's q, k and v projections, or its
// gate and up): their tiles are split between the threads as one list, one call instead of several.
//
// Layout of the avx2 variant: the N outputs are cut into tiles of kTileN weight rows (a few KB, held in L1 while every
// input row passes over them); threads split the tiles. Inputs go in chunks of kChunkM rows (held in L2). Over a
// tile, the rows go in passes of 8 (then the 1-7 left), each pass one weight row against those rows, one accumulator
// set per row. (Measured: passes over two or four weight rows at once were slower on the memory-bound output head, 20%
// on a 2-core AVX2 EPYC.) The avx512bf16 variant: packed tiles of 32 outputs split between the threads, inputs in
// chunks of kPackM rows.
// Both: each output element is summed in an order that depends on K alone, then rounded once to bf16: the result of
// row m does not depend on M, on the other rows, on the pass that computed it or on the thread split (a
// batch-invariant product: verifying k+1 tokens gives the logits k+1 decodes give). The two variants sum in different
// orders (and vdpbf16ps flushes denormals): their results may differ in the last bit.
#include "linear.h"

#include <ATen/Parallel.h>

#include "avx512_vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

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

// The avx2 variant as a type: Input is the element type of x as the pass reads it, pass<MT> the pass.
struct Avx2 {
  using Input = float;
  template <int MT>
  static void pass(const at::BFloat16* w, const float* x, const float* bias, int64_t K, at::BFloat16* y, int64_t ldy) {
    pass_avx2<MT>(w, x, bias, K, y, ldy);
  }
};

// Calls pass(std::integral_constant<int, MT>()) for MT = rows, 1 to 8: a pass is compiled for each row count, so
// that its accumulators stay in registers.
template <class Pass>
void with_rows(int64_t rows, Pass&& pass) {
  switch (rows) {
    case 8: pass(std::integral_constant<int, 8>()); break;
    case 7: pass(std::integral_constant<int, 7>()); break;
    case 6: pass(std::integral_constant<int, 6>()); break;
    case 5: pass(std::integral_constant<int, 5>()); break;
    case 4: pass(std::integral_constant<int, 4>()); break;
    case 3: pass(std::integral_constant<int, 3>()); break;
    case 2: pass(std::integral_constant<int, 2>()); break;
    case 1: pass(std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// Splits the tiles of every part of a call (tile_n outputs each; a part has N outputs) between the threads as one
// list, about 64K multiply-adds per task so that small layers do not pay for threads they cannot use, and calls
// tile(part, n0, m0, rows) for each of a task's tiles (outputs n0 ..) and each chunk of chunk_m input rows (m0 ..).
template <class P, class Tile>
void for_each_tile(const std::vector<P>& parts, int64_t tile_n, int64_t chunk_m, int64_t M, int64_t K, Tile&& tile) {
  std::vector<int64_t> first(parts.size() + 1, 0);  // the tiles of part p: [first[p], first[p + 1])
  for (size_t p = 0; p < parts.size(); ++p) first[p + 1] = first[p] + (parts[p].N + tile_n - 1) / tile_n;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, tile_n * K * std::min(M, chunk_m)));
  at::parallel_for(0, first.back(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += chunk_m) {
      const int64_t rows = std::min(chunk_m, M - m0);
      size_t p = 0;
      for (int64_t t = begin; t < end; ++t) {
        while (t >= first[p + 1]) ++p;
        tile(parts[p], (t - first[p]) * tile_n, m0, rows);
      }
    }
  });
}

// MT input rows over the n (<= kTileN) weight rows of a tile, one weight row at a time.
template <class V, int MT>
void passes(const at::BFloat16* w, const typename V::Input* x, const float* bias, int64_t K, int64_t n,
            at::BFloat16* y, int64_t ldy) {
  for (int64_t i = 0; i < n; ++i) V::template pass<MT>(w + i * K, x, bias == nullptr ? nullptr : bias + i, K, y + i, ldy);
}

// All `rows` input rows over one tile of n weight rows, in passes of 8 (then the 1-7 left).
template <class V>
void tile(const at::BFloat16* w, const typename V::Input* x, const float* bias, int64_t K, int64_t n, int64_t rows,
          at::BFloat16* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 8 <= rows; m += 8) passes<V, 8>(w, x + m * K, bias, K, n, y + m * ldy, ldy);
  with_rows(rows - m, [&](auto mt) { passes<V, decltype(mt)::value>(w, x + m * K, bias, K, n, y + m * ldy, ldy); });
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
  for_each_tile(parts, kTileN, kChunkM, M, K, [&](const Part& part, int64_t n0, int64_t m0, int64_t rows) {
    tile<V>(part.w + n0 * K, x + m0 * K, part.bias == nullptr ? nullptr : part.bias + n0, K,
            std::min(kTileN, part.N - n0), rows, part.y + m0 * part.N + n0, part.N);
  });
}

// ---- avx512bf16 on packed weights. linear_bf16_cpu_pack lays a weight [N, K] out as tiles of kPackN outputs:
// packed[t][p][i][h] = w[t * kPackN + i][2 p + h] (zero beyond N and K), so one 64-byte load holds the pairs
// (k = 2p, 2p + 1) of 16 outputs and a tile is one contiguous stream. Per pair p and input row j, vdpbf16ps adds
// x[j][2p] w[n][2p] + x[j][2p + 1] w[n][2p + 1] (the input pair broadcast) to the fp32 accumulator of each output n:
// one accumulator per output, summed over p = 0, 1, ... in order, no lane reduction at the end. A tile's 2 x MT
// accumulators stay in registers while the weight stream passes once per pass of MT <= 8 input rows.
constexpr int64_t kPackN = 32;   // outputs per packed tile: two 16-lane accumulators per input row
constexpr int64_t kPackM = 128;  // input rows per chunk: 128 x K bf16 stays in L2 with a tile for K up to ~3000

// MT input rows (x, row stride K, bf16) over one packed tile (wp, pairs = ceil(K / 2) rows of kPackN uint32) ->
// y[j * ldy + i] for the n <= kPackN outputs i of the tile; bias: the tile's n fp32 biases or nullptr.
template <int MT>
TEMPSPEC_AVX512BF16 void packed_pass(const uint32_t* wp, const at::BFloat16* x, const float* bias, int64_t K,
                                     at::BFloat16* y, int64_t ldy, int64_t n) {
  __m512 acc[2][MT];
#pragma GCC unroll 8
  for (int j = 0; j < MT; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
  const int64_t full = K / 2;
  for (int64_t p = 0; p < full; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + p * kPackN);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + p * kPackN + 16);
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) {
      int32_t pair;
      std::memcpy(&pair, x + j * K + 2 * p, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[0][j] = _mm512_dpbf16_ps(acc[0][j], w0, xb);
      acc[1][j] = _mm512_dpbf16_ps(acc[1][j], w1, xb);
    }
  }
  if (K % 2) {  // the last pair is (x[K - 1], 0)
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + full * kPackN);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + full * kPackN + 16);
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) {
      uint16_t last;
      std::memcpy(&last, x + j * K + K - 1, sizeof(last));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(last));
      acc[0][j] = _mm512_dpbf16_ps(acc[0][j], w0, xb);
      acc[1][j] = _mm512_dpbf16_ps(acc[1][j], w1, xb);
    }
  }
  const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
  const __m512 b0 = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, bias);
  const __m512 b1 = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, bias + 16);
  for (int j = 0; j < MT; ++j) {
    const __m512 s0 = bias == nullptr ? acc[0][j] : _mm512_add_ps(acc[0][j], b0);
    const __m512 s1 = bias == nullptr ? acc[1][j] : _mm512_add_ps(acc[1][j], b1);
    at::BFloat16* yj = y + j * ldy;
    if (n == kPackN) {
      store16(yj, s0);
      store16(yj + 16, s1);
    } else {  // the last tile of a weight whose N is not a multiple of kPackN
      alignas(64) at::BFloat16 out[kPackN];
      store16(out, s0);
      store16(out + 16, s1);
      std::memcpy(yj, out, n * sizeof(at::BFloat16));
    }
  }
}

// All `rows` input rows over one packed tile, in ceil(rows / 8) passes of as even sizes as can be (9 rows go as 5 + 4,
// not 8 + 1: a pass of one or two rows has too few accumulator chains to hide vdpbf16ps's latency).
TEMPSPEC_AVX512BF16 void packed_tile(const uint32_t* wp, const at::BFloat16* x, const float* bias, int64_t K,
                                     int64_t rows, at::BFloat16* y, int64_t ldy, int64_t n) {
  const int64_t passes = (rows + 7) / 8;
  for (int64_t q = 0, m = 0; q < passes; ++q) {
    const int64_t size = (rows - m) / (passes - q);  // the later passes take the remainder's extra rows
    with_rows(size, [&](auto mt) { packed_pass<decltype(mt)::value>(wp, x + m * K, bias, K, y + m * ldy, ldy, n); });
    m += size;
  }
}

// One packed weight of a call: its tiles, bias [N] fp32 or nullptr, its output y [M, N].
struct PackedPart {
  const uint32_t* wp;
  const float* bias;
  int64_t N;
  at::BFloat16* y;
};

void run_packed(const std::vector<PackedPart>& parts, const at::BFloat16* x, int64_t M, int64_t K) {
  const int64_t pairs = (K + 1) / 2;
  for_each_tile(parts, kPackN, kPackM, M, K, [&](const PackedPart& part, int64_t n0, int64_t m0, int64_t rows) {
    packed_tile(part.wp + n0 * pairs, x + m0 * K, part.bias == nullptr ? nullptr : part.bias + n0, K, rows,
                part.y + m0 * part.N + n0, part.N, std::min(kPackN, part.N - n0));
  });
}

// The packed layout's shape for a weight [N, K]: [ceil(N / kPackN), ceil(K / 2), 2 kPackN] bf16.
std::vector<int64_t> packed_shape(int64_t N, int64_t K) {
  return {(N + kPackN - 1) / kPackN, (K + 1) / 2, 2 * kPackN};
}

}  // namespace

bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

bool linear_bf16_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

std::string linear_bf16_cpu_isa() {
  return cpu_has_avx512bf16() ? "avx512bf16" : (linear_bf16_cpu_supported() ? "avx2" : "");
}

at::Tensor linear_bf16_cpu_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kBFloat16 && weight.dim() == 2,
              "linear_bf16_cpu_pack: the weight must be a bfloat16 CPU tensor [N, K], got ", weight.scalar_type(),
              " ", weight.sizes(), " on ", weight.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const std::vector<int64_t> shape = packed_shape(N, K);
  at::Tensor padded = at::zeros({shape[0] * kPackN, shape[1] * 2}, weight.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(weight);
  // [tiles, kPackN, pairs, 2] -> [tiles, pairs, kPackN, 2]
  return padded.view({shape[0], kPackN, shape[1], 2}).permute({0, 2, 1, 3}).contiguous().view(shape);
}

std::vector<at::Tensor> linear_bf16_cpu_many(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                             const std::vector<c10::optional<at::Tensor>>& biases,
                                             const std::string& isa,
                                             const std::vector<c10::optional<at::Tensor>>& packed) {
  TORCH_CHECK(linear_bf16_cpu_supported(), "linear_bf16_cpu needs a CPU with AVX2 and FMA");
  const std::string best = linear_bf16_cpu_isa();
  const std::string use = isa.empty() ? best : isa;
  TORCH_CHECK(use == "avx2" || (use == "avx512bf16" && best == "avx512bf16"), "linear_bf16_cpu: isa ", isa,
              " is not one this CPU runs (it runs avx2", best == "avx512bf16" ? " and avx512bf16)" : ")");
  TORCH_CHECK(!weights.empty(), "linear_bf16_cpu: no weight");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), "linear_bf16_cpu: ", biases.size(), " biases for ",
              weights.size(), " weights");
  TORCH_CHECK(packed.empty() || packed.size() == weights.size(), "linear_bf16_cpu: ", packed.size(),
              " packed weights for ", weights.size(), " weights");
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
  std::vector<at::Tensor> outs, fp32_biases, packs;
  std::vector<Part> parts;
  std::vector<PackedPart> packed_parts;
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
    if (M == 0 || N == 0) continue;
    if (use != "avx512bf16") {
      parts.push_back({weights[p].data_ptr<at::BFloat16>(), b, N, outs.back().data_ptr<at::BFloat16>()});
      continue;
    }
    if (!packed.empty() && packed[p].has_value() && packed[p]->defined()) {
      const at::Tensor& wp = *packed[p];
      TORCH_CHECK(wp.device().is_cpu() && wp.scalar_type() == at::kBFloat16 && wp.is_contiguous() &&
                      wp.sizes() == at::IntArrayRef(packed_shape(N, K)),
                  "linear_bf16_cpu: packed weight ", p, " must be linear_bf16_cpu_pack of weight ", p,
                  ": a contiguous bfloat16 CPU tensor ", at::IntArrayRef(packed_shape(N, K)), ", got ",
                  wp.scalar_type(), " ", wp.sizes(), wp.is_contiguous() ? "" : " (not contiguous)");
      packs.push_back(wp);
    } else {
      packs.push_back(linear_bf16_cpu_pack(weights[p]));
    }
    packed_parts.push_back({reinterpret_cast<const uint32_t*>(packs.back().data_ptr<at::BFloat16>()), b, N,
                            outs.back().data_ptr<at::BFloat16>()});
  }
  if (!packed_parts.empty()) {
    const at::Tensor xb = x2.contiguous();
    run_packed(packed_parts, xb.data_ptr<at::BFloat16>(), M, K);
  }
  if (!parts.empty()) {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    run<Avx2>(parts, xf.data_ptr<float>(), M, K);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  for (size_t p = 0; p < outs.size(); ++p) {
    shape.back() = weights[p].size(0);
    outs[p] = outs[p].view(shape);
  }
  return outs;
}

at::Tensor linear_bf16_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const std::string& isa, const c10::optional<at::Tensor>& packed) {
  return linear_bf16_cpu_many(x, {weight}, {bias}, isa, {packed})[0];
}

}  // namespace tempspec
