"""The engine's loop: greedy SD equals greedy target-only decoding, sampled SD is lossless, bad input is refused."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from conftest import DEVICES  # noqa: E402
from engine_fixtures import exact_first_two, first_two_chi_square, tiny_llama_hf, tiny_target, word_tokenizer  # noqa: E402,E501
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.models.loading import LoadedModel, TokenizerMismatchError, from_hf_model  # noqa: E402

PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13, 14, 15], [4, 4]]  # different lengths, one of a single token


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab=128, layers=4, seed=0)


@pytest.mark.parametrize("draft", ["layers:0,3", "random", "lookup", "lookup+layers:0,3"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_equals_greedy_target(target, draft, batch):
    engine = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k="auto", max_len=128)
    base = engine.generate(PROMPTS, 0.0, 40, speculative=False, batch_size=batch)
    spec = engine.generate(PROMPTS, 0.0, 40, batch_size=batch)
    fixed = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k=3, max_len=128)
    spec_fixed = fixed.generate(PROMPTS, 0.0, [40, 7, 40, 25], batch_size=batch)
    for b, s, f in zip(base, spec, spec_fixed):
        assert s.token_ids == b.token_ids
        assert f.token_ids == b.token_ids[: len(f.token_ids)]
        assert len(s.token_ids) == 40 and s.finish_reason == "length"
        assert s.stats.steps <= 40 and f.stats.accepted + f.stats.rejections > 0  # (auto may find no draft pays)
    if draft.startswith("lookup"):  # the tiny model repeats itself: n-gram lookup must get accepted tokens
        assert sum(s.stats.accepted for s in spec) > 0 and sum(s.stats.lookup_steps for s in spec) > 0
    if draft == "lookup":  # steps without a match run the target alone
        assert sum(s.stats.plain_steps for s in spec) > 0
    if "+" in draft:  # the model drafts where the lookup has no 2-gram match
        assert sum(f.stats.steps - f.stats.lookup_steps for f in spec_fixed) > 0
        assert sum(f.stats.plain_steps for f in spec_fixed) == 0
    assert [len(f.token_ids) for f in spec_fixed] == [40, 7, 40, 25]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hybrid_model_steps_see_a_complete_draft_cache(target, temperature):
    """Lookup steps leave the draft model's cache behind; its next step must first read what it missed. With the
    target's own layers as that model, every model step is then accepted in full (a stale cache would not be)."""
    small = tiny_target(vocab=16, layers=4, seed=5)  # a small vocabulary: n-grams recur at any temperature
    # (k_min=1: a draft as dear as the target never pays, and with k_min=0 its steps would run the target alone)
    engine = SpeculativeEngine(small, "lookup+layers:0-3", device="cpu", dtype=torch.float32, max_len=160, k_min=1)
    out = engine.generate([[p % 16 for p in prompt] for prompt in PROMPTS], temperature, 60, batch_size=2, seed=0)
    assert sum(o.stats.lookup_steps for o in out) > 0
    model_steps = sum(o.stats.steps - o.stats.lookup_steps for o in out)
    positions = [c for rows in engine.adaptive.counts.values() for c in rows]  # [accepted, reached] per position
    assert model_steps > 0 and sum(c[1] for c in positions) > 0
    assert all(c[0] == c[1] for c in positions)  # the model's drafts: every one reached was accepted


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_equal_to_target_accepts_everything(target, temperature):
    """A 'draft' made of all the target's layers must be accepted at every position (p == q): this catches any
    position, cache or rollback mistake on the draft side, which greedy equality alone would not."""
    engine = SpeculativeEngine(target, "layers:0-3", device="cpu", dtype=torch.float32, k=3, max_len=128)
    out = engine.generate(PROMPTS, temperature, 30, batch_size=4, seed=0)
    for o in out:
        assert o.stats.rejections == 0 and o.stats.alpha == 1.0
        assert o.stats.steps == 8  # 7 steps of 4 tokens, then 2 more tokens
        assert o.stats.position_proposed == o.stats.position_accepted == [8, 8, 8]  # every position, every step
        assert o.stats.acceptance_by_position == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("batch", [1, 3])
