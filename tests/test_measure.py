"""tempspec_engine/measure.py, run_meta.py and results.write_json on tiny random models: the summed figures of a timed
generate() call, its draft/target seconds counting every engine step once (rows that end at different steps, more
prompts than rows), bench_engine using the same rule, the counts per draft position and the standard error of alpha,
prefill charged apart from the steps, the metadata keys and the JSON writer."""
import datetime
import importlib.util
import itertools
import json
import math
import os
import types

import pytest
import torch

pytest.importorskip("transformers")

from engine_fixtures import tiny_target  # noqa: E402
from trainer_fixtures import one_thread  # noqa: E402
from tempspec_engine import engine as engine_mod  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.measure import (COUNTS, POSITION_COUNTS, acceptance_by_position, add_figures,  # noqa: E402
                                     alpha_se, charge_prefill, decode_seconds, speedup_interval, step_times,
                                     timed_generate)
from tempspec_engine.models.feature_draft import FeatureDraft, FeatureDraftConfig  # noqa: E402
from tempspec_engine.results import write_json  # noqa: E402
from tempspec_engine.run_meta import collect_meta  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10], [4, 4], [11, 12]]


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab=64, layers=2, seed=0)


@pytest.fixture
def step_log(monkeypatch):
    """Gives each timed engine step distinct integer durations (float sums stay exact) and logs them, one
    (draft s, target s) per engine step (draft 0 for a step of the target alone)."""
    log, counter = [], itertools.count(1)

    def seconds(self):
        values = [float(next(counter)) for _ in self.marks[1:]]
        log.append(tuple(values) if len(values) == 2 else (0.0, values[0]))
        return values

    monkeypatch.setattr(engine_mod._Timer, "seconds", seconds)
    return log


def make_engine(target, draft="layers:0", static_shapes=False):
    return SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k=2, max_batch_size=4, max_len=64,
                             static_shapes=static_shapes)


def check_each_step_once(figures, log):
    assert figures["engine_steps"] == len(log)
    assert figures["draft_time_s"] == sum(d for d, _ in log)
    assert figures["target_time_s"] == sum(t for _, t in log)


def test_sums_equal_the_outputs_stats(target):
    eng = make_engine(target)
    outs, fig = timed_generate(eng, PROMPTS, 1.0, 9, batch_size=2, seed=3)
    stats = [o.stats for o in outs]
    assert fig["tokens"] == sum(s.new_tokens for s in stats) == 9 * len(PROMPTS)
    for key in COUNTS:
        assert fig[key] == sum(getattr(s, key) for s in stats), key
    assert fig["steps"] >= len(PROMPTS) and fig["accepted"] + fig["rejections"] > 0 and fig["seconds"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in eng.generate(PROMPTS, 1.0, 9, batch_size=2, seed=3)]


@pytest.mark.parametrize("draft, static_shapes", [("layers:0", False), ("layers:0", True), ("lookup", False)])
def test_one_batch_row_zero_ends_first(target, step_log, draft, static_shapes):
    """All prompts in one batch; row 0 ends after its first step, the others later: each step is counted once."""
    eng = make_engine(target, draft, static_shapes)
    outs, fig = timed_generate(eng, PROMPTS[:3], 0.0, [1, 12, 7], batch_size=3, seed=0)
    assert outs[0].stats.steps == 1 < min(o.stats.steps for o in outs[1:])
    check_each_step_once(fig, step_log)
    assert fig["target_time_s"] == max(o.stats.target_time_s for o in outs)  # the last row took part in every step
    assert outs[0].stats.target_time_s < fig["target_time_s"]  # row 0 alone undercounts


@pytest.mark.parametrize("draft, static_shapes, speculative", [("layers:0", False, True), ("layers:0", True, True),
                                                              ("lookup", False, True), ("none", False, False)])
def test_more_prompts_than_rows(target, step_log, draft, static_shapes, speculative):
    """5 prompts on 2 rows: queued requests take the rows that free up; the row that ends last covers every step."""
    eng = make_engine(target, draft, static_shapes)
    outs, fig = timed_generate(eng, PROMPTS, 0.0, [1, 6, 12, 12, 12], batch_size=2, seed=0, speculative=speculative)
    check_each_step_once(fig, step_log)
    assert max(o.stats.target_time_s for o in outs) < fig["target_time_s"]  # no single request ran throughout
    assert sum(o.stats.target_time_s for o in outs) > fig["target_time_s"]  # shared steps counted once
    if not speculative:
        assert fig["draft_time_s"] == 0 and fig["plain_steps"] == fig["steps"] == 43


