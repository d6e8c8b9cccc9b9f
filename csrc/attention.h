// Attention of a few queries over a KV cache on the CPU (csrc/attention_cpu.cpp). Wrapper and dispatch rule:
// tempspec_engine/attention.py.
//
//   attention_cpu(q [B, H, T, D], k [B, Hkv, L, D], v [B, Hkv, L, D], mask [B|1, H|1, T, L] bool or None, scale)
//     -> [B, H, T, D] (a view of a [B, T, H, D] tensor); bf16 or fp32, the last dimension of each input contiguous
#pragma once
#include <torch/extension.h>

#include "linear.h"

namespace tempspec {

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, double scale);

}  // namespace tempspec