def test_draft_equal_to_target_accepts_every_position(target, batch):
    """Greedy SD with adaptive k and the target's own layers as the draft: acceptance 1.0 at every position that was
    proposed (None beyond the longest step), and the per-position counts add up to the accepted total."""
    engine = SpeculativeEngine(target, "layers:0-3", device="cpu", dtype=torch.float32, k="auto", k_max=5,
                               max_len=128, k_min=1)  # (never worth it: with k_min=0 its steps run the target alone)
    out = engine.generate(PROMPTS[:3], 0.0, 24, batch_size=batch, seed=0)
    for o in out:
        s = o.stats
        assert s.rejections == 0 and sum(s.position_accepted) == s.accepted > 0
        assert s.position_proposed == s.position_accepted and s.position_proposed[0] == s.steps
        assert all(x == (1.0 if p else None) for x, p in zip(s.acceptance_by_position, s.position_proposed))


@pytest.mark.parametrize("draft", ["layers:0,3", "lookup+layers:0,3"])
def test_static_shapes_mode(target, draft):
    """The CUDA-graph layout run eagerly on CPU: rows keep their slots (idle rows are padded) and attention spans
    the whole cache; the caches persist across calls. Output equals the compacting mode's."""
    dynamic = SpeculativeEngine(target, "layers:0,3", device="cpu", dtype=torch.float32, k=3, max_len=64)
    static = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k="auto", max_len=64,
                               static_shapes=True)
    lengths = [30, 5, 18, 9, 12, 3]
    want = dynamic.generate(PROMPTS + PROMPTS[:2], 0.0, lengths, speculative=False, batch_size=4)
    for _ in range(2):
        got = static.generate(PROMPTS + PROMPTS[:2], 0.0, lengths, batch_size=4)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert static.generate(PROMPTS[:1], 0.0, 10, speculative=False, batch_size=1)[0].token_ids == \
        want[0].token_ids[:10]


def test_greedy_target_only_equals_hugging_face(target):
    engine = SpeculativeEngine(target, "none", device="cpu", dtype=torch.float32, max_len=64)
    out = engine.generate([PROMPTS[2]], 0.0, 20)[0]
    hf = target.hf_model.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert out.token_ids == hf[0, len(PROMPTS[2]):].tolist()


def test_more_requests_than_slots_and_eos(target):
    """Finished rows free their slot for queued requests; EOS ends a request (and is included in its ids)."""
    ref = SpeculativeEngine(target, "none", device="cpu", dtype=torch.float32, max_len=128).generate(
        PROMPTS, 0.0, 30, batch_size=4)
    eos = ref[2].token_ids[11]
    with_eos = dataclasses.replace(target, eos_ids=(eos,))
    engine = SpeculativeEngine(with_eos, "layers:0,3", device="cpu", dtype=torch.float32, k=2, max_len=128)
    out = engine.generate(PROMPTS * 2, 0.0, 30, batch_size=3)
    for o, r in zip(out, ref + ref):
        ids = r.token_ids
        cut = ids.index(eos) + 1 if eos in ids else len(ids)
        assert o.token_ids == ids[:cut]
        assert o.finish_reason == ("eos" if eos in ids else "length")


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("draft", ["random", "layers:0", "layers:0/vocab:8", "lookup", "lookup+layers:0"])
def test_sampled_sd_is_lossless(temperature, draft):
    """Chi-square goodness of fit of the first two SD tokens against the target's exact joint distribution.

    Fixed seed, 4000 samples, bins with expected count < 5 merged; fails below p = 1e-3. A wrong acceptance rule
    (e.g. always accepting, or drafting at another temperature) gives p < 1e-10 here.
    """
    V = 16
    target = tiny_target(vocab=V, layers=2, seed=5, scale=3.0)
    prompt = [3, 1, 4, 1]  # the lookup draft proposes 4, 1, ... after the repeated 1
    engine = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k=3, max_len=16,
                               max_batch_size=2000)
    expected = exact_first_two(target.model, prompt, temperature)
    out = engine.generate([prompt] * 4000, temperature, 2, seed=1234)
    p_value = first_two_chi_square(out, expected)
    assert p_value > 1e-3, p_value
    assert sum(o.stats.accepted for o in out) > 0  # the draft was used
    if "+" in draft:  # both proposers took part (the lookup after a first token 4)
        lookup_steps = sum(o.stats.lookup_steps for o in out)
        assert 0 < lookup_steps < sum(o.stats.steps for o in out)