@pytest.mark.parametrize("draft, speculative", [("feature", True), ("layers:0", True), ("none", False)])
def test_prefill_time_counts_each_prefill_once(target, draft, speculative):
    """5 prompts on 2 rows (queued requests prefilled as rows free up): prefill_time_s is the sum over requests, every
    prompt of 2+ tokens was charged, a one-token prompt (nothing to prefill) was not, and prefill lies outside the
    steps' time within the call's wall seconds ("feature": a head that reads the target's features at prefill)."""
    if draft == "feature":
        draft = FeatureDraft(FeatureDraftConfig.for_target(target.model.config)).attach(
            target.model.embed_tokens, target.model.lm_head).eval()
    eng = make_engine(target, draft)
    outs, fig = timed_generate(eng, PROMPTS, 0.0, 6, batch_size=2, seed=0, speculative=speculative)
    stats = [o.stats for o in outs]
    assert fig["prefill_time_s"] == sum(s.prefill_time_s for s in stats)
    assert [s.prefill_time_s > 0 for s in stats] == [len(p) > 1 for p in PROMPTS]
    assert fig["prefill_time_s"] + fig["draft_time_s"] + fig["target_time_s"] <= fig["seconds"]
    assert decode_seconds(fig) == fig["seconds"] - fig["prefill_time_s"] and decode_seconds({"seconds": 1.0}) is None


def test_one_prefill_of_several_rows_is_shared_by_prompt_tokens(target, monkeypatch):
    """A prefill of several rows (a GPU's: _prefill_groups) charges each request its share of prompt[:-1] tokens; a
    clock that ticks 1 s per reading makes the prefill take exactly 1 s."""
    ticks = itertools.count()
    monkeypatch.setattr(engine_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    monkeypatch.setattr(SpeculativeEngine, "_prefill_groups", lambda self, lens: [(0, len(lens))])
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]  # 2, 3 and 1 tokens to prefill
    outs = make_engine(target).generate(prompts, 0.0, 4, batch_size=3, seed=0)
    assert [o.stats.prefill_time_s for o in outs] == [2 / 6, 3 / 6, 1 / 6]
    stats = [types.SimpleNamespace(prefill_time_s=0.0) for _ in range(2)]
    charge_prefill(stats, [0, 0], 3.0)  # no prompt tokens at all: equal shares
    assert [s.prefill_time_s for s in stats] == [1.5, 1.5]


def test_step_times_lanes():
    """Lanes rebuilt from step counts: width 1 sums, one batch takes the last row, a queue joins freed rows."""
    class S:
        def __init__(self, steps):
            self.steps, self.draft_time_s, self.target_time_s = steps, 0.5 * steps, float(steps)

    rows = [S(1), S(4), S(2), S(3)]
    assert step_times(rows, 1) == (10, 5.0, 10.0)
    assert step_times(rows, 4) == (4, 2.0, 4.0)
    assert step_times(rows, 2) == (6, 3.0, 6.0)  # rows: [1 + 2 + 3] and [4]; the 3 joins the first free row at 4


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_engine", os.path.join(ROOT, "benchmarks", "bench_engine.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_engine_uses_the_rule(target, step_log):
    bench = load_bench()
    res = bench.run_engine(make_engine(target), PROMPTS[:3], 0.0, [1, 12, 7], 3, True, 0)
    check_each_step_once(res, step_log)
    assert res["tokens"] == 20 and {"steps", "accepted", "rejections", "lookup_steps", "plain_steps"} <= set(res)


def test_bench_engine_parses_variants():
    """--variants: each ';'-separated label becomes the engine keywords it names, typed; a wrong key, a value of the
    wrong kind and a device loop without a fixed k are refused naming the label."""
    bench = load_bench()
    got = bench.parse_variants("alternatives=0,confidence_stop=0; k_min=1 ;verify_slope=0.12;device_loop=1,k=4")
    assert got == {"alternatives=0,confidence_stop=0": {"alternatives": 0, "confidence_stop": False},
                   "k_min=1": {"k_min": 1}, "verify_slope=0.12": {"verify_slope": 0.12},
                   "device_loop=1,k=4": {"device_loop": True, "k": 4}}
    assert bench.parse_variants("") == {}
    for text, word in (("kmin=1", "KEY one of"), ("k_min=one", "k_min needs an integer"),
                       ("verify_slope=x", "verify_slope needs a number"), ("device_loop=1", "needs a fixed k")):
        with pytest.raises(ValueError, match=word):
            bench.parse_variants(text)


