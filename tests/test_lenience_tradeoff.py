"""benchmarks/lenience_tradeoff.py: exact acceptance and distortion of lenient acceptance along the target's texts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine_fixtures import tiny_target  # noqa: E402
from trainer_fixtures import one_thread  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.models.draft import make_draft  # noqa: E402
from tempspec_engine.models.feature_draft import FeatureDraft, FeatureDraftConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "lenience_tradeoff.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import lenience_tradeoff as lt  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
EPS = [1.0, 0.7, 0.4]


@pytest.fixture(scope="module")
def setup():
    target = tiny_target(vocab=64, layers=2, seed=0)
    engine = SpeculativeEngine(target, "none", device="cpu", dtype=torch.float32)
    torch.manual_seed(1)
    head = FeatureDraft(FeatureDraftConfig.for_target(engine.target.model.config))
    head.attach(engine.target.model.embed_tokens, engine.target.model.lm_head)
    drafts = {"itself": make_draft("layers:0-1", engine.target, "cpu", torch.float32).model,
              "random": make_draft("random", engine.target, "cpu", torch.float32).model, "head": head.eval()}
    prompts = [[1, 2, 3], [5, 6], [7, 8, 9, 10]]
    res = lt.run_tradeoff(engine, drafts, prompts, [0.7, 1.0], EPS, 12, seed=0, chat_template=False)
    return engine, drafts, prompts, res


def test_schema_and_counts(setup):
    _, drafts, prompts, res = setup
    rows = res["results"]
    assert len(rows) == len(drafts) * 2 * len(EPS)
    for r in rows:
        assert set(r) == {"draft", "temperature", "lenience", "alpha", "alpha_se", "distortion", "distortion_se",
                          "positions"}
        assert r["positions"] == len(prompts) * 12  # one per generated token
        assert 0.0 <= r["alpha"] <= 1.0 + 1e-6 and 0.0 <= r["distortion"] <= 1.0
    json.dumps(res, allow_nan=False)


def test_the_target_as_its_own_draft_is_always_accepted_and_never_distorts(setup):
    """Alignment: a draft equal to the target gives q = p at every position, so alpha 1 and distortion 0 for
    every lenience (a shift by one position would not)."""
    for r in setup[3]["results"]:
        if r["draft"] == "itself":
            assert r["alpha"] == pytest.approx(1.0, abs=1e-5) and r["distortion"] == pytest.approx(0.0, abs=1e-5)


def test_lenience_buys_acceptance_at_a_distortion(setup):
    for name in ("random", "head"):
        for T in (0.7, 1.0):
            rows = {r["lenience"]: r for r in setup[3]["results"] if r["draft"] == name and r["temperature"] == T}
            assert rows[1.0]["distortion"] == pytest.approx(0.0, abs=1e-9)  # eps = 1: lossless
            assert rows[1.0]["alpha"] < 0.9
            assert rows[1.0]["alpha"] < rows[0.7]["alpha"] < rows[0.4]["alpha"]
            assert 0.0 < rows[0.7]["distortion"] < rows[0.4]["distortion"]


def test_position_figures_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    figs = lt.position_figures(p, q, [1.0, 0.5])
    assert float(figs[1.0][0]) == pytest.approx(0.1 + 0.1 + 0.2)  # sum min(q, p) = 1 - TV
    assert float(figs[1.0][1]) == pytest.approx(0.0, abs=1e-12)
    assert float(figs[0.5][0]) == pytest.approx(0.6)  # sum min(q, 2p)
    # emitted = (.1, .1, .4, 0) + 0.4 * (.45, .25, 0, 0) / 0.7; TV from p
    emitted = torch.tensor([0.1 + 0.4 * 0.45 / 0.7, 0.1 + 0.4 * 0.25 / 0.7, 0.4, 0.0])
    assert float(figs[0.5][1]) == pytest.approx(float(0.5 * (emitted - p[0]).abs().sum()))


def test_feature_head_rows_use_only_the_prefix(setup):
    """Row t of a feature head's teacher-forced logits comes from the features and tokens up to position t."""
    engine, drafts, _, _ = setup
    head, target = drafts["head"], engine.target.model
    seq = torch.tensor([[3, 9, 4, 1, 7, 2, 8]])

    def along(s):
        _, feats = target(s, torch.arange(s.shape[1])[None], None, return_features=True)
        return lt.draft_logits_along(head, s, feats)

    with torch.no_grad():
        full = along(seq)
        for t in (1, 3, 5):
            prefix = along(seq[:, :t + 2])
            torch.testing.assert_close(prefix[t], full[t], rtol=1e-4, atol=1e-4)
    assert full.shape == (seq.shape[1] - 1, 64)


def test_refusals():
    with pytest.raises(ValueError, match="temperatures > 0"):
        lt.run_tradeoff(None, {}, [], [0.0, 1.0], EPS, 4)
    with pytest.raises(ValueError, match="model draft"):
        lt.draft_logits_along(object(), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 4))
    for bad in ("0", "1.5", "x"):
        with pytest.raises(ValueError, match="lenience"):
            lt.parse_lenience(bad)
    assert lt.parse_lenience("0.5,1,0.5") == [1.0, 0.5]


def test_command_line_on_the_default_models(tmp_path):
    out = tmp_path / "lt.json"
    r = subprocess.run([sys.executable, SCRIPT, "--n-prompts", "2", "--max-new-tokens", "4", "--drafts", "feature:1",
                        "--temperatures", "1", "--lenience", "1,0.5", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [(x["lenience"], x["positions"]) for x in res["results"]] == [(1.0, 8), (0.5, 8)]
    assert res["meta"]["device_name"] and res["plot"] == "lt.png" and (tmp_path / "lt.png").stat().st_size > 1000
    for args in (["--temperatures", "0"], ["--drafts", "lookup"], ["--lenience", "2"]):
        bad = subprocess.run([sys.executable, SCRIPT, "--n-prompts", "1", "--max-new-tokens", "2", "--threads", "1",
                              "--out", str(tmp_path / "x.json"), *args], capture_output=True, text=True)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
