// The elementwise work of a decoder layer on the CPU, fused: RMSNorm (with the residual add before it), SiLU(gate) *
// up, and RoPE with the KV-cache store. Semantics: tempspec_engine/layer_ops.py (the *_reference functions).
//
// Why: in bf16, torch's CPU RMSNorm runs a dozen operators (casts, pow, mean, rsqrt, the weight product), and RoPE and
// the cache store a dozen more; at a decode's few rows each costs its dispatch, not its arithmetic (the default 135M
// target has 30 layers and 61 norms).
// Each op here is one pass over its rows, with the roundings torch makes between its operators kept: in bf16 a value
// torch stores as bf16 between two operators is rounded to bf16 here too, so the results equal torch's up to the
// summation order of the RMS (8 lanes, then the lanes in a fixed order) and exp's last bit in SiLU. Every row is
// computed alone: a row's result does not depend on the other rows (batch invariant, like the linear and attention
// kernels).
#include "layer_ops.h"

#include <ATen/Parallel.h>

#include "avx2_vec.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

// Every product and sum rounds as torch's operators round it: no a * b + c contracted into an FMA.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace tempspec {
namespace {

// A value as torch holds it after an operator whose output dtype is T: rounded to bf16 for bf16, itself for fp32.
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The body, with scalar_t = float or at::BFloat16 (the dtypes check_cpu_same_dtype lets through).
#define DISPATCH_FLOAT_BF16(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int64_t kRowsPerTask = 16;  // rows of a few hundred to a few thousand values: threads only for prefills

void check_cpu_same_dtype(const char* op, std::initializer_list<at::Tensor> tensors) {
  const at::ScalarType dtype = tensors.begin()->scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, op, ": bfloat16 or float32 tensors only");
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), op, ": CPU tensors only");
    TORCH_CHECK(t.scalar_type() == dtype, op, ": every tensor must have the same dtype");
  }
}

// The sum of x[i]^2 over n values: 8 fp32 lanes over i in steps of 8, the lanes summed in a fixed order, the tail.
template <typename T>
TEMPSPEC_AVX2 float sum_of_squares(const T* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float s = lane_sum(acc);
  for (; i < n; ++i) s += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  return s;
}

// y = w * round(x * rsqrt(mean(x^2) + eps)) over one row of n values.
template <typename T>
TEMPSPEC_AVX2 void norm_row(const T* x, const T* w, float eps, int64_t n, T* y) {
  const float r = 1.f / std::sqrt(sum_of_squares(x, n) / static_cast<float>(n) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, _mm256_mul_ps(load8(w + i), rounded8<T>(_mm256_mul_ps(load8(x + i), rv))));
  for (; i < n; ++i) y[i] = static_cast<T>(static_cast<float>(w[i]) * rounded<T>(static_cast<float>(x[i]) * r));
}

// h = x + delta over one row of n values.
template <typename T>
TEMPSPEC_AVX2 void add_row(const T* x, const T* delta, int64_t n, T* h) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(h + i, _mm256_add_ps(load8(x + i), load8(delta + i)));
  for (; i < n; ++i) h[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(delta[i]));
}

template <typename T>
void rms_norm_rows(const T* x, const T* delta, const T* w, float eps, int64_t rows, int64_t n, T* h, T* y) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      if (delta != nullptr) {  // h = x + delta, rounded, then normalized
        add_row(xr, delta + r * n, n, h + r * n);
        xr = h + r * n;
      }
      norm_row(xr, w, eps, n, y + r * n);
    }
  });
}

// y = round(silu(g)) * u over one row of n values (silu(g) = g / (1 + exp(-g)), exp vectorized).
template <typename T>
TEMPSPEC_AVX2 void silu_mul_row(const T* g, const T* u, int64_t n, T* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = load8(g + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
    store8(y + i, _mm256_mul_ps(rounded8<T>(s), load8(u + i)));
  }
  for (; i < n; ++i) {
    const float gi = static_cast<float>(g[i]);
    y[i] = static_cast<T>(rounded<T>(gi / (1.f + std::exp(-gi))) * static_cast<float>(u[i]));
  }
}

// RoPE of one head row (rotate-half): out[d] = round(round(x[d] * cos[d]) + round(x[d +- D/2] * sin[d])), sin
// already signed ([-sin, sin]): apply_rope's three operators. 8 values at a time where D/2 is a multiple of 8.
template <typename T>
TEMPSPEC_AVX2 void rope_row(const T* x, const T* cos, const T* sin, int64_t D, T* out) {
  const int64_t half = D / 2;
  if (half % 8 == 0) {
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 a = rounded8<T>(_mm256_mul_ps(load8(x + d), load8(cos + d)));
      const __m256 b = rounded8<T>(_mm256_mul_ps(load8(x + (d < half ? d + half : d - half)), load8(sin + d)));
      store8(out + d, _mm256_add_ps(a, b));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    const float a = rounded<T>(static_cast<float>(x[d]) * static_cast<float>(cos[d]));
    const float b = rounded<T>(static_cast<float>(x[d < half ? d + half : d - half]) * static_cast<float>(sin[d]));
    out[d] = static_cast<T>(a + b);
  }
}

}  // namespace

