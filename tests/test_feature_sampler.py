"""On-policy samples of a feature head (tempspec_trainer/feature_sampler.py): greedy rows, batched with ragged prompts,
equal a cache-free rollout of the head; sampled rows follow the exact joint law of the first two tokens (the
target's first token, then the head's); `tempspec-train gen-data --generator <feature head>` writes them."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from engine_fixtures import first_two_chi_square, tiny_target  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.models.feature_draft import save_feature_draft  # noqa: E402
from tempspec_trainer.feature_sampler import FeatureDraftSampler  # noqa: E402
from test_engine_feature_draft import feature_head  # noqa: E402

PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13, 14, 15], [4, 4]]


def sampler(target, head, max_len=96):
    engine = SpeculativeEngine(target, head, device="cpu", dtype=torch.float32, max_len=max_len)
    return FeatureDraftSampler(engine, "head")


@torch.no_grad()
def head_rollout(target, head, prompt, n):
    """The greedy response, recomputed from scratch at every step without caches: the target's argmax after the
    prompt, then the head over [target features of the prompt, its own predictions] (causal, cache=None)."""
    model = target.model
    P = len(prompt)
    _, wide = model(torch.tensor([prompt]), torch.arange(P).unsqueeze(0), None, compute_logits=False,
                    return_features=True, feature_taps=head.config.taps)
    x = int(model.head_logits(wide[0, -1, :head.config.dim]).argmax())
    features, tokens, out = list(head.read(wide)[0]), prompt[1:] + [x], [x]
    for _ in range(n - 1):
        T = len(tokens)
        pred = head(torch.stack(features).unsqueeze(0), torch.tensor([tokens]), torch.arange(T).unsqueeze(0),
                    None)[0, -1]
        y = int(head.logits(pred).argmax())
        out.append(y)
        features.append(pred)
        tokens.append(y)
    return out


@pytest.mark.parametrize("draft_vocab, taps", [(None, ()), (40, ()), (None, (1,))])
def test_greedy_batched_rows_equal_a_cache_free_rollout(draft_vocab, taps):
    target = tiny_target(vocab=64, layers=3, seed=1)
    head = feature_head(target, seed=2, draft_vocab=draft_vocab, taps=taps)
    s = sampler(target, head)
    n = 12
    got = s.generate(PROMPTS, 0.0, n, batch_size=4, seed=0)
    for prompt, o in zip(PROMPTS, got):
        want = head_rollout(target, head, prompt, n)
        eos = set(target.eos_ids)
        end = next((i + 1 for i, t in enumerate(want) if t in eos), n)
        assert o.prompt_ids == prompt
        assert o.token_ids == want[:end]
        assert o.finish_reason == ("eos" if end < n or want[-1] in eos else "length")
    assert [o.token_ids for o in s.generate(PROMPTS, 0.0, n, batch_size=1)] == [o.token_ids for o in got]


def test_sampled_first_two_tokens_follow_target_then_head():
    """Row by row: x_P ~ the target at T, x_{P+1} ~ the head at T given x_P. Chi-square of 4000 rows against the exact
    joint [V, V] (fails below 1e-3)."""
    V, T = 16, 0.8
    target = tiny_target(vocab=V, layers=2, seed=4)
    head = feature_head(target, seed=5)
    prompt = [3, 1, 4, 1, 5]
    model = target.model
    with torch.no_grad():
        _, feats = model(torch.tensor([prompt]), torch.arange(5).unsqueeze(0), None, compute_logits=False,
                         return_features=True)
        first = torch.softmax(model.head_logits(feats[0, -1]).double() / T, -1)
        seqs = torch.tensor([prompt[1:] + [x] for x in range(V)])
        pred = head(feats.expand(V, 5, -1), seqs, torch.arange(5).expand(V, 5), None)[:, -1]
        second = torch.softmax(head.logits(pred).double() / T, -1)
    joint = first.unsqueeze(1) * second
    outputs = sampler(target, head, max_len=16).generate([prompt] * 4000, T, 2, batch_size=1000, seed=7)
    assert all(len(o.token_ids) == 2 or o.token_ids[0] in target.eos_ids for o in outputs)
    kept = [o for o in outputs if len(o.token_ids) == 2]
    joint_kept = joint.clone()
    joint_kept[list(target.eos_ids)] = 0  # rows that ended at the first token carry no second one
    joint_kept /= joint_kept.sum()
    assert first_two_chi_square(kept, joint_kept) > 1e-3
    # the same seed gives the same rows
    runs = [sampler(target, head, max_len=16).generate([prompt] * 50, T, 6, batch_size=20, seed=7) for _ in range(2)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]


def test_the_sampler_refuses_a_model_draft():
    target = tiny_target(vocab=64, layers=3, seed=1)
    engine = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, max_len=64)
    with pytest.raises(ValueError, match="needs a feature draft"):
        FeatureDraftSampler(engine, "layers:0")
