"""The engine with an EAGLE-style feature draft (proposers.FeatureProposer over models/feature_draft.py): lossless
(greedy equality, chi-square per temperature group in one mixed batch), and its cache after rejections equals a
fresh pass over the accepted prefix; the same with a head that also reads tapped target blocks (EAGLE-3)."""
import pytest
import torch

pytest.importorskip("transformers")

from engine_fixtures import exact_first_two, first_two_chi_square, tiny_target  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.models.feature_draft import (FeatureDraft, FeatureDraftConfig, load_feature_draft,  # noqa: E402
                                                  save_feature_draft)
from tempspec_engine.proposers import FeatureProposer  # noqa: E402

PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13, 14, 15], [4, 4]]


def feature_head(target, seed=0, draft_vocab=None, taps=()):
    """A randomly initialized 1-layer head attached to the target (fp32): low acceptance, still lossless. With taps,
    its fuse is random too, so the tapped blocks' outputs change what it drafts."""
    torch.manual_seed(seed)
    head = FeatureDraft(FeatureDraftConfig.for_target(target.model.config, draft_vocab=draft_vocab, taps=taps))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.dim() > 1 and not name.startswith("fuse."):
                p.normal_(0, 0.05)
        if taps:  # the same head as without taps, plus a random mix of the tapped blocks' outputs
            head.fuse.weight[:, head.config.dim:].normal_(0, 0.15)
    return head.attach(target.model.embed_tokens, target.model.lm_head).eval()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("draft_vocab, taps", [(None, ()), (40, ()), (None, (1,))])
def test_greedy_sd_with_a_feature_draft_equals_the_target(batch, draft_vocab, taps):
    target = tiny_target(vocab=64, layers=3, seed=1)
    engine = SpeculativeEngine(target, feature_head(target, draft_vocab=draft_vocab, taps=taps), device="cpu",
                               dtype=torch.float32, k=3, max_len=128)
    assert isinstance(engine.proposer, FeatureProposer)
    want = engine.generate(PROMPTS, 0.0, 30, speculative=False, batch_size=batch)
    got = engine.generate(PROMPTS, 0.0, 30, batch_size=batch)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert sum(o.stats.accepted for o in got) > 0 and sum(o.stats.rejections for o in got) > 0
    assert engine.alternatives == 2 and sum(o.stats.alternative_hits for o in got) > 0  # corrections it had read


def test_feature_draft_is_lossless_per_temperature_group():
    """One batch mixing T = 0.5 and T = 1 row by row; each group's first two tokens against the target's exact joint
    distribution at its temperature (chi-square, fails below 1e-3). With 6 alternatives per position (of 16 ids) the
    second token is often the one drawn after a correction the target had read as an alternative."""
    V = 16
    target = tiny_target(vocab=V, layers=2, seed=5, scale=3.0)
    engine = SpeculativeEngine(target, feature_head(target, seed=2), device="cpu", dtype=torch.float32, k=3,
                               max_len=32, max_batch_size=1000, alternatives=6)
    prompt = [3, 1, 4, 1]
    temps = [0.5, 1.0] * 2000
    out = engine.generate([prompt] * len(temps), temps, 2, seed=7)
    for j, t in enumerate((0.5, 1.0)):
        p_value = first_two_chi_square(out[j::2], exact_first_two(target.model, prompt, t))
        assert p_value > 1e-3, (t, p_value)
        assert sum(o.stats.alternative_hits for o in out[j::2]) > 100
    assert sum(o.stats.accepted for o in out) > 0


def test_stopping_on_confidence_is_lossless_row_by_row():
    """k="auto" stops each step's drafts on the head's confidence (adaptive_k.DraftChain). At batch 1 that decision
    follows the row's own earlier tokens, and the first two tokens still follow the target's exact joint
    distribution (chi-square), with steps of several lengths. (An 8-layer target, so that a head step is cheap
    beside it, and a head made sharp by its final norm, so that it is sometimes confident.)"""
    V = 16
    target = tiny_target(vocab=V, layers=8, seed=5, scale=3.0)
    head = feature_head(target, seed=2)
    with torch.no_grad():
        head.norm.weight.mul_(4.0)
    engine = SpeculativeEngine(target, head, device="cpu", dtype=torch.float32, max_len=40)
    assert engine.confidence_stop
    prompt = [3, 1, 4, 1]
    out = engine.generate([prompt] * 1500, 1.0, 2, seed=11, batch_size=1)
    assert first_two_chi_square(out, exact_first_two(target.model, prompt, 1.0)) > 1e-3
    proposed = [sum(o.stats.position_proposed[j] for o in out) for j in range(2)]
    assert proposed[0] > proposed[1] >= 30  # some steps stopped after one draft, others went on
    assert engine.adaptive.calibration  # the head's confidence was calibrated from the accepted counts


