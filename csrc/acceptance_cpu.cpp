// C++ CPU backend of the fused speculative-sampling ops. Semantics: tempspec_engine/reference.py.
//
// Every logit row [V] is cut into blocks of kBlock tokens (a block fits in L1).
// - Temperature softmax in two passes: per-block maxima give the row max m; then one pass writes per block the sum
//   part_j of the weights exp((l - m) / T). (A one-pass online softmax would rescale block sums by exp((m_j - m) / T),
//   whose rounding differs from the reference's by several ulps; the second pass is as cheap: the max pass does no exp.)
// - Inverse-CDF draw: S = sum_j part_j, find the block where the running sum of part_j crosses u * S and rescan only
//   that block. A draw from the target weights reuses the softmax pass's block sums; the residual max(0, p - q) costs
//   one pass over V that writes its own block sums.
// Rows run in parallel; with fewer rows than threads, the blocks of each row run in parallel instead.
// Arithmetic is fp32 as in the reference (logits read in their own dtype); sums of weights are accumulated in double.
// Sampling filters (the *_filtered ops): the reference's keep rule is two thresholds per row, l >= logit_min and
// w >= weight_min (Keep). logit_min (top-k) comes from std::nth_element on a copy of the row's logits; the top-p
// threshold from a quickselect on the mass of the candidate weights (expected O(V), no sort); min-p is w >= min_p.
// The kept weights then replace the weights everywhere (fill_weights / weight_at), as in the reference.
#include "acceptance.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace tempspec {
namespace {

constexpr int64_t kBlock = 2048;
constexpr int kLanes = 16;  // independent accumulators, so that max/sum loops vectorize
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Leaf loops over one block. GCC keeps floating-point selects out of vectorized loops under -ftrapping-math (its
// default); nobody observes FP exception flags here, so these few functions are compiled without it, and without
// contracting a * b + c into FMAs, so that every clone rounds exactly as the scalar code. On x86-64 Linux they are
// also cloned for AVX2 and AVX-512 (picked at load time; the build itself targets the baseline ISA).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TEMPSPEC_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TEMPSPEC_SIMD_CLONES
#endif

// exp(x) for x <= 0 (or -inf) in fp32, within about 1 ulp, with gradual underflow (exactly 0 below about -103.97).
// Branch-free so that loops calling it vectorize: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 Taylor
// polynomial, times 2^n applied in two halves so that subnormal results are rounded once.
float exp_nonpos(float x) {
  x = x < -104.0f ? -104.0f : x;
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + shift) - shift;
  float r = x - n * 0.693145751953125f;    // ln2 high part (15 bits): n * hi is exact
  r = r - n * 1.42860682030941723212e-6f;  // ln2 low part
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);  // in [-150, 0]
  const int32_t n1 = ni / 2;
  const int32_t b1 = (n1 + 127) << 23;
  const int32_t b2 = (ni - n1 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(float));
  std::memcpy(&s2, &b2, sizeof(float));
  return p * s1 * s2;
}

TEMPSPEC_SIMD_CLONES float max_of(const float* l, int64_t n) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = kNegInf;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = l[i + j] > acc[j] ? l[i + j] : acc[j];
  for (; i < n; ++i) acc[0] = l[i] > acc[0] ? l[i] : acc[0];
  float m = acc[0];
  for (int j = 1; j < kLanes; ++j) m = acc[j] > m ? acc[j] : m;
  return m;
}

TEMPSPEC_SIMD_CLONES double sum_of(const float* w, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(w[i + j]);
  for (; i < n; ++i) acc[0] += static_cast<double>(w[i]);
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// out[i] = exp((l[i] - m) / T); out may alias l.
TEMPSPEC_SIMD_CLONES void exp_weights(const float* l, int64_t n, float m, float t, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = exp_nonpos((l[i] - m) / t);
}

// Residual weights in place: wp[i] = max(0, wp[i] / sp - eps * (wq[i] / sq)), from target and draft weights
// (eps = 1: lossless, the same rounding as without the product).
TEMPSPEC_SIMD_CLONES void residual_weights(float* wp, const float* wq, int64_t n, float sp, float sq, float eps) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = wp[i] / sp - eps * (wq[i] / sq);
    wp[i] = d > 0.0f ? d : 0.0f;
  }
}

