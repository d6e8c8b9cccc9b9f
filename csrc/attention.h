// Attention on the CPU: of a few queries over a KV cache (csrc/attention_cpu.cpp), and of a whole prompt from
// position 0 (csrc/prefill_attention_cpu.cpp). Wrapper and dispatch rule:
// tempspec_engine/attention.py.
//
//   attention_cpu(q [B, H, T, D], k [B, Hkv, L, D], v [B, Hkv, L, D], mask [B|1, H|1, T, L] bool or None, scale)
//     -> [B, H, T, D] (a view of a [B, T, H, D] tensor); bf16 or fp32, the last dimension of each input contiguous
//   prefill_attention_cpu(q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D], scale) -> [B, H, T, D] (the same view):
//     causal attention of a whole prompt (csrc/prefill_attention_cpu.cpp); bf16, D 64 or 128, AVX-512 BF16
#pragma once
#include <torch/extension.h>

#include "linear.h"

namespace tempspec {

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, double scale);
at::Tensor prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

}  // namespace tempspec
