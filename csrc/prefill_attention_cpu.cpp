// Causal attention of a whole prompt on the CPU (a prefill from position 0): bf16, AVX-512 BF16.
//
// out[b, h, t] = sum_{j <= t} softmax_j(scale * q[b, h, t] . k[b, h / G, j]) v[b, h / G, j] for t, j < T (G = H / Hkv
// query heads share a key head). Scores, softmax and sums in fp32; the softmax weights are rounded to bf16 for their
// product with the values (as GPU flash attention does), the output to bf16.
//
// Why: torch's CPU flash attention ran the default target's prefill attention at about 90 GFLOPS of causal work on a
// 2-core Zen 4, 2.3 s of its 6.8 s prefill of 20 Spec-Bench prompts (40-1378 tokens). Here both products run on
// vdpbf16ps, which multiplies bf16 pairs and adds to fp32 (benchmarks/bench_attention_cpu.py --prefill).
//
// How (flash attention, Dao et al. 2022): the keys and values of each key head are first packed,
//   kp[j / 16][p][j % 16] = (k[j][2p], k[j][2p + 1])   one 64-byte load: dimension pair p of 16 keys
//   vp[j / 2][d]          = (v[j][d], v[j + 1][d])      one 64-byte load: key pair j, j + 1 of 16 dimensions
// (zeros beyond T, up to a multiple of kKeys). A task takes kQueries consecutive queries of one query head and walks
// the key blocks of kKeys keys from 0 up to its last query: the block's scores 4 queries at a time (4 queries x 64
// keys in 16 accumulators, each key load shared by the 4 queries, each query pair broadcast), the keys after a query
// masked, each query's running max and sum updated and its output rescaled, then the block's weights times the
// values (each value load shared by kValueRows queries, each weight pair broadcast).
// A query's arithmetic is its own and its key blocks start at 0 whatever T, so its result does not depend on T or
// on the other queries and rows (a block it sees no key of leaves its max, sum and output as they were): a prompt
// prefilled alone or right-padded in a batch gives the same values.
#include "attention.h"

#include <ATen/Parallel.h>

#include "avx512_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// GCC 12's unmasked AVX-512 intrinsics start from an undefined register (_mm512_undefined_ps) and, once inlined here,
// warn that it may be used uninitialized (GCC bug 105593, fixed in GCC 13); nothing here reads such a register.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace tempspec {
namespace {

constexpr int64_t kKeys = 64;     // keys per block: 4 groups of 16 lanes
constexpr int64_t kQueries = 32;  // queries per task
constexpr int kScoreRows = 4;     // queries per score pass

// Packs one key head's keys and values (rows k + j * ks and v + j * vs, j < T) as the header describes, up to Tp keys.
void pack_head(const at::BFloat16* k, int64_t ks, const at::BFloat16* v, int64_t vs, int64_t T, int64_t Tp, int64_t D,
               uint32_t* kp, uint32_t* vp) {
  const int64_t P = D / 2;
  std::fill(kp, kp + Tp * P, 0u);
  std::fill(vp, vp + Tp / 2 * D, 0u);
  for (int64_t j = 0; j < T; ++j) {
    uint32_t* kj = kp + (j / 16) * P * 16 + j % 16;
    for (int64_t p = 0; p < P; ++p) std::memcpy(kj + p * 16, k + j * ks + 2 * p, sizeof(uint32_t));
    uint32_t* vj = vp + (j / 2) * D;
    const int shift = 16 * static_cast<int>(j % 2);
    for (int64_t d = 0; d < D; ++d) {
      uint16_t bits;
      std::memcpy(&bits, v + j * vs + d, sizeof(bits));
      vj[d] |= static_cast<uint32_t>(bits) << shift;
    }
  }
}

// Dot products of 4 queries (q[i]: D bf16) with the kKeys keys of one block (kb: its packed keys) -> s[i][0..63].
template <int D>
TEMPSPEC_AVX512BF16 void block_scores(const at::BFloat16* const* q, const uint32_t* kb, float (*s)[kKeys]) {
  constexpr int P = D / 2;
  __m512 acc[kScoreRows][4];
#pragma GCC unroll 16
  for (int i = 0; i < kScoreRows; ++i)
    for (int g = 0; g < 4; ++g) acc[i][g] = _mm512_setzero_ps();
  for (int p = 0; p < P; ++p) {
    __m512bh keys[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) keys[g] = (__m512bh)_mm512_loadu_si512(kb + (g * P + p) * 16);
#pragma GCC unroll 4
    for (int i = 0; i < kScoreRows; ++i) {
      int32_t pair;
      std::memcpy(&pair, q[i] + 2 * p, sizeof(pair));
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) acc[i][g] = _mm512_dpbf16_ps(acc[i][g], keys[g], qb);
    }
  }
  for (int i = 0; i < kScoreRows; ++i)
    for (int g = 0; g < 4; ++g) _mm512_storeu_ps(s[i] + 16 * g, acc[i][g]);
}

