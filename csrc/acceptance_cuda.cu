// CUDA backend of the fused speculative-sampling ops. Semantics: tempspec_engine/reference.py. Design, bytes moved
// and tuning knobs: .dev/cuda_notes.md.
//
// One kernel launch per call (plus a memset of a few counters). Each CTA takes a ticket from an atomic counter; the
// ticket, not blockIdx, names its work item. Per batch row b there are
//   - stats items, one per (logit row, chunk of V): the chunk's max and sum of exp((l - max) / T) (T > 0), or its max
//     and the first index of the max (T == 0; draft rows are then skipped). The last stats item of b to finish merges
//     the chunks of every row, runs the acceptance test of every draft position and publishes the decision (a greedy
//     row is finished right there);
//   - sweep items (T > 0 only), one per chunk of V: sums of the draw weights (residual max(0, p_j - q_j) and target
//     weights exp((l - m) / T)) of the row the decision picked, per segment (one warp's contiguous share of the chunk).
//     The last sweep item of b to finish finds the segment where the running sum crosses u * S, rescans only that
//     segment (2048 or 1024 tokens) and writes the outputs.
// Sweep items of row b are handed out `lag` batch rows after its stats items: by then the decision is (almost always)
// published and the rows are still in L2. A sweep CTA that arrives early spins; this cannot deadlock because it only
// waits for items with smaller tickets, whose CTAs are already running and never wait themselves.
//
// Numerics: fp32, logits read in their own dtype. The setup.py flags include --use_fast_math (flush-to-zero), so the
// values that decide "weight > 0" and the draw itself (weights with gradual underflow, p, q, the residual, the
// acceptance comparison, the running sums) use explicit IEEE PTX instructions: results do not depend on the flags.
// Running sums of the inverse-CDF draw are kept in fp64; only the softmax normalizers are plain fp32 sums.
//
// Sampling filters and lenience (the *_filtered ops, semantics in reference.py): a first launch,
// filter_thresholds_kernel, gives each logit row of a T > 0 batch row its max M and keep thresholds (logit_min,
// weight_min) by threshold search without sorting (bisection on the bit patterns of fp32 values, one CTA per row,
// fp64 masses for top-p). The fused kernel is then instantiated with traits WithFilters<Tr>: stats items sum the
// kept weights against M (so the chunk merge rescales by exactly 1), and every weight of the acceptance test and of
// the draw is zero unless kept; eps scales q in the test and the residual. Without filters nothing of this is compiled.
// torch/python.h (through torch/extension.h) trips nvcc's C++20 "module" keyword diagnostic: torch's, harmless.
#pragma nv_diag_suppress 3189
#include "acceptance.h"
#pragma nv_diag_default 3189

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cstdint>

namespace tempspec {
namespace {

constexpr int kThreads = 256;     // CTA size of every work item
constexpr int kWarps = kThreads / 32;
constexpr int kSlots = 8;         // 16-byte vectors per thread per chunk: a chunk is kThreads * 128 bytes = 32 KiB
constexpr int kSweepBatch = 4;    // vectors per row loaded at once by a sweep item (it reads two rows)
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------------------
// IEEE fp32 / fp64 helpers that ignore -ftz / -prec-div / -fmad (no flush of subnormals, no contraction).
namespace ieee {
__device__ __forceinline__ float add(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// 2^x within 2 ulp, subnormal results kept.
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ double widen(float x) {
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float narrow(double x) {
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
  return r;
}
// a >= b, subnormals compared as they are.
__device__ __forceinline__ bool ge(float a, float b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.ge.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
// x > 0 for a non-NaN x, subnormals included (-0 is not positive).
__device__ __forceinline__ bool positive(float x) { return __float_as_int(x) > 0; }
}  // namespace ieee

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// T == 0 (either sign), by bits so that a subnormal T is not flushed to a greedy row.
__device__ __forceinline__ bool is_greedy(float t) { return (__float_as_uint(t) & 0x7fffffffu) == 0u; }

// c = log2(e) / T for T > 0, so that exp((l - m) / T) = 2^((l - m) * c); capped so that a subnormal T stays finite.
__device__ __forceinline__ float temp_scale(float t) { return fminf(ieee::div(kLog2e, t), FLT_MAX); }

// exp((l - m) / T) with gradual underflow: the weight whose sign decides whether a token can be drawn or accepted.
__device__ __forceinline__ float weight(float l, float m, float c) { return ieee::ex2(ieee::mul(ieee::sub(l, m), c)); }

// The same weight flushed below 2^-126: only for the softmax normalizer, a sum that already holds the max's weight 1.
__device__ __forceinline__ float weight_ftz(float l, float m, float c) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(ieee::mul(ieee::sub(l, m), c)));
  return r;
}

// Factor taking a sum of weights relative to max m to one relative to M >= m (0 for an empty / fully masked part).
__device__ __forceinline__ float rescale(float m, float M, float c) { return m == neg_inf() ? 0.f : weight_ftz(m, M, c); }

// ---------------------------------------------------------------------------------------------------------------
// Logit dtypes, as raw bits: 16-byte vectors of 4 fp32 or 8 bf16 / fp16 values.
struct Slot {
  uint32_t w[4];
};

struct F32 {
  static constexpr bool kFiltered = false;
  using Bits = uint32_t;
  static constexpr Bits kNegInf = 0xff800000u;
  static __device__ __forceinline__ float to_float(uint32_t b) { return __uint_as_float(b); }
};
struct BF16 {
  static constexpr bool kFiltered = false;
  using Bits = uint16_t;
  static constexpr Bits kNegInf = 0xff80u;
  static __device__ __forceinline__ float to_float(uint32_t b) { return __uint_as_float(b << 16); }
};
struct F16 {
  static constexpr bool kFiltered = false;
  using Bits = uint16_t;
  static constexpr Bits kNegInf = 0xfc00u;
  static __device__ __forceinline__ float to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
};
// The same dtype, for the filtered ops: the fused kernel reads Params::thr and Params::lenience.
template <class Tr>
struct WithFilters : Tr {
  static constexpr bool kFiltered = true;
};

// The keep rule (reference.filter_thresholds): weight w of logit l counts iff l >= logit_min and w >= weight_min.
struct Keep {
  float logit_min, weight_min;
};
__device__ __forceinline__ float kept(float w, float l, Keep keep) {
  return (ieee::ge(l, keep.logit_min) && ieee::ge(w, keep.weight_min)) ? w : 0.f;
}

// One chunk of a logit row: kSlots vectors per thread; warp w covers the contiguous segment [w*kSegment,
// (w+1)*kSegment) of the chunk. kVec: 16-byte loads (rows 16-byte aligned), vector u*32 + lane of the segment;
// otherwise scalar loads, element (u*kPerVec + e)*32 + lane. Both coalesce, and a thread's elements come in increasing
// index order (first-index argmax relies on it).
template <class Tr, bool kVec>
struct Chunk {
  using Bits = typename Tr::Bits;
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(Bits));
  static constexpr int kPerVec = 4 * kPerWord;
  static constexpr int kSegment = 32 * kSlots * kPerVec;  // elements per warp: 2048 (16-bit) or 1024 (fp32)
  static constexpr int kSize = kWarps * kSegment;         // elements per chunk

