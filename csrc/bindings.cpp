// Python bindings of tempspec_engine._C: the CPU ops always, the CUDA ops when built with TEMPSPEC_WITH_CUDA.
#include "acceptance.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tempspec fused speculative-sampling ops (C++ CPU and CUDA)";
  m.def("speculative_sample_cpu", &tempspec::speculative_sample_cpu, "fused acceptance step (CPU)");
  m.def("sample_cpu", &tempspec::sample_cpu, "fused temperature sampler (CPU)");
#ifdef TEMPSPEC_WITH_CUDA
  m.def("speculative_sample_cuda", &tempspec::speculative_sample_cuda, "fused acceptance step (CUDA)");
  m.def("sample_cuda", &tempspec::sample_cuda, "fused temperature sampler (CUDA)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