def test_bench_engine_says_what_transformers_cannot_run(target):
    """Prompt lookup and a full-vocabulary model draft have transformers counterparts; the hybrid, a restricted
    vocabulary and a feature head do not, each with its reason (recorded even when the HF baselines are skipped)."""
    from tempspec_engine.models.feature_draft import FeatureDraft, FeatureDraftConfig

    bench = load_bench()
    head = FeatureDraft(FeatureDraftConfig.for_target(target.model.config)).attach(target.model.embed_tokens,
                                                                                target.model.lm_head)
    drafts = {"lookup": "lookup", "layers:0": "layers:0", "layers:0/vocab:32": "layers:0/vocab:32",
              "lookup+layers:0": "lookup+layers:0", "feature": head}
    runnable, not_run = bench.hf_counterparts({f"tempspec_sd[{name}]": make_engine(target, d)
                                               for name, d in drafts.items()})
    assert runnable["hf_assisted[lookup]"] == "lookup" and set(runnable) == {"hf_assisted[lookup]",
                                                                             "hf_assisted[layers:0]"}
    assert runnable["hf_assisted[layers:0]"].n_layers == 1
    assert set(not_run) == {"layers:0/vocab:32", "lookup+layers:0", "feature"}
    assert "hybrid" in not_run["lookup+layers:0"] and "/vocab:N" in not_run["layers:0/vocab:32"]
    assert "EAGLE-style head" in not_run["feature"]


def check_positions(proposed, accepted, reached, n_accepted, n_rejections, speculative_steps, k_max):
    """The per-position counts of one request, or summed over several."""
    assert len(proposed) == len(accepted) == len(reached) == k_max
    assert sum(accepted) == n_accepted
    assert sum(reached) == n_accepted + n_rejections  # each step decides its accepted positions and first rejection
    assert proposed[0] == reached[0] == speculative_steps  # every step with a proposal proposed position 0
    assert all(a <= r <= p for a, r, p in zip(accepted, reached, proposed))
    assert all(r <= a for r, a in zip(reached[1:], accepted))  # reaching position i+1 needs position i accepted
    assert all(x >= y for x, y in zip(proposed, proposed[1:]))  # proposing position i+1 means proposing i


