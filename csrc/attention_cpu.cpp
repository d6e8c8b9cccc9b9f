// Attention of a few queries over a KV cache on the CPU (decode, verification, drafting).
//
// out[b, h, t] = sum_j softmax_j(scale * q[b, h, t] . k[b, h / G, j]) v[b, h / G, j] over the keys j < L that
// mask[b, h, t, j] lets through (all of them without a mask); G = H / Hkv query heads share a key head. fp32 scores,
// softmax and sums whatever the input dtype (bf16 or fp32), the output rounded to the input dtype.
//
// Why: torch's CPU flash attention spends ~0.3 ms per layer on a single query over 512 keys (2.8 times what it
// spends on two queries: benchmarks/results/attention_cpu_amd-epyc-zen4.json), a third of a 135M model's decode. Here a task takes up to kRows query rows of one
// key head (its G query heads times the T queries) and loads each key and value once for all of them. Each row's
// arithmetic is its own: its scores (one fp32 accumulator per vector lane over the head dimension, lanes summed in a
// fixed order), their maximum, then exp(score - max) (a vectorized Cephes expf) summed and the values weighted in key
// order. Masked keys are skipped, not added as zeros, so a row's result does not depend on the other rows, on T or on
// L beyond the keys it sees (batch invariant, like csrc/linear_cpu.cpp: verifying k+1 tokens attends exactly as k+1
// decodes do). A row that sees no key is zero.
#include "attention.h"

#include <ATen/Parallel.h>