// The filters' keep rule on weights w of logits l: w[i] = 0 unless l[i] >= logit_min and w[i] >= weight_min.
TEMPSPEC_SIMD_CLONES void mask_weights(const float* l, int64_t n, float logit_min, float weight_min, float* w) {
  for (int64_t i = 0; i < n; ++i) w[i] = (l[i] >= logit_min && w[i] >= weight_min) ? w[i] : 0.0f;
}

// bfloat16 / float16 -> float32 of n values, exact (as c10's conversions), in integer arithmetic that vectorizes.
TEMPSPEC_SIMD_CLONES void widen(const c10::BFloat16* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i].x) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

TEMPSPEC_SIMD_CLONES void widen(const c10::Half* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = src[i].x;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    const float sub = static_cast<float>(static_cast<int32_t>(mant)) * 5.9604644775390625e-8f;  // zero, subnormal
    uint32_t sub_bits;
    std::memcpy(&sub_bits, &sub, sizeof(float));
    const uint32_t normal = ((e + 112u) << 23) | (mant << 13);  // rebias the exponent: 127 - 15
    const uint32_t special = 0x7f800000u | (mant << 13);       // inf, nan
    const uint32_t bits = ((h & 0x8000u) << 16) | (e == 0u ? sub_bits : (e == 31u ? special : normal));
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The n logits at src as fp32: src itself for float, else converted into buf.
inline const float* as_float(const float* src, int64_t, float*) { return src; }
template <typename scalar_t>
const float* as_float(const scalar_t* src, int64_t n, float* buf) {
  widen(src, n, buf);
  return buf;
}

inline int64_t num_blocks(int64_t V) { return (V + kBlock - 1) / kBlock; }
inline int64_t block_len(int64_t j, int64_t V) { return std::min(kBlock, V - j * kBlock); }

// Calls f(j) for every block j, in parallel over blocks when `parallel`.
template <class F>
void for_each_block(int64_t nblk, bool parallel, const F& f) {
  if (parallel && nblk > 1) {
    at::parallel_for(0, nblk, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) f(j);
    });
  } else {
    for (int64_t j = 0; j < nblk; ++j) f(j);
  }
}

// Max pass over one row [V]: blk_m[j] = max of block j. Returns the row max.
template <typename scalar_t>
float row_max(const scalar_t* row, int64_t V, float* blk_m, bool parallel) {
  const int64_t nblk = num_blocks(V);
  for_each_block(nblk, parallel, [&](int64_t j) {
    float buf[kBlock];
    const int64_t n = block_len(j, V);
    blk_m[j] = max_of(as_float(row + j * kBlock, n, buf), n);
  });
  float m = kNegInf;
  for (int64_t j = 0; j < nblk; ++j) m = blk_m[j] > m ? blk_m[j] : m;
  return m;
}

// Which tokens of a row the filters keep (reference.filter_thresholds): l >= logit_min and w >= weight_min.
// The default keeps every token.
struct Keep {
  float logit_min = kNegInf;
  float weight_min = 0.0f;
  bool active() const { return logit_min > kNegInf || weight_min > 0.0f; }
};

// Writes block j's softmax weights exp((l - m) / T) of the row [V] into w, zero where `keep` drops the token.
template <typename scalar_t>
void fill_weights(const scalar_t* row, int64_t V, float m, float t, int64_t j, float* w, const Keep& keep = Keep()) {
  const int64_t n = block_len(j, V);
  if (!keep.active()) {
    exp_weights(as_float(row + j * kBlock, n, w), n, m, t, w);
    return;
  }
  float buf[kBlock];
  const float* l = as_float(row + j * kBlock, n, buf);
  exp_weights(l, n, m, t, w);
  mask_weights(l, n, keep.logit_min, keep.weight_min, w);
}

// The (kept) weight of token x of the row, as fill_weights writes it.
template <typename scalar_t>
float weight_at(const scalar_t* row, int64_t x, float m, float t, const Keep& keep) {
  const float l = static_cast<float>(row[x]);
  const float w = exp_nonpos((l - m) / t);
  return (l >= keep.logit_min && w >= keep.weight_min) ? w : 0.0f;
}