  static __device__ __forceinline__ int index(int start, int u, int e) {
    const int lane = threadIdx.x & 31, segment = start + (threadIdx.x >> 5) * kSegment;
    return kVec ? segment + (u * 32 + lane) * kPerVec + e : segment + (u * kPerVec + e) * 32 + lane;
  }
  static __device__ __forceinline__ Slot load(const Bits* row, int start, int u, int V) {
    Slot s;
    if constexpr (kVec) {
      const int i = index(start, u, 0);  // V is a multiple of kPerVec: a vector is entirely in or out
      if (i < V) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + i));
        s.w[0] = raw.x, s.w[1] = raw.y, s.w[2] = raw.z, s.w[3] = raw.w;
      } else {
        const uint32_t neg_inf_bits = static_cast<uint32_t>(Tr::kNegInf);
#pragma unroll
        for (int q = 0; q < 4; ++q) s.w[q] = kPerWord == 1 ? neg_inf_bits : neg_inf_bits | (neg_inf_bits << 16);
      }
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) s.w[q] = 0u;
#pragma unroll
      for (int e = 0; e < kPerVec; ++e) {
        const int i = index(start, u, e);
        const uint32_t bits = i < V ? static_cast<uint32_t>(__ldg(row + i)) : static_cast<uint32_t>(Tr::kNegInf);
        s.w[e / kPerWord] |= bits << ((32 / kPerWord) * (e % kPerWord));
      }
    }
    return s;
  }
  static __device__ __forceinline__ float value(const Slot& s, int e) {
    const uint32_t word = s.w[e / kPerWord];
    return Tr::to_float(kPerWord == 1 ? word : (word >> (16 * (e % kPerWord))) & 0xffffu);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Workspace records and their reductions.
struct Partial {  // one chunk of one logit row
  float m;        // chunk max
  float s;        // sum of exp((l - m) / T) over the chunk (T > 0)
  int idx;        // first index of the max (T == 0)
  int pad;
};
struct RowStat {  // one logit row
  float m;
  float inv_s;    // 1 / sum of exp((l - m) / T) (T > 0)
  int argmax;     // T == 0
  int pad;
};
struct DrawSums {  // one segment (kSegment tokens, one warp's share of a chunk) of the row drawn from
  double residual;
  double target;
};

struct SoftMax {
  float m, s;
};
struct SoftMaxOp {
  float c;
  __device__ __forceinline__ SoftMax operator()(SoftMax a, SoftMax b) const {
    const float M = fmaxf(a.m, b.m);
    return {M, a.s * rescale(a.m, M, c) + b.s * rescale(b.m, M, c)};
  }
};
__device__ __forceinline__ SoftMax shfl_xor(SoftMax v, int o) {
  return {__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.s, o)};
}

struct ArgMax {
  float m;
  int idx;  // INT_MAX: none yet
};
struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(ArgMax a, ArgMax b) const {
    return (b.m > a.m || (b.m == a.m && b.idx < a.idx)) ? b : a;
  }
};
__device__ __forceinline__ ArgMax shfl_xor(ArgMax v, int o) {
  return {__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.idx, o)};
}

struct SumOp {
  __device__ __forceinline__ DrawSums operator()(DrawSums a, DrawSums b) const {
    return {a.residual + b.residual, a.target + b.target};
  }
};
__device__ __forceinline__ DrawSums shfl_xor(DrawSums v, int o) {
  return {__shfl_xor_sync(kFullMask, v.residual, o), __shfl_xor_sync(kFullMask, v.target, o)};
}

struct AddOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ int shfl_xor(int v, int o) { return __shfl_xor_sync(kFullMask, v, o); }

template <class V, class Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  return v;
}

// Reduction over the CTA; every thread gets the result.
template <class V, class Op>
__device__ __forceinline__ V block_reduce(V v, Op op) {
  __shared__ V partial[kWarps];
  v = warp_reduce(v, op);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  v = partial[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = op(v, partial[w]);
  __syncthreads();
  return v;
}

// Exclusive prefix sum over the CTA in thread order.
__device__ __forceinline__ double block_exclusive_scan(double v) {
  __shared__ double warp_total[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double x = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += x;
  }
  double excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) excl = 0.0;
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  double offset = 0.0;
  for (int w = 0; w < warp; ++w) offset += warp_total[w];
  __syncthreads();
  return offset + excl;
}

// ---------------------------------------------------------------------------------------------------------------
// Cross-CTA signalling (the threadfence-reduction pattern). Workspace written by other CTAs is read with __ldcg (L2).

// Counts this CTA in; true for the CTA that brings the count to `expected` (it then sees every earlier CTA's writes).
__device__ __forceinline__ bool arrive_last(int* counter, int expected) {
  __shared__ int last;
  __threadfence();  // every thread's workspace writes, ordered before the count
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1) == expected - 1;
    __threadfence();
  }
  __syncthreads();
  return last != 0;
}

__device__ __forceinline__ void publish(int* flag) {
  __threadfence();
  atomicExch(flag, 1);
}

