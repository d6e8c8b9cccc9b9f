"""The Llama-family transformer and its KV cache: logits equal Hugging Face's, rollback is exact."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from engine_fixtures import tiny_llama_hf  # noqa: E402
from tempspec_engine.models.config import ModelConfig  # noqa: E402
from tempspec_engine.models.draft import layer_subset_draft, make_draft  # noqa: E402
from tempspec_engine.models.llama import Transformer  # noqa: E402
from tempspec_engine.models.loading import LoadedModel, from_hf_model  # noqa: E402


def _ours(hf):
    model = Transformer(ModelConfig.from_hf(hf.config))
    model.load_hf_state_dict(hf.state_dict())
    return model.eval()


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
], ids=["tied", "untied", "llama3-rope", "linear-rope"])
@torch.no_grad()
def test_logits_match_hf_llama(overrides):
    hf = tiny_llama_hf(vocab=96, layers=2, seed=1, **overrides)
    model = _ours(hf)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits
    cache = model.new_cache(2, 64)
    pos = torch.arange(24).expand(2, 24)
    first = model(ids[:, :10], pos[:, :10], cache)  # prefill, then two chunks reading the cache
    second = model(ids[:, 10:11], pos[:, 10:11], cache)
    third = model(ids[:, 11:], pos[:, 11:], cache, kv_len=30)
    torch.testing.assert_close(torch.cat([first, second, third], 1), ref, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_logits_match_hf_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    model = _ours(hf)
    ids = torch.randint(0, 80, (1, 12))
    cache = model.new_cache(1, 16)
    torch.testing.assert_close(model(ids, torch.arange(12).unsqueeze(0), cache), hf(ids).logits,
                               atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_rollback_equals_fresh_forward():
    """Rows verify k+1 tokens, keep different numbers of them (length moves back, no copies), continue; the
    valid cache prefix then equals a fresh forward over the committed tokens, and so do the logits."""
    model = _ours(tiny_llama_hf(vocab=64, layers=3, seed=2))
    g = torch.Generator().manual_seed(3)
    B, k = 3, 4
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 9, 2)]
    cache = model.new_cache(B, 48)
    committed = [list(p) for p in prompts]
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    model(tokens, torch.arange(T).expand(B, T), cache, compute_logits=False)
    for step, keep in enumerate([[0, 4, 2], [3, 1, 0], [2, 2, 4]]):
        drafts = torch.randint(0, 64, (B, k + 1), generator=g)
        start = torch.tensor([len(c) for c in committed])  # the lengths' one source of truth: committed tokens
        model(drafts, start.unsqueeze(1) + torch.arange(k + 1), cache, kv_len=int(start.max()) + k + 1)
        for b in range(B):
            committed[b] += drafts[b, : keep[b]].tolist()
    for b in range(B):
        n = len(committed[b])
        fresh = model.new_cache(1, 48)
        model(torch.tensor([committed[b]]), torch.arange(n).unsqueeze(0), fresh)  # fills the fresh cache
        for layer in range(model.n_layers):
            torch.testing.assert_close(cache.k[layer][b, :, :n], fresh.k[layer][0, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[layer][b, :, :n], fresh.v[layer][0, :, :n], atol=1e-5, rtol=1e-5)
        # The next token read through the rolled-back cache sees exactly the committed prefix.
        probe = torch.tensor([[7]])
        row = cache.rows(b, b + 1)
        got = model(probe, torch.tensor([[n]]), row)
        want = model(probe, torch.tensor([[n]]), fresh)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_token_tree_reads_each_branch_after_its_ancestors_and_moves_into_place():
    """A tree forward (Transformer.forward's `tree`): a chain d1 d2 after the prompt's last token, plus two
    alternatives to d1 and one to d2 in slots after the chain. Each node's logits equal a plain forward of its own
    branch; moving an alternative's keys to its position (KVCache.move) leaves the cache of a fresh forward over the
    branch it ends."""
    model = _ours(tiny_llama_hf(vocab=64, layers=3, seed=2))
    prompt, chain = [5, 9, 2, 7], [11, 12]
    n = len(prompt) - 1  # the prompt's last token ("pending") is not in the cache yet
    cache = model.new_cache(1, 32)
    model(torch.tensor([prompt[:n]]), torch.arange(n).unsqueeze(0), cache, compute_logits=False)
    tokens = torch.tensor([[prompt[-1]] + chain + [21, 22, 23]])
    positions = torch.tensor([[n, n + 1, n + 2, n + 1, n + 1, n + 2]])
    slots = torch.tensor([[n, n + 1, n + 2, n + 3, n + 4, n + 5]])
    visible = torch.tensor([[n, n + 1, n + 2, n, n, n + 1]])  # an alternative sees its ancestors and itself
    logits = model(tokens, positions, cache, kv_len=n + 6, tree=(slots, visible))
    branches = {0: prompt, 1: prompt + chain[:1], 2: prompt + chain, 3: prompt + [21], 4: prompt + [22],
                5: prompt + chain[:1] + [23]}
    for node, seq in branches.items():
        want = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None)[0, -1]
        torch.testing.assert_close(logits[0, node], want, atol=1e-4, rtol=1e-4)
    cache.move(torch.tensor([0]), torch.tensor([n + 5]), torch.tensor([n + 2]))  # d1 accepted, d2 -> alternative 23
    seq = branches[5]
    fresh = model.new_cache(1, 32)
    model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), fresh, compute_logits=False)
    for layer in range(model.n_layers):
        torch.testing.assert_close(cache.k[layer][0, :, :len(seq)], fresh.k[layer][0, :, :len(seq)], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(cache.v[layer][0, :, :len(seq)], fresh.v[layer][0, :, :len(seq)], atol=1e-5,
                                   rtol=1e-5)


def test_compact_moves_rows():
    model = _ours(tiny_llama_hf(vocab=32, layers=1))
    cache = model.new_cache(3, 8)
    cache.k[0].copy_(torch.arange(3.0).view(3, 1, 1, 1).expand_as(cache.k[0]))
    cache.compact(torch.tensor([2]))
    assert float(cache.k[0][0, 0, 0, 0]) == 2.0 and float(cache.k[0][1, 0, 0, 0]) == 1.0


def test_layer_subset_draft_shares_weights():
    target = from_hf_model(tiny_llama_hf(vocab=64, layers=4), None, eos_ids=())
    draft = make_draft("layers:0,2-3/vocab:40", target, "cpu", torch.float32).model
    assert draft.n_layers == 3
    assert draft.layers[1] is target.model.layers[2] and draft.embed_tokens is target.model.embed_tokens
    cache = draft.new_cache(1, 8)
    logits = draft(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache)
    assert logits.shape == (1, 2, 64) and torch.isneginf(logits[..., 40:]).all()
    assert torch.isfinite(logits[..., :40]).all()
    with pytest.raises(ValueError, match="subset"):
        layer_subset_draft(target.model, [0, 9])


def test_config_refuses_other_architectures():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="Llama family"):
        ModelConfig.from_hf(GPT2Config())
    cfg = ModelConfig.from_hf(tiny_llama_hf(vocab=32, layers=1).config)
    assert dataclasses.replace(cfg, n_layers=2).n_layers == 2


def test_lookup_draft_proposals():
    from tempspec_engine.models.lookup_draft import LookupDraft

    d = LookupDraft(vocab_size=10, max_ngram=2)
    assert d.propose_row([1, 2, 3, 9, 2, 3], 3) == [9, 2, 3]  # bigram (2, 3) seen before: what followed it
    assert d.propose_row([5, 6, 7, 5], 2) == [6, 7]  # unigram fallback
    assert d.propose_row([1, 2, 3], 2) == []  # no match: no proposal (the engine runs a plain target step)
    assert d.propose_row([4, 4], 3) == [4]  # what followed the match, no more
    assert d.propose([[1, 2, 3, 9, 2, 3], [1, 2, 3]], 1) == [[9], []]
    strict = LookupDraft(vocab_size=10, max_ngram=3, min_ngram=2)
    assert strict.propose_row([5, 6, 7, 5], 2) == []  # a unigram match is not enough
    assert strict.propose_row([5, 6, 7, 5, 6], 2) == [7, 5]
    with pytest.raises(ValueError, match="min_ngram"):
        LookupDraft(vocab_size=10, max_ngram=2, min_ngram=3)
    logits = LookupDraft.draft_logits(torch.tensor([[2, 7]]), 10, torch.float32)
    assert logits.shape == (1, 2, 10) and logits[0, 0, 2] == 0 and torch.isneginf(logits[0, 0, :2]).all()


@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 2), (3, 1), (1, 1), (4, 2)])
def test_ngram_index_proposes_what_the_rule_proposes(max_ngram, min_ngram):
    """NgramIndex (the proposers' incremental lookup) against LookupDraft.propose_row, the rule, on growing rows over
    a small vocabulary (many repeats), each step appending 1-4 tokens; a row that shrinks is re-indexed."""
    import random

    from tempspec_engine.models.lookup_draft import LookupDraft, NgramIndex

    rng = random.Random(max_ngram * 10 + min_ngram)
    rule = LookupDraft(vocab_size=6, max_ngram=max_ngram, min_ngram=min_ngram)
    found = 0
    for _ in range(20):
        seq = [rng.randrange(6) for _ in range(rng.randrange(1, 5))]
        index = NgramIndex(rule, seq)
        for _ in range(40):
            k = rng.randrange(1, 9)
            expected = rule.propose_row(seq, k)
            assert index.propose(k) == expected, (seq, k)
            found += bool(expected)
            seq.extend(rng.randrange(6) for _ in range(rng.randrange(1, 5)))
        del seq[len(seq) // 2:]  # shrunk: the index starts over
        assert index.propose(3) == rule.propose_row(seq, 3)
    assert 100 < found < 800  # both outcomes occur


def test_hybrid_and_lookup_specs():
    from tempspec_engine.models.draft import make_lookup, split_hybrid

    assert split_hybrid("lookup+distilled:1/vocab:4096") == ("lookup", "distilled:1/vocab:4096")
    assert split_hybrid("lookup:4+layers:0,3") == ("lookup:4", "layers:0,3")
    assert split_hybrid("layers:0,3") == (None, "layers:0,3") and split_hybrid(None) == (None, None)
    for bad in ("lookup+", "lookup+lookup"):
        with pytest.raises(ValueError, match="model draft spec"):
            split_hybrid(bad)
    d = make_lookup("lookup:4", vocab_size=10, min_ngram=2)
    assert (d.max_ngram, d.min_ngram) == (4, 2)
    assert make_lookup("lookup:1", 10, min_ngram=2).min_ngram == 1  # never above max_ngram
    for bad in ("lookup:x", "lookup:0"):
        with pytest.raises(ValueError, match=f"draft '{bad}'.*integer N >= 1"):
            make_lookup(bad, 10)


@pytest.mark.parametrize("spec, expected", [("random:x", "random:N"), ("random:0", "random:N"),
                                            ("distilled:abc", "distilled:T"), ("distilled:", "distilled:T")])
def test_malformed_numbered_specs_name_the_spec(spec, expected):
    target = _ours(tiny_llama_hf(vocab=16, layers=1))
    loaded = LoadedModel(target, None, (), "tiny")
    with pytest.raises(ValueError, match=f"draft '{spec}'.*{expected}"):
        make_draft(spec, loaded, "cpu", torch.float32)