def test_a_request_joining_late_keeps_the_head_cache_in_bounds():
    """Plain steps (a high verify_slope) pile up one row's unread features, and a step's extension pads every row to
    the most: a request that takes a freed row late, with a prompt as long as max_len allows, wrote its padding past
    the head's cache (IndexError). Its padding now stays inside, and greedy decoding still equals the target's."""
    target = tiny_target(vocab=16, layers=3, seed=1)
    engine = SpeculativeEngine(target, feature_head(target), device="cpu", dtype=torch.float32, max_len=64, k_max=2,
                               alternatives=0, verify_slope=4.0)
    prompts = [[1, 2, 3], [4, 5], [(i * 7) % 16 for i in range(64 - 8 - engine.lookahead - 1)]]
    want = engine.generate(prompts, 0.0, [45, 9, 8], batch_size=2, speculative=False)
    got = engine.generate(prompts, 0.0, [45, 9, 8], batch_size=2, seed=0)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert sum(o.stats.plain_steps for o in got) > 0 and sum(sum(o.stats.position_proposed) for o in got) > 0


def test_lookup_in_front_of_a_feature_draft(tmp_path):
    """lookup+<feature head directory>: greedy equality at batch 1 and 4, with both proposers taking part (the head
    reads the features of the tokens lookup steps committed before it drafts again)."""
    target = tiny_target(vocab=16, layers=3, seed=1)  # a small vocabulary: n-grams recur
    save_feature_draft(feature_head(target), tmp_path / "head", target_name="tiny")
    engine = SpeculativeEngine(target, f"lookup+{tmp_path / 'head'}", device="cpu", dtype=torch.float32, k=3,
                               max_len=128)
    prompts = [[p % 16 for p in prompt] for prompt in PROMPTS]
    for batch in (1, 4):
        want = engine.generate(prompts, 0.0, 40, speculative=False, batch_size=batch)
        got = engine.generate(prompts, 0.0, 40, batch_size=batch)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert 0 < sum(o.stats.lookup_steps for o in got) < sum(o.stats.steps for o in got)


@pytest.mark.parametrize("draft, taps", [("head", ()), ("lookup+head", ()), ("lookup+head", (1, 0))])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_feature_cache_after_rejections_equals_a_fresh_pass(temperature, draft, taps, tmp_path):
    """The head's cache after rejections equals a fresh pass over the accepted prefix. With taps (saved and loaded
    through a directory), the fresh pass reads the target's features with those blocks' outputs: a proposer that fed
    the head other columns, or none of them, fails here."""
    check_feature_cache_after_rejections(temperature, draft, taps, tmp_path)


@pytest.mark.parametrize("draft, temperature", [("head", 0.0), ("head", 1.0), ("lookup+head", 1.0)])
def test_feature_cache_after_steps_of_the_target_alone(temperature, draft, tmp_path):
    """Where no lookahead pays (a cost model that prices each verified token at 4 decodes), steps run the target
    alone, the head reading none of them, and now and then a step drafts (adaptive_k's exploration): the head's cache
    equals a fresh pass over the accepted prefix all the same (it read the plain steps' features before drafting)."""
    stats = check_feature_cache_after_rejections(temperature, draft, (), tmp_path, k="auto", verify_slope=4.0,
                                                 max_new=60)
    assert stats.plain_steps > 16 and stats.steps - stats.plain_steps - stats.lookup_steps > 0  # the head drafted


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("draft", ["head", "lookup+head"])
def test_greedy_sd_with_steps_of_the_target_alone_equals_the_target(batch, draft, tmp_path):
    target = tiny_target(vocab=16, layers=3, seed=1)
    save_feature_draft(feature_head(target), tmp_path / "head", target_name="tiny")
    spec = str(tmp_path / "head") if draft == "head" else f"lookup+{tmp_path / 'head'}"
    engine = SpeculativeEngine(target, spec, device="cpu", dtype=torch.float32, max_len=128, verify_slope=4.0)
    prompts = [[p % 16 for p in prompt] for prompt in PROMPTS]
    want = engine.generate(prompts, 0.0, 50, speculative=False, batch_size=batch)
    got = engine.generate(prompts, 0.0, 50, batch_size=batch, seed=0)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    plain = sum(o.stats.plain_steps for o in got)
    assert 0 < plain < sum(o.stats.steps for o in got) and sum(o.stats.position_proposed[0] for o in got) > 0