__device__ __forceinline__ void wait_for(const int* flag) {
  if (threadIdx.x == 0) {
    while (*reinterpret_cast<const volatile int*>(flag) == 0) __nanosleep(256);
    __threadfence();
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------------------------
struct Params {
  const void* draft;             // [B, k, V] logits (unused when k == 0)
  const void* target;            // [B, k+1, V] logits
  const int64_t* draft_tokens;   // [B, k]
  const float* temperature;      // [B]
  const float* uniforms;         // [B, k+1]
  int64_t* accepted;             // [B], or null (sample)
  int64_t* tokens;               // [B, k+1]
  Partial* partials;             // [B, 2k+1, S]: logit rows 0..k are the target's, k+1..2k the draft's
  RowStat* rows;                 // [B, 2k+1]
  DrawSums* sums;                // [B, S * kWarps]: per segment, in token order
  int* decision;                 // [B]: accepted count n (the emitted token's position)
  int* ticket;                   // [1]                    } zeroed before
  int* stats_done;               // [B]                    } every launch
  int* sweep_done;               // [B]                    }
  int* ready;                    // [B]: decision published }
  const float* thr;              // filtered only: [B, 2k+1, 4] per logit row (M, logit_min, weight_min, unused)
  const float* lenience;         // filtered only: [B]
  int B, k, V, S, lag;
};

// Keep rule of logit row r of batch row b (filtered kernels only).
__device__ __forceinline__ Keep row_keep(const Params& p, int b, int r) {
  const float* t = p.thr + (static_cast<int64_t>(b) * (2 * p.k + 1) + r) * 4;
  return Keep{t[1], t[2]};
}

template <class Tr>
__device__ __forceinline__ const typename Tr::Bits* logit_row(const Params& p, int b, int r) {
  using Bits = typename Tr::Bits;
  if (r <= p.k) return static_cast<const Bits*>(p.target) + (static_cast<int64_t>(b) * (p.k + 1) + r) * p.V;
  return static_cast<const Bits*>(p.draft) + (static_cast<int64_t>(b) * p.k + (r - p.k - 1)) * p.V;
}

__device__ __forceinline__ void write_outputs(const Params& p, int b, int n, int emitted) {
  for (int i = threadIdx.x; i <= p.k; i += kThreads) {
    int64_t v = -1;
    if (i < n) v = p.draft_tokens[static_cast<int64_t>(b) * p.k + i];
    if (i == n) v = emitted;
    p.tokens[static_cast<int64_t>(b) * (p.k + 1) + i] = v;
  }
  if (threadIdx.x == 0 && p.accepted != nullptr) p.accepted[b] = n;
}

// Acceptance test of draft position i: greedy x == argmax(target_i); else p(x) > 0 and u_i * q(x) <= p(x)
// (filtered: p, q of the kept weights and u_i * (eps * q(x)) <= p(x)).
template <class Tr>
__device__ __forceinline__ bool accepts(const Params& p, int b, int i, bool greedy, float c) {
  const int64_t x = p.draft_tokens[static_cast<int64_t>(b) * p.k + i];
  if (x < 0 || x >= p.V) return false;  // outside the vocabulary (the Python wrapper rejects these)
  const RowStat* rs = p.rows + static_cast<int64_t>(b) * (2 * p.k + 1);
  if (greedy) return x == __ldcg(&rs[i].argmax);
  const RowStat* rd = rs + p.k + 1;
  const float lt = Tr::to_float(__ldg(logit_row<Tr>(p, b, i) + x));
  const float ld = Tr::to_float(__ldg(logit_row<Tr>(p, b, p.k + 1 + i) + x));
  float wt = weight(lt, __ldcg(&rs[i].m), c), wd = weight(ld, __ldcg(&rd[i].m), c);
  if constexpr (Tr::kFiltered) {
    wt = kept(wt, lt, row_keep(p, b, i));
    wd = kept(wd, ld, row_keep(p, b, p.k + 1 + i));
  }
  const float px = ieee::mul(wt, __ldcg(&rs[i].inv_s));
  float qx = ieee::mul(wd, __ldcg(&rd[i].inv_s));
  if constexpr (Tr::kFiltered) qx = ieee::mul(p.lenience[b], qx);  // u * (eps * q(x)) <= p(x)
  const float u = p.uniforms[static_cast<int64_t>(b) * (p.k + 1) + i];
  return ieee::positive(px) && ieee::ge(px, ieee::mul(u, qx));
}

// Run by the last stats CTA of row b: merge chunk partials into row stats, run the acceptance tests, then finish a
// greedy row or publish the decision for the sweep items.
template <class Tr>
__device__ __forceinline__ void decide(const Params& p, int b) {
  __shared__ int first_rejected;
  const int R = 2 * p.k + 1;
  const float t = p.temperature[b];
  const bool greedy = is_greedy(t);
  const float c = greedy ? 0.f : temp_scale(t);
  const int lane = threadIdx.x & 31;
  const int nrows = greedy ? p.k + 1 : R;  // greedy rows never read the draft
  for (int r = threadIdx.x >> 5; r < nrows; r += kWarps) {  // one warp per logit row
    const Partial* part = p.partials + (static_cast<int64_t>(b) * R + r) * p.S;
    RowStat out;
    if (greedy) {
      ArgMax a{neg_inf(), INT_MAX};
      for (int x = lane; x < p.S; x += 32) a = ArgMaxOp()(a, ArgMax{__ldcg(&part[x].m), __ldcg(&part[x].idx)});
      a = warp_reduce(a, ArgMaxOp());
      out = {a.m, 0.f, a.idx == INT_MAX ? 0 : a.idx, 0};
    } else {
      const SoftMaxOp op{c};
      SoftMax st{neg_inf(), 0.f};
      for (int x = lane; x < p.S; x += 32) st = op(st, SoftMax{__ldcg(&part[x].m), __ldcg(&part[x].s)});
      st = warp_reduce(st, op);
      out = {st.m, ieee::div(1.f, st.s), 0, 0};
    }
    if (lane == 0) p.rows[static_cast<int64_t>(b) * R + r] = out;
  }
  if (threadIdx.x == 0) first_rejected = p.k;
  __threadfence();  // row stats: ordered before the publish below (by thread 0) for the sweep CTAs
  __syncthreads();  // ... and visible to this CTA
  for (int i = threadIdx.x; i < p.k; i += kThreads)
    if (!accepts<Tr>(p, b, i, greedy, c)) atomicMin(&first_rejected, i);
  __syncthreads();
  const int n = first_rejected;
  if (greedy) {
    write_outputs(p, b, n, __ldcg(&p.rows[static_cast<int64_t>(b) * R + n].argmax));
  } else if (threadIdx.x == 0) {
    p.decision[b] = n;
    publish(p.ready + b);
  }
}

template <class Tr, bool kVec>
__device__ __forceinline__ void stats_item(const Params& p, int b, int item) {
  using C = Chunk<Tr, kVec>;
  const int R = 2 * p.k + 1;
  const int r = item / p.S, x = item - (item / p.S) * p.S;  // logit row, chunk
  const float t = p.temperature[b];
  const bool greedy = is_greedy(t);
  if (!(greedy && r > p.k)) {
    const typename Tr::Bits* row = logit_row<Tr>(p, b, r);
    const int start = x * C::kSize;
    // All loads of a batch are issued before any use; the scalar fallback uses smaller batches (register pressure).
    constexpr int kBatch = kVec ? kSlots : kSlots / 2;
    const float c = greedy ? 0.f : temp_scale(t);
    ArgMax a{neg_inf(), INT_MAX};
    SoftMax st{neg_inf(), 0.f};
    Keep keep{neg_inf(), 0.f};
    if constexpr (Tr::kFiltered) {
      if (!greedy) {  // the row max M of the thresholds pass: every chunk sums its kept weights against it
        st.m = p.thr[(static_cast<int64_t>(b) * R + r) * 4];
        keep = row_keep(p, b, r);
      }
    }
#pragma unroll 1
    for (int u0 = 0; u0 < kSlots; u0 += kBatch) {
      Slot s[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) s[j] = C::load(row, start, u0 + j, p.V);
      if (greedy) {
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
#pragma unroll
          for (int e = 0; e < C::kPerVec; ++e) {
            const float v = C::value(s[j], e);
            if (v > a.m) a = ArgMax{v, C::index(start, u0 + j, e)};
          }
        }
      } else if constexpr (Tr::kFiltered) {
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
#pragma unroll
          for (int e = 0; e < C::kPerVec; ++e) {
            const float v = C::value(s[j], e);
            st.s += kept(weight(v, st.m, c), v, keep);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          float v[C::kPerVec];
          float vm = neg_inf();
#pragma unroll
          for (int e = 0; e < C::kPerVec; ++e) {
            v[e] = C::value(s[j], e);
            vm = fmaxf(vm, v[e]);
          }
          if (vm > st.m) {
            st.s *= rescale(st.m, vm, c);
            st.m = vm;
          }
          if (st.m != neg_inf()) {
#pragma unroll
            for (int e = 0; e < C::kPerVec; ++e) st.s += weight_ftz(v[e], st.m, c);
          }
        }
      }
    }
    Partial out;
    if (greedy) {
      a = block_reduce(a, ArgMaxOp());
      out = {a.m, 0.f, a.idx, 0};
    } else {
      st = block_reduce(st, SoftMaxOp{c});
      out = {st.m, st.s, INT_MAX, 0};
    }
    if (threadIdx.x == 0) p.partials[(static_cast<int64_t>(b) * R + r) * p.S + x] = out;
  }
  if (arrive_last(p.stats_done + b, R * p.S)) decide<Tr>(p, b);
}

// What a T > 0 row draws from: target row n (weights exp((l - m_t) / T)) and, after a rejection (n < k), the residual
// max(0, p_n - q_n) against draft row n; the target weights serve when the residual is all zero.
struct Draw {
  int n;
  bool residual;
  float c, mt, inv_st, md, inv_sd;
  Keep kt, kd;  // filtered only: keep rules of target row n and draft row n
  float eps;    // filtered only: lenience
};

__device__ __forceinline__ Draw load_draw(const Params& p, int b, float c) {
  Draw d;
  d.kt = d.kd = Keep{neg_inf(), 0.f};
  d.eps = 1.f;
  d.n = __ldcg(&p.decision[b]);
  d.residual = d.n < p.k;
  d.c = c;
  const RowStat* rs = p.rows + static_cast<int64_t>(b) * (2 * p.k + 1);
  d.mt = __ldcg(&rs[d.n].m);
  d.inv_st = __ldcg(&rs[d.n].inv_s);
  d.md = d.residual ? __ldcg(&rs[p.k + 1 + d.n].m) : 0.f;
  d.inv_sd = d.residual ? __ldcg(&rs[p.k + 1 + d.n].inv_s) : 0.f;
  if (p.thr != nullptr) {
    d.kt = row_keep(p, b, d.n);
    if (d.residual) d.kd = row_keep(p, b, p.k + 1 + d.n);
    d.eps = p.lenience[b];
  }
  return d;
}

template <bool kFiltered>
__device__ __forceinline__ float target_weight(const Draw& d, float lt) {
  const float w = weight(lt, d.mt, d.c);
  return kFiltered ? kept(w, lt, d.kt) : w;
}

// max(0, p - q) with p = wt / s_t and q = exp((ld - m_d) / T) / s_d (filtered: kept weights, max(0, p - eps q)).
template <bool kFiltered>
__device__ __forceinline__ float residual_weight(const Draw& d, float wt, float ld) {
  float wd = weight(ld, d.md, d.c);
  if (kFiltered) wd = kept(wd, ld, d.kd);
  float q = ieee::mul(wd, d.inv_sd);
  if (kFiltered) q = ieee::mul(d.eps, q);
  const float r = ieee::sub(ieee::mul(wt, d.inv_st), q);
  return ieee::positive(r) ? r : 0.f;
}

// Draw weights of the tokens i0 .. i0+N-1 (0 from `end` on), all loads issued before any use.
template <class Tr, bool kResidual, int N>
__device__ __forceinline__ void draw_weights(const Draw& d, const typename Tr::Bits* trow,
                                             const typename Tr::Bits* drow, int i0, int end, float (&w)[N]) {
  uint32_t tb[N], db[N];
#pragma unroll
  for (int q = 0; q < N; ++q) {
    const bool in = i0 + q < end;
    tb[q] = in ? static_cast<uint32_t>(__ldg(trow + i0 + q)) : static_cast<uint32_t>(Tr::kNegInf);
    if (kResidual) db[q] = in ? static_cast<uint32_t>(__ldg(drow + i0 + q)) : static_cast<uint32_t>(Tr::kNegInf);
  }
#pragma unroll
  for (int q = 0; q < N; ++q) {
    const float wt = target_weight<Tr::kFiltered>(d, Tr::to_float(tb[q]));
    w[q] = kResidual ? residual_weight<Tr::kFiltered>(d, wt, Tr::to_float(db[q])) : wt;
  }
}

// Rescan of the crossing segment (every thread of the CTA): thread t takes kEach contiguous tokens; a block scan of
// the per-thread sums finds the first thread whose running sum reaches `goal` (fallback: the last thread with a
// positive sum), which then walks its tokens in order. Returns the drawn token (the same in every thread).
template <class Tr, bool kResidual>
__device__ __forceinline__ int rescan_segment(const Params& p, int b, const Draw& d, int segment, double base,
                                              float goal) {
  constexpr int kSegment = Chunk<Tr, true>::kSegment;
  constexpr int kEach = kSegment / kThreads;  // 8 (16-bit) or 4 (fp32)
  __shared__ int first_s, last_s, emitted_s;
  const typename Tr::Bits* trow = logit_row<Tr>(p, b, d.n);
  const typename Tr::Bits* drow = kResidual ? logit_row<Tr>(p, b, p.k + 1 + d.n) : trow;
  const int lo = segment * kSegment + static_cast<int>(threadIdx.x) * kEach;
  if (threadIdx.x == 0) {
    first_s = INT_MAX;
    last_s = -1;
    emitted_s = segment * kSegment;  // only if no weight is positive, which the segment sums exclude
  }
  float w[kEach];
  draw_weights<Tr, kResidual, kEach>(d, trow, drow, lo, p.V, w);
  float own = 0.f;
#pragma unroll
  for (int q = 0; q < kEach; ++q) own = ieee::add(own, w[q]);
  const double before = base + block_exclusive_scan(ieee::widen(own));  // its syncs also order the init above
  if (ieee::positive(own)) {
    atomicMax(&last_s, static_cast<int>(threadIdx.x));
    if (ieee::ge(ieee::narrow(before + ieee::widen(own)), goal)) atomicMin(&first_s, static_cast<int>(threadIdx.x));
  }
  __syncthreads();
  const int owner = first_s != INT_MAX ? first_s : last_s;
  if (static_cast<int>(threadIdx.x) == owner) {
    double run = before;
    int found = -1, last = -1;
#pragma unroll
    for (int q = 0; q < kEach; ++q) {
      if (found < 0 && ieee::positive(w[q])) {
        run += ieee::widen(w[q]);
        last = lo + q;
        if (ieee::ge(ieee::narrow(run), goal)) found = last;
      }
    }
    emitted_s = found >= 0 ? found : last;
  }
  __syncthreads();
  return emitted_s;
}

// Run by the last sweep CTA of row b: inverse-CDF draw over the segment sums, rescan of the crossing segment, outputs.
template <class Tr>
__device__ __forceinline__ void finish(const Params& p, int b, const Draw& d) {
  __shared__ int segment_s, use_residual_s;
  __shared__ double base_s;
  __shared__ float goal_s;
  const float u = p.uniforms[static_cast<int64_t>(b) * (p.k + 1) + p.k];
  const int nseg = p.S * kWarps;
  const DrawSums* part = p.sums + static_cast<int64_t>(b) * nseg;

  // Segment level, one warp: S = sum of the segment sums in token order (every lane adds them in the same order); the
  // first segment with a positive sum whose running sum reaches u * S (fallback: the last positive segment).
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    double tot_r = 0.0, tot_t = 0.0;
    for (int x0 = 0; x0 < nseg; x0 += 32) {
      const bool in = x0 + lane < nseg;
      const double vr = in ? __ldcg(&part[x0 + lane].residual) : 0.0;
      const double vt = in ? __ldcg(&part[x0 + lane].target) : 0.0;
      for (int i = 0; i < 32; ++i) {
        tot_r += __shfl_sync(kFullMask, vr, i);
        tot_t += __shfl_sync(kFullMask, vt, i);
      }
    }
    const bool use_r = tot_r > 0.0;  // a residual that is all zero falls back to the target weights
    const float goal = ieee::mul(u, ieee::narrow(use_r ? tot_r : tot_t));
    double run = 0.0, base = 0.0, last_base = 0.0;
    int segment = -1, last = -1;
    for (int x0 = 0; x0 < nseg; x0 += 32) {
      const bool in = x0 + lane < nseg;
      const double v = in ? (use_r ? __ldcg(&part[x0 + lane].residual) : __ldcg(&part[x0 + lane].target)) : 0.0;
      for (int i = 0; i < 32; ++i) {
        const double w = __shfl_sync(kFullMask, v, i);
        if (w > 0.0 && segment < 0) {
          if (ieee::ge(ieee::narrow(run + w), goal)) segment = x0 + i, base = run;
          last = x0 + i, last_base = run;
        }
        run += w;
      }
    }
    if (lane == 0) {
      segment_s = segment >= 0 ? segment : last;
      base_s = segment >= 0 ? base : last_base;
      goal_s = goal;
      use_residual_s = use_r;
    }
  }
  __syncthreads();
  const int segment = segment_s;
  int emitted = 0;  // only if every weight is zero, which valid inputs exclude
  if (segment >= 0) {
    emitted = use_residual_s ? rescan_segment<Tr, true>(p, b, d, segment, base_s, goal_s)
                             : rescan_segment<Tr, false>(p, b, d, segment, base_s, goal_s);
  }
  write_outputs(p, b, d.n, emitted);
}

