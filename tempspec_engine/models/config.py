"""Model configuration for the Llama-family transformer (Llama, Mistral, Qwen2, SmolLM, TinyLlama)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

# Hugging Face `model_type`s whose decoder our Llama implementation reproduces exactly.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "smollm", "smollm3_llama")


@dataclasses.dataclass
class ModelConfig:
    """Shapes and constants of a Llama-family decoder.

    `rope_scaling` is None or a dict in the Hugging Face "llama3" / "linear" format; other kinds are refused.
    `qkv_bias` is True for Qwen2. `sliding_window` (Mistral) is ignored when no sequence exceeds it.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    max_position: int = 4096
    sliding_window: Optional[int] = None

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Builds the config from a transformers PretrainedConfig; raises ValueError for other architectures."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in LLAMA_FAMILY:
            raise ValueError(f"model_type {model_type!r} is not in the Llama family {LLAMA_FAMILY}")
        n_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})  # transformers >= 5
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = getattr(hf_config, "rope_scaling", None)
        if rope.get("rope_type", "default") != "default":
            scaling = rope
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"rope scaling {kind!r} is not supported")
        return cls(
            vocab_size=hf_config.vocab_size,
            dim=hf_config.hidden_size,
            n_layers=hf_config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            intermediate_size=hf_config.intermediate_size,
            rms_eps=hf_config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(getattr(hf_config, "attention_bias", False)),
            max_position=getattr(hf_config, "max_position_embeddings", 4096),
            sliding_window=getattr(hf_config, "sliding_window", None) if model_type == "mistral" else None,
        )