def check_feature_cache_after_rejections(temperature, draft, taps, tmp_path, max_new=40, **engine_kw):
    """The checks of the test above, with SpeculativeEngine keywords engine_kw (default k=3: then the run must have
    rejections); returns the run's RequestStats."""
    target = tiny_target(vocab=32, layers=2, seed=4, scale=3.0)
    head = feature_head(target, seed=3, taps=taps)
    if draft != "head":
        save_feature_draft(head, tmp_path / "head", target_name="tiny")
        head = load_feature_draft(tmp_path / "head", target.model)
    spec = head if draft == "head" else f"lookup+{tmp_path / 'head'}"
    engine = SpeculativeEngine(target, spec, device="cpu", dtype=torch.float32, max_len=96, static_shapes=True,
                               **{"k": 3, **engine_kw})
    head = getattr(engine.proposer, "model", engine.proposer).head
    out = engine.generate([[3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4]], temperature, max_new, seed=2)[0]
    assert out.stats.rejections > 0 or engine.k == "auto"
    seq = out.prompt_ids + out.token_ids
    # (a last step cut at max_new_tokens leaves fewer committed tokens than the proposer saw: n is then lower)
    n = getattr(engine.proposer, "model", engine.proposer).cached(0, len(seq))
    assert 0 < n < len(seq)
    (caches, _), = engine._static_state.values()
    with torch.no_grad():
        _, feats = target.model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None, compute_logits=False,
                                return_features=True, feature_taps=taps)
        fresh = head.new_cache(1, 96)
        head(head.read(feats[:, :n]), torch.tensor([seq[1:n + 1]]), torch.arange(n).unsqueeze(0), fresh, kv_len=n)
        if taps:  # the tapped columns matter: without them (zeros) the fresh cache differs
            other = head.new_cache(1, 96)
            blind = torch.cat((feats[:, :n, :head.config.dim], torch.zeros_like(feats[:, :n, head.config.dim:])), -1)
            head(head.read(blind), torch.tensor([seq[1:n + 1]]), torch.arange(n).unsqueeze(0), other, kv_len=n)
            assert not torch.allclose(other.k[0][0, :, :n], fresh.k[0][0, :, :n], atol=1e-3)
    for layer in range(len(fresh.k)):
        torch.testing.assert_close(caches[1].k[layer][0, :, :n], fresh.k[layer][0, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1].v[layer][0, :, :n], fresh.v[layer][0, :, :n], atol=1e-5, rtol=1e-5)
    # the target's cache too: every committed token but the pending one, alternatives followed included
    m = len(seq) - 1
    target_fresh = target.model.new_cache(1, 96)
    target.model(torch.tensor([seq[:m]]), torch.arange(m).unsqueeze(0), target_fresh, compute_logits=False)
    for layer in range(len(target_fresh.k)):
        torch.testing.assert_close(caches[0].k[layer][0, :, :m], target_fresh.k[layer][0, :, :m], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(caches[0].v[layer][0, :, :m], target_fresh.v[layer][0, :, :m], atol=1e-5,
                                   rtol=1e-5)
    return out.stats


def test_feature_cache_tests_follow_alternatives(tmp_path):
    """The cache test above is only as good as the alternatives it meets: in this setting the head's corrections
    hit its alternatives."""
    assert check_feature_cache_after_rejections(0.0, "head", (), tmp_path).alternative_hits > 0


@pytest.mark.skipif(not __import__("tempspec_engine.linear").linear.kernel_available(),
                    reason="the extension is not built or this CPU lacks AVX2/FMA")
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_in_bf16_equals_the_target_with_the_cpu_kernels(batch, monkeypatch):
    """With every linear layer and every few-query attention through tempspec's CPU kernels (whose rows do not depend
    on the other rows), verifying k+1 tokens computes the logits k+1 decodes compute, bit for bit: greedy SD equals
    the target alone token for token in bf16 too, not only in fp32."""
    from tempspec_engine import attention, linear

    monkeypatch.setenv("TEMPSPEC_CPU_LINEAR", "1")
    monkeypatch.setenv("TEMPSPEC_CPU_ATTENTION", "1")
    linear.cpu_kernel_max_rows.cache_clear()
    attention.cpu_attention_enabled.cache_clear()
    try:
        target = tiny_target(vocab=64, layers=3, seed=2)
        engine = SpeculativeEngine(target, feature_head(target, seed=3), device="cpu", dtype=torch.bfloat16, k=3,
                                   max_len=128)
        want = engine.generate(PROMPTS, 0.0, 40, speculative=False, batch_size=batch)
        got = engine.generate(PROMPTS, 0.0, 40, batch_size=batch)
    finally:
        monkeypatch.undo()
        linear.cpu_kernel_max_rows.cache_clear()
        attention.cpu_attention_enabled.cache_clear()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert sum(o.stats.accepted for o in got) > 0 and sum(o.stats.rejections for o in got) > 0


def test_cpu_prefill_computes_no_padding(monkeypatch):
    """On the CPU each prompt is prefilled alone (the target sees one row of len(prompt) - 1 tokens), and the text
    equals that of one right-padded batch prefill (the GPU's way) token for token, with a feature draft that reads
    the prefill's features."""
    target = tiny_target(vocab=64, layers=3, seed=4)
    engine = SpeculativeEngine(target, feature_head(target, seed=5), device="cpu", dtype=torch.float32, k=3,
                               max_len=128)
    shapes = []
    forward = target.model.forward
    monkeypatch.setattr(target.model, "forward",
                        lambda tokens, *a, **kw: shapes.append((tuple(tokens.shape), kw.get("from_start", False)))
                        or forward(tokens, *a, **kw))
    got = engine.generate(PROMPTS, 0.0, 20, batch_size=4)
    assert [s for s, prefill in shapes if prefill] == [(1, len(p) - 1) for p in PROMPTS if len(p) > 1]
    monkeypatch.setattr(engine, "_prefill_groups", lambda lens: [(0, len(lens))])
    shapes.clear()
    padded = engine.generate(PROMPTS, 0.0, 20, batch_size=4)
    assert [s for s, prefill in shapes if prefill] == [(4, max(len(p) for p in PROMPTS) - 1)]
    assert [o.token_ids for o in got] == [o.token_ids for o in padded]


@pytest.mark.parametrize("padded", [False, True])
def test_head_prefill_equals_a_fresh_pass_over_each_prompt(padded, monkeypatch):
    """FeatureProposer.start runs the head over each prompt's features right after the target's prefill (one
    right-padded pass when the rows are prefilled together, the GPU's way): its cache then holds, row by row, what a
    fresh batch-1 pass over (f_p, x_{p+1}), p < n - 1 computes, and the one feature left unread is f_{n-1}."""
    target = tiny_target(vocab=64, layers=3, seed=4)
    engine = SpeculativeEngine(target, feature_head(target, seed=6), device="cpu", dtype=torch.float32, k=3,
                               max_len=64, static_shapes=True)
    if padded:
        monkeypatch.setattr(engine, "_prefill_groups", lambda lens: [(0, len(lens))])
    proposer, seen = engine.proposer, {}
    start = proposer.start

    def start_and_look(reqs, features=None, caches=()):
        start(reqs, features, caches)
        for b, r in enumerate(reqs):
            seen[r.index] = ([(k[b].clone(), v[b].clone()) for k, v in zip(caches[0].k, caches[0].v)]
                             if caches else None, proposer.unread[r.index].clone())

    monkeypatch.setattr(proposer, "start", start_and_look)
    engine.generate(PROMPTS, 0.0, 2, batch_size=4)
    head = proposer.head
    assert sorted(seen) == list(range(len(PROMPTS)))
    for i, prompt in enumerate(PROMPTS):
        n = len(prompt) - 1
        kv, unread = seen[i]
        assert unread.shape[0] == min(n, 1)
        if n == 0:
            continue
        with torch.no_grad():
            _, feats = target.model(torch.tensor([prompt[:n]]), torch.arange(n).unsqueeze(0), None,
                                    compute_logits=False, return_features=True)
            torch.testing.assert_close(unread, feats[0, n - 1:n].to(unread.dtype), atol=1e-5, rtol=1e-5)
            if n == 1:
                continue
            fresh = head.new_cache(1, 64)
            head(head.read(feats[:, :n - 1]), torch.tensor([prompt[1:n]]), torch.arange(n - 1).unsqueeze(0), fresh,
                 kv_len=n - 1)
        for (k, v), fk, fv in zip(kv, fresh.k, fresh.v):
            torch.testing.assert_close(k[:, :n - 1], fk[0, :, :n - 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[:, :n - 1], fv[0, :, :n - 1], atol=1e-5, rtol=1e-5)