// Softmax pass over one row [V] with its max m: part[j] = sum of block j's weights exp((l - m) / T).
// Returns the row sum s (fp32, as the reference's weights.sum()).
template <typename scalar_t>
float row_weights(const scalar_t* row, int64_t V, float m, float t, double* part, bool parallel,
                  const Keep& keep = Keep()) {
  const int64_t nblk = num_blocks(V);
  for_each_block(nblk, parallel, [&](int64_t j) {
    float w[kBlock];
    fill_weights(row, V, m, t, j, w, keep);
    part[j] = sum_of(w, block_len(j, V));
  });
  double total = 0.0;
  for (int64_t j = 0; j < nblk; ++j) total += part[j];
  return static_cast<float>(total);
}

// First index of the row max m (torch.argmax), rescanning only the first block whose max is m.
template <typename scalar_t>
int64_t row_argmax(const scalar_t* row, int64_t V, const float* blk_m, float m) {
  const int64_t nblk = num_blocks(V);
  for (int64_t j = 0; j < nblk; ++j) {
    if (blk_m[j] != m) continue;
    float buf[kBlock];
    const int64_t n = block_len(j, V);
    const float* l = as_float(row + j * kBlock, n, buf);
    for (int64_t i = 0; i < n; ++i)
      if (l[i] == m) return j * kBlock + i;
  }
  return 0;  // only reached for NaN maxima, which the wrapper excludes
}

// Inverse-CDF draw with the uniform u over a row [V] of non-negative weights known by block: part[j] is the (double)
// sum of block j's weights and fill(j, out) writes them. Returns the first token t with w_t > 0 and
// cumsum_t >= u * S (S = sum of part), else the last token with w_t > 0; -1 when every weight is zero.
template <class Fill>
int64_t draw_blocked(const double* part, int64_t V, float u, const Fill& fill) {
  const int64_t nblk = num_blocks(V);
  double total = 0.0;
  for (int64_t j = 0; j < nblk; ++j) total += part[j];
  if (!(total > 0.0)) return -1;
  const float goal = u * static_cast<float>(total);
  // The block where the running sum crosses goal, else (rounding) the last block of positive weight.
  int64_t sel = -1;
  double prefix = 0.0, sel_prefix = 0.0;
  for (int64_t j = 0; j < nblk; ++j) {
    if (!(part[j] > 0.0)) continue;
    sel = j;
    sel_prefix = prefix;
    prefix += part[j];
    if (static_cast<float>(prefix) >= goal) break;
  }
  // part[sel] > 0: the block holds a positive weight.
  float w[kBlock];
  fill(sel, w);
  double cum = sel_prefix;
  int64_t last = -1;
  for (int64_t i = 0; i < block_len(sel, V); ++i) {
    if (w[i] > 0.0f) {
      last = i;
      cum += w[i];
      if (static_cast<float>(cum) >= goal) break;
    }
  }
  return sel * kBlock + last;
}

// Per-row sampling settings of the filtered ops (reference.py); the defaults are all off and lossless.
struct RowSettings {
  int64_t top_k = 0;     // 0: off
  float top_p = 1.0f;    // 1: off
  float min_p = 0.0f;    // 0: off
  float lenience = 1.0f; // 1: lossless
  bool filtered() const { return top_k > 0 || top_p < 1.0f || min_p > 0.0f; }
};

// Scratch buffers of one row's work, sized by the number of blocks (cand grows to V when filters need it).
struct Scratch {
  std::vector<float> blk_m;          // block maxima of the row at hand
  std::vector<double> tpart, rpart;  // block sums of the target weights; of the draft weights, then the residual
  std::vector<float> cand;           // the filters' selection buffer: logits for top-k, candidate weights for top-p
  explicit Scratch(int64_t nblk) : blk_m(nblk), tpart(nblk), rpart(nblk) {}
};

// Top-k's logit_min: the k-th largest fp32 logit of the row [V] counting repeats (-inf when top_k is 0 or >= V),
// by a partial selection (std::nth_element, expected O(V)).
template <typename scalar_t>
float top_k_logit_min(const scalar_t* row, int64_t V, int64_t top_k, std::vector<float>& buf) {
  if (top_k <= 0 || top_k >= V) return kNegInf;
  buf.resize(V);
  for (int64_t j = 0; j < num_blocks(V); ++j) {
    const int64_t n = block_len(j, V);
    const float* l = as_float(row + j * kBlock, n, buf.data() + j * kBlock);
    if (l != buf.data() + j * kBlock) std::copy(l, l + n, buf.data() + j * kBlock);
  }
  std::nth_element(buf.begin(), buf.begin() + (top_k - 1), buf.end(), std::greater<float>());
  return buf[top_k - 1];
}