@pytest.mark.parametrize("filter_draft", [True, False])
def test_mixed_settings_in_one_batch_are_lossless_per_group(filter_draft):
    """One batch mixes temperatures and filters row by row (greedy rows, plain T, top-p, top-k, min-p); each group's
    first two tokens must follow that group's exact filtered target distribution (chi-square, fails below 1e-3),
    whether the draft samples filtered (tempspec) or unfiltered with only the target filtered (serving engines)."""
    V = 16
    target = tiny_target(vocab=V, layers=2, seed=5, scale=3.0)
    prompt = [3, 1, 4, 1]
    engine = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, k=3, max_len=16,
                               max_batch_size=1000)
    groups = [dict(temperature=0.5), dict(temperature=1.0, top_p=0.6), dict(temperature=1.0, top_k=3),
              dict(temperature=2.0, min_p=0.1), dict(temperature=0.7, top_k=5, top_p=0.8)]
    n = 1500
    rows = [groups[i % len(groups)] for i in range(n * len(groups))]
    out = engine.generate([prompt] * len(rows), [g["temperature"] for g in rows], 2, seed=99,
                          top_k=[g.get("top_k", 0) for g in rows], top_p=[g.get("top_p", 1.0) for g in rows],
                          min_p=[g.get("min_p", 0.0) for g in rows], filter_draft=filter_draft)
    for j, g in enumerate(groups):
        mine = out[j::len(groups)]
        assert all(o.stats.temperature == g["temperature"] and o.stats.top_k == g.get("top_k", 0)
                   and o.stats.filter_draft == filter_draft for o in mine)
        expected = exact_first_two(target.model, prompt, g["temperature"], g.get("top_k", 0), g.get("top_p", 1.0),
                                   g.get("min_p", 0.0))
        assert first_two_chi_square(mine, expected) > 1e-3, g
    assert sum(o.stats.accepted for o in out) > 0
    greedy = engine.generate([prompt], 0.0, 2, top_p=0.5, top_k=2)[0].token_ids  # filters never change greedy rows
    assert greedy == engine.generate([prompt], 0.0, 2, speculative=False)[0].token_ids


def test_filters_are_checked(target):
    engine = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, max_len=64)
    for kw, word in ((dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
                     (dict(top_p=1.5), "top_p"), (dict(min_p=1.0), "min_p"), (dict(lenience=0.0), "lenience"),
                     (dict(lenience=1.2), "lenience"), (dict(top_p=[0.5]), "one entry per prompt")):
        with pytest.raises(ValueError, match=word):
            engine.generate([[1, 2], [3, 4]], 1.0, 4, **kw)


def test_mixed_temperatures_in_one_batch(target):
    engine = SpeculativeEngine(target, "layers:0,3", device="cpu", dtype=torch.float32, max_len=128)
    base = engine.generate(PROMPTS, 0.0, 25, speculative=False)
    out = engine.generate(PROMPTS, [0.0, 1.0, 0.0, 0.7], 25, seed=0)
    assert out[0].token_ids == base[0].token_ids and out[2].token_ids == base[2].token_ids
    assert all(len(o.token_ids) == 25 for o in out)


def test_stats_and_streaming(target):
    engine = SpeculativeEngine(target, "layers:0,3", device="cpu", dtype=torch.float32, k=3, max_len=128)
    streamed = {}
    out = engine.generate(PROMPTS[:2], 0.0, 20, on_tokens=lambda i, t: streamed.setdefault(i, []).extend(t))
    for i, o in enumerate(out):
        s = o.stats
        assert streamed[i] == o.token_ids
        assert s.new_tokens == 20 and s.steps * 4 >= 20 and 0.0 <= s.alpha <= 1.0
        assert s.tokens_per_step == pytest.approx(20 / s.steps)
        assert s.draft_time_s > 0 and s.target_time_s > 0 and s.tokens_per_s > 0
        assert set(s.as_dict()) >= {"alpha", "mean_accepted", "draft_time_s", "target_time_s", "tokens_per_s"}


@pytest.mark.parametrize("device_loop", [False, True])
def test_lookup_rows_without_a_match_count_as_plain_steps(device_loop):
    """At batch > 1 a row that lookup found nothing for verifies a filler (its last token) beside the other rows'
    proposals: a plain step of its own, not a draft in its acceptance counts, which hold its real proposals alone."""
    target = tiny_target(vocab=64, layers=2, seed=0)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], [5, 9], [7, 8, 11, 13], [4, 6]]
    engine = SpeculativeEngine(target, "lookup", device="cpu", dtype=torch.float32, k=3, max_len=128,
                               device_loop=device_loop)
    out = engine.generate(prompts, 0.0, 24, batch_size=4, seed=0)
    for o in out:
        s = o.stats
        if not device_loop:  # (the device loop counts no lookup steps apart)
            assert s.steps == s.lookup_steps + s.plain_steps
        assert s.position_proposed[0] == s.steps - s.plain_steps
        assert sum(s.position_reached) == s.accepted + s.rejections
    assert sum(o.stats.plain_steps for o in out) > 0 and sum(o.stats.accepted for o in out) > 0


