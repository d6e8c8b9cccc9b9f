// Python bindings of tempspec_engine._C: the CPU ops always, the CUDA ops when built with TEMPSPEC_WITH_CUDA.
#include "acceptance.h"
#include "attention.h"
#include "layer_ops.h"
#include "linear.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tempspec fused speculative-sampling ops (C++ CPU and CUDA)";
  m.def("speculative_sample_cpu", &tempspec::speculative_sample_cpu, "fused acceptance step (CPU)");
  m.def("sample_cpu", &tempspec::sample_cpu, "fused temperature sampler (CPU)");
  m.def("speculative_sample_filtered_cpu", &tempspec::speculative_sample_filtered_cpu,
        "fused acceptance step with top-k / top-p / min-p filters and lenience (CPU)");
  m.def("sample_filtered_cpu", &tempspec::sample_filtered_cpu,
        "fused sampler with top-k / top-p / min-p filters (CPU)");
  m.def("linear_bf16_cpu", &tempspec::linear_bf16_cpu,
        "bf16 linear layer, weights read once for all rows, batch-invariant rows (AVX2 or AVX-512 BF16)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("isa") = "", pybind11::arg("packed") = pybind11::none());
  m.def("linear_bf16_cpu_many", &tempspec::linear_bf16_cpu_many,
        "linear_bf16_cpu of several weights of one K on one input, in one call", pybind11::arg("x"),
        pybind11::arg("weights"), pybind11::arg("biases"), pybind11::arg("isa") = "",
        pybind11::arg("packed") = std::vector<c10::optional<at::Tensor>>());
  m.def("linear_bf16_cpu_pack", &tempspec::linear_bf16_cpu_pack,
        "a weight [N, K] in the layout linear_bf16_cpu's avx512bf16 variant reads (pass it as `packed`)",
        pybind11::arg("weight"));
  m.def("attention_cpu", &tempspec::attention_cpu,
        "attention of a few queries over a KV cache, fp32 math, batch-invariant rows (AVX2)", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask") = pybind11::none(), pybind11::arg("scale"));
  m.def("prefill_attention_cpu", &tempspec::prefill_attention_cpu,
        "causal attention of a whole prompt from position 0, bf16 products with fp32 sums (AVX-512 BF16)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("scale"));
  m.def("cpu_has_avx512bf16", &tempspec::cpu_has_avx512bf16, "whether this CPU has AVX-512 BF16");
  m.def("linear_bf16_cpu_supported", &tempspec::linear_bf16_cpu_supported, "whether this CPU has AVX2 and FMA");
  m.def("rms_norm_cpu", &tempspec::rms_norm_cpu, "RMSNorm times its weight, after an optional residual add (CPU)",
        pybind11::arg("x"), pybind11::arg("delta"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("silu_mul_cpu", &tempspec::silu_mul_cpu, "silu(gate) * up (CPU)");
  m.def("rope_store_cpu", &tempspec::rope_store_cpu, "RoPE of q and k, k and v stored in the KV cache (CPU)");
  m.def("linear_bf16_cpu_isa", &tempspec::linear_bf16_cpu_isa,
        "the linear kernel's variant on this CPU: avx512bf16, avx2 or empty");
#ifdef TEMPSPEC_WITH_CUDA
  m.def("speculative_sample_cuda", &tempspec::speculative_sample_cuda, "fused acceptance step (CUDA)");
  m.def("sample_cuda", &tempspec::sample_cuda, "fused temperature sampler (CUDA)");
  m.def("speculative_sample_filtered_cuda", &tempspec::speculative_sample_filtered_cuda,
        "fused acceptance step with top-k / top-p / min-p filters and lenience (CUDA)");
  m.def("sample_filtered_cuda", &tempspec::sample_filtered_cuda,
        "fused sampler with top-k / top-p / min-p filters (CUDA)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
