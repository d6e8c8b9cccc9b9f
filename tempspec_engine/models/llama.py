"""A small Llama-family decoder (gpt-fast style) that reads and writes a preallocated KVCache.

RMSNorm, rotary embeddings (rotate-half convention, as Hugging Face stores the weights), grouped-query attention
with a mask built from per-row positions (attention.attend: tempspec's CPU kernel for a few queries, SDPA otherwise),
SwiGLU MLP, optional tied embeddings. The projections go through linear.linear (q, k and v in one call, gate and up
in one: linear.linears), the norms, SiLU product, RoPE and cache store through layer_ops (fused CPU kernels where
they apply). Weights load from a Hugging Face Llama/Mistral/Qwen2 state dict.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from tempspec_engine.attention import attend
from tempspec_engine.kv_cache import KVCache
from tempspec_engine.layer_ops import add_rms_norm, apply_rope, rms_norm, rope_store, silu_mul
from tempspec_engine.linear import Linear, linear, linears
from tempspec_engine.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hugging Face's semantics: x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times the weight
        (layer_ops.rms_norm_reference; one fused kernel on the CPU)."""
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] fp32, with "linear" or "llama3" scaling applied."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    sc = config.rope_scaling
    if sc is None:
        return inv.float()
    kind = sc.get("rope_type", sc.get("type"))
    factor = float(sc["factor"])
    if kind == "linear":
        return (inv / factor).float()
    # llama3: long wavelengths divided by factor, short ones kept, smooth blend in between.
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_len = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