def test_text_prompts_stop_strings_and_chat_template():
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
    tok = word_tokenizer(words)
    tok.chat_template = "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}"
    target = from_hf_model(tiny_llama_hf(vocab=64, layers=2, scale=4.0), tok, eos_ids=(1,))
    engine = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, k=2, max_len=64)
    full = engine.generate(["w3 w4"], 0.0, 12)[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text.split()[3]
    cut = engine.generate(["w3 w4"], 0.0, 12, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    chat = engine.generate(["w3 w4"], 0.0, 4, chat_template=True)[0]
    assert chat.prompt_ids == tok.encode("w5 w3 w4 w6")
    one = engine.generate(["w3 w4"], 0.0, 12, stop=stop)[0]  # a string is one stop, not its characters
    assert (one.text, one.token_ids) == (cut.text, cut.token_ids)
    for bad, match in (([""], "stop must be"), ([3], "stop must be")):
        with pytest.raises(ValueError, match=match):
            engine.generate(["w3 w4"], 0.0, 4, stop=bad)
    with pytest.raises(ValueError, match="system_prompt .* needs chat_template=True"):
        engine.generate(["w3 w4"], 0.0, 4, system_prompt="w9")
    with pytest.raises(ValueError, match="prompt 0: chat_template applies to text prompts"):
        engine.generate([[3, 4]], 0.0, 4, chat_template=True)


@pytest.mark.parametrize("draft", ["layers:0", "lookup"])
def test_a_stop_string_ends_on_the_same_token_with_a_draft_as_without(draft):
    """A step commits several tokens; the stop string is read after each, so the tokens past the one that completes
    it are not kept (nor streamed): the same token ids as the target alone's."""
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
    target = from_hf_model(tiny_llama_hf(vocab=64, layers=2, scale=4.0), word_tokenizer(words), eos_ids=(1,))
    engine = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k=4, max_len=64)
    full = engine.generate(["w3 w4"], 0.0, 24, speculative=False)[0].text.split()
    checked = 0
    for end in range(3, len(full)):
        stop = " ".join(full[end - 2:end + 1])
        if " ".join(full).find(stop) < " ".join(full[:end + 1]).rfind(stop):
            continue  # (it occurs earlier too)
        streamed = []
        spec = engine.generate(["w3 w4"], 0.0, 24, stop=[stop], on_tokens=lambda i, t: streamed.extend(t))[0]
        alone = engine.generate(["w3 w4"], 0.0, 24, stop=[stop], speculative=False)[0]
        assert spec.finish_reason == alone.finish_reason == "stop"
        assert (spec.token_ids, spec.text) == (alone.token_ids, alone.text) and streamed == spec.token_ids
        checked += 1
    assert checked >= 3


def test_bad_input_is_refused(target):
    engine = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, k=4, max_len=32)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], 0.0, 4)
    with pytest.raises(ValueError, match="KV-cache capacity"):
        engine.generate([[1, 2]], 0.0, 30)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1, 2]], -0.5, 4)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1, 2]], float("nan"), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2]], 0.0, 0)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], 0.0, 4)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[1, 500]], 0.0, 4)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(["text without a tokenizer"], 0.0, 4)
    with pytest.raises(ValueError, match="k must be"):
        SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, k=0)
    with pytest.raises(ValueError, match=r"prompt 0: a prompt is text or a sequence of token ids, got int 1"):
        engine.generate([1, 2], 0.0, 4)  # one prompt of ids, not in a list
    with pytest.raises(ValueError, match="prompt 1: a prompt is text"):
        engine.generate([[1, 2], None], 0.0, 4)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.generate([[1, 2]], 0.0, 4, stop=["x"])
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            engine.generate([[1, 2]], 0.0, 4, seed=seed)
    assert engine.generate([[1, 2]], 0.0, 2, seed=2**64 - 1)[0].token_ids  # the largest seed
    huge = engine.generate([[1, 2]], 1.0, 4, top_k=2**70, seed=0)[0]  # top_k past int64 keeps every token
    assert huge.token_ids == engine.generate([[1, 2]], 1.0, 4, seed=0)[0].token_ids
    kw = dict(device="cpu", dtype=torch.float32)
    for bad, match in ((dict(k=3, k_min=1), "k_min: for k='auto' only"),
                       (dict(k=3, verify_slope=0.1), "verify_slope: for k='auto' only"),
                       (dict(sync_every=4), "sync_every .* needs device_loop=True"),
                       (dict(backend="cpp"), "backend must be one of 'auto', 'torch'")):
        with pytest.raises(ValueError, match=match):
            SpeculativeEngine(target, "layers:0", **bad, **kw)