// This thread's sums of the draw weights over its elements of one chunk: target weights, and residual weights.
template <class Tr, bool kVec, bool kResidual>
__device__ __forceinline__ void chunk_draw_sums(const Params& p, const Draw& d, const typename Tr::Bits* trow,
                                                const typename Tr::Bits* drow, int start, float& sum_t,
                                                float& sum_r) {
  using C = Chunk<Tr, kVec>;
  constexpr int kBatch = kVec ? kSweepBatch : kSweepBatch / 2;
#pragma unroll 1
  for (int u0 = 0; u0 < kSlots; u0 += kBatch) {
    Slot ts[kBatch], ds[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      ts[j] = C::load(trow, start, u0 + j, p.V);
      if (kResidual) ds[j] = C::load(drow, start, u0 + j, p.V);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
#pragma unroll
      for (int e = 0; e < C::kPerVec; ++e) {
        const float wt = target_weight<Tr::kFiltered>(d, C::value(ts[j], e));
        sum_t = ieee::add(sum_t, wt);
        if (kResidual) sum_r = ieee::add(sum_r, residual_weight<Tr::kFiltered>(d, wt, C::value(ds[j], e)));
      }
    }
  }
}

template <class Tr, bool kVec>
__device__ __forceinline__ void sweep_item(const Params& p, int b, int x) {
  const float t = p.temperature[b];
  if (is_greedy(t)) return;  // finished by decide()
  wait_for(p.ready + b);
  const Draw d = load_draw(p, b, temp_scale(t));
  const typename Tr::Bits* trow = logit_row<Tr>(p, b, d.n);
  const int start = x * Chunk<Tr, kVec>::kSize;
  float sum_t = 0.f, sum_r = 0.f;  // per thread (64 or 32 elements); fp64 across threads and segments
  if (d.residual) {
    chunk_draw_sums<Tr, kVec, true>(p, d, trow, logit_row<Tr>(p, b, p.k + 1 + d.n), start, sum_t, sum_r);
  } else {
    chunk_draw_sums<Tr, kVec, false>(p, d, trow, trow, start, sum_t, sum_r);
  }
  const DrawSums s = warp_reduce(DrawSums{ieee::widen(sum_r), ieee::widen(sum_t)}, SumOp());  // this warp's segment
  if ((threadIdx.x & 31) == 0) p.sums[(static_cast<int64_t>(b) * p.S + x) * kWarps + (threadIdx.x >> 5)] = s;
  if (arrive_last(p.sweep_done + b, p.S)) finish<Tr>(p, b, d);
}