// One query at position t over the block of keys j0..j0+63 (s: their dot products): its running max `best` and sum
// `total` updated, its weights for the block as bf16 pairs in w[0..31] (0 for keys after t). Returns the factor
// its output so far is rescaled by (1 when it sees no key of the block).
TEMPSPEC_AVX512BF16 float block_softmax(const float* s, int64_t j0, int64_t t, float scale, float& best, float& total,
                                        uint32_t* w) {
  const int64_t seen = std::min<int64_t>(kKeys, t - j0 + 1);
  if (seen <= 0) {
    std::fill(w, w + kKeys / 2, 0u);
    return 1.f;
  }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 x[4];
  __mmask16 visible[4];
  float top = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < 4; ++g) {
    const int64_t n = seen - 16 * g;
    visible[g] = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
    x[g] = _mm512_mask_mov_ps(minus_inf, visible[g], _mm512_mul_ps(_mm512_loadu_ps(s + 16 * g), _mm512_set1_ps(scale)));
    top = std::max(top, _mm512_reduce_max_ps(x[g]));
  }
  const float next = std::max(best, top);
  const float rescale = std::exp(best - next);  // best = -inf before the first block: 0
  const __m512 shift = _mm512_set1_ps(next);
  float sum = 0.f;
  __m512 e[4];
  for (int g = 0; g < 4; ++g) {
    e[g] = _mm512_maskz_mov_ps(visible[g], exp16(_mm512_sub_ps(x[g], shift)));
    sum += _mm512_reduce_add_ps(e[g]);
  }
  _mm512_storeu_si512(w, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
  _mm512_storeu_si512(w + 16, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
  total = total * rescale + sum;
  best = next;
  return rescale;
}

// R queries' outputs o[i] (D fp32) times rescale[i], plus their block weights w[i] (bf16 pairs) times the values of
// the first `pairs` key pairs of the block (vb: its packed values).
template <int D, int R>
TEMPSPEC_AVX512BF16 void block_values(float* const* o, const float* rescale, const uint32_t* const* w,
                                      const uint32_t* vb, int64_t pairs) {
  constexpr int NG = D / 16;
  __m512 acc[R][NG];
  for (int i = 0; i < R; ++i) {
    const __m512 r = _mm512_set1_ps(rescale[i]);
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) acc[i][g] = _mm512_mul_ps(_mm512_loadu_ps(o[i] + 16 * g), r);
  }
  for (int64_t m = 0; m < pairs; ++m) {
    __m512bh vals[NG];
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) vals[g] = (__m512bh)_mm512_loadu_si512(vb + m * D + 16 * g);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w[i][m]));
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) acc[i][g] = _mm512_dpbf16_ps(acc[i][g], vals[g], wb);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < NG; ++g) _mm512_storeu_ps(o[i] + 16 * g, acc[i][g]);
}