def test_tokenizer_mismatch_is_refused():
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
    target = from_hf_model(tiny_llama_hf(vocab=64, layers=2), word_tokenizer(words), eos_ids=(1,))
    shuffled = words[:2] + words[:1:-1]
    draft = from_hf_model(tiny_llama_hf(vocab=64, layers=1, seed=3), word_tokenizer(shuffled), eos_ids=(1,))
    with pytest.raises(TokenizerMismatchError, match="do not share a tokenizer"):
        SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32)
    # A draft whose vocabulary is a prefix of the target's is accepted, its logits padded with -inf.
    small = from_hf_model(tiny_llama_hf(vocab=40, layers=1, seed=3), word_tokenizer(words[:40]), eos_ids=(1,))
    engine = SpeculativeEngine(target, small, device="cpu", dtype=torch.float32, k=2, max_len=64)
    base = engine.generate([[2, 3, 4]], 0.0, 15, speculative=False)[0]
    assert engine.generate([[2, 3, 4]], 0.0, 15)[0].token_ids == base.token_ids
    # One whose vocabulary extends the target's: its extra ids are cut, never proposed to a target that lacks them.
    big = from_hf_model(tiny_llama_hf(vocab=96, layers=1, seed=3), word_tokenizer(words + [f"x{i}" for i in range(32)]),
                        eos_ids=(1,))
    engine = SpeculativeEngine(target, big, device="cpu", dtype=torch.float32, k=3, max_len=64)
    with torch.no_grad():  # a draft that favours the ids the target lacks (tied embeddings: its head is embed_tokens)
        (big.model.lm_head or big.model.embed_tokens).weight[64:] *= 20
        assert big.model(torch.tensor([[2, 3, 4]]), torch.arange(3)[None], None).argmax(-1).min() >= 64
    for temperature in (0.0, 1.0):
        out = engine.generate([[2, 3, 4]] * 4, temperature, 15, seed=0)
        assert all(max(o.token_ids) < 64 for o in out) and sum(sum(o.stats.position_proposed) for o in out) > 0
    assert engine.generate([[2, 3, 4]], 0.0, 15)[0].token_ids == base.token_ids


