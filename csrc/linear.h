// The bf16 linear layer for CPUs with AVX2 (csrc/linear_cpu.cpp). Wrapper and dispatch rule:
// tempspec_engine/linear.py.
//
//   linear_bf16_cpu(x [..., K] bf16, weight [N, K] bf16 contiguous, bias [N] or None) -> [..., N] bf16
//   linear_bf16_cpu_supported() -> whether this CPU has AVX2 and FMA (the kernel needs both)
#pragma once
#include <torch/extension.h>

namespace tempspec {

at::Tensor linear_bf16_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
bool linear_bf16_cpu_supported();

}  // namespace tempspec
