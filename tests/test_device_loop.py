"""The device loop (tempspec_engine/device_loop.py), run eagerly on CPU (the same step is captured on CUDA:
test_engine_cuda.py): greedy decoding equals the engine's own target-only decoding with a Transformer draft, a feature
head, a token-mapped head and a tapped one, at batch 1 and 4 with EOS and per-row max_new_tokens; sampled decoding is
lossless per temperature group in one mixed batch, with top-k and top-p too (chi-square on the first two tokens);
n-gram lookup on the device proposes what the host's rule (LookupDraft) proposes, and decodes losslessly, alone and
in front of a model draft or a feature head; the same seed gives the same tokens; and what it cannot do is refused
with one clear error."""
import pytest
import torch

pytest.importorskip("transformers")

from engine_fixtures import exact_first_two, first_two_chi_square, tiny_target  # noqa: E402
from test_engine_feature_draft import feature_head  # noqa: E402
from tempspec_engine.device_loop import _Lookup, _State  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.models.draft import make_lookup  # noqa: E402
from tempspec_engine.models.lookup_draft import LookupDraft  # noqa: E402

PROMPTS = [[1, 2, 3], [5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15], [4, 4]]


def loop_engine(target, draft, **kw):
    kw = dict(device="cpu", dtype=torch.float32, k=3, max_len=96, device_loop=True, **kw)
    return SpeculativeEngine(target, draft, **kw)


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab=64, layers=3, seed=1)


def drafts(target):
    return {"layers:0": "layers:0", "feature": feature_head(target), "feature/vocab:40": feature_head(target,
            draft_vocab=40), "feature+taps": feature_head(target, taps=(1,)), "lookup": "lookup",
            "lookup+layers:0": "lookup+layers:0"}


def loop_engine_for(target, name, **kw):
    """loop_engine with drafts(target)[name], or, for "lookup+feature", lookup in front of a feature head object (a
    spec names only shipped heads), as SpeculativeEngine does for "lookup+feature:1": self.lookup with min_ngram 2."""
    if name != "lookup+feature":
        return loop_engine(target, drafts(target)[name], **kw)
    engine = loop_engine(target, feature_head(target), **kw)
    engine.lookup = make_lookup("lookup", target.model.config.vocab_size, min_ngram=2)
    return engine


@pytest.mark.parametrize("name", ["layers:0", "feature", "feature/vocab:40", "feature+taps", "lookup",
                                  "lookup+layers:0", "lookup+feature"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_device_loop_equals_the_target(target, name, batch):
    plain = SpeculativeEngine(target, "none", device="cpu", dtype=torch.float32, max_len=96)
    want = plain.generate(PROMPTS, 0.0, [30, 12, 30, 21], batch_size=batch)
    engine = loop_engine_for(target, name)
    got = engine.generate(PROMPTS, 0.0, [30, 12, 30, 21], batch_size=batch)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == ["length"] * 4
    assert sum(o.stats.accepted for o in got) > 0 and sum(o.stats.rejections for o in got) > 0
    # no step runs after a wave's last row is done (no EOS here): the host reads the state early enough
    waves = [got[i:i + batch] for i in range(0, len(got), batch)]
    assert engine.device_loop.timing.steps == sum(max(o.stats.steps for o in w) for w in waves)
    assert all(o.stats.prefill_time_s > 0 for o in got)  # each wave's prefill, shared by its rows
    alone = engine.generate(PROMPTS, 0.0, [30, 12, 30, 21], batch_size=batch, speculative=False)
    assert [o.token_ids for o in alone] == [o.token_ids for o in want]
    assert all(o.stats.plain_steps == o.stats.steps == len(o.token_ids) for o in alone)
    assert engine.device_loop.timing.steps == sum(max(len(o.token_ids) for o in alone[i:i + batch])
                                                  for i in range(0, len(alone), batch))
    assert engine.device_loop.timing.syncs > 0


@pytest.mark.parametrize("name", ["layers:0", "feature", "feature+taps"])
@pytest.mark.parametrize("batch", [1, 4])
def test_drafts_what_the_engine_drafts(target, name, batch):
    """Greedy, the loop's draft state (a Transformer draft's window, a head's unread features and cache positions)
    gives the very proposals of the engine's own proposers at the same k: the same draft distributions step by step
    (batch 1) and the same accepted counts, request by request."""
    draft = drafts(target)[name]
    engine = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k=3, max_len=96, alternatives=0)
    loop = loop_engine(target, draft, sync_every=1)  # (no step runs after the last row is done)
    want_q, got_q = [], []
    propose = engine.proposer.propose
    engine.proposer.propose = lambda *a: (lambda p: want_q.append(p.logits) or p)(propose(*a))
    want = engine.generate(PROMPTS, 0.0, 30, batch_size=batch)
    got = loop.generate(PROMPTS, 0.0, 30, batch_size=batch)  # (captures the loop's decoder for this width)
    decoder = loop.device_loop._decoders[(batch, True)]
    loop_propose = decoder._propose
    decoder._propose = lambda u: (lambda r: got_q.append(r[0]) or r)(loop_propose(u))
    assert [o.token_ids for o in loop.generate(PROMPTS, 0.0, 30, batch_size=batch)] == [o.token_ids for o in got]
    def counts(o):
        s = o.stats
        return s.steps, s.accepted, s.rejections, s.position_proposed, s.position_accepted, s.position_reached

    assert [counts(o) for o in got] == [counts(o) for o in want]
    if batch == 1:  # the loop runs every wave's steps of one request in order, as the engine does
        assert len(got_q) == len(want_q) > 20
        for w, g in zip(want_q, got_q):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_lookup_proposes_what_the_host_rule_proposes():
    """The device search (_Lookup) against LookupDraft.propose_row on random rows with many repeats: whether a tail
    matched, and the k tokens (a shorter run repeats its last token; no match: the last token k times)."""
    g = torch.Generator().manual_seed(0)
    B, max_len, k = 64, 40, 4
    for min_ngram in (1, 2):
        lookup = LookupDraft(5, max_ngram=3, min_ngram=min_ngram)
        state = _State(B, max_len, k, torch.device("cpu"))
        lengths = torch.randint(2, max_len + 1, (B,), generator=g)
        state.seq[:, :max_len] = torch.randint(0, 5, (B, max_len), generator=g)
        state.seq[:, max_len] = 7  # (the column that takes writes landing nowhere is never read)
        state.length.copy_(lengths)
        found, tokens = _Lookup(lookup).propose(state, k)
        for b in range(B):
            row = state.seq[b, :lengths[b]].tolist()
            want = lookup.propose_row(row, k)
            assert bool(found[b]) == bool(want)
            want = (want + [want[-1] if want else row[-1]] * k)[:k]
            assert tokens[b].tolist() == want, (b, row)
        assert 0 < int(found.sum()) < B


def test_eos_ends_a_row_within_a_step(target):
    """The first EOS among a step's received tokens ends the row there (the tokens after it are dropped)."""
    plain = SpeculativeEngine(target, "none", device="cpu", dtype=torch.float32, max_len=96)
    free = plain.generate(PROMPTS, 0.0, 30)
    eos = free[2].token_ids[9]  # a token row 2 produces mid-way
    target.eos_ids = (eos,)
    try:
        want = SpeculativeEngine(target, "none", device="cpu", dtype=torch.float32, max_len=96).generate(
            PROMPTS, 0.0, 30)
        got = loop_engine(target, feature_head(target)).generate(PROMPTS, 0.0, 30)
    finally:
        target.eos_ids = ()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert got[2].finish_reason == "eos" and got[2].token_ids[-1] == eos


@pytest.mark.parametrize("draft, filters", [(d, f) for d in ("layers:0", "feature") for f in (
    {}, {"top_k": 5}, {"top_p": 0.8})] + [("lookup", {}), ("lookup+layers:0", {}), ("lookup+layers:0", {"top_k": 5})])
def test_sampled_device_loop_is_lossless_per_temperature_group(draft, filters):
    """One batch mixing T = 0.5 and T = 1 row by row; each group's first two tokens against the target's exact
    (filtered) joint distribution at its temperature (chi-square, fails below 1e-3). With lookup the prompt's tail
    [3, 1] occurred earlier, so the first step verifies the lookup's one-hot proposal [4, 3, 1]."""
    V = 16
    target = tiny_target(vocab=V, layers=2, seed=5, scale=3.0)
    head = feature_head(target, seed=2) if draft == "feature" else draft
    engine = SpeculativeEngine(target, head, device="cpu", dtype=torch.float32, k=3, max_len=16,
                               max_batch_size=1000, device_loop=True)
    prompt = [3, 1, 4, 3, 1] if draft.startswith("lookup") else [3, 1, 4, 1]
    temps = [0.5, 1.0] * 1500
    out = engine.generate([prompt] * len(temps), temps, 2, seed=7, **filters)
    for j, t in enumerate((0.5, 1.0)):
        p_value = first_two_chi_square(out[j::2], exact_first_two(target.model, prompt, t, **filters))
        assert p_value > 1e-3, (t, p_value)
    assert sum(o.stats.accepted for o in out) > 0 and sum(o.stats.rejections for o in out) > 0


def test_the_same_seed_gives_the_same_tokens(target):
    engine = loop_engine(target, feature_head(target))
    a, b, c = (engine.generate(PROMPTS, 1.0, 20, seed=s) for s in (3, 3, 4))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


@pytest.mark.parametrize("kw, message", [
    (dict(draft="lookup", k="auto"), "fixed k"),
    (dict(draft="layers:0", k="auto"), "fixed k"),
    (dict(draft="layers:0", alternatives=2), "alternatives must be 0"),
    (dict(draft="layers:0", static_shapes=False), "static shapes"),
    (dict(draft="layers:0", sync_every=0), "sync_every"),
])
def test_what_it_cannot_do_is_refused(target, kw, message):
    draft = kw.pop("draft")
    with pytest.raises(ValueError, match=message):
        SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, max_len=96,
                          **{"k": 3, "device_loop": True, **kw})


def test_stop_strings_and_one_token_prompts_are_refused(target):
    engine = loop_engine(target, "layers:0")
    with pytest.raises(ValueError, match="stop strings"):
        engine.generate(PROMPTS, 0.0, 5, stop=["x"])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        engine.generate([[5]], 0.0, 5)


@pytest.mark.parametrize("broken", ["target", "draft"])
def test_nan_logits_end_in_one_error(broken):
    """NaN logits from either model are caught at the next host read (the flag rides along), not sampled from."""
    target = tiny_target(vocab=64, layers=3, seed=1)
    head = feature_head(target)
    with torch.no_grad():
        (head if broken == "draft" else target.model).norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        loop_engine(target, head).generate(PROMPTS, 1.0, 10, seed=0)