// Queries t0..t0+n-1 of one query head (query t at q + t * qt) over its key head's packed keys and values ->
// out + t * ot. Rows past n (to a multiple of 4) repeat the last query and are not written.
template <int D>
TEMPSPEC_AVX512BF16 void attend_block(const at::BFloat16* q, int64_t qt, int64_t t0, int64_t n, const uint32_t* kp,
                                      const uint32_t* vp, float scale, at::BFloat16* out, int64_t ot) {
  constexpr int R = D == 64 ? 4 : 2;  // queries per value pass: R x D / 16 accumulators = 16
  alignas(64) float o[kQueries][D];
  alignas(64) uint32_t w[kQueries][kKeys / 2];
  alignas(64) float s[kScoreRows][kKeys];
  float best[kQueries], total[kQueries], rescale[kQueries];
  const int64_t rows = (n + kScoreRows - 1) / kScoreRows * kScoreRows, last = t0 + n - 1;
  for (int64_t i = 0; i < rows; ++i) {
    std::fill(o[i], o[i] + D, 0.f);
    best[i] = -std::numeric_limits<float>::infinity();
    total[i] = 0.f;
  }
  for (int64_t j0 = 0; j0 <= last; j0 += kKeys) {
    const uint32_t* kb = kp + j0 * (D / 2);
    for (int64_t i0 = 0; i0 < rows; i0 += kScoreRows) {
      const at::BFloat16* qs[kScoreRows];
      for (int i = 0; i < kScoreRows; ++i) qs[i] = q + std::min(t0 + i0 + i, last) * qt;
      block_scores<D>(qs, kb, s);
      for (int i = 0; i < kScoreRows; ++i)
        rescale[i0 + i] = block_softmax(s[i], j0, std::min(t0 + i0 + i, last), scale, best[i0 + i], total[i0 + i],
                                        w[i0 + i]);
    }
    const int64_t pairs = std::min<int64_t>(kKeys / 2, (last - j0 + 2) / 2);  // past the last query: zero weights
    const uint32_t* vb = vp + (j0 / 2) * D;
    for (int64_t i0 = 0; i0 < rows; i0 += R) {
      float* os[R];
      const uint32_t* ws[R];
      for (int i = 0; i < R; ++i) {
        os[i] = o[i0 + i];
        ws[i] = w[i0 + i];
      }
      block_values<D, R>(os, rescale + i0, ws, vb, pairs);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const __m512 inv = _mm512_set1_ps(1.f / total[i]);
    at::BFloat16* oi = out + (t0 + i) * ot;
    for (int g = 0; g < D / 16; ++g) store16(oi + 16 * g, _mm512_mul_ps(_mm512_loadu_ps(o[i] + 16 * g), inv));
  }
}

}  // namespace

at::Tensor prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(cpu_has_avx512bf16(), "prefill_attention_cpu needs a CPU with AVX-512 BF16");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "prefill_attention_cpu: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefill_attention_cpu: q, k, v must be [B, heads, T, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "prefill_attention_cpu: q, k, v must be bfloat16");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(2) == T && v.size(2) == T && k.size(3) == D &&
                  v.size(3) == D && v.size(1) == Hkv && Hkv > 0 && H % Hkv == 0,
              "prefill_attention_cpu: k, v must be [B, kv_heads, T, D] (as many keys as queries) with kv_heads "
              "dividing q's heads");
  TORCH_CHECK(D == 64 || D == 128, "prefill_attention_cpu: head dimension 64 or 128, got ", D);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "prefill_attention_cpu: the last dimension of q, k, v must be contiguous");
  // [B, T, H, D] in memory, returned as a [B, H, T, D] view: the caller's transpose(1, 2) is then free
  at::Tensor out = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  if (B * H * T == 0) return out;
  const int64_t G = H / Hkv, Tp = (T + kKeys - 1) / kKeys * kKeys, per_head = Tp * D / 2;
  std::vector<uint32_t> kp(static_cast<size_t>(B * Hkv * per_head)), vp(kp.size());
  const at::BFloat16* kd = k.data_ptr<at::BFloat16>();
  const at::BFloat16* vd = v.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      pack_head(kd + b * k.stride(0) + h * k.stride(1), k.stride(2), vd + b * v.stride(0) + h * v.stride(1),
                v.stride(2), T, Tp, D, kp.data() + bh * per_head, vp.data() + bh * per_head);
    }
  });
  // tasks in pairs of query blocks, the first with the last, the second with the one before it...: the later a block,
  // the more keys it reads, and each thread's contiguous range of tasks then holds about as much work as the others'
  const int64_t blocks = (T + kQueries - 1) / kQueries;
  const at::BFloat16* qd = q.data_ptr<at::BFloat16>();
  at::BFloat16* od = out.data_ptr<at::BFloat16>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, blocks * B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / (B * H), b = (task % (B * H)) / H, h = task % H;
      const int64_t block = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;
      const int64_t t0 = block * kQueries, n = std::min(kQueries, T - t0);
      const at::BFloat16* qh = qd + b * q.stride(0) + h * q.stride(1);
      const uint32_t* kh = kp.data() + (b * Hkv + h / G) * per_head;
      const uint32_t* vh = vp.data() + (b * Hkv + h / G) * per_head;
      at::BFloat16* oh = od + b * out.stride(0) + h * out.stride(1);
      if (D == 64) {
        attend_block<64>(qh, q.stride(2), t0, n, kh, vh, fscale, oh, out.stride(2));
      } else {
        attend_block<128>(qh, q.stride(2), t0, n, kh, vh, fscale, oh, out.stride(2));
      }
    }
  });
  return out;
}

}  // namespace tempspec

#pragma GCC diagnostic pop