class UnrolledKeys:
    """In training, the keys and values of a feature head's earlier unrolled steps (EAGLE-3's training-time test), in
    place of a KV cache: per layer, the RoPE'd k and v of steps 1..j-1 [B, H_kv, (j-1)T, D], which the queries of step
    j attend to beside the step's own under `mask` [T, jT] bool (unrolled_mask(T, j)). Attention appends each step's
    own (new tensors, so that autograd keeps every step's)."""

    def __init__(self, n_layers: int):
        self.k: List[Optional[torch.Tensor]] = [None] * n_layers
        self.v: List[Optional[torch.Tensor]] = [None] * n_layers
        self.mask: Optional[torch.Tensor] = None

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Appends a step's k, v [B, H_kv, T, D] to the layer's; returns every step's so far."""
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def unrolled_mask(T: int, step: int, device=None) -> torch.Tensor:
    """[T, step * T] bool: the keys that the queries of unrolled step `step` (1-based) see, as at inference. Query t
    is the step-th draft of a chain that starts at index r = t - step + 1, where the target's feature is known: it
    sees the step-1 keys at indices <= r (read from the target's features, as the head's cache holds them) and, for
    u = 2..step, the step-u key at index r + u - 1 (the chain's own predicted features, as its draft steps write
    them). Step 1 is causal attention."""
    t = torch.arange(T, device=device).view(T, 1)
    p = torch.arange(T, device=device).view(1, T)
    return torch.cat([p <= t - step + 1] + [p == t - step + u for u in range(2, step + 1)], dim=1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)

    def forward(self, x, cos, sin, slots, mask, cache: KVCache, layer: int, kv_len: int, causal: bool = False):
        """x [B,T,dim]; cos/sin [B,T,1,D] (rope_cos_sin); slots [B,T] (the cache slots the keys are written to);
        mask [B,1,T,kv_len] bool, or None with causal=True (query t sees keys 0..t: a prefill from position 0).
        Returns [B,T,dim]."""
        B, T, _ = x.shape
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if cache is None or isinstance(cache, UnrolledKeys):  # training / scoring a whole sequence: no KV cache
            # one RoPE over the query and key heads together (RoPE is per head)
            qk = apply_rope(torch.cat((q, k), dim=2), cos, sin)
            q, k = qk[:, :, :self.n_heads].transpose(1, 2), qk[:, :, self.n_heads:].transpose(1, 2)
            v = v.transpose(1, 2)
            if cache is None:  # causal attention within the sequence
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
            else:  # an unrolled step: the earlier steps' keys too, under the step's mask
                k, v = cache.extend(layer, k, v)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask,
                                                     enable_gqa=self.n_kv != self.n_heads)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        q = rope_store(q, k, v, cos, sin, cache.k[layer], cache.v[layer], slots).transpose(1, 2)
        keys, values = cache.k[layer][:, :, :kv_len], cache.v[layer][:, :, :kv_len]
        out = attend(q, keys, values, mask, causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.dim, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.dim, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(*linears(x, (self.gate_proj, self.up_proj))))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.rms_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.rms_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, slots, mask, cache, layer, kv_len, causal: bool = False):
        delta = self.self_attn(self.input_layernorm(x), cos, sin, slots, mask, cache, layer, kv_len, causal)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x, delta, norm.weight, norm.eps)  # x + delta, then its norm: one kernel on the CPU
        return x + self.mlp(h)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin_signed [B, T, 1, head_dim] of `dtype` for positions [B, T] (rotate-half layout; layer_ops.apply_rope):
    cos(f) twice, and -sin(f) then sin(f), for the frequencies f = position * inv_freq."""
    freqs = (positions.unsqueeze(-1).float() * inv_freq).unsqueeze(2)  # [B, T, 1, D/2]
    sin = freqs.sin().to(dtype)
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1)


def run_layers(layers: Sequence[Block], x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor,
               cache: Union[KVCache, UnrolledKeys, None], kv_len: Optional[int] = None, last_query: bool = False,
               keep: Sequence[int] = (), tree: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               from_start: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The decoder blocks on x [B, T, dim] with RoPE at positions [B, T], under Transformer.forward's cache
    conventions: with a cache, each layer writes its T keys at `positions` and attends over cache positions
    [0, kv_len) (default: all) where key position <= query position (no mask with last_query=True); cache=None:
    plain causal attention over the T inputs (training); an UnrolledKeys: a feature head's unrolled training step.
    tree = (slots, visible), each [B, T] int64: the keys are written at `slots` instead, and query t attends to the
    slots <= visible[b, t] and to its own slot (a token tree whose branches share positions: Transformer.forward).
    from_start=True promises positions 0..T-1 in every row and kv_len == T (a prefill): attention is then causal with
    no mask (SDPA skips the masked half). Returns the last block's output [B, T, dim] and the outputs of the blocks
    whose indices are in `keep`, in that order (each [B, T, dim]; the residual stream, no norm)."""
    if cache is None or isinstance(cache, UnrolledKeys):
        kv_len, last_query = x.shape[1], True  # no mask built here: causal, or the unrolled step's own
    kv_len = cache.max_len if kv_len is None else kv_len
    cos, sin = rope_cos_sin(inv_freq, positions, x.dtype)
    keys = torch.arange(kv_len, device=positions.device).view(1, 1, 1, -1)
    B = positions.shape[0]
    slots = positions
    if tree is not None:
        slots, visible = tree
        mask = (keys <= visible.view(B, 1, -1, 1)) | (keys == slots.view(B, 1, -1, 1))
    else:
        mask = None if last_query or from_start else keys <= positions.view(B, 1, -1, 1)
    kept = {}
    for i, block in enumerate(layers):
        x = block(x, cos, sin, slots, mask, cache, i, kv_len, from_start and cache is not None)
        if i in keep:
            kept[i] = x
    return x, [kept[i] for i in keep]