def test_a_transformer_target_takes_its_end_of_sequence_from_the_tokenizer():
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
    tok = word_tokenizer(words)
    loaded = from_hf_model(tiny_llama_hf(vocab=64, layers=2, scale=4.0), tok, eos_ids=(1,))
    kw = dict(device="cpu", dtype=torch.float32, max_len=32)
    first = SpeculativeEngine(loaded.model, "none", **kw).generate([[2, 3]], 0.0, 8)[0].token_ids  # no EOS known
    tok.eos_token = words[first[2]]  # the third token generated ends the text
    engine = SpeculativeEngine(loaded.model, "none", tokenizer=tok, **kw)
    assert engine.target.eos_ids == (first[2],)
    out = engine.generate([[2, 3]], 0.0, 8)[0]
    assert out.finish_reason == "eos" and out.token_ids == first[:first.index(first[2]) + 1]
    other = LoadedModel(loaded.model, None, (1,), "no tokenizer")
    SpeculativeEngine(other, "none", tokenizer=tok, **kw)
    assert other.tokenizer is None  # the caller's LoadedModel is left as it was


def test_other_architecture_through_hf_cache():
    """A non-Llama pair (GPT-2) runs through the Hugging Face cache at batch size 1, losslessly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=64, n_positions=64, n_embd=32, n_head=2)
    target = from_hf_model(GPT2LMHeadModel(GPT2Config(n_layer=2, **cfg)).eval(), None, eos_ids=())
    draft = from_hf_model(GPT2LMHeadModel(GPT2Config(n_layer=1, **cfg)).eval(), None, eos_ids=())
    engine = SpeculativeEngine(target, LoadedModel(draft.model, None, (), "gpt2-draft"), device="cpu",
                               dtype=torch.float32, k=3, max_len=64)
    prompts = [[1, 2, 3], [9]]
    base = engine.generate(prompts, 0.0, 20, speculative=False)
    spec = engine.generate(prompts, 0.0, 20)
    assert [s.token_ids for s in spec] == [b.token_ids for b in base]
    hf = target.hf_model.generate(torch.tensor([prompts[0]]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert base[0].token_ids == hf[0, 3:].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_model_objects_move_to_the_engine_device_and_dtype(device):
    """A LoadedModel built on CPU in fp32 keeps its place with device/dtype None, and is moved and cast in place when
    they are given (as nn.Module.to does), its drafts with it."""
    t = tiny_target(vocab=128, layers=2, seed=1)
    kept = SpeculativeEngine(t, "layers:0", max_len=64)
    assert kept.device.type == "cpu" and kept.dtype == torch.float32
    engine = SpeculativeEngine(t, LoadedModel(tiny_target(vocab=128, layers=1, seed=2).model, None, (), "d"),
                               device=device, dtype=torch.bfloat16, max_len=64)
    for model in (t.model, engine.draft.model):
        p = next(model.parameters())
        assert p.device.type == device and p.dtype == torch.bfloat16
    out = engine.generate([[1, 2, 3]], 0.0, 5)[0]
    assert len(out.token_ids) == 5 and out.stats.steps >= 1


@pytest.mark.parametrize("draft", ["random", "layers:0", "lookup+layers:0"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("lookahead", ["fixed", "plain steps"])
def test_draft_cache_after_rejections_equals_a_fresh_pass(draft, temperature, lookahead):
    """After decoding (with rejections, and lookup steps that leave the model's cache behind), the keys the model
    proposer counts as cached equal a fresh forward of the draft over the accepted prefix. "plain steps": k="auto"
    with a cost model that prices each verified token at 4 decodes, so that most steps run the target alone and
    every explore_every-th one drafts, re-reading what the plain steps committed."""
    target = tiny_target(vocab=32, layers=2, seed=4, scale=3.0)
    kw = dict(k=3) if lookahead == "fixed" else dict(k="auto", verify_slope=4.0)
    engine = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, max_len=96, static_shapes=True,
                               **kw)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = engine.generate([prompt], temperature, 40 if lookahead == "fixed" else 60, seed=2)[0]
    s = out.stats
    if lookahead == "fixed":
        assert s.rejections > 0 and s.plain_steps == 0
    else:  # mostly plain steps, and drafts after some of them (the model's; in the hybrid, lookup's may be all)
        drafted = s.steps - s.plain_steps
        assert s.plain_steps > 16 and (drafted if "+" in draft else drafted - s.lookup_steps) > 0
    model_proposer = getattr(engine.proposer, "model", engine.proposer)
    n = model_proposer.cached[0]
    seq = out.prompt_ids + out.token_ids
    assert 0 < n <= len(seq)
    (caches, _), = engine._static_state.values()
    fresh = engine.draft_model.model.new_cache(1, 96)
    with torch.no_grad():
        engine.draft_model.model(torch.tensor([seq[:n]]), torch.arange(n).unsqueeze(0), fresh, compute_logits=False)
    for layer in range(len(fresh.k)):
        torch.testing.assert_close(caches[1].k[layer][0, :, :n], fresh.k[layer][0, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1].v[layer][0, :, :n], fresh.v[layer][0, :, :n], atol=1e-5, rtol=1e-5)


def test_alternatives_default_follows_the_cost_of_a_wide_verification(target):
    """On a CPU a bf16 engine names no alternatives by default (a wider verification costs in proportion there, with
    tempspec's linear kernel or oneDNN's); in fp32 it names ALTERNATIVES."""
    from tempspec_engine import engine as engine_mod

    bf16 = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.bfloat16, max_len=64)
    fp32 = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, max_len=64)
    assert bf16.alternatives == 0 and not engine_mod.wide_verification_is_cheap(torch.device("cpu"), torch.bfloat16)
    assert fp32.alternatives == engine_mod.ALTERNATIVES
    assert SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.bfloat16, max_len=64,
                             alternatives=1).alternatives == 1  # an explicit choice stands


def test_alternatives_and_confidence_stop_defaults_and_refusals(target):
    """Alternatives default to ALTERNATIVES with a model draft and to none for lookup; stopping on confidence is on
    with k="auto" on the CPU. What cannot work is refused in one line."""
    from tempspec_engine.engine import ALTERNATIVES

    kw = dict(device="cpu", dtype=torch.float32, max_len=64)
    model = SpeculativeEngine(target, "layers:0", **kw)
    assert model.alternatives == ALTERNATIVES and model.confidence_stop
    assert model.lookahead == model.k_max * (1 + ALTERNATIVES)
    lookup = SpeculativeEngine(target, "lookup", **kw)
    assert lookup.alternatives == 0 and lookup.lookahead == lookup.k_max
    assert not SpeculativeEngine(target, "layers:0", k=3, **kw).confidence_stop
    assert SpeculativeEngine(target, "layers:0", alternatives=0, **kw).lookahead == 8
    with pytest.raises(ValueError, match="alternatives need a model draft"):
        SpeculativeEngine(target, "lookup", alternatives=2, **kw)
    with pytest.raises(ValueError, match="alternatives must be an integer >= 0"):
        SpeculativeEngine(target, "layers:0", alternatives=-1, **kw)
    with pytest.raises(ValueError, match="confidence_stop needs k='auto'"):
        SpeculativeEngine(target, "layers:0", k=3, confidence_stop=True, **kw)


def test_cost_model_settings_are_checked(target):
    """verify_slope (any real number type) and k_min reach the estimators; a bad one is refused in one line naming
    it and what it must be."""
    import numpy as np

    kw = dict(device="cpu", dtype=torch.float32, max_len=64)
    engine = SpeculativeEngine(target, "layers:0", verify_slope=np.float32(0.25), k_min=1, **kw)
    assert engine.verify_slope == pytest.approx(0.25) and engine.verify_beyond is None
    est = engine._new_estimators(seed=0)[0]
    assert est.k_min == 1 and est.verify_slope_prior == pytest.approx(0.25)
    for bad in (-1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="verify_slope must be a finite number >= 0"):
            SpeculativeEngine(target, "layers:0", verify_slope=bad, **kw)
    for bad in (-1, 9, 1.0):
        with pytest.raises(ValueError, match=r"k_min must be an integer in \[0, k_max = 8\]"):
            SpeculativeEngine(target, "layers:0", k_min=bad, **kw)
