"""tempspec_engine: lossless speculative decoding across decoding temperatures.

The fused acceptance op `speculative_sample` and the sampler `sample` run on the best available backend
(cuda > triton > cpu C++ > torch); `available_backends(device)` lists them. `SpeculativeEngine` (the engine, with
`GenerationOutput` and `RequestStats`) is imported on first use, so that importing the ops stays light.
"""
from tempspec_engine.backends import BACKEND_NAMES, BackendUnavailableError, available_backends
from tempspec_engine.ops import SpecSampleOutput, sample, speculative_sample

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "GenerationOutput",
    "RequestStats",
    "SpecSampleOutput",
    "SpeculativeEngine",
    "available_backends",
    "sample",
    "speculative_sample",
]
__version__ = "0.1.0"

_ENGINE_NAMES = ("SpeculativeEngine", "GenerationOutput", "RequestStats")


def __getattr__(name):
    if name in _ENGINE_NAMES:
        from tempspec_engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'tempspec_engine' has no attribute {name!r}")
