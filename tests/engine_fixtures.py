"""Tiny random models for the engine tests (built locally with transformers: no downloads)."""
from __future__ import annotations

import torch

from tempspec_engine.models.loading import from_hf_model


def tiny_llama_hf(vocab=128, layers=4, seed=0, scale=1.0, **overrides):
    """A random LlamaForCausalLM (hidden 64, GQA 4/2 heads). scale > 1 sharpens its output distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, rope_theta=10000.0)
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return model


def tiny_target(vocab=128, layers=4, seed=0, scale=4.0):
    """LoadedModel of a tiny random Llama (no tokenizer, no EOS): prompts are token-id lists."""
    return from_hf_model(tiny_llama_hf(vocab, layers, seed, scale), None, eos_ids=())


def word_tokenizer(words):
    """A PreTrainedTokenizerFast over whitespace-separated words (ids in the given order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], eos_token=words[1])
