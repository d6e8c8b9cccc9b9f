"""EAGLE-style feature draft heads (tempspec_engine/models/feature_draft.py) and their distillation: the target's
features, the head's cache path against its training path, the restricted draft vocabulary, save/load and broken
directories, the loss alignment (an oracle head scores zero loss and full acceptance), a tiny training run, resume,
and `tempspec-train distill --init feature...` from the command line (one process and two torchrun processes)."""
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import trainer_fixtures as tf
from tempspec_engine.models.feature_draft import (FORMAT, FeatureDraft, FeatureDraftConfig, is_feature_draft_dir,
                                                  load_feature_draft, save_feature_draft, token_map_from_counts)
from tempspec_engine.models.llama import Transformer
from tempspec_trainer import train
from tempspec_trainer.divergences import forward_kl
from tempspec_trainer.draft_init import init_feature_draft, parse_feature_init, warm_start_lineage
from tempspec_trainer.evaluate import expected_acceptance_over
from tempspec_trainer.train import DistillConfig, Distiller, Unrolled, make_batch

_one_thread = pytest.fixture(scope="module", autouse=True)(tf.one_thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def target():
    return tf.tiny_target()


@pytest.fixture(scope="module")
def data_file(target, tmp_path_factory):
    rows = tf.sampled_rows(target, 200, prompt_len=6, response_len=12, temperature=1.0, seed=0)
    return str(tf.write_jsonl(tmp_path_factory.mktemp("data") / "t1.jsonl", rows))


def config(data_file, out_dir, **overrides) -> DistillConfig:
    base = dict(data=[data_file], out_dir=str(out_dir), tau_kd=1.0, mode="online", divergence="fkl",
                init="feature", precision="fp32", batch_size=4, lr=1e-2, warmup_steps=2, steps=30, seq_len=64,
                eval_rows=32, eval_every=10, save_every=10, eval_temperatures=(0.0, 1.0), device="cpu", seed=0)
    base.update(overrides)
    return DistillConfig(**base)


def untied_target(seed=3) -> Transformer:
    """The tiny target with its own (untied) output head."""
    model = tf.tiny_transformer(seed)
    config = dataclasses.replace(model.config, tie_embeddings=False)
    untied = Transformer(config)
    state = dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    state["lm_head.weight"] = torch.randn(config.vocab_size, config.dim, generator=gen) * 0.5
    untied.load_state_dict(state)
    return untied.eval()


def tokens_positions(B=2, T=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, tf.VOCAB, (B, T), generator=gen)
    return tokens, torch.arange(T).expand(B, T)


def head_for(model, spec="feature:layers=2", seed=0, counts=None) -> FeatureDraft:
    return init_feature_draft(model, spec, seed, counts).eval()


# ------------------------------------------------------------------------------------ the target's features
@pytest.mark.parametrize("tied", [True, False])
def test_return_features_is_the_final_norm_output(tied):
    model = tf.tiny_transformer() if tied else untied_target()
    tokens, positions = tokens_positions()
    seen = {}
    hook = model.norm.register_forward_hook(lambda m, inp, out: seen.update(hidden=inp[0]))
    with torch.no_grad():
        plain = model(tokens, positions, None)
        logits, feats = model(tokens, positions, None, return_features=True)
    hook.remove()
    assert torch.equal(logits, plain)  # the default result is unchanged
    assert feats.shape == (2, 9, 32) and feats.dtype == torch.float32
    with torch.no_grad():  # the norm as the forward ran it (under no_grad: the fused CPU kernel)
        assert torch.equal(feats, model.norm(seen["hidden"]))
    assert torch.equal(F.linear(feats, model.output_weight()), logits)
    assert not torch.equal(feats, seen["hidden"])  # the norm is really applied (weight 0.5)
    # through a cache, with logits_index: the same positions as the logits
    cache = model.new_cache(2, 16)
    index = torch.tensor([3, 8])
    with torch.no_grad():
        li, fi = model(tokens, positions, cache, kv_len=9, logits_index=index, return_features=True)
        none, fo = model(tokens, positions, model.new_cache(2, 16), kv_len=9, compute_logits=False,
                         return_features=True)
    assert none is None and torch.allclose(fo, feats, atol=1e-5)
    assert li.shape == (2, 1, tf.VOCAB) and fi.shape == (2, 1, 32)
    rows = torch.arange(2)
    assert torch.allclose(fi[:, 0], feats[rows, index], atol=1e-5)
    assert torch.allclose(li[:, 0], logits[rows, index], atol=1e-5)


def test_return_features_with_vocab_limit_keeps_the_padding():
    model = tf.tiny_transformer()
    model.vocab_limit = 40
    tokens, positions = tokens_positions()
    with torch.no_grad():
        logits, feats = model(tokens, positions, None, return_features=True)
    model.vocab_limit = None
    assert torch.isinf(logits[..., 40:]).all() and torch.isfinite(logits[..., :40]).all()
    assert feats.shape == (2, 9, 32)


def test_feature_taps_follow_the_final_features():
    """feature_taps=(1, 0): the final-norm features, then block 1's and block 0's outputs (the residual stream),
    also through a cache with logits_index; the logits are unchanged; a block the target lacks is refused."""
    model = tf.tiny_transformer()
    tokens, positions = tokens_positions()
    outs = {}
    hooks = [model.layers[i].register_forward_hook(lambda m, inp, out, i=i: outs.update({i: out})) for i in (0, 1)]
    with torch.no_grad():
        logits, wide = model(tokens, positions, None, return_features=True, feature_taps=(1, 0))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        plain_logits, feats = model(tokens, positions, None, return_features=True)
    assert wide.shape == (2, 9, 96) and torch.equal(logits, plain_logits)
    assert torch.equal(wide[..., :32], feats)
    assert torch.equal(wide[..., 32:64], outs[1]) and torch.equal(wide[..., 64:], outs[0])
    index = torch.tensor([3, 8])
    with torch.no_grad():
        _, at = model(tokens, positions, model.new_cache(2, 16), kv_len=9, logits_index=index, return_features=True,
                      feature_taps=(1, 0))
    torch.testing.assert_close(at[:, 0], wide[torch.arange(2), index], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="feature_taps"):
        model(tokens, positions, None, return_features=True, feature_taps=(2,))


# ------------------------------------------------------------------------------------ the head
def test_a_head_given_taps_starts_as_the_head_without_them(target):
    """A fresh head with taps draws the same weights as one without (same seed) and its fuse starts as [I, 0]: it
    predicts exactly what the untapped head predicts. read() RMS-normalizes each tap, so a tap's scale does not
    matter, and keeps zero (padding) rows zero."""
    model = target.model
    plain = init_feature_draft(model, "feature", seed=0)
    tapped = init_feature_draft(model, "feature", seed=0, taps=(1, 0))
    assert tapped.config.taps == (1, 0) and tapped.config.feature_width == 96
    for name, value in plain.state_dict().items():
        assert torch.equal(tapped.state_dict()[name], value), name
    tokens, positions = tokens_positions()
    with torch.no_grad():
        _, wide = model(tokens, positions, None, return_features=True, feature_taps=(1, 0))
        torch.testing.assert_close(tapped(tapped.read(wide), tokens, positions, None),
                                   plain(plain.read(wide[..., :32]), tokens, positions, None))
        tapped.fuse.weight.normal_()
        scaled = torch.cat((wide[..., :32], 10 * wide[..., 32:]), dim=-1)
        torch.testing.assert_close(tapped.read(scaled), tapped.read(wide), atol=1e-4, rtol=1e-4)
        assert torch.equal(tapped.read(torch.zeros(3, 96)), torch.zeros(3, 32))
    with pytest.raises(ValueError, match="block indices"):
        init_feature_draft(model, "feature", taps=(2,))
    with pytest.raises(ValueError, match="taps must be distinct"):
        FeatureDraftConfig.for_target(model.config, taps=(1, 1))


def test_cache_steps_equal_the_causal_training_pass(target):
    """Prefill 3 positions, extend by 2, draft one position at a time, then roll back over predicted-feature entries
    and rewrite them: every output equals the cache=None causal pass over the same inputs (fp32)."""
    head = head_for(target.model)
    B, T = 2, 9
    tokens, positions = tokens_positions(B, T, seed=1)
    feats = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = head(feats, tokens, positions, None)
        cache = head.new_cache(B, 16)
        got = [head(feats[:, :3], tokens[:, :3], positions[:, :3], cache, kv_len=3),
               head(feats[:, 3:5], tokens[:, 3:5], positions[:, 3:5], cache, kv_len=5)]
        for t in range(5, T):
            got.append(head(feats[:, t:t + 1], tokens[:, t:t + 1], positions[:, t:t + 1], cache, kv_len=t + 1,
                            last_query=t % 2 == 0))
        assert torch.allclose(torch.cat(got, 1), want, atol=1e-5)
        # stale entries at positions 6..8 (e.g. the head's own predictions) are overwritten by a new extension
        garbage = torch.randn(B, 3, 32)
        head(garbage, tokens[:, 6:9], positions[:, 6:9], cache, kv_len=9)
        again = head(feats[:, 6:8], tokens[:, 6:8], positions[:, 6:8], cache, kv_len=8)
        assert torch.allclose(again, want[:, 6:8], atol=1e-5)
        # the mask hides entries beyond the query's position: kv_len = the whole cache gives the same result
        whole = head(feats[:, 6:8], tokens[:, 6:8], positions[:, 6:8], cache)
        assert torch.allclose(whole, want[:, 6:8], atol=1e-5)
    assert not torch.allclose(head(garbage, tokens[:, 6:9], positions[:, 6:9], None)[:, 1:],
                              want[:, 7:9], atol=1e-3)  # the inputs matter


def test_the_documented_proposer_recipe(target):
    """FeatureDraft's docstring recipe, greedily, B = 1, over several rounds (prefill, extend with the verified
    features, k - 1 single steps, roll back): every draft distribution equals the head's causal pass over the same
    sequence of inputs (target features where verified, its own predictions after), and the verified tokens are the
    target's greedy tokens."""
    model = target.model
    head = head_for(model, "feature:layers=2")
    k, prompt = 3, torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        logits, f = model(prompt, torch.arange(5).view(1, -1), None, return_features=True)
        seq = torch.cat((prompt, logits[:, -1:].argmax(-1)), 1)  # x_0..x_n, n = 5
        feats = f  # f_0..f_{n-1}
        cache, m = head.new_cache(1, 64), 0
        for _ in range(4):
            n = seq.shape[1] - 1
            # 1. extend with target features m..n-1 and the tokens they produced
            pos = torch.arange(m, n).view(1, -1)
            pred = head(feats[:, m:n], seq[:, m + 1:n + 1], pos, cache, kv_len=n)[:, -1:]
            ins_f, ins_x = [feats[:, :n]], [seq[:, 1:n + 1]]  # the causal pass's inputs
            drafts = []
            for j in range(1, k + 1):
                q = head.logits(pred)
                ref = head(torch.cat(ins_f, 1), torch.cat(ins_x, 1), torch.arange(n + j - 1).view(1, -1), None)
                assert torch.allclose(q, head.logits(ref[:, -1:]), atol=1e-4)
                d = q.argmax(-1)
                drafts.append(d)
                if j == k:
                    break
                ins_f.append(pred)
                ins_x.append(d)
                # 2. one step: the previous prediction with the token just drafted, at position n + j - 1
                pred = head(pred, d, torch.tensor([[n + j - 1]]), cache, kv_len=n + j, last_query=True)
            # 3. verify [x_n, d_1..d_k]: accept the greedy prefix, then the target's own token
            block = torch.cat([seq] + drafts, 1)
            vlog, vfeat = model(block, torch.arange(block.shape[1]).view(1, -1), None, return_features=True)
            greedy = vlog[:, n:].argmax(-1)  # the target's tokens x_{n+1}..x_{n+k+1}
            a = 0
            while a < k and int(drafts[a]) == int(greedy[0, a]):
                a += 1
            seq = torch.cat((seq, greedy[:, :a + 1]), 1)
            feats = vfeat[:, :n + a + 1]  # f_0..f_{n+a}
            m = n  # the head's real entries: 0..n-1
    full = model(seq[:, :-1], torch.arange(seq.shape[1] - 1).view(1, -1), None).argmax(-1)
    assert torch.equal(seq[:, 6:], full[:, 5:])  # lossless: all tokens after the prompt are the target's greedy ones


def test_head_predicts_from_feature_and_next_token(target):
    """Changing the token of index t or the feature of index t changes the prediction of t and later ones only."""
    head = head_for(target.model, "feature")
    tokens, positions = tokens_positions(1, 6, seed=3)
    feats = torch.randn(1, 6, 32)
    with torch.no_grad():
        base = head(feats, tokens, positions, None)
        t2 = tokens.clone()
        t2[0, 3] = (t2[0, 3] + 1) % tf.VOCAB
        f2 = feats.clone()
        f2[0, 3] += 1.0
        for out in (head(feats, t2, positions, None), head(f2, tokens, positions, None)):
            assert torch.equal(out[:, :3], base[:, :3]) and not torch.allclose(out[:, 3], base[:, 3])


@pytest.mark.parametrize("first", [True, False])
def test_restricted_vocabulary_logits(first):
    model = untied_target()
    counts = torch.randint(0, 100, (tf.VOCAB,), generator=torch.Generator().manual_seed(4))
    spec = "feature/vocab:first:20" if first else "feature/vocab:20"
    head = head_for(model, spec, counts=counts)
    full = head_for(model, "feature")
    full.load_state_dict({k: v for k, v in head.state_dict().items() if k != "d2t"})
    d2t = head.d2t
    assert d2t.dtype == torch.int64 and d2t.shape == (20,)
    if first:
        assert d2t.tolist() == list(range(20))
    else:
        assert torch.equal(d2t, token_map_from_counts(counts, 20)) and d2t.tolist() != list(range(20))
        top = sorted(range(tf.VOCAB), key=lambda i: (-int(counts[i]), i))[:20]
        assert sorted(top) == d2t.tolist()
    assert head.output_weight() is model.lm_head.weight  # the target's own tensor
    tokens, positions = tokens_positions()
    feats = torch.randn(2, 9, 32)
    with torch.no_grad():
        pred = head(feats, tokens, positions, None)
        got, want = head.logits(pred), full.logits(pred)
        sub = head.draft_logits(pred)
    assert got.shape == (2, 9, tf.VOCAB) and sub.shape == (2, 9, 20)
    assert torch.allclose(got[..., d2t], want[..., d2t], atol=1e-6) and torch.equal(got[..., d2t], sub)
    others = torch.ones(tf.VOCAB, dtype=torch.bool)
    others[d2t] = False
    assert torch.isneginf(got[..., others]).all()
    assert torch.equal(want, F.linear(pred, model.lm_head.weight))  # the full head is the target's
    # gathered rows follow an in-place change of the target's head
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
        assert torch.allclose(head.logits(pred)[..., d2t], 2 * got[..., d2t], atol=1e-5)
    with torch.inference_mode():  # gathered under inference, still a normal tensor: the CPU kernel packs it once
        model.lm_head.weight.add_(0.0)
        assert not head.head_rows().is_inference()


def test_token_map_from_counts_orders_ties_and_fills():
    counts = torch.tensor([0, 5, 5, 1, 0, 9])
    assert token_map_from_counts(counts, 3).tolist() == [1, 2, 5]
    assert token_map_from_counts(counts, 5).tolist() == [0, 1, 2, 3, 5]  # unseen ids fill by increasing id
    with pytest.raises(ValueError, match="1..6"):
        token_map_from_counts(counts, 7)


def test_head_shares_and_never_casts_the_target():
    model = tf.tiny_transformer()
    head = head_for(model, "feature")
    assert head.embed_tokens is model.embed_tokens and head.output_weight() is model.embed_tokens.weight
    assert all(p is not model.embed_tokens.weight for p in head.parameters())
    assert not any("embed" in k or "lm_head" in k for k in head.state_dict())
    head.to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.float32 and head.fc.weight.dtype == torch.bfloat16
    cache = head.new_cache(3, 8)
    assert cache.k[0].shape == (3, 2, 8, 8) and cache.k[0].dtype == torch.bfloat16 and len(cache.k) == 1


# ------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("spec", ["feature:layers=2", "feature:mlp=16/vocab:24"])
def test_save_load_round_trip(target, tmp_path, spec):
    counts = torch.arange(tf.VOCAB)
    head = head_for(target.model, spec, counts=counts)
    out = save_feature_draft(head, tmp_path / "h", target_name="tiny-target",
                             metadata={"note": 1, "loss": float("nan")})
    assert is_feature_draft_dir(out)
    # standard JSON: a diverged run's nan is written as null (a strict parser rejects NaN)
    info = json.loads((out / "tempspec_draft.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert info["format"] == FORMAT and info["target"] == {"name": "tiny-target", "vocab_size": 64, "dim": 32}
    assert info["metadata"] == {"note": 1, "loss": None} and info["config"]["n_layers"] == head.config.n_layers
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert not any("embed" in k or "lm_head" in k for k in stored)
    loaded = load_feature_draft(out, target.model)
    assert loaded.embed_tokens is target.model.embed_tokens and not loaded.training
    assert loaded.config == head.config
    if head.d2t is not None:
        assert torch.equal(loaded.d2t, head.d2t) and loaded.d2t.dtype == torch.int64
    tokens, positions = tokens_positions()
    feats = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(feats, tokens, positions, None)),
                           head.logits(head(feats, tokens, positions, None)))
    # saved in bf16: the int64 token map stays exact, the weights load in the target's dtype
    bf = save_feature_draft(head, tmp_path / "bf", target_name="tiny-target", dtype=torch.bfloat16)
    stored = load_file(str(bf / "model.safetensors"))
    assert all(v.dtype == (torch.int64 if k == "d2t" else torch.bfloat16) for k, v in stored.items())
    assert load_feature_draft(bf, target.model).fc.weight.dtype == torch.float32
    assert load_feature_draft(bf, target.model, dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16


@pytest.fixture()
def saved(target, tmp_path):
    head = head_for(target.model, "feature/vocab:first:16")
    return save_feature_draft(head, tmp_path / "h", target_name="tiny-target")


def _edit_json(directory, fn):
    path = directory / "tempspec_draft.json"
    info = json.loads(path.read_text())
    fn(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("breakage,match", [
    ("no_json", "no tempspec_draft.json"),
    ("bad_json", "tempspec_draft.json: not valid JSON"),
    ("other_format", "tempspec_draft.json: unknown feature draft format 'tempspec-draft/1'"),
    ("bad_config", "tempspec_draft.json: 'config' does not describe a feature draft"),
    ("no_weights", "model.safetensors is missing"),
    ("empty_weights", "model.safetensors: cannot read the weights"),
    ("truncated_weights", "model.safetensors: cannot read the weights"),
    ("wrong_layers", "model.safetensors: the weights do not fit the config"),
    ("bad_token_map", "model.safetensors: d2t: ids must lie in"),
    ("taps_beyond_target", r"tempspec_draft.json: the feature draft's taps \[5\] must be block indices of the "
                           r"target, 0\.\.1"),
])
def test_broken_directory_errors_name_the_file(saved, target, breakage, match):
    weights = saved / "model.safetensors"
    if breakage == "no_json":
        (saved / "tempspec_draft.json").unlink()
    elif breakage == "bad_json":
        (saved / "tempspec_draft.json").write_text("{not json")
    elif breakage == "other_format":
        _edit_json(saved, lambda i: i.update(format="tempspec-draft/1"))
    elif breakage == "bad_config":
        _edit_json(saved, lambda i: i["config"].update(heads=3))
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "empty_weights":
        weights.write_bytes(b"")
    elif breakage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:200])
    elif breakage == "wrong_layers":
        _edit_json(saved, lambda i: i["config"].update(n_layers=2))
    elif breakage == "taps_beyond_target":
        _edit_json(saved, lambda i: i["config"].update(taps=[5]))
    elif breakage == "bad_token_map":
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state["d2t"] = state["d2t"] + 60
        save_file(state, str(weights))
    with pytest.raises((ValueError, FileNotFoundError), match=match) as exc:  # each one line at the CLI
        load_feature_draft(saved, target.model)
    assert str(saved) in str(exc.value)
    assert is_feature_draft_dir(saved) == (breakage not in ("no_json", "bad_json", "other_format"))


def test_mismatched_or_foreign_target_is_refused(saved):
    other = tf.tiny_transformer(vocab=96)
    with pytest.raises(ValueError, match="vocab 64 and width 32; this target has vocab 96"):
        load_feature_draft(saved, other)
    with pytest.raises(ValueError, match="needs a Llama-family target"):
        load_feature_draft(saved, torch.nn.Linear(2, 2))
    assert not is_feature_draft_dir(saved / "nowhere") and not is_feature_draft_dir(saved / "model.safetensors")


# ------------------------------------------------------------------------------------ the loss and its alignment
def drafted(head, read, tokens, positions, steps):
    """What drafting computes, by the inference path (a KV cache), one chain at a time: for each start r, the head's
    cache holds its reads of the target's features at 0..r, then its own predictions; pred_j[t] comes from the chain
    that starts at r = t - j + 1 (teacher-forced tokens). read [B, T, dim] (head.read of the features, or noisy);
    returns [pred_1, ..., pred_steps], each [B, T, dim], zero where t < j - 1 (no such chain)."""
    B, T, _ = read.shape
    out = [read.new_zeros(B, T, head.config.dim) for _ in range(steps)]
    for r in range(T):
        cache = head.new_cache(B, T + steps, dtype=read.dtype)
        pred = head(read[:, :r + 1], tokens[:, :r + 1], positions[:, :r + 1], cache, kv_len=r + 1)[:, -1:]
        out[0][:, r] = pred[:, 0]
        for j in range(2, min(steps, T - r) + 1):
            t = r + j - 1
            pred = head(pred, tokens[:, t:t + 1], positions[:, t:t + 1], cache, kv_len=t + 1)
            out[j - 1][:, t] = pred[:, 0]
    return out


@pytest.mark.parametrize("spec", ["feature", "feature:layers=2"])
def test_unrolled_steps_compute_what_drafting_does(target, spec):
    """Training's unroll (EAGLE-3's training-time test) equals the draft steps of inference at every index with a
    chain: step j at t attends to the target-feature keys up to t - j + 1 and to the chain's own keys, not to keys
    built from predictions at every position (what a plain causal pass over the step's inputs would see)."""
    model = copy.deepcopy(target.model).double()
    head = head_for(model, spec).double()
    ids = torch.tensor([[7, 9, 11, 20, 33, 41, 12, 50, 8, 19, 27, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        _, f = model(ids, pos, None, return_features=True)
        read = head.read(f[:, :-1])
        got = Unrolled(head)(f[:, :-1], ids[:, 1:], pos[:, :-1], 3)
        want = drafted(head, read, ids[:, 1:], pos[:, :-1], 3)
        for j in range(3):
            assert torch.allclose(got[j][:, j:], want[j][:, j:], atol=1e-10), j
        causal = head(torch.cat((read[:, :1], got[0][:, :-1]), 1), ids[:, 1:], pos[:, :-1], None)
        assert not torch.allclose(causal[:, 2:], want[1][:, 2:], atol=1e-3)  # the check can fail


def test_later_draft_positions_are_scored_as_drafting_computes_them(target, data_file, tmp_path):
    """expected_acceptance_over(position=2): 1 - TV at T between the target at t+1 and the second draft of the chain
    that starts at t - 1 (drafted), over the same response positions as position 1; refused for a draft model."""
    d = Distiller(config(data_file, tmp_path), target=target, progress=False)
    seqs, head = d.eval_seqs[:6], d.draft
    tokens, mask = make_batch(seqs, "cpu")
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits, feats = target.model(tokens, pos, None, return_features=True)
        _, p2 = drafted(head, head.read(feats[:, :-1]), tokens[:, 1:], pos[:, :-1], 2)
        m = mask[:, 1:]
        tv = 0.5 * (torch.softmax(head.logits(p2[m]).double(), -1) - torch.softmax(logits[:, 1:][m].double(), -1))
        want = float(1 - tv.abs().sum(-1).mean())
        got = expected_acceptance_over(head, target.model, seqs, (1.0,), 3, "cpu", position=2)["alpha@1"]
        first = expected_acceptance_over(head, target.model, seqs, (1.0,), 3, "cpu")["alpha@1"]
    assert got == pytest.approx(want, abs=1e-5) and abs(got - first) > 1e-4
    with pytest.raises(ValueError, match="feature heads only"):
        expected_acceptance_over(tf.tiny_transformer(), target.model, seqs, (1.0,), 3, "cpu", position=2)


class Oracle(FeatureDraft):
    """Returns the target's true next features: index t of its input is position t, so its answer at t is the
    target's feature at t+1 (computed from the full sequence, whose first token the test stores in `x0`); shift=1
    answers the feature at t instead."""

    shift = 0

    def forward(self, features, tokens, positions, cache, kv_len=None, last_query=False):
        full = torch.cat((self.x0, tokens), dim=1)
        pos = torch.arange(full.shape[1]).expand_as(full)
        _, feats = self.model(full, pos, None, return_features=True)
        return feats[:, 1 - self.shift:full.shape[1] - self.shift] + 0.0 * self.fc.weight.sum()


def test_an_oracle_head_has_zero_loss_and_full_acceptance(target, data_file, tmp_path):
    """The positions compared by the loss and the evaluation: a head that returns the target's next features exactly
    must score loss 0 (divergence and feature term, both unrolled steps) and acceptance 1 at every temperature."""
    d = Distiller(config(data_file, tmp_path, feature_weight=1.0, unroll=2), target=target, progress=False)
    oracle = Oracle(d.draft.config).attach(target.model.embed_tokens)
    oracle.model = target.model
    d.draft, d.model = oracle, Unrolled(oracle)
    seqs = d.eval_seqs[:8]
    tokens, mask = make_batch(seqs, "cpu")
    oracle.x0 = tokens[:, :1]
    with torch.no_grad():
        assert float(d.loss(seqs, tokens, mask)) == pytest.approx(0.0, abs=1e-6)
        acc = expected_acceptance_over(oracle, target.model, seqs, (0.0, 1.0), len(seqs), "cpu")
    assert acc == {"alpha@0": pytest.approx(1.0), "alpha@1": pytest.approx(1.0, abs=1e-5)}
    # answering one position early is far off: the checks above can fail
    oracle.shift = 1
    with torch.no_grad():
        assert float(d.loss(seqs, tokens, mask)) > 0.5
        assert expected_acceptance_over(oracle, target.model, seqs, (0.0,), len(seqs), "cpu")["alpha@0"] < 0.5


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_loss_matches_its_definition(target, data_file, tmp_path, noise):
    """unroll=2, feature_weight 0.3: the mean over both steps of FKL(head logits vs target at t+1) + 0.3 smooth L1,
    step 2 being the second draft step of the chain that starts at t - 1 (drafted). With feature_noise 0.05, U(-0.05, 0.05) noise (the run's RNG) on
    the target's features the head reads, step 2 starting from the noisy f_0, while the targets (the target's logits
    and features at t+1) stay clean; that noise changes the loss, so the check can fail."""
    d = Distiller(config(data_file, tmp_path, feature_weight=0.3, unroll=2, feature_noise=noise), target=target,
                  progress=False)
    seqs = d.eval_seqs[:6]
    tokens, mask = make_batch(seqs, "cpu")
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    head, m = d.draft, mask[:, 1:]
    with torch.no_grad():
        logits, feats = target.model(tokens, pos, None, return_features=True)
        torch.manual_seed(7)
        read = feats[:, :-1] + (torch.rand_like(feats[:, :-1]) * 2 - 1) * noise
        p1, p2 = drafted(head, read, tokens[:, 1:], pos[:, :-1], 2)
        want = sum(forward_kl(head.logits(p)[m], logits[:, 1:][m], 1.0).mean()
                   + 0.3 * F.smooth_l1_loss(p[m], feats[:, 1:][m]) for p in (p1, p2)) / 2
        torch.manual_seed(7)
        got = float(d.loss(seqs, tokens, mask))
        d.cfg = dataclasses.replace(d.cfg, feature_noise=0.0)
        clean = float(d.loss(seqs, tokens, mask))
    assert got == pytest.approx(float(want), rel=1e-5)
    assert (abs(got - clean) > 1e-4 * clean) == (noise > 0)


def test_offline_loss_is_the_cross_entropy_of_the_data(target, data_file, tmp_path):
    """mode offline, a 48-token draft vocabulary: the mean over both unrolled steps of the cross-entropy of the data's
    token t+2 (positions whose token lies outside the map skipped) + 0.3 smooth L1; the target's logits play no part."""
    d = Distiller(config(data_file, tmp_path, mode="offline", init="feature/vocab:48", feature_weight=0.3, unroll=2),
                  target=target, progress=False)
    seqs = d.eval_seqs[:6]
    tokens, mask = make_batch(seqs, "cpu")
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    head, m = d.draft, mask[:, 1:]
    labels = tokens[:, 2:][m[:, :-1]]
    in_map = torch.isin(labels, head.d2t)
    assert 0 < int(in_map.sum()) < labels.numel()  # both kinds of position occur
    with torch.no_grad():
        _, feats = target.model(tokens, pos, None, return_features=True)
        p1, p2 = drafted(head, head.read(feats[:, :-1]), tokens[:, 1:], pos[:, :-1], 2)
        want = 0.0
        for p in (p1, p2):
            logp = torch.log_softmax(head.logits(p)[m].float(), -1)  # -inf outside the map: the same softmax
            nll = -logp[torch.arange(labels.numel()), labels][in_map].mean()
            want = want + nll + 0.3 * F.smooth_l1_loss(p[m], feats[:, 1:][m])
        assert float(d.loss(seqs, tokens, mask)) == pytest.approx(float(want / 2), rel=1e-5)
        d.cfg.mode = "online"  # the same batch online differs: the check above can fail
        assert float(d.loss(seqs, tokens, mask)) != pytest.approx(float(want / 2), rel=1e-3)


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def feature_run(target, data_file, tmp_path_factory):
    """30 steps of online FKL at tau 1 of a fresh 1-layer feature head with a 48-token draft vocabulary."""
    d = Distiller(config(data_file, tmp_path_factory.mktemp("feature"), init="feature/vocab:48", lr=3e-2),
                  target=target, progress=False)
    final = d.run()
    return types.SimpleNamespace(d=d, final=final)


def test_training_raises_teacher_forced_agreement(feature_run, target):
    hist = feature_run.d.history
    before, after = hist[0], hist[-1]
    assert after["alpha@0"] > before["alpha@0"] + 0.04 and after["alpha@0"] > 2.5 * before["alpha@0"], (before, after)
    assert after["alpha@1"] > before["alpha@1"] + 0.08, (before, after)
    # the target and its embedding are untouched; the final directory reloads to the trained head (bf16-rounded)
    fresh = tf.tiny_target()
    for (name, p), q in zip(target.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(p, q), name
    loaded = load_feature_draft(feature_run.final, target.model)
    assert loaded.d2t.shape == (48,)
    counts = train.response_token_counts(feature_run.d.schedule.seqs, tf.VOCAB)
    assert torch.equal(loaded.d2t, token_map_from_counts(counts, 48))
    acc = expected_acceptance_over(loaded, target.model, feature_run.d.eval_seqs, (0.0, 1.0), 8, "cpu")
    assert acc["alpha@1"] == pytest.approx(after["alpha@1"], abs=0.02)


def test_warm_start_continues_from_a_saved_head(feature_run, target, data_file, tmp_path):
    """--init DIR starts from the saved head (its weights, shapes and token map, not a fresh one) and trains it."""
    saved = load_feature_draft(feature_run.final, target.model, dtype=torch.float32)
    d = Distiller(config(data_file, tmp_path / "warm", init=str(feature_run.final), steps=6, eval_every=6,
                         save_every=6, lr=1e-2), target=target, progress=False)
    assert torch.equal(d.draft.d2t, saved.d2t) and d.draft.config == saved.config
    assert all(p.requires_grad for p in d.draft.parameters())
    for (name, p), q in zip(d.draft.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(p, q), name
    final = d.run()
    # its step-0 evaluation is the saved head's (bf16-rounded), not a fresh head's near-zero agreement
    assert d.history[0]["alpha@1"] == pytest.approx(feature_run.d.history[-1]["alpha@1"], abs=0.02)
    trained = load_feature_draft(final, target.model, dtype=torch.float32)
    assert not torch.equal(trained.fc.weight, saved.fc.weight)
    assert parse_feature_init(str(feature_run.final)) == {"from": str(feature_run.final)}


def test_warm_start_records_every_earlier_stage(feature_run, target, data_file, tmp_path):
    """A head warm-started twice records both earlier stages, oldest first, in its metadata ("lineage") and names
    them in its card; a head saved without a lineage (before they were recorded) is traced through its init."""
    from tempspec_trainer.model_card import write_card

    first = str(feature_run.final)
    assert warm_start_lineage("feature/vocab:48") == [] and feature_run.d.lineage == []
    second = Distiller(config(data_file, tmp_path / "second", init=first, steps=2, eval_every=2, save_every=2,
                              warmup_steps=1, tau_kd=0.5, divergence="jsd"), target=target, progress=False).run()
    info_file = second / "tempspec_draft.json"
    info = json.loads(info_file.read_text())
    assert [(s["recipe"]["init"], s["step"]) for s in info["metadata"]["lineage"]] == [("feature/vocab:48", 30)]
    del info["metadata"]["lineage"]  # as a head saved before lineages were recorded
    info_file.write_text(json.dumps(info))
    third = Distiller(config(data_file, tmp_path / "third", init=str(second), steps=1, eval_every=1, save_every=1,
                             warmup_steps=0), target=target, progress=False)
    assert [(s["recipe"]["init"], s["step"]) for s in third.lineage] == [("feature/vocab:48", 30), (first, 2)]
    final = third.run()
    card = write_card(final, command="tempspec-train distill").read_text()
    assert "It continues 2 earlier training stages" in card
    assert "1. from `feature/vocab:48`: 30 steps of fkl at tau_kd = 1 (online), lr 0.03" in card
    assert f"2. from `{first}`: 2 steps of jsd at tau_kd = 0.5 (online)" in card
    # a cycle of directories naming each other ends instead of recursing
    info["metadata"]["recipe"]["init"] = str(second)
    info_file.write_text(json.dumps(info))
    assert [s["step"] for s in warm_start_lineage(str(second))] == [2]


def test_warm_start_gains_taps_and_trains_them(feature_run, target, data_file, tmp_path):
    """--feature-taps on a warm start without taps: the head starts as the saved one (its step-0 evaluation), its
    teacher cache holds the tapped blocks' outputs (equal to a teacher forward with them), training moves the fuse's
    tap columns, and the saved head keeps its taps. A cache made without taps is refused; a tapped head keeps its
    taps when none are given and refuses others."""
    plain_cache = tmp_path / "plain.safetensors"
    Distiller(config(data_file, tmp_path / "plain", init=str(feature_run.final), teacher_cache=str(plain_cache)),
              target=target, progress=False)
    with pytest.raises(ValueError, match="was made for"):
        Distiller(config(data_file, tmp_path / "refused", init=str(feature_run.final), feature_taps=(1,),
                         teacher_cache=str(plain_cache)), target=target, progress=False)
    d = Distiller(config(data_file, tmp_path / "taps", init=str(feature_run.final), feature_taps=(1,), steps=6,
                         eval_every=6, save_every=6, lr=1e-2, teacher_cache=str(tmp_path / "taps.safetensors")),
                  target=target, progress=False)
    assert d.draft.config.taps == (1,)
    seqs = d.schedule(0)
    tokens, _ = make_batch(seqs, "cpu")
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    want = target.model(tokens, pos, None, return_features=True, feature_taps=(1,))[1]
    got = d.teacher_features(seqs, tokens)
    for b, (ids, _) in enumerate(seqs):
        torch.testing.assert_close(got[b, :len(ids)], want[b, :len(ids)], rtol=1e-5, atol=1e-5)
    final = d.run()
    assert d.history[0]["alpha@1"] == pytest.approx(feature_run.d.history[-1]["alpha@1"], abs=0.02)
    trained = load_feature_draft(final, target.model, dtype=torch.float32)
    assert trained.config.taps == (1,) and float(trained.fuse.weight[:, 32:].detach().abs().sum()) > 0
    again = Distiller(config(data_file, tmp_path / "again", init=str(final), steps=1, warmup_steps=0), target=target,
                      progress=False)
    assert again.draft.config.taps == (1,)
    with pytest.raises(ValueError, match="reads taps"):
        Distiller(config(data_file, tmp_path / "other", init=str(final), feature_taps=(0,)), target=target,
                  progress=False)


def test_warm_start_from_a_shipped_head_is_refused_for_another_target(data_file, tmp_path):
    """'feature:1' names the shipped head, made for the default target: a tiny target of another width gets one
    line, and an unknown shipped name too."""
    tiny = tf.tiny_target()
    with pytest.raises(ValueError, match="width"):
        Distiller(config(data_file, tmp_path / "a", init="feature:1"), target=tiny, progress=False)
    with pytest.raises(ValueError, match="no shipped draft distilled at tau_kd=7.0"):
        parse_feature_init("feature:7")


def test_model_card_says_feature_head(feature_run):
    from tempspec_trainer.model_card import write_card

    text = write_card(feature_run.final, command="tempspec-train distill --init feature/vocab:48").read_text()
    assert text.startswith("# tempspec feature draft head (EAGLE-style)")
    assert "draft vocabulary of 48 token ids" in text and "2 unrolled steps" in text
    assert "at the first draft position" in text
    assert "noise" not in text  # feature_noise 0: the card says nothing of it
    assert text.index("- feature head loss") < text.index("- data:")


def test_offline_feature_head_trains_and_its_card_says_cross_entropy(target, data_file, tmp_path):
    from tempspec_trainer.model_card import write_card

    d = Distiller(config(data_file, tmp_path, mode="offline", steps=4, eval_every=2, save_every=2), target=target,
                  progress=False)
    text = write_card(d.run(), command="tempspec-train distill --init feature --mode offline").read_text()
    assert text.startswith("# tempspec feature draft head (EAGLE-style): offline KD at tau_kd = 1 "
                           "(cross-entropy on the data)")
    assert "- feature head loss: the cross-entropy of the data's tokens + 0.1 x smooth L1" in text
    losses = [h["loss"] for h in d.history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


def test_bf16_precision_trains_a_feature_head(data_file, tmp_path):
    """bf16 autocast over fp32 head weights with a bf16 teacher: finite losses, fp32 master weights, bf16 features."""
    target = tf.tiny_target()
    target.model.to(torch.bfloat16)
    d = Distiller(config(data_file, tmp_path, precision="bf16", steps=3, eval_every=3), target=target,
                  progress=False)
    final = d.run()
    assert d.draft.fc.weight.dtype == torch.float32 and d.draft.output_weight().dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in d.history[1:]) and "alpha@1" in d.history[-1]
    loaded = load_feature_draft(final, target.model)
    assert loaded.fc.weight.dtype == torch.bfloat16
    tokens, positions = tokens_positions()
    with torch.no_grad():
        _, feats = target.model(tokens, positions, None, return_features=True)
        assert feats.dtype == torch.bfloat16
        logits = loaded.logits(loaded(feats, tokens, positions, None))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).any(-1).all()


@pytest.fixture(scope="module")
def resumed(target, data_file, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cfg = config(data_file, tmp_path_factory.mktemp("full"), steps=4, save_every=2, eval_every=2, warmup_steps=1,
                 init="feature:layers=2/vocab:40", unroll=3)
    full = Distiller(cfg, target=target, progress=False)
    full.run()
    cut_cfg = dataclasses.replace(cfg, out_dir=str(tmp_path_factory.mktemp("cut")))
    cut = Distiller(cut_cfg, target=target, progress=False)

    def barrier(world):
        if cut.step == 2:
            raise KeyboardInterrupt

    mp.setattr(train, "_barrier", barrier)
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    mp.undo()
    again = Distiller(cut_cfg, target=target, progress=False)
    assert again.resume() and again.step == 2
    again.run()
    return types.SimpleNamespace(cfg=cut_cfg, full=full, cut=cut, again=again)


def test_resume_reproduces_uninterrupted_weights(resumed, target):
    full, again = resumed.full.draft.state_dict(), resumed.again.draft.state_dict()
    assert full.keys() == again.keys() and "d2t" in full
    for name in full:
        assert torch.equal(full[name], again[name]), name
    assert not torch.equal(resumed.cut.draft.state_dict()["fc.weight"], full["fc.weight"])
    ckpt = sorted((resumed.again.out / train.CHECKPOINTS).glob("step-*"))[-1]
    assert torch.equal(load_feature_draft(ckpt, target.model).fc.weight, resumed.again.draft.fc.weight)
    with pytest.raises(ValueError, match="unroll"):
        Distiller(dataclasses.replace(resumed.cfg, unroll=1), target=target, progress=False).resume()


def test_resume_of_a_checkpoint_older_than_the_feature_fields(target, data_file, tmp_path):
    """A checkpoint whose saved config lacks feature_weight / unroll (written before they existed) resumes when the
    run uses their defaults, and is refused when it does not."""
    cfg = config(data_file, tmp_path / "run", steps=2, save_every=2, eval_every=2, warmup_steps=1)
    Distiller(cfg, target=target, progress=False).run()
    ckpt = tmp_path / "run" / train.CHECKPOINTS / "step-000002" / train.STATE_FILE
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["feature_weight"], state["config"]["unroll"]
    torch.save(state, ckpt)
    longer = Distiller(dataclasses.replace(cfg, steps=3), target=target, progress=False)
    assert longer.resume() and longer.step == 2
    with pytest.raises(ValueError, match="unroll"):
        Distiller(dataclasses.replace(cfg, steps=3, unroll=3), target=target, progress=False).resume()


# ------------------------------------------------------------------------------------ teacher cache, tau mixture
def test_a_teacher_cache_trains_exactly_like_the_teacher(target, data_file, tmp_path):
    """fp32: 3 steps from a teacher cache give the same weights as 3 steps with a teacher forward per batch; the cache
    is written on first use, read by the next run (no teacher forward: the teacher is poisoned) and refused when made
    from other sequences, by a target of other weights or dtype, or truncated."""
    plain = Distiller(config(data_file, tmp_path / "plain", steps=3, eval_every=3), target=target, progress=False)
    plain.run()
    cache = tmp_path / "cache" / "features.safetensors"
    first = Distiller(config(data_file, tmp_path / "first", steps=3, eval_every=3, teacher_cache=str(cache)),
                      target=target, progress=False)
    assert cache.is_file() and first.teacher_cache.missing(first.schedule.seqs) == 0
    first.run()
    for name, value in plain.draft.state_dict().items():
        torch.testing.assert_close(first.draft.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    again = Distiller(config(data_file, tmp_path / "again", steps=3, eval_every=3, teacher_cache=str(cache)),
                      target=target, progress=False)
    poisoned = again.teacher.forward
    again.teacher.forward = None  # a call would fail: every feature comes from the cache
    try:
        seqs = again.schedule(0)
        tokens, _ = make_batch(seqs, "cpu")
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        got = again.teacher_features(seqs, tokens)
    finally:
        again.teacher.forward = poisoned
    want = target.model(tokens, pos, None, return_features=True)[1]
    lengths = [len(ids) for ids, _ in seqs]
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lacks .* training sequences"):
        Distiller(config(data_file, tmp_path / "short", seq_len=10, teacher_cache=str(cache)), target=target,
                  progress=False)
    retrained = tf.tiny_target()  # the same name and shapes, other weights (a fine-tuned target)
    assert retrained.name == target.name
    with torch.no_grad():
        retrained.model.norm.weight.mul_(1.5)
    with pytest.raises(ValueError, match="was made for .*'weights'"):
        Distiller(config(data_file, tmp_path / "retrained", teacher_cache=str(cache)), target=retrained,
                  progress=False)
    bf16 = tf.tiny_target()
    bf16.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="was made for"):
        Distiller(config(data_file, tmp_path / "bf16", precision="bf16", teacher_cache=str(cache)), target=bf16,
                  progress=False)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read"):
        Distiller(config(data_file, tmp_path / "broken", teacher_cache=str(broken)), target=target, progress=False)
    with pytest.raises(ValueError, match="feature heads"):
        DistillConfig(**{**dataclasses.asdict(config(data_file, tmp_path)), "init": "layers:0",
                         "teacher_cache": str(cache)}).validate()


def test_the_weights_fingerprint_sees_one_changed_value():
    """A teacher cache is refused for a target whose weights differ in a single value anywhere (an edited token row,
    a patched bias): the fingerprint reads every byte, not a sample of each tensor."""
    from tempspec_trainer.teacher_cache import weights_fingerprint

    model = torch.nn.Embedding(1000, 16)
    before = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == before
    with torch.no_grad():
        model.weight[617, 5] += 1e-3  # (flat index 9877: off the stride of a 4096-value sample, 3)
    assert weights_fingerprint(model) != before
    in_bf16 = weights_fingerprint(model.to(torch.bfloat16))
    assert weights_fingerprint(model.float()) != in_bf16  # the same values in another dtype


def test_tau_mix_averages_the_divergence_over_its_temperatures(target, data_file, tmp_path):
    d = Distiller(config(data_file, tmp_path, tau_mix=(0.0, 0.5, 1.0), divergence="jsd"), target=target,
                  progress=False)
    student, teacher = torch.randn(5, 64), torch.randn(5, 64)
    from tempspec_trainer.divergences import jsd
    want = sum(float(jsd(student, teacher, tau).mean()) for tau in (0.0, 0.5, 1.0)) / 3
    assert float(d.divergence(student, teacher)) == pytest.approx(want, rel=1e-6)
    assert d.cfg.tau_label() == "tau_mix=0,0.5,1"
    d.cfg.steps = d.cfg.eval_every = 2
    from tempspec_trainer.model_card import write_card

    card = write_card(d.run(), command="tempspec-train distill --tau-mix 0,0.5,1").read_text()
    assert card.startswith("# tempspec feature draft head (EAGLE-style): online KD on the temperature mixture "
                           "tau_kd in {0, 0.5, 1}")
    single = Distiller(config(data_file, tmp_path / "one", tau_kd=0.5, divergence="jsd"), target=target,
                       progress=False)
    assert float(single.divergence(student, teacher)) == pytest.approx(float(jsd(student, teacher, 0.5).mean()))


@pytest.mark.parametrize("overrides,match", [
    (dict(init="feature:layers=0"), "layers=N or mlp=N"),
    (dict(init="feature:depth=2"), "layers=N or mlp=N"),
    (dict(init="feature/vocab:abc"), "draft vocabulary"),
    (dict(init="feature/vocab:65"), "1..64"),
    (dict(unroll=0), "unroll"),
    (dict(feature_weight=-1.0), "feature_weight"),
    (dict(feature_noise=-0.1), "feature_noise"),
    (dict(feature_noise=float("nan")), "feature_noise"),
    (dict(init="layers:0", feature_noise=0.1), "feature_noise is for feature heads"),
    (dict(tau_mix=(0.5, -1.0)), "tau_mix"),
    (dict(tau_mix=(0.0, 1.0), divergence="rkl"), "drop 0 from tau_mix"),
])
def test_bad_feature_config_raises(target, data_file, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        Distiller(config(data_file, tmp_path, **overrides), target=target, progress=False)


def test_parse_feature_init():
    assert parse_feature_init("feature") == {"layers": 1, "mlp": None, "vocab": None, "vocab_from": "data"}
    assert parse_feature_init("feature:layers=2,mlp=512/vocab:first:100") == \
        {"layers": 2, "mlp": 512, "vocab": 100, "vocab_from": "first"}
    with pytest.raises(ValueError, match="not a feature head"):
        parse_feature_init("layers:0")


def test_feature_config_refuses_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        FeatureDraftConfig(dim=32, n_heads=4, n_kv_heads=3, head_dim=8, intermediate_size=64, vocab_size=64)
    with pytest.raises(ValueError, match="draft_vocab"):
        FeatureDraftConfig(dim=32, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64, vocab_size=64,
                           draft_vocab=65)


# ------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A 2-layer Hugging Face Llama (vocab 130, untied head) with a word-level tokenizer, and generated-data rows
    sampled from it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny_hf")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(127)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                  eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(d / "model")
    hf_tok.save_pretrained(d / "model")
    from tempspec_engine.models.loading import load_target

    loaded = load_target(str(d / "model"), torch.device("cpu"), torch.float32)
    rows = tf.sampled_rows(loaded, 40, prompt_len=5, response_len=8, seed=1, vocab=len(words))
    tf.write_jsonl(d / "t1.jsonl", rows)
    return d


FEATURE_ARGS = ["--init", "feature/vocab:100", "--steps", "4", "--batch-size", "4", "--precision", "fp32",
                "--eval-rows", "8", "--eval-every", "2", "--save-every", "2", "--lr", "1e-2", "--no-progress",
                "--tau-kd", "1.0", "--warmup-steps", "1", "--unroll", "2", "--feature-weight", "0.2",
                "--feature-noise", "0.05", "--eval-temperatures", "0,1"]


def test_distill_feature_head_from_the_command_line(tiny_hf, tmp_path):
    """distill then eval (expected acceptance) from the command line, with a head that taps the target's block 0."""
    from tempspec_trainer.cli import main

    out = tmp_path / "run"
    assert main(["distill", "--target", str(tiny_hf / "model"), "--data", str(tiny_hf / "t1.jsonl"), "--out-dir",
                 str(out), "--device", "cpu", "--feature-taps", "0"] + FEATURE_ARGS) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["recipe"]["feature_taps"] == [0]
    assert json.loads((out / "final" / "tempspec_draft.json").read_text())["config"]["taps"] == [0]
    assert log["step"] == 4 and log["recipe"]["init"] == "feature/vocab:100"
    assert log["recipe"]["feature_weight"] == 0.2 and log["recipe"]["unroll"] == 2
    assert log["recipe"]["feature_noise"] == 0.05
    assert [h["step"] for h in log["history"] if "alpha@0" in h] == [0, 2, 4]
    for name in ("init", "final"):
        assert is_feature_draft_dir(out / name)
    card = (out / "final" / "README.md").read_text()
    assert "feature draft head" in card and "fused with the outputs of its blocks 0 (EAGLE-3" in card
    assert "with U(-0.05, 0.05) noise on the target's features it reads" in card
    res = tmp_path / "eval.json"
    assert main(["eval", "--target", str(tiny_hf / "model"), "--drafts", str(out / "final"), "--data",
                 str(tiny_hf / "t1.jsonl"), "--n-rows", "8", "--temperatures", "0,1", "--out", str(res),
                 "--dtype", "fp32", "--device", "cpu"]) == 0
    expected = json.loads(res.read_text())["expected"][str(out / "final")]
    assert 0.0 <= expected["alpha@0"] <= 1.0 and 0.0 < expected["alpha@1"] <= 1.0


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun"))
                    and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_distill_feature_head_under_torchrun(tiny_hf, tmp_path):
    """Two processes over gloo: DDP wraps the unrolled head (one forward per backward); rank 0 writes."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", "29617", "-m", "tempspec_trainer.cli", "distill",
           "--target", str(tiny_hf / "model"), "--data", str(tiny_hf / "t1.jsonl"), "--out-dir", str(out),
           "--device", "cpu"] + FEATURE_ARGS
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "train_log.json").read_text())["step"] == 4
    assert is_feature_draft_dir(out / "final") and proc.stdout.count("final draft:") == 1


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_feature_head_trains_on_cuda(data_file, tmp_path, precision):
    """The same training on the GPU (draft vocabulary included); the final head reloads on CUDA and its cache path
    equals its causal path there."""
    target = tf.tiny_target()  # its own copy: the Distiller moves the teacher to the GPU
    d = Distiller(config(data_file, tmp_path, device="cuda", precision=precision, init="feature/vocab:48", lr=3e-2),
                  target=target, progress=False)
    assert next(d.draft.parameters()).is_cuda and d.draft.d2t.is_cuda
    final = d.run()
    assert d.history[-1]["alpha@1"] > d.history[0]["alpha@1"] + 0.05
    head = load_feature_draft(final, d.teacher)
    assert head.fc.weight.is_cuda and head.d2t.is_cuda
    tokens, positions = tokens_positions()
    tokens, positions = tokens.cuda(), positions.cuda()
    with torch.no_grad():
        _, feats = d.teacher(tokens, positions, None, return_features=True)
        want = head(feats, tokens, positions, None)
        cache = head.new_cache(2, 16)
        got = torch.cat([head(feats[:, :4], tokens[:, :4], positions[:, :4], cache, kv_len=4)]
                        + [head(feats[:, t:t + 1], tokens[:, t:t + 1], positions[:, t:t + 1], cache, kv_len=t + 1)
                           for t in range(4, 9)], 1)
    torch.testing.assert_close(head.logits(got), head.logits(want), atol=1e-4, rtol=1e-4)
