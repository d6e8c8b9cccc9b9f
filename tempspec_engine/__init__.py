"""tempspec_engine: lossless speculative decoding across decoding temperatures.

The fused acceptance op `speculative_sample` and the sampler `sample` run on the best available backend
(cuda > triton > cpu C++ > torch); `available_backends(device)` lists them.
"""
from tempspec_engine.backends import BACKEND_NAMES, BackendUnavailableError, available_backends
from tempspec_engine.ops import SpecSampleOutput, sample, speculative_sample

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "SpecSampleOutput",
    "available_backends",
    "sample",
    "speculative_sample",
]
__version__ = "0.1.0"