// The largest value v among the candidate weights c[0, n) (all > 0) whose mass, the fp64 sum of the candidates
// >= v, reaches goal. A quickselect on the mass: three-way partitions around a median-of-three pivot keep the side
// that holds v (the mass of the larger side carried in `above`), expected O(n). If rounding never reaches goal, the
// smallest candidate (everything is kept).
float mass_threshold(float* c, int64_t n, double goal) {
  double above = 0.0;  // mass of the candidates set aside as larger than every remaining one
  float smallest = 0.0f;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const float a = c[lo], b = c[lo + (hi - lo) / 2], d = c[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));
    int64_t gt = lo, i = lo, lt = hi;  // c[lo, gt) > pivot, c[gt, i) == pivot, c[lt, hi) < pivot
    double sum_gt = 0.0, sum_eq = 0.0;
    while (i < lt) {
      const float v = c[i];
      if (v > pivot) {
        sum_gt += v;
        std::swap(c[gt++], c[i++]);
      } else if (v < pivot) {
        std::swap(c[i], c[--lt]);
      } else {
        sum_eq += v;
        ++i;
      }
    }
    if (above + sum_gt >= goal) {
      hi = gt;  // v > pivot
    } else if (above + sum_gt + sum_eq >= goal) {
      return pivot;
    } else {
      above += sum_gt + sum_eq;
      smallest = pivot;
      lo = lt;
    }
  }
  return smallest;
}

// Top-p's v* over the row's weights that survive top-k (l >= logit_min), 0 when top_p >= 1 (off).
template <typename scalar_t>
float top_p_weight_min(const scalar_t* row, int64_t V, float m, float t, float logit_min, float top_p,
                       std::vector<float>& buf) {
  if (!(top_p < 1.0f)) return 0.0f;
  buf.clear();
  double total = 0.0;
  Keep top_k_only;
  top_k_only.logit_min = logit_min;
  for (int64_t j = 0; j < num_blocks(V); ++j) {
    float w[kBlock];
    fill_weights(row, V, m, t, j, w, top_k_only);
    for (int64_t i = 0; i < block_len(j, V); ++i) {
      if (w[i] > 0.0f) {
        buf.push_back(w[i]);
        total += w[i];
      }
    }
  }
  return mass_threshold(buf.data(), static_cast<int64_t>(buf.size()), static_cast<double>(top_p) * total);
}

// The keep rule of one row at T > 0 with max m (reference.filter_thresholds): top-k, then top-p, then min-p.
template <typename scalar_t>
Keep row_keep(const scalar_t* row, int64_t V, float m, float t, const RowSettings& rs, Scratch& sc) {
  Keep keep;
  if (!rs.filtered()) return keep;
  keep.logit_min = top_k_logit_min(row, V, rs.top_k, sc.cand);
  keep.weight_min = std::max(top_p_weight_min(row, V, m, t, keep.logit_min, rs.top_p, sc.cand), rs.min_p);
  return keep;
}

// Token for a target row: argmax when T == 0, else an inverse-CDF draw from the kept exp((l - m) / T) with u.
template <typename scalar_t>
int64_t sample_row(const scalar_t* row, int64_t V, float t, float u, const RowSettings& rs, Scratch& sc,
                   bool parallel) {
  const float m = row_max(row, V, sc.blk_m.data(), parallel);
  if (t == 0.0f) return row_argmax(row, V, sc.blk_m.data(), m);
  const Keep keep = row_keep(row, V, m, t, rs, sc);
  row_weights(row, V, m, t, sc.tpart.data(), parallel, keep);
  return draw_blocked(sc.tpart.data(), V, u,
                      [&](int64_t j, float* w) { fill_weights(row, V, m, t, j, w, keep); });
}