#include "avx2_vec.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace tempspec {
namespace {

// Strides (in elements) of a [B, H, T or S, D] view whose last dimension is contiguous.
struct View4 {
  int64_t b, h, t;
  explicit View4(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
};

constexpr int kRows = 8;  // query rows per task, all reading one key head: each key and value is loaded once for them

// R (<= kRows) query rows of one key head: q (R x D, already scaled, fp32), keys/values rows k + j * ks, v + j * vs
// for j < L; row r sees the keys that visible[r] (L bools, stride ms) lets through, or all of them when visible is
// nullptr -> out[r] (D values of scalar_t). scores: R x L8 scratch (L rounded up to 8), acc: R x D scratch.
// DC: D when it is a compile-time constant (a key or value row then sits in registers while every row uses it), 0
// for any D.
template <typename scalar_t, int DC>
TEMPSPEC_AVX2 void attend_rows(int R, const float* q, const scalar_t* k, int64_t ks, const scalar_t* v, int64_t vs,
                               const bool* const* visible, int64_t ms, int64_t L, int64_t D_, float* scores,
                               float* acc, scalar_t* const* out) {
  const int64_t D = DC > 0 ? DC : D_;
  const int64_t D8 = D - D % 8, L8 = (L + 7) / 8 * 8;
  constexpr int NV = DC > 0 ? DC / 8 : 1;
  __m256 row[NV];
  float best[kRows], total[kRows];
  int64_t seen[kRows];
  for (int r = 0; r < R; ++r) {
    best[r] = -std::numeric_limits<float>::infinity();
    total[r] = 0.f;
    seen[r] = 0;
  }
  for (int64_t j = 0; j < L; ++j) {
    const scalar_t* kj = k + j * ks;
    if (DC > 0) {
#pragma GCC unroll 16
      for (int i = 0; i < NV; ++i) row[i] = load8(kj + 8 * i);
    }
    for (int r = 0; r < R; ++r) {
      if (visible != nullptr && !visible[r][j * ms]) continue;
      const float* qr = q + r * D;
      __m256 a = _mm256_setzero_ps();
      if (DC > 0) {
#pragma GCC unroll 16
        for (int i = 0; i < NV; ++i) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * i), row[i], a);
      } else {
        for (int64_t d = 0; d < D8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), load8(kj + d), a);
      }
      float sc = lane_sum(a);
      for (int64_t d = D8; d < D; ++d) sc += qr[d] * static_cast<float>(kj[d]);
      scores[r * L8 + j] = sc;
      best[r] = std::max(best[r], sc);
      ++seen[r];
    }
  }
  // the weights exp(score - best) of each row, 8 keys at a time (a key's weight is its own lanes' arithmetic; the
  // weights of keys the row does not see are computed from stale scores and never read)
  for (int r = 0; r < R; ++r) {
    float* sr = scores + r * L8;
    const __m256 top = _mm256_set1_ps(best[r]);
    for (int64_t j = 0; j < L8; j += 8) _mm256_storeu_ps(sr + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), top)));
  }
  for (int64_t i = 0; i < R * D; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    const scalar_t* vj = v + j * vs;
    if (DC > 0) {
#pragma GCC unroll 16
      for (int i = 0; i < NV; ++i) row[i] = load8(vj + 8 * i);
    }
    for (int r = 0; r < R; ++r) {
      if (visible != nullptr && !visible[r][j * ms]) continue;
      const float p = scores[r * L8 + j];
      total[r] += p;
      const __m256 pv = _mm256_set1_ps(p);
      float* ar = acc + r * D;
      if (DC > 0) {
#pragma GCC unroll 16
        for (int i = 0; i < NV; ++i)
          _mm256_storeu_ps(ar + 8 * i, _mm256_fmadd_ps(pv, row[i], _mm256_loadu_ps(ar + 8 * i)));
      } else {
        for (int64_t d = 0; d < D8; d += 8)
          _mm256_storeu_ps(ar + d, _mm256_fmadd_ps(pv, load8(vj + d), _mm256_loadu_ps(ar + d)));
        for (int64_t d = D8; d < D; ++d) ar[d] += p * static_cast<float>(vj[d]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float inv = seen[r] > 0 ? 1.f / total[r] : 0.f;
    for (int64_t d = 0; d < D; ++d) out[r][d] = static_cast<scalar_t>(acc[r * D + d] * inv);
  }
}

template <typename scalar_t>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                    double scale, int64_t L, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), G = H / Hkv;
  const View4 qs(q), ks(k), vs(v), os(out);
  const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t mb = m ? mask.stride(0) : 0, mh = m ? mask.stride(1) : 0, mt = m ? mask.stride(2) : 0,
                mj = m ? mask.stride(3) : 0;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  // a task: up to kRows of the G * T query rows (head g = i / T of the group, query t = i % T) of one key head
  const int64_t chunks = (G * T + kRows - 1) / kRows;
  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t L8 = (L + 7) / 8 * 8;
    std::vector<float> buf(static_cast<size_t>(kRows * (L8 + 2 * D)));  // zeros: no stale score is NaN
    float* scores = buf.data();
    float* acc = scores + kRows * L8;
    float* qf = acc + kRows * D;
    const bool* visible[kRows];
    scalar_t* outs[kRows];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hkv * chunks), kvh = (task / chunks) % Hkv, first = (task % chunks) * kRows;
      const int R = static_cast<int>(std::min<int64_t>(kRows, G * T - first));
      for (int r = 0; r < R; ++r) {
        const int64_t h = kvh * G + (first + r) / T, t = (first + r) % T;
        const scalar_t* qr = qp + b * qs.b + h * qs.h + t * qs.t;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(qr[d]) * fscale;
        visible[r] = m ? m + b * mb + h * mh + t * mt : nullptr;
        outs[r] = op + b * os.b + h * os.h + t * os.t;
      }
      const scalar_t* kr = kp + b * ks.b + kvh * ks.h;
      const scalar_t* vr = vp + b * vs.b + kvh * vs.h;
      const bool* const* vis = m ? visible : nullptr;
      if (D == 64) {
        attend_rows<scalar_t, 64>(R, qf, kr, ks.t, vr, vs.t, vis, mj, L, D, scores, acc, outs);
      } else if (D == 128) {
        attend_rows<scalar_t, 128>(R, qf, kr, ks.t, vr, vs.t, vis, mj, L, D, scores, acc, outs);
      } else {
        attend_rows<scalar_t, 0>(R, qf, kr, ks.t, vr, vs.t, vis, mj, L, D, scores, acc, outs);
      }
    }
  });
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(linear_bf16_cpu_supported(), "attention_cpu needs a CPU with AVX2 and FMA");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention_cpu: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_cpu: q, k, v must be [B, heads, len, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "attention_cpu: q, k, v must all be bfloat16 or all float32");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D && v.size(2) == L &&
                  v.size(1) == k.size(1) && k.size(1) > 0 && H % k.size(1) == 0,
              "attention_cpu: k, v must be [B, kv_heads, L, D] with kv_heads dividing q's heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attention_cpu: the last dimension of q, k, v must be contiguous");
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->device().is_cpu() &&
                    (mask->size(0) == B || mask->size(0) == 1) && (mask->size(1) == H || mask->size(1) == 1) &&
                    mask->size(2) == T && mask->size(3) == L,
                "attention_cpu: mask must be a CPU bool tensor [B or 1, heads or 1, T, L] = [", B, " or 1, ", H,
                " or 1, ", T, ", ", L, "], got ", mask->scalar_type(), " ", mask->sizes());
    m = mask->expand({B, H, T, L});
  }
  // [B, T, H, D] in memory, returned as a [B, H, T, D] view: the caller's transpose(1, 2) is then free
  at::Tensor out = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  if (B * H * T > 0 && D > 0) {
    if (q.scalar_type() == at::kBFloat16) {
      attention_impl<at::BFloat16>(q, k, v, m, scale, L, out);
    } else {
      attention_impl<float>(q, k, v, m, scale, L, out);
    }
  }
  return out;
}

}  // namespace tempspec
