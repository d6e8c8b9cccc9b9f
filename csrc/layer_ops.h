// The elementwise work of a decoder layer on the CPU, fused (csrc/layer_ops_cpu.cpp). Wrappers, dispatch rule and
// the readable references: tempspec_engine/layer_ops.py. bf16 or fp32, every tensor of a call one dtype.
//
//   rms_norm_cpu(x [..., n], delta [..., n] or None, weight [n], eps) -> [y] without delta, [h, y] with it:
//       h = x + delta, y = weight * rms_norm(h or x)
//   silu_mul_cpu(gate [..., n], up [..., n]) -> silu(gate) * up
//   rope_store_cpu(q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, D], cos [B, T, 1, D], sin [B, T, 1, D],
//                  k_cache [B, Hkv, L, D], v_cache [B, Hkv, L, D], slots [B, T] int64)
//       -> RoPE(q) [B, T, H, D]; writes RoPE(k) and v to the caches at slots[b, t] (last dimensions contiguous)
// All three need AVX2 and FMA (linear_bf16_cpu_supported()).
#pragma once
#include <torch/extension.h>

#include <vector>

#include "linear.h"

namespace tempspec {

std::vector<at::Tensor> rms_norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                     const at::Tensor& weight, double eps);
at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up);
at::Tensor rope_store_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                          const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots);

}  // namespace tempspec
