// Declarations of the fused speculative-sampling ops. Semantics: tempspec_engine/reference.py (the reference).
// Inputs are validated by the Python wrapper (tempspec_engine/ops.py); these functions only TORCH_CHECK the
// invariants they rely on (contiguity, dtypes, devices, shapes).
//
//   speculative_sample_*(draft_logits [B,k,V] f32|bf16|f16, target_logits [B,k+1,V] same dtype,
//                        draft_tokens [B,k] int64, temperature [B] f32, uniforms [B,k+1] f32)
//       -> (accepted [B] int64, tokens [B,k+1] int64, -1 after the emitted token)
//   sample_*(logits [B,V] f32|bf16|f16, temperature [B] f32, uniforms [B] f32) -> tokens [B] int64
//   speculative_sample_filtered_* / sample_filtered_*: the same, then the per-row sampling settings
//       top_k [B] int64 (0: off), top_p [B] f32 (1: off), min_p [B] f32 (0: off)
//       and, for speculative_sample_filtered_*, lenience [B] f32 (1: lossless)
#pragma once
#include <torch/extension.h>
#include <tuple>

namespace tempspec {

std::tuple<at::Tensor, at::Tensor> speculative_sample_cpu(const at::Tensor& draft_logits,
                                                          const at::Tensor& target_logits,
                                                          const at::Tensor& draft_tokens,
                                                          const at::Tensor& temperature,
                                                          const at::Tensor& uniforms);
at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms);
std::tuple<at::Tensor, at::Tensor> speculative_sample_filtered_cpu(
    const at::Tensor& draft_logits, const at::Tensor& target_logits, const at::Tensor& draft_tokens,
    const at::Tensor& temperature, const at::Tensor& uniforms, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& lenience);
at::Tensor sample_filtered_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms,
                               const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p);

#ifdef TEMPSPEC_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> speculative_sample_cuda(const at::Tensor& draft_logits,
                                                           const at::Tensor& target_logits,
                                                           const at::Tensor& draft_tokens,
                                                           const at::Tensor& temperature,
                                                           const at::Tensor& uniforms);
at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms);
std::tuple<at::Tensor, at::Tensor> speculative_sample_filtered_cuda(
    const at::Tensor& draft_logits, const at::Tensor& target_logits, const at::Tensor& draft_tokens,
    const at::Tensor& temperature, const at::Tensor& uniforms, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& lenience);
at::Tensor sample_filtered_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniforms,
                                const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p);
#endif

}  // namespace tempspec