// Ticket order: stats(0) .. stats(lag-1), then [stats(lag+g), sweep(g)] for g = 0 .. B-lag-1, then the last lag sweeps.
struct Item {
  int b, index;
  bool sweep;
};
__device__ __forceinline__ Item decode_ticket(int t, const Params& p) {
  const int ns = (2 * p.k + 1) * p.S, nw = p.S, group = ns + nw;
  if (t < p.lag * ns) return {t / ns, t % ns, false};
  t -= p.lag * ns;
  if (t < (p.B - p.lag) * group) {
    const int g = t / group, o = t % group;
    return o < ns ? Item{p.lag + g, o, false} : Item{g, o - ns, true};
  }
  t -= (p.B - p.lag) * group;
  return {p.B - p.lag + t / nw, t % nw, true};
}

template <class Tr, bool kVec>
__global__ void __launch_bounds__(kThreads) fused_sampling_kernel(const Params p) {
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(p.ticket, 1);
  __syncthreads();
  const Item it = decode_ticket(ticket, p);
  if (it.sweep) {
    sweep_item<Tr, kVec>(p, it.b, it.index);
  } else {
    stats_item<Tr, kVec>(p, it.b, it.index);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Filter thresholds (filtered ops only), one CTA per logit row: bisection on the bit patterns of fp32 values, each
// step one pass over the row (at most 32 per filter; a multi-pivot search would need fewer: see the notes).

struct Settings {  // per batch row, [B] each
  const int64_t* top_k;
  const float* top_p;
  const float* min_p;
};

// fp32 (not NaN) -> int32 key of the same order, and back.
__device__ __forceinline__ int ordered_key(float x) {
  const int bits = __float_as_int(x);
  return bits >= 0 ? bits : bits ^ 0x7fffffff;
}
__device__ __forceinline__ float from_key(int key) { return __int_as_float(key >= 0 ? key : key ^ 0x7fffffff); }

// k-th largest logit (0 < top_k < V): the largest key whose count of logits >= it reaches top_k (the count changes
// only at logit values, so it is a logit's key). Invariant: count(lo) >= top_k > count(hi).
template <class Tr>
__device__ float top_k_logit_min(const typename Tr::Bits* row, int V, int top_k, float M) {
  long long lo = ordered_key(neg_inf()), hi = static_cast<long long>(ordered_key(M)) + 1;
  while (hi - lo > 1) {
    const long long mid = lo + (hi - lo) / 2;
    int count = 0;
    for (int i = threadIdx.x; i < V; i += kThreads) count += ordered_key(Tr::to_float(__ldg(row + i))) >= mid;
    if (block_reduce(count, AddOp()) >= top_k) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return from_key(static_cast<int>(lo));
}

// v* of top-p over the weights that survive top-k: the largest weight value whose mass (fp64 sum of the weights >= it)
// reaches top_p * total. Weights are >= 0, so their bit patterns are ordered. Invariant: mass(lo) >= goal > mass(hi).
template <class Tr>
__device__ float top_p_weight_min(const typename Tr::Bits* row, int V, float M, float c, float logit_min, float top_p) {
  const Keep top_k_only{logit_min, 0.f};
  double total = 0.0;
  for (int i = threadIdx.x; i < V; i += kThreads) {
    const float l = Tr::to_float(__ldg(row + i));
    total += ieee::widen(kept(weight(l, M, c), l, top_k_only));
  }
  const double goal = ieee::widen(top_p) * block_reduce(total, AddOp());
  int lo = 0, hi = 0x3f800001;  // bits of 1.0 (the largest weight) + 1
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    double mass = 0.0;
    for (int i = threadIdx.x; i < V; i += kThreads) {
      const float l = Tr::to_float(__ldg(row + i));
      const float w = kept(weight(l, M, c), l, top_k_only);
      if (__float_as_int(w) >= mid) mass += ieee::widen(w);
    }
    if (block_reduce(mass, AddOp()) >= goal) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return __int_as_float(lo);
}

// Logit row r = blockIdx.x % (2k+1) of batch row b = blockIdx.x / (2k+1) (rows 0..k target, k+1..2k draft):
// thr[b, r] = (M, logit_min, weight_min, 0); greedy rows get (0, -inf, 0, 0) and are not read.
template <class Tr>
__global__ void __launch_bounds__(kThreads) filter_thresholds_kernel(const void* draft, const void* target,
                                                                     const float* temperature, Settings st, float* thr,
                                                                     int k, int V) {
  using Bits = typename Tr::Bits;
  const int R = 2 * k + 1;
  const int b = blockIdx.x / R, r = blockIdx.x % R;
  const float t = temperature[b];
  float* out = thr + static_cast<int64_t>(blockIdx.x) * 4;
  float M = 0.f, logit_min = neg_inf(), weight_min = 0.f;
  if (!is_greedy(t)) {
    const Bits* row = r <= k ? static_cast<const Bits*>(target) + (static_cast<int64_t>(b) * (k + 1) + r) * V
                             : static_cast<const Bits*>(draft) + (static_cast<int64_t>(b) * k + (r - k - 1)) * V;
    float m = neg_inf();
    for (int i = threadIdx.x; i < V; i += kThreads) m = fmaxf(m, Tr::to_float(__ldg(row + i)));
    M = block_reduce(m, MaxOp());
    const float c = temp_scale(t);
    const int64_t top_k = st.top_k[b];
    if (top_k > 0 && top_k < V) logit_min = top_k_logit_min<Tr>(row, V, static_cast<int>(top_k), M);
    const float top_p = st.top_p[b], min_p = st.min_p[b];
    if (top_p < 1.f) weight_min = top_p_weight_min<Tr>(row, V, M, c, logit_min, top_p);
    if (!ieee::ge(weight_min, min_p)) weight_min = min_p;
  }
  if (threadIdx.x == 0) {
    out[0] = M;
    out[1] = logit_min;
    out[2] = weight_min;
    out[3] = 0.f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

struct Launch {
  const void* draft;
  const at::Tensor* target;  // dtype, device, data
  const int64_t* draft_tokens;
  const float* temperature;
  const float* uniforms;
  int64_t* accepted;
  int64_t* tokens;
  int64_t B, k, V;
  const float* thr = nullptr;       // filtered calls: [B, 2k+1, 4] from filter_thresholds_kernel
  const float* lenience = nullptr;  // filtered calls: [B]
};

inline int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

template <class Tr, bool kVec>
void launch_typed(const Launch& in) {
  constexpr int kSize = Chunk<Tr, kVec>::kSize;
  const int64_t S = (in.V + kSize - 1) / kSize;
  const int64_t R = 2 * in.k + 1;
  const int64_t group = R * S + S;
  TORCH_CHECK(in.V <= INT_MAX - kSize && in.B * group <= INT_MAX, "tempspec cuda: problem too large (B=", in.B,
              ", k=", in.k, ", V=", in.V, ")");

  // Workspace: partials, row stats, draw sums, decisions (never read before written), then the zeroed counters.
  const int64_t off_rows = align16(in.B * R * S * static_cast<int64_t>(sizeof(Partial)));
  const int64_t off_sums = off_rows + align16(in.B * R * static_cast<int64_t>(sizeof(RowStat)));
  const int64_t off_decision = off_sums + align16(in.B * S * kWarps * static_cast<int64_t>(sizeof(DrawSums)));
  const int64_t off_counters = off_decision + align16(in.B * static_cast<int64_t>(sizeof(int)));
  const int64_t counter_bytes = (1 + 3 * in.B) * static_cast<int64_t>(sizeof(int));
  at::Tensor ws = at::empty({off_counters + counter_bytes}, in.target->options().dtype(at::kByte));
  char* base = static_cast<char*>(ws.data_ptr());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(base + off_counters, 0, counter_bytes, stream));

  auto kernel = fused_sampling_kernel<Tr, kVec>;
  static std::atomic<int> per_sm_cache{0};  // CTAs per SM: a property of the compiled kernel, queried once
  int per_sm = per_sm_cache.load();
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    per_sm = std::max(per_sm, 1);
    per_sm_cache.store(per_sm);
  }
  const int64_t resident = static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Sweep items trail their stats items by enough batch rows that the stats items in between cover the CTAs in flight.
  const int64_t lag = std::min<int64_t>(in.B, (resident + group - 1) / group + 1);

  Params p;
  p.draft = in.draft;
  p.target = in.target->data_ptr();
  p.draft_tokens = in.draft_tokens;
  p.temperature = in.temperature;
  p.uniforms = in.uniforms;
  p.accepted = in.accepted;
  p.tokens = in.tokens;
  p.partials = reinterpret_cast<Partial*>(base);
  p.rows = reinterpret_cast<RowStat*>(base + off_rows);
  p.sums = reinterpret_cast<DrawSums*>(base + off_sums);
  p.decision = reinterpret_cast<int*>(base + off_decision);
  p.ticket = reinterpret_cast<int*>(base + off_counters);
  p.stats_done = p.ticket + 1;
  p.sweep_done = p.stats_done + in.B;
  p.ready = p.sweep_done + in.B;
  p.thr = in.thr;
  p.lenience = in.lenience;
  p.B = static_cast<int>(in.B);
  p.k = static_cast<int>(in.k);
  p.V = static_cast<int>(in.V);
  p.S = static_cast<int>(S);
  p.lag = static_cast<int>(lag);
  kernel<<<static_cast<unsigned>(in.B * group), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Tr>
void launch_dtype(const Launch& in) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vec = (in.V * static_cast<int64_t>(sizeof(typename Tr::Bits))) % 16 == 0 &&
                   aligned(in.target->data_ptr()) && (in.k == 0 || aligned(in.draft));
  if (vec) {
    launch_typed<Tr, true>(in);
  } else {
    launch_typed<Tr, false>(in);
  }
}

template <class Tr>
void launch_filters(const Launch& in) {
  if (in.thr != nullptr) {
    launch_dtype<WithFilters<Tr>>(in);
  } else {
    launch_dtype<Tr>(in);
  }
}

void launch(const Launch& in) {
  switch (in.target->scalar_type()) {
    case at::kFloat:
      launch_filters<F32>(in);
      break;
    case at::kBFloat16:
      launch_filters<BF16>(in);
      break;
    case at::kHalf:
      launch_filters<F16>(in);
      break;
    default:
      TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", in.target->scalar_type());
  }
}

void check_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_logits(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  check_tensor(t, name, device);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dt);
}

void check_aux(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
               const at::Device& device) {
  check_tensor(t, name, device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// The per-row settings of a filtered call (undefined tensors: the temperature-only op).
struct SettingsTensors {
  at::Tensor top_k, top_p, min_p, lenience;
  bool defined() const { return top_k.defined(); }
};

// Checks the settings and runs filter_thresholds_kernel over the B*(2k+1) logit rows; returns thr [B, 2k+1, 4].
at::Tensor filter_thresholds(const void* draft, const at::Tensor& target, const at::Tensor& temperature,
                             const SettingsTensors& st, int64_t B, int64_t k, int64_t V, const at::Device& device) {
  check_aux(st.top_k, "top_k", at::kLong, {B}, device);
  check_aux(st.top_p, "top_p", at::kFloat, {B}, device);
  check_aux(st.min_p, "min_p", at::kFloat, {B}, device);
  if (st.lenience.defined()) check_aux(st.lenience, "lenience", at::kFloat, {B}, device);
  at::Tensor thr = at::empty({B, 2 * k + 1, 4}, temperature.options());
  const Settings settings{st.top_k.data_ptr<int64_t>(), st.top_p.data_ptr<float>(), st.min_p.data_ptr<float>()};
  const unsigned grid = static_cast<unsigned>(B * (2 * k + 1));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* temp = temperature.data_ptr<float>();
  float* out = thr.data_ptr<float>();
  switch (target.scalar_type()) {
    case at::kFloat:
      filter_thresholds_kernel<F32><<<grid, kThreads, 0, stream>>>(draft, target.data_ptr(), temp, settings, out,
                                                                   k, V);
      break;
    case at::kBFloat16:
      filter_thresholds_kernel<BF16><<<grid, kThreads, 0, stream>>>(draft, target.data_ptr(), temp, settings, out,
                                                                    k, V);
      break;
    case at::kHalf:
      filter_thresholds_kernel<F16><<<grid, kThreads, 0, stream>>>(draft, target.data_ptr(), temp, settings, out,
                                                                   k, V);
      break;
    default:
      TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", target.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return thr;
}

std::tuple<at::Tensor, at::Tensor> speculative_sample_impl(const at::Tensor& draft_logits,
                                                           const at::Tensor& target_logits,
                                                           const at::Tensor& draft_tokens,
                                                           const at::Tensor& temperature, const at::Tensor& uniforms,
                                                           const SettingsTensors& settings) {
  const at::Device device = target_logits.device();
  check_logits(target_logits, "target_logits", 3, device);
  check_logits(draft_logits, "draft_logits", 3, device);
  TORCH_CHECK(draft_logits.scalar_type() == target_logits.scalar_type(),
              "draft_logits and target_logits must have the same dtype");
  const int64_t B = draft_logits.size(0), k = draft_logits.size(1), V = draft_logits.size(2);
  TORCH_CHECK(V > 0, "the vocabulary must not be empty");
  TORCH_CHECK(target_logits.sizes() == at::IntArrayRef({B, k + 1, V}), "target_logits must have shape [", B, ", ",
              k + 1, ", ", V, "], got ", target_logits.sizes());
  check_aux(draft_tokens, "draft_tokens", at::kLong, {B, k}, device);
  check_aux(temperature, "temperature", at::kFloat, {B}, device);
  check_aux(uniforms, "uniforms", at::kFloat, {B, k + 1}, device);

  const c10::cuda::CUDAGuard guard(device);
  const auto long_opts = draft_tokens.options();
  at::Tensor accepted = at::empty({B}, long_opts);
  at::Tensor tokens = at::empty({B, k + 1}, long_opts);
  if (B == 0) return {accepted, tokens};
  Launch in{draft_logits.data_ptr(), &target_logits, draft_tokens.data_ptr<int64_t>(),
            temperature.data_ptr<float>(), uniforms.data_ptr<float>(), accepted.data_ptr<int64_t>(),
            tokens.data_ptr<int64_t>(), B, k, V};
  at::Tensor thr;
  if (settings.defined()) {
    thr = filter_thresholds(draft_logits.data_ptr(), target_logits, temperature, settings, B, k, V, device);
    in.thr = thr.data_ptr<float>();
    in.lenience = settings.lenience.data_ptr<float>();
  }
  launch(in);
  return {accepted, tokens};
}

at::Tensor sample_impl(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms,
                       const SettingsTensors& settings) {
  const at::Device device = logits.device();
  check_logits(logits, "logits", 2, device);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "the vocabulary must not be empty");
  check_aux(temperature, "temperature", at::kFloat, {B}, device);
  check_aux(uniforms, "uniforms", at::kFloat, {B}, device);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0) return out;
  // k = 0: no draft, the "bonus" draw from the only row is the sample.
  Launch in{nullptr, &logits, nullptr, temperature.data_ptr<float>(), uniforms.data_ptr<float>(), nullptr,
            out.data_ptr<int64_t>(), B, 0, V};
  at::Tensor thr, ones;
  if (settings.defined()) {
    thr = filter_thresholds(nullptr, logits, temperature, settings, B, 0, V, device);
    ones = at::ones({B}, temperature.options());
    in.thr = thr.data_ptr<float>();
    in.lenience = ones.data_ptr<float>();
  }
  launch(in);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> speculative_sample_cuda(const at::Tensor& draft_logits,
                                                           const at::Tensor& target_logits,
                                                           const at::Tensor& draft_tokens,
                                                           const at::Tensor& temperature,
                                                           const at::Tensor& uniforms) {
  return speculative_sample_impl(draft_logits, target_logits, draft_tokens, temperature, uniforms,
                                 SettingsTensors());
}

std::tuple<at::Tensor, at::Tensor> speculative_sample_filtered_cuda(
    const at::Tensor& draft_logits, const at::Tensor& target_logits, const at::Tensor& draft_tokens,
    const at::Tensor& temperature, const at::Tensor& uniforms, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& lenience) {
  TORCH_CHECK(lenience.defined(), "lenience must be given");
  return speculative_sample_impl(draft_logits, target_logits, draft_tokens, temperature, uniforms,
                                 SettingsTensors{top_k, top_p, min_p, lenience});
}

at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms) {
  return sample_impl(logits, temperature, uniforms, SettingsTensors());
}

at::Tensor sample_filtered_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms,
                                const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p) {
  return sample_impl(logits, temperature, uniforms, SettingsTensors{top_k, top_p, min_p, at::Tensor()});
}

}  // namespace tempspec