@pytest.mark.parametrize("draft", ["layers:0", "lookup", "lookup+layers:0"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("temperature, k", [(0.0, "auto"), (1.0, "auto"), (1.0, 3)])
def test_counts_by_draft_position(target, draft, batch, temperature, k):
    """position_proposed / position_accepted per request and summed by timed_generate: consistent with the accepted
    count and the steps that proposed; adaptive k (k_max 4) and lookup matches make steps of several lengths."""
    eng = SpeculativeEngine(target, draft, device="cpu", dtype=torch.float32, k=k, k_max=4, max_batch_size=3,
                            max_len=64)
    k_max = eng.k_max
    outs, fig = timed_generate(eng, PROMPTS, temperature, [10, 14, 6, 12, 9], batch_size=batch, seed=1)
    for o in outs:
        s = o.stats
        check_positions(s.position_proposed, s.position_accepted, s.position_reached, s.accepted, s.rejections,
                        s.steps - s.plain_steps, k_max)
        assert s.acceptance_by_position == [a / p if p else None for a, p in zip(s.position_accepted,
                                                                                s.position_proposed)]
        assert s.conditional_acceptance_by_position == [a / r if r else None for a, r in zip(s.position_accepted,
                                                                                            s.position_reached)]
        assert s.as_dict()["acceptance_by_position"] == s.acceptance_by_position
        assert s.as_dict()["conditional_acceptance_by_position"] == s.conditional_acceptance_by_position
    for key in POSITION_COUNTS:
        assert fig[key] == [sum(col) for col in zip(*(getattr(o.stats, key) for o in outs))], key
    check_positions(fig["position_proposed"], fig["position_accepted"], fig["position_reached"], fig["accepted"],
                    fig["rejections"], fig["steps"] - fig["plain_steps"], k_max)
    assert fig["position_proposed"][0] > 0
    if draft == "layers:0":  # a model draft proposes at every step that does not run the target alone
        assert fig["position_proposed"][0] == fig["steps"] - fig["plain_steps"]


def test_reached_positions(target):
    """A draft equal to the target reaches and passes every position it proposes; a poor one reaches position i+1
    only after accepting position i, so its conditional acceptance differs from the share of proposals accepted."""
    full = SpeculativeEngine(target, f"layers:0-{target.model.n_layers - 1}", device="cpu", dtype=torch.float32,
                             k=3, max_len=64)
    outs, fig = timed_generate(full, PROMPTS[:2], 0.0, 9, batch_size=2)
    assert fig["position_reached"] == fig["position_proposed"] == fig["position_accepted"]
    assert all(x == 1.0 for x in outs[0].stats.conditional_acceptance_by_position if x is not None)
    poor = SpeculativeEngine(target, "random", device="cpu", dtype=torch.float32, k=3, max_len=64)
    _, fig = timed_generate(poor, PROMPTS, 1.0, 12, batch_size=1, seed=0)
    assert fig["position_reached"][0] == fig["position_proposed"][0] > fig["position_reached"][1]
    assert fig["position_reached"][1] == fig["position_accepted"][0]  # k = 3 fixed: position 1 follows position 0


def test_target_only_has_no_positions(target):
    outs, fig = timed_generate(make_engine(target, "none"), PROMPTS[:2], 0.0, 5, batch_size=2, speculative=False)
    assert fig["position_proposed"] == fig["position_accepted"] == [0, 0]  # k=2: k_max 2
    assert outs[0].stats.acceptance_by_position == [None, None]


def test_alpha_se_and_acceptance_by_position_by_hand():
    assert alpha_se(3, 1) == math.sqrt(0.75 * 0.25 / 4)
    assert alpha_se(2, 2) == 0.25  # sqrt(0.5 * 0.5 / 4)
    assert alpha_se(5, 0) == 0.0 and alpha_se(0, 7) == 0.0
    assert alpha_se(0, 0) is None
    # clustered by request: two prompts that accept all and none are a spread the binomial error does not see
    assert alpha_se(10, 10, [[10, 0], [0, 10]]) == math.sqrt(2 * (5 ** 2 + 5 ** 2)) / 20 > alpha_se(10, 10)
    assert alpha_se(3, 1, [[3, 1], [0, 0]]) == alpha_se(3, 1)  # one judged request: the binomial error
    assert alpha_se(4, 4, [[2, 2], [2, 2]]) == 0.0  # requests that agree exactly
    assert acceptance_by_position([3, 1, 0, 0], [4, 2, 1, 0]) == [0.75, 0.5, 0.0, None]
    assert acceptance_by_position([], []) == []
    total = {}
    add_figures(total, {"steps": 2, "position_proposed": [2, 1], "seconds": 0.5, "by_request": [[1, 1]]})
    add_figures(total, {"steps": 3, "position_proposed": [3, 2, 1], "seconds": 0.25, "by_request": [[2, 0], [0, 1]]})
    assert total == {"steps": 5, "position_proposed": [5, 3, 1], "seconds": 0.75,
                     "by_request": [[1, 1], [2, 0], [0, 1]]}  # the requests' pairs joined, not summed


def test_speedup_interval():
    # every chunk 1.5x faster: the interval is that one value
    base = [(64, 2.0), (64, 3.0), (32, 1.0)]
    sd = [(64, 2.0 / 1.5), (64, 3.0 / 1.5), (32, 1.0 / 1.5)]
    lo, hi = speedup_interval(sd, base)
    assert lo == pytest.approx(1.5) and hi == pytest.approx(1.5)
    # noisy chunks with a true speedup of 1.3: the interval holds it, is deterministic for a seed, widens with level
    gen = torch.Generator().manual_seed(0)
    noise = 1.0 + 0.2 * torch.randn(40, generator=gen)
    base = [(64, 2.0) for _ in range(40)]
    sd = [(64, 2.0 / 1.3 * float(x)) for x in noise]
    ci = speedup_interval(sd, base)
    assert ci[0] < 1.3 < ci[1] and ci[1] - ci[0] < 0.3
    assert speedup_interval(sd, base) == ci and speedup_interval(sd, base, seed=1) != ci
    wide = speedup_interval(sd, base, level=0.99)
    assert wide[0] <= ci[0] and wide[1] >= ci[1]
    # the point estimate (ratio of sums) lies inside
    point = (sum(t for t, _ in sd) / sum(s for _, s in sd)) / (64 * 40 / (2.0 * 40))
    assert ci[0] <= point <= ci[1]
    assert speedup_interval(sd[:1], base[:1]) is None  # one chunk: no spread to resample
    assert speedup_interval([(5, 0.0), (5, 1.0)], [(5, 1.0), (5, 1.0)]) is None
    with pytest.raises(ValueError, match="chunks"):
        speedup_interval(sd, base[:3])


def test_bench_engine_summary_keys():
    bench = load_bench()
    sums = {"tokens": 12, "seconds": 2.0, "steps": 4, "accepted": 6, "rejections": 2, "lookup_steps": 0,
            "alternative_hits": 1, "plain_steps": 1, "draft_time_s": 0.5, "target_time_s": 1.0, "position_proposed": [3, 3, 2, 0],
            "position_accepted": [3, 2, 1, 0], "position_reached": [3, 3, 2, 0]}
    res = bench.summarize(sums, True)
    assert "decode_tokens_per_s" not in res  # figures without prefill_time_s (Hugging Face's)
    res = bench.summarize({**sums, "prefill_time_s": 0.5}, True)
    assert res["decode_tokens_per_s"] == 12 / 1.5 and res["prefill_time_s"] == 0.5
    assert res["alpha"] == 0.75 and res["alpha_se"] == math.sqrt(0.75 * 0.25 / 8)  # no requests' counts: binomial
    clustered = bench.summarize({**sums, "by_request": [[4, 0], [2, 2]]}, True)
    assert clustered["alpha_se"] == math.sqrt(2 * ((4 - 3) ** 2 + (2 - 3) ** 2)) / 8
    assert clustered["by_request"] == [[4, 0], [2, 2]]
    assert res["acceptance_by_position"] == [1.0, 2 / 3, 0.5, None]
    assert res["conditional_acceptance_by_position"] == [1.0, 2 / 3, 0.5, None]
    assert res["position_reached"] == [3, 3, 2, 0]
    assert res["position_proposed"] == [3, 3, 2, 0] and res["position_accepted"] == [3, 2, 1, 0]
    assert {"tokens_per_s", "mean_accepted", "tokens_per_step", "lookup_step_share", "plain_step_share"} <= set(res)
    assert res["alternative_hit_share"] == 0.25
    base = bench.summarize({**sums, "accepted": 0, "rejections": 0, "plain_steps": 4,
                            "position_proposed": [0] * 4, "position_accepted": [0] * 4}, False)
    assert base["alpha"] is None and base["alpha_se"] is None
    json.dumps(res, allow_nan=False)


def test_collect_meta_keys():
    meta = collect_meta("cpu")
    assert {"device_name", "cpu", "cpu_count", "torch_threads", "platform", "versions", "command", "date"} <= set(meta)
    assert {"python", "torch", "tempspec"} <= set(meta["versions"])
    assert meta["device_name"] == meta["cpu"] and "cuda" not in meta
    assert ("loadavg" in meta) == hasattr(os, "getloadavg")
    assert isinstance(meta["cpu_linear_kernel"], bool) and isinstance(meta["onednn_bf16"], bool)
    assert isinstance(meta["cpu_attention_kernel"], bool) and isinstance(meta["cpu_layer_ops"], bool)
    rows = meta["cpu_linear_kernel_max_rows"]
    assert rows == "all" or (isinstance(rows, int) and (rows > 0) == meta["cpu_linear_kernel"])
    assert meta["cpu_linear_kernel_isa"] in (("avx2", "avx512bf16") if meta["cpu_linear_kernel"] else (None,))
    assert datetime.datetime.fromisoformat(meta["date"]).utcoffset() == datetime.timedelta(0)
    json.dumps(meta, allow_nan=False)


def test_write_json(tmp_path):
    path = write_json({"a": [1, 2], "b": None}, tmp_path / "new" / "dir" / "r.json")
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"a": [1, 2], "b": None} and '\n "a"' in text
    assert write_json({"a": 1}, path, indent=2).read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no .tmp left


def test_write_json_writes_nan_and_infinities_as_null(tmp_path):
    """A one-row standard error (nan) or an alpha of no drafts is written as null: standard JSON, which strict
    parsers (JavaScript's JSON.parse, jq) read; Python's json would otherwise write the non-standard NaN."""
    obj = {"se": float("nan"), "rows": [1.5, float("inf"), -float("inf")], "t": (0.5, float("nan")), "n": 3}
    text = write_json(obj, tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"se": None, "rows": [1.5, None, None], "t": [0.5, None], "n": 3}
    assert math.isnan(obj["se"])  # the caller's object is left as it was
