"""Build and install tempspec: the Python packages and the optional C++/CUDA extension tempspec_engine._C.

The C++ CPU op is always attempted; the CUDA op is added when torch was built with CUDA and nvcc is found
(set TEMPSPEC_NO_CUDA=1 to skip it). A failed compile only warns: the package then falls back to Triton/torch.
"""
import os
import warnings

from setuptools import setup

PACKAGES = ["tempspec_engine", "tempspec_engine.models", "tempspec_engine.kernels", "tempspec_trainer"]
PACKAGE_DIR = {"tempspec_engine": "tempspec_engine", "tempspec_engine.kernels": "kernels"}


def _extension_build():
    """Returns (ext_modules, cmdclass); empty when torch or a compiler is missing."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not installed at build time: tempspec_engine._C is not built")
        return [], {}

    sources = ["csrc/bindings.cpp", "csrc/acceptance_cpu.cpp", "csrc/linear_cpu.cpp", "csrc/attention_cpu.cpp",
               "csrc/prefill_attention_cpu.cpp", "csrc/layer_ops_cpu.cpp"]
    # the C++ standard is the one torch's cpp_extension chooses for its own headers. -fopenmp: at::parallel_for is
    # inline and runs serially without it; the libgomp.so.1 this records is the one torch has already loaded
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    with_cuda = (
        os.environ.get("TEMPSPEC_NO_CUDA", "0") != "1"
        and cpp_extension.CUDA_HOME is not None
        and getattr(__import__("torch").version, "cuda", None) is not None
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "tempspec_engine._C",
            sources + ["csrc/acceptance_cuda.cu"],
            define_macros=[("TEMPSPEC_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension("tempspec_engine._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_flags)

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Warns instead of failing when the extension does not compile (no compiler, unsupported toolchain)."""

        def build_extension(self, extension):
            if os.environ.get("TEMPSPEC_REQUIRE_EXT", "0") == "1":
                return super().build_extension(extension)
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: fall back, loudly
                warnings.warn(f"tempspec_engine._C was not built ({exc}); the Triton/torch backends remain")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    name="tempspec",
    version="0.1.0",
    description="Speculative decoding across decoding temperatures: fused lossless acceptance ops and engine",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "transformers>=4.45", "safetensors", "gguf", "accelerate", "tqdm"],
    extras_require={"triton": ["triton"], "plots": ["matplotlib"], "test": ["pytest", "scipy", "triton", "matplotlib"]},
    package_data={"tempspec_engine": ["drafts/*/*.json", "drafts/*/*.safetensors", "drafts/*/*.safetensors.xz", "drafts/*/*.md"]},
    entry_points={"console_scripts": ["tempspec=tempspec_engine.cli:main", "tempspec-train=tempspec_trainer.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