// One batch row of the acceptance op. draft [k, V], target [k+1, V], tokens [k], uniforms [k+1];
// writes out_tokens[0..n] (the caller filled -1) and returns the number n of accepted draft tokens.
template <typename scalar_t>
int64_t speculate_row(const scalar_t* draft, const scalar_t* target, const int64_t* draft_tokens, float t,
                      const float* uniforms, const RowSettings& rs, int64_t k, int64_t V, int64_t* out_tokens,
                      bool parallel) {
  const int64_t nblk = num_blocks(V);
  Scratch sc(nblk);
  const float u_draw = uniforms[k];
  const float eps = rs.lenience;
  for (int64_t i = 0; i < k; ++i) {
    const scalar_t* lt = target + i * V;
    const scalar_t* lq = draft + i * V;
    const int64_t x = draft_tokens[i];
    if (t == 0.0f) {
      const float m = row_max(lt, V, sc.blk_m.data(), parallel);
      const int64_t choice = row_argmax(lt, V, sc.blk_m.data(), m);
      if (x != choice) {
        out_tokens[i] = choice;
        return i;
      }
    } else {
      const float mp = row_max(lt, V, sc.blk_m.data(), parallel);
      const float mq = row_max(lq, V, sc.blk_m.data(), parallel);
      const Keep keep_p = row_keep(lt, V, mp, t, rs, sc);
      const Keep keep_q = row_keep(lq, V, mq, t, rs, sc);
      const float sp = row_weights(lt, V, mp, t, sc.tpart.data(), parallel, keep_p);
      const float sq = row_weights(lq, V, mq, t, sc.rpart.data(), parallel, keep_q);
      const float px = weight_at(lt, x, mp, t, keep_p) / sp;
      const float qx = weight_at(lq, x, mq, t, keep_q) / sq;
      if (!(px > 0.0f && uniforms[i] * (eps * qx) <= px)) {
        // Rejected: draw from the residual weights max(0, p - eps q), or from p when they are all zero.
        auto residual = [&](int64_t j, float* w) {
          float wq[kBlock];
          fill_weights(lt, V, mp, t, j, w, keep_p);
          fill_weights(lq, V, mq, t, j, wq, keep_q);
          residual_weights(w, wq, block_len(j, V), sp, sq, eps);
        };
        double* rpart = sc.rpart.data();
        for_each_block(nblk, parallel, [&](int64_t j) {
          float w[kBlock];
          residual(j, w);
          rpart[j] = sum_of(w, block_len(j, V));
        });
        int64_t drawn = draw_blocked(rpart, V, u_draw, residual);
        if (drawn < 0)
          drawn = draw_blocked(sc.tpart.data(), V, u_draw,
                               [&](int64_t j, float* w) { fill_weights(lt, V, mp, t, j, w, keep_p); });
        out_tokens[i] = drawn;
        return i;
      }
    }
    out_tokens[i] = x;
  }
  out_tokens[k] = sample_row(target + k * V, V, t, u_draw, rs, sc, parallel);  // all accepted: the bonus token
  return k;
}

// Runs body(b, parallel_blocks) for every row: rows in parallel, or blocks in parallel when rows are few.
template <class F>
void for_each_row(int64_t B, const F& body) {
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) body(b, false);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) body(b, true);
  }
}

// Dispatch over the logit dtypes: float32, bfloat16, float16.
#define TEMPSPEC_DISPATCH_LOGIT_TYPES(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)             \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)      \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

