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


def exact_first_two(model, prompt, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Exact target probabilities of the first two generated tokens after `prompt`: [V, V] fp64 on CPU, of the
    filtered distribution F(softmax(l / T)) when filters are given (semantics: tempspec_engine/reference.py)."""
    from tempspec_engine.reference import filtered_weights

    V = model.config.vocab_size
    with torch.no_grad():
        seqs = torch.tensor([prompt + [x] for x in range(V)])
        n = len(prompt) + 1
        cache = model.new_cache(V, n)
        logits = model(seqs, torch.arange(n).expand(V, n), cache).float()
    rows = torch.cat([logits[:1, n - 2], logits[:, n - 1]])  # [1 + V, V]: the first position, then per first token
    per_row = [torch.full((V + 1,), x, dtype=d) for x, d in ((temperature, torch.float32), (top_k, torch.int64),
                                                               (top_p, torch.float32), (min_p, torch.float32))]
    w = filtered_weights(rows, *per_row).double()
    probs = w / w.sum(-1, keepdim=True)
    return probs[0].unsqueeze(1) * probs[1:]


def first_two_chi_square(outputs, joint) -> float:
    """p-value of the chi-square goodness of fit of the outputs' first two tokens against `joint` [V, V] (bins with
    expected count < 5 merged into one)."""
    from scipy import stats

    V = joint.shape[0]
    counts = torch.zeros(V * V, dtype=torch.float64)
    for o in outputs:
        counts[o.token_ids[0] * V + o.token_ids[1]] += 1
    expected = joint.flatten().cpu() * len(outputs)
    order = torch.argsort(expected)
    if bool((counts[expected == 0] > 0).any()):
        return 0.0  # a sample the distribution cannot produce (e.g. a token a filter removes)
    small = expected[order] < 5
    obs, exp = counts[order][~small], expected[order][~small]
    if expected[order][small].sum() > 0:  # the small bins, merged into one
        obs = torch.cat([obs, counts[order][small].sum().view(1)])
        exp = torch.cat([exp, expected[order][small].sum().view(1)])
    return stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue
