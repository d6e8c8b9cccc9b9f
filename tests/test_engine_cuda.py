"""The engine on CUDA (skipped without a GPU): static shapes and CUDA-graph replay give the same tokens as eager
forwards, greedy SD equals greedy target-only, a draft equal to the target is always accepted, and sampled SD is
lossless (the CPU versions of these tests are in test_engine_generate.py)."""
import pytest
import torch

pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from engine_fixtures import exact_first_two, first_two_chi_square, tiny_target  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from test_engine_generate import PROMPTS  # noqa: E402


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab=128, layers=4, seed=0)


def cuda_engine(target, draft, k="auto", graphs=True, **kw):
    return SpeculativeEngine(target, draft, device="cuda", dtype=torch.float32, k=k, max_len=128,
                             cuda_graphs=graphs, **kw)


@pytest.mark.parametrize("draft", ["layers:0,3", "random", "lookup", "lookup+layers:0,3"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_with_graphs_equals_greedy_target(target, draft, batch):
    engine = cuda_engine(target, draft)
    assert engine.cuda_graphs and engine.static_shapes
    base = engine.generate(PROMPTS, 0.0, 40, speculative=False, batch_size=batch)
    eager = cuda_engine(target, draft, graphs=False).generate(PROMPTS, 0.0, 40, speculative=False, batch_size=batch)
    assert [b.token_ids for b in base] == [e.token_ids for e in eager]
    for _ in range(2):  # the second call replays the graphs captured by the first
        spec = engine.generate(PROMPTS, 0.0, [40, 7, 40, 25], batch_size=batch)
        for b, s in zip(base, spec):
            assert s.token_ids == b.token_ids[: len(s.token_ids)]
        assert [len(s.token_ids) for s in spec] == [40, 7, 40, 25]
    fixed = cuda_engine(target, draft, k=3).generate(PROMPTS, 0.0, 40, batch_size=batch)
    assert [f.token_ids for f in fixed] == [b.token_ids for b in base]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_equal_to_target_accepts_everything(target, temperature):
    out = cuda_engine(target, "layers:0-3", k=3).generate(PROMPTS, temperature, 30, batch_size=4, seed=0)
    for o in out:
        assert o.stats.rejections == 0 and o.stats.alpha == 1.0


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("draft", ["random", "layers:0"])
def test_sampled_sd_with_graphs_is_lossless(temperature, draft):
    """Chi-square of the first two tokens against the target's exact joint distribution (as on CPU)."""
    target = tiny_target(vocab=16, layers=2, seed=5, scale=3.0)
    prompt = [3, 1, 4, 1]
    expected = exact_first_two(target.model, prompt, temperature)  # before the engine moves the model to the GPU
    engine = SpeculativeEngine(target, draft, device="cuda", dtype=torch.float32, k=3, max_len=16,
                               max_batch_size=4000)
    out = engine.generate([prompt] * 4000, temperature, 2, seed=1234)
    p_value = first_two_chi_square(out, expected)
    assert p_value > 1e-3, p_value
    assert sum(o.stats.accepted for o in out) > 0


@pytest.mark.parametrize("draft", ["layers:0,3", "feature", "lookup", "lookup+layers:0,3"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_device_loop_graph_equals_eager(target, draft, temperature):
    """The device loop's captured step gives the tokens of the same step run eagerly (same seed), replayed across
    calls; greedy, the target alone's tokens; and its step can be timed by replay."""
    from test_device_loop import PROMPTS as LOOP_PROMPTS
    from test_engine_feature_draft import feature_head

    head = feature_head(target) if draft == "feature" else draft
    kw = dict(device="cuda", dtype=torch.float32, k=3, max_len=128, device_loop=True)
    graphs = SpeculativeEngine(target, head, cuda_graphs=True, **kw)
    eager = SpeculativeEngine(target, head, cuda_graphs=False, **kw)
    lengths = [40, 7, 40, 25]
    want = eager.generate(LOOP_PROMPTS, temperature, lengths, batch_size=4, seed=3)
    for _ in range(2):
        got = graphs.generate(LOOP_PROMPTS, temperature, lengths, batch_size=4, seed=3)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [len(o.token_ids) for o in got] == lengths
    if temperature == 0.0:
        alone = cuda_engine(target, "none").generate(LOOP_PROMPTS, 0.0, lengths, batch_size=4)
        assert [o.token_ids for o in got] == [o.token_ids for o in alone]
    assert graphs.device_loop.step_seconds(4, True) > 0


@pytest.mark.parametrize("draft", ["layers:0", "feature"])
def test_device_loop_with_graphs_is_lossless(draft):
    """Chi-square of the first two tokens against the target's exact joint distribution, T = 1, captured step."""
    from test_engine_feature_draft import feature_head

    target = tiny_target(vocab=16, layers=2, seed=5, scale=3.0)
    prompt = [3, 1, 4, 1]
    expected = exact_first_two(target.model, prompt, 1.0)
    head = feature_head(target, seed=2) if draft == "feature" else draft
    engine = SpeculativeEngine(target, head, device="cuda", dtype=torch.float32, k=3, max_len=16,
                               max_batch_size=4000, device_loop=True)
    assert engine.cuda_graphs
    out = engine.generate([prompt] * 4000, 1.0, 2, seed=1234)
    assert first_two_chi_square(out, expected) > 1e-3
    assert sum(o.stats.accepted for o in out) > 0


@pytest.mark.parametrize("taps", [(), (1,)])
def test_feature_head_in_the_host_loop_with_graphs(target, taps):
    """A feature head in the engine's own loop: the target's verification (with its features) replays a captured
    graph, the head's steps run eagerly; greedy SD equals the target alone, and the same seed gives the eager
    forwards' tokens at T = 1."""
    from test_engine_feature_draft import feature_head

    head = feature_head(target, taps=taps)
    engine = cuda_engine(target, head, k=3)
    assert engine.cuda_graphs and engine.alternatives == 0
    base = cuda_engine(target, "none").generate(PROMPTS, 0.0, 30, batch_size=4)
    for _ in range(2):
        spec = engine.generate(PROMPTS, 0.0, 30, batch_size=4)
        assert [s.token_ids for s in spec] == [b.token_ids for b in base]
    sampled = engine.generate(PROMPTS, 1.0, 30, batch_size=4, seed=5)
    # (without graphs the engine would name alternatives by default: they draw their own random numbers)
    eager = cuda_engine(target, head, k=3, graphs=False, alternatives=0).generate(PROMPTS, 1.0, 30, batch_size=4,
                                                                                  seed=5)
    assert [s.token_ids for s in sampled] == [e.token_ids for e in eager]


def test_device_loop_captures_its_step_again_for_the_other_filter_draft(target):
    """The captured step branches on filter_draft, so a call with the other value captures again rather than replay
    the first call's graph. A draft equal to the target at T=1 with top-k 2: filtered as the target is, it is never
    rejected; unfiltered (the serving engines' way) it is."""
    engine = cuda_engine(target, "layers:0-3", k=3, device_loop=True)
    kw = dict(top_k=2, seed=0, batch_size=4)
    filtered = engine.generate(PROMPTS, 1.0, 20, filter_draft=True, **kw)
    assert sum(o.stats.rejections for o in filtered) == 0
    unfiltered = engine.generate(PROMPTS, 1.0, 20, filter_draft=False, **kw)
    assert sum(o.stats.rejections for o in unfiltered) > 0 and not unfiltered[0].stats.filter_draft