void check_logits(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_aux(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The per-row settings tensors of a filtered op (undefined tensors: the temperature-only op, everything off).
struct SettingsTensors {
  at::Tensor top_k, top_p, min_p, lenience;

  void check(int64_t B) const {
    if (top_k.defined()) check_aux(top_k, "top_k", at::kLong, {B});
    if (top_p.defined()) check_aux(top_p, "top_p", at::kFloat, {B});
    if (min_p.defined()) check_aux(min_p, "min_p", at::kFloat, {B});
    if (lenience.defined()) check_aux(lenience, "lenience", at::kFloat, {B});
  }

  RowSettings row(int64_t b) const {
    RowSettings rs;
    if (top_k.defined()) rs.top_k = top_k.data_ptr<int64_t>()[b];
    if (top_p.defined()) rs.top_p = top_p.data_ptr<float>()[b];
    if (min_p.defined()) rs.min_p = min_p.data_ptr<float>()[b];
    if (lenience.defined()) rs.lenience = lenience.data_ptr<float>()[b];
    return rs;
  }
};

std::tuple<at::Tensor, at::Tensor> speculative_sample_impl(const at::Tensor& draft_logits,
                                                           const at::Tensor& target_logits,
                                                           const at::Tensor& draft_tokens,
                                                           const at::Tensor& temperature, const at::Tensor& uniforms,
                                                           const SettingsTensors& settings) {
  check_logits(draft_logits, "draft_logits", 3);
  check_logits(target_logits, "target_logits", 3);
  TORCH_CHECK(draft_logits.scalar_type() == target_logits.scalar_type(),
              "draft_logits and target_logits must have the same dtype");
  const int64_t B = draft_logits.size(0), k = draft_logits.size(1), V = draft_logits.size(2);
  TORCH_CHECK(V > 0, "the vocabulary must not be empty");
  TORCH_CHECK(target_logits.sizes() == at::IntArrayRef({B, k + 1, V}), "target_logits must have shape [",
              B, ", ", k + 1, ", ", V, "], got ", target_logits.sizes());
  check_aux(draft_tokens, "draft_tokens", at::kLong, {B, k});
  check_aux(temperature, "temperature", at::kFloat, {B});
  check_aux(uniforms, "uniforms", at::kFloat, {B, k + 1});
  settings.check(B);
  const int64_t* tok = draft_tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * k; ++i)
    TORCH_CHECK(tok[i] >= 0 && tok[i] < V, "draft_tokens must lie in [0, ", V, "), got ", tok[i]);

  at::Tensor accepted = at::zeros({B}, draft_tokens.options());
  at::Tensor tokens = at::full({B, k + 1}, -1, draft_tokens.options());
  const float* temp = temperature.data_ptr<float>();
  const float* uni = uniforms.data_ptr<float>();
  int64_t* acc = accepted.data_ptr<int64_t>();
  int64_t* out = tokens.data_ptr<int64_t>();
  TEMPSPEC_DISPATCH_LOGIT_TYPES(draft_logits.scalar_type(), "speculative_sample_cpu", [&] {
    const scalar_t* draft = draft_logits.data_ptr<scalar_t>();
    const scalar_t* target = target_logits.data_ptr<scalar_t>();
    for_each_row(B, [&](int64_t b, bool parallel) {
      acc[b] = speculate_row(draft + b * k * V, target + b * (k + 1) * V, tok + b * k, temp[b], uni + b * (k + 1),
                             settings.row(b), k, V, out + b * (k + 1), parallel);
    });
  });
  return {accepted, tokens};
}

at::Tensor sample_impl(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms,
                       const SettingsTensors& settings) {
  check_logits(logits, "logits", 2);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "the vocabulary must not be empty");
  check_aux(temperature, "temperature", at::kFloat, {B});
  check_aux(uniforms, "uniforms", at::kFloat, {B});
  settings.check(B);

  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* temp = temperature.data_ptr<float>();
  const float* uni = uniforms.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  TEMPSPEC_DISPATCH_LOGIT_TYPES(logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* data = logits.data_ptr<scalar_t>();
    for_each_row(B, [&](int64_t b, bool parallel) {
      Scratch sc(num_blocks(V));
      o[b] = sample_row(data + b * V, V, temp[b], uni[b], settings.row(b), sc, parallel);
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> speculative_sample_cpu(const at::Tensor& draft_logits,
                                                          const at::Tensor& target_logits,
                                                          const at::Tensor& draft_tokens,
                                                          const at::Tensor& temperature,
                                                          const at::Tensor& uniforms) {
  return speculative_sample_impl(draft_logits, target_logits, draft_tokens, temperature, uniforms,
                                 SettingsTensors());
}

std::tuple<at::Tensor, at::Tensor> speculative_sample_filtered_cpu(
    const at::Tensor& draft_logits, const at::Tensor& target_logits, const at::Tensor& draft_tokens,
    const at::Tensor& temperature, const at::Tensor& uniforms, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& lenience) {
  return speculative_sample_impl(draft_logits, target_logits, draft_tokens, temperature, uniforms,
                                 SettingsTensors{top_k, top_p, min_p, lenience});
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms) {
  return sample_impl(logits, temperature, uniforms, SettingsTensors());
}

at::Tensor sample_filtered_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms,
                               const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p) {
  return sample_impl(logits, temperature, uniforms, SettingsTensors{top_k, top_p, min_p, at::Tensor()});
}

}  // namespace tempspec