std::vector<at::Tensor> rms_norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(linear_bf16_cpu_supported(), "rms_norm_cpu needs a CPU with AVX2 and FMA");
  const bool add = delta.has_value() && delta->defined();
  check_cpu_same_dtype("rms_norm_cpu", add ? std::initializer_list<at::Tensor>{x, *delta, weight}
                                           : std::initializer_list<at::Tensor>{x, weight});
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "rms_norm_cpu: weight must be [", n, "]");
  TORCH_CHECK(!add || delta->sizes() == x.sizes(), "rms_norm_cpu: delta must have x's shape");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor dc = add ? delta->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(xc), h = add ? at::empty_like(xc) : at::Tensor();
  const int64_t rows = n == 0 ? 0 : xc.numel() / n;
  DISPATCH_FLOAT_BF16(xc.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), add ? dc.data_ptr<scalar_t>() : nullptr,
                            wc.data_ptr<scalar_t>(), static_cast<float>(eps), rows, n,
                            add ? h.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
  });
  return add ? std::vector<at::Tensor>{h, y} : std::vector<at::Tensor>{y};
}

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(linear_bf16_cpu_supported(), "silu_mul_cpu needs a CPU with AVX2 and FMA");
  check_cpu_same_dtype("silu_mul_cpu", {gate, up});
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul_cpu: gate and up must have the same shape");
  const at::Tensor gc = gate.contiguous(), uc = up.contiguous();
  at::Tensor y = at::empty_like(gc);
  const int64_t n = gc.dim() == 0 ? 1 : gc.size(-1);
  const int64_t rows = n == 0 ? 0 : gc.numel() / n;
  DISPATCH_FLOAT_BF16(gc.scalar_type(), "silu_mul_cpu", [&] {
    const scalar_t *g = gc.data_ptr<scalar_t>(), *u = uc.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(g + r * n, u + r * n, n, out + r * n);
    });
  });
  return y;
}

at::Tensor rope_store_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                          const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots) {
  TORCH_CHECK(linear_bf16_cpu_supported(), "rope_store_cpu needs a CPU with AVX2 and FMA");
  check_cpu_same_dtype("rope_store_cpu", {q, k, v, cos, sin, k_cache, v_cache});
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "rope_store_cpu: q, k, v must be [B, T, heads, D]");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(D % 2 == 0, "rope_store_cpu: the head dimension must be even");
  TORCH_CHECK(k.size(0) == B && k.size(1) == T && k.size(3) == D && v.sizes() == k.sizes(),
              "rope_store_cpu: k and v must be [", B, ", ", T, ", Hkv, ", D, "]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 4 && cos.size(0) == B && cos.size(1) == T &&
                  cos.size(2) == 1 && cos.size(3) == D,
              "rope_store_cpu: cos and sin must be [", B, ", ", T, ", 1, ", D, "]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hkv && k_cache.size(3) == D &&
                  v_cache.sizes() == k_cache.sizes(),
              "rope_store_cpu: k_cache and v_cache must be [", B, ", ", Hkv, ", L, ", D, "]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == B && slots.size(1) == T &&
                  slots.device().is_cpu(),
              "rope_store_cpu: slots must be int64 [", B, ", ", T, "] on the CPU");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->stride(3) == 1, "rope_store_cpu: the last dimension of every tensor must be contiguous");
  const int64_t L = k_cache.size(2);
  const at::Tensor sl = slots.contiguous();
  const int64_t* slot = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < L, "rope_store_cpu: slot ", slot[i], " outside the cache's ", L);
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  DISPATCH_FLOAT_BF16(q.scalar_type(), "rope_store_cpu", [&] {
    using T_ = scalar_t;
    at::parallel_for(0, B * T, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T, s = slot[bt];
        const T_* c = cos.data_ptr<T_>() + b * cos.stride(0) + t * cos.stride(1);
        const T_* sn = sin.data_ptr<T_>() + b * sin.stride(0) + t * sin.stride(1);
        for (int64_t h = 0; h < H; ++h)
          rope_row(q.data_ptr<T_>() + b * q.stride(0) + t * q.stride(1) + h * q.stride(2), c, sn, D,
                   out.data_ptr<T_>() + ((b * T + t) * H + h) * D);
        for (int64_t h = 0; h < Hkv; ++h) {
          rope_row(k.data_ptr<T_>() + b * k.stride(0) + t * k.stride(1) + h * k.stride(2), c, sn, D,
                   k_cache.data_ptr<T_>() + b * k_cache.stride(0) + h * k_cache.stride(1) + s * k_cache.stride(2));
          const T_* vr = v.data_ptr<T_>() + b * v.stride(0) + t * v.stride(1) + h * v.stride(2);
          T_* vc = v_cache.data_ptr<T_>() + b * v_cache.stride(0) + h * v_cache.stride(1) + s * v_cache.stride(2);
          std::memcpy(vc, vr, static_cast<size_t>(D) * sizeof(T_));
        }
      }
    });
  });
  return out;
}

}  // namespace tempspec