class Transformer(nn.Module):
    """Llama-family decoder. Module names follow Hugging Face (`model.` prefix dropped) so state dicts load as is.

    `vocab_limit` (derived drafts): only the first vocab_limit rows of the output head are computed; the other
    logits are -inf, so the draft never proposes those tokens (still lossless: the acceptance rule corrects it).
    """

    def __init__(self, config: ModelConfig, *, embed_tokens: Optional[nn.Embedding] = None,
                 layers: Optional[Sequence[Block]] = None, norm: Optional[RMSNorm] = None,
                 lm_head: Optional[nn.Linear] = None, vocab_limit: Optional[int] = None):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens or nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(layers if layers is not None else [Block(config) for _ in range(config.n_layers)])
        self.norm = norm or RMSNorm(config.dim, config.rms_eps)
        if lm_head is None and not config.tie_embeddings:
            lm_head = Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head = lm_head
        self.vocab_limit = vocab_limit
        self._inv_freq = rope_inv_freq(config)  # fp32 on purpose: not a buffer, so .to(dtype) leaves it alone

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def output_weight(self) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return w if self.vocab_limit is None else w[: self.vocab_limit]

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.embed_tokens.weight
        c = self.config
        return KVCache(self.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, dtype or p.dtype, device or p.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache],
                kv_len: Optional[int] = None, logits_index: Optional[torch.Tensor] = None,
                compute_logits: bool = True, last_query: bool = False, return_features: bool = False,
                feature_taps: Sequence[int] = (), tree: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                from_start: bool = False
                ) -> Union[Optional[torch.Tensor], Tuple[Optional[torch.Tensor], torch.Tensor]]:
        """tokens, positions: [B, T] int64 (row b's token t sits at positions[b, t]; keys at positions <= it are
        visible). Writes the T keys per layer into `cache` (lengths untouched: the caller owns them) and attends
        over cache positions [0, kv_len) (default: the whole cache). logits_index [B] picks one position per row.
        last_query=True promises a single query per row at position kv_len - 1: attention then needs no mask
        (CPU SDPA is much faster without one). from_start=True promises tokens at positions 0..T-1 in every row
        and kv_len == T (a prefill into an empty cache row): causal attention, no mask.
        cache=None (training, scoring): plain causal attention over the T given tokens (positions 0..T-1 in order,
        right padding only); differentiable.
        Returns logits [B, T or 1, V] in the model dtype, or None when compute_logits is False.
        return_features=True returns (logits or None, features): features [B, T or 1, dim] in the model dtype are the
        final hidden states after the final norm (the output head's input) at the same positions as the logits
        (all T, or the logits_index ones); no extra pass (EAGLE-style feature drafts read them). feature_taps: block
        indices whose outputs (the residual stream, before any norm) follow the final features along the last axis:
        features [B, T or 1, (1 + len(feature_taps)) * dim] (EAGLE-3's low/middle/high-level features).
        tree = (slots, visible), each [B, T] int64 (with a cache): a token tree, whose tokens may share positions. Token
        t keeps RoPE position positions[b, t] but writes its keys to cache slot slots[b, t], and attends to the slots
        <= visible[b, t] (its ancestors, laid out in order) and to its own slot.
        """
        x = self.embed_tokens(tokens)
        if self._inv_freq.device != tokens.device:
            self._inv_freq = self._inv_freq.to(tokens.device)
        taps = tuple(feature_taps) if return_features else ()
        if any(not 0 <= i < self.n_layers for i in taps):
            raise ValueError(f"feature_taps {list(taps)} must be block indices in 0..{self.n_layers - 1}")
        x, kept = run_layers(self.layers, x, self._inv_freq, positions, cache, kv_len, last_query, taps, tree,
                             from_start)
        if not compute_logits and not return_features:
            return None
        if logits_index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, logits_index].unsqueeze(1)
            kept = [h[rows, logits_index].unsqueeze(1) for h in kept]
        features = self.norm(x)
        logits = self.head_logits(features) if compute_logits else None
        if kept:
            features = torch.cat([features] + kept, dim=-1)
        return (logits, features) if return_features else logits

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The output head on final-norm features [..., dim] -> logits [..., V] (-inf beyond vocab_limit)."""
        logits = linear(features, self.output_weight())
        if self.vocab_limit is not None and self.vocab_limit < self.config.vocab_size:
            logits = F.pad(logits, (0, self.config.vocab_size - self.vocab_limit), value=float("-inf"))
        return logits

    def load_hf_state_dict(self, state: dict, strict: bool = True, assign: bool = False) -> None:
        """Loads a Hugging Face causal-LM state dict (keys `model.layers.0...`, `lm_head.weight`).

        assign=True adopts the given tensors as parameters (no copy; use it on a model built on the meta device).
        """
        own = {}
        for key, value in state.items():
            if key.startswith("model."):
                key = key[len("model."):]
            if "rotary_emb" in key:
                continue
            if key == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            own[key] = value
        missing, unexpected = self.load_state_dict(own, strict=False, assign=assign)
        if strict and (missing or unexpected):
            raise ValueError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
