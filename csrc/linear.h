// The bf16 linear layer for CPUs with AVX2, or AVX-512 BF16 (csrc/linear_cpu.cpp). Wrapper and dispatch rule:
// tempspec_engine/linear.py.
//
//   linear_bf16_cpu(x [..., K] bf16, weight [N, K] bf16 contiguous, bias [N] or None, isa = "", packed = None)
//       -> [..., N] bf16; isa: "" (the best variant this CPU runs), "avx2" or "avx512bf16"; packed:
//       linear_bf16_cpu_pack(weight), which the avx512bf16 variant reads (None: packed in the call)
//   linear_bf16_cpu_many(x [..., K], weights [N_i, K], biases [N_i] or None (or an empty list), isa = "",
//       packed = [] or one packed weight or None per weight) -> [x @ weights[i]^T + biases[i]] ([..., N_i] each):
//       several matrices of one K in one call, each output as linear_bf16_cpu gives it
//   linear_bf16_cpu_pack(weight [N, K] bf16) -> [ceil(N / 32), ceil(K / 2), 64] bf16: the weight as the avx512bf16
//       variant streams it (32 outputs per tile, their (k, k + 1) pairs side by side; zero padding)
//   linear_bf16_cpu_supported() -> whether this CPU has AVX2 and FMA (the kernel needs both)
//   linear_bf16_cpu_isa() -> the variant "" picks: "avx512bf16", "avx2", or "" (none)
//   cpu_has_avx512bf16() -> whether this CPU runs the avx512bf16 variants (of this kernel and of
//       csrc/prefill_attention_cpu.cpp)
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace tempspec {

at::Tensor linear_bf16_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const std::string& isa, const c10::optional<at::Tensor>& packed);
std::vector<at::Tensor> linear_bf16_cpu_many(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                             const std::vector<c10::optional<at::Tensor>>& biases,
                                             const std::string& isa,
                                             const std::vector<c10::optional<at::Tensor>>& packed);
at::Tensor linear_bf16_cpu_pack(const at::Tensor& weight);
bool linear_bf16_cpu_supported();
std::string linear_bf16_cpu_isa();
bool cpu_has_avx512bf16();

}  // namespace tempspec
