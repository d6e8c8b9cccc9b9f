"""Trained-draft checkpoints in the engine: save/load round trip (with and without the target's shared embeddings),
clear errors, the `distilled:<tau>` spec, and the drafts shipped with the package (size, model cards, loading)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.draft_checkpoint import (DRAFT_FILE, MIX, PACKED_FILE, SHIPPED_DIR, WEIGHTS_FILE,
                                                     is_draft_dir, load_draft, pack_weights, read_draft_info,
                                                     save_draft, shipped_draft, shipped_drafts)
from tempspec_engine.models.feature_draft import FORMAT as FEATURE_FORMAT
from tempspec_engine.models.llama import Transformer

TINY = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64,
                   tie_embeddings=True)


def _model(config=TINY, seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(config, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def _logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


@pytest.mark.parametrize("shared", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, shared):
    target = _model(seed=1)
    config = dataclasses.replace(TINY, n_layers=1, intermediate_size=48)
    kw = {"embed_tokens": target.embed_tokens} if shared else {}
    draft = _model(config, seed=2, **kw)
    save_draft(draft, tmp_path / "d", shares_target_embeddings=shared, target_name="tiny", target_vocab=96,
               metadata={"recipe": {"tau_kd": 0.5}, "loss": float("inf")})
    assert is_draft_dir(tmp_path / "d")
    text = (tmp_path / "d" / "tempspec_draft.json").read_text()  # standard JSON: inf and nan written as null
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c))["metadata"]["loss"] is None
    loaded = load_draft(tmp_path / "d", target)
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(loaded, tokens), _logits(draft, tokens))
    if shared:  # the shared tensors are the target's own, not copies, and were not saved
        assert loaded.embed_tokens is target.embed_tokens
        from safetensors.torch import load_file

        assert "embed_tokens.weight" not in load_file(str(tmp_path / "d" / "model.safetensors"))
    # packed (xz) weights load to the same draft
    packed = pack_weights(tmp_path / "d")
    assert packed.name == PACKED_FILE and not (tmp_path / "d" / WEIGHTS_FILE).exists()
    assert torch.equal(_logits(load_draft(tmp_path / "d", target), tokens), _logits(draft, tokens))


def test_trained_draft_with_a_restricted_head(tmp_path):
    """'<draft>/vocab:N' keeps the draft's logits for ids < N exactly and makes the others -inf; bad N is refused."""
    from tempspec_engine.models.draft import make_draft
    from tempspec_engine.models.loading import LoadedModel

    target = LoadedModel(_model(seed=1), None, (), "tiny")
    draft = _model(dataclasses.replace(TINY, n_layers=1), seed=2, embed_tokens=target.model.embed_tokens)
    save_draft(draft, tmp_path / "d", shares_target_embeddings=True, target_name="tiny", target_vocab=96)
    tokens = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    full = _logits(make_draft(str(tmp_path / "d"), target, "cpu", torch.float32).model, tokens)
    cut = _logits(make_draft(f"{tmp_path / 'd'}/vocab:40", target, "cpu", torch.float32).model, tokens)
    torch.testing.assert_close(cut[..., :40], full[..., :40])
    assert torch.isneginf(cut[..., 40:]).all()
    for bad in ("0", "97", "x"):
        with pytest.raises(ValueError, match="vocab:"):
            make_draft(f"{tmp_path / 'd'}/vocab:{bad}", target, "cpu", torch.float32)


def test_shared_draft_needs_a_matching_target(tmp_path):
    target = _model(seed=1)
    draft = _model(dataclasses.replace(TINY, n_layers=1), seed=2, embed_tokens=target.embed_tokens)
    save_draft(draft, tmp_path / "d", shares_target_embeddings=True, target_name="tiny", target_vocab=96)
    with pytest.raises(ValueError, match="pass the target"):
        load_draft(tmp_path / "d")
    other = _model(dataclasses.replace(TINY, vocab_size=128), seed=3)
    with pytest.raises(ValueError, match="vocab 96"):
        load_draft(tmp_path / "d", other)


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=DRAFT_FILE):
        read_draft_info(tmp_path)
    (tmp_path / DRAFT_FILE).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="unknown draft format"):
        read_draft_info(tmp_path)
    with pytest.raises(ValueError, match="no shipped draft distilled at tau_kd=9.5"):
        shipped_draft(9.5)
    with pytest.raises(ValueError, match=r"shipped: feature:0, feature:0\.5, feature:1, feature:mix"):
        shipped_draft(9.5, FEATURE_FORMAT, "feature")


SHIPPED = shipped_drafts()


def test_shipped_drafts_are_small_and_documented():
    """Issue 4: distilled drafts for tau_kd 0, 0.5, 1.0 ship with the package, each with a card; issue 12: with the
    feature heads, <= 64 MB in all."""
    assert sorted(SHIPPED) == [0.0, 0.5, 1.0]
    total = sum(f.stat().st_size for f in SHIPPED_DIR.rglob("*") if f.is_file())
    assert total <= 64 * 10**6, f"shipped drafts take {total / 10**6:.1f} MB"
    from tempspec_engine.models.feature_draft import read_feature_draft_info

    heads = shipped_drafts(FEATURE_FORMAT)
    assert sorted(heads, key=str) == sorted([0.0, 0.5, 1.0, MIX], key=str)
    for tau, d in heads.items():
        card = (d / "README.md").read_text()
        assert "feature head" in card and "tempspec-train distill" in card
        recipe = read_feature_draft_info(d)["metadata"]["recipe"]
        assert (recipe["tau_mix"] == [0.0, 0.5, 1.0] if tau == MIX else recipe["tau_kd"] == tau and not
                recipe["tau_mix"])
        assert read_feature_draft_info(d)["metadata"]["final"] is True
    # one recipe apart from the temperature, stage by stage (each head continues its own earlier stages): the heads
    # compare the KD temperatures and nothing else
    def stages(d):
        meta = read_feature_draft_info(d)["metadata"]
        return [{k: v for k, v in recipe.items() if k not in ("tau_kd", "tau_mix", "out_dir", "init")}
                for recipe in [s["recipe"] for s in meta["lineage"]] + [meta["recipe"]]]

    assert all(stages(d) == stages(heads[1.0]) for d in heads.values())
    for d in heads.values():  # each continues its own: from the head as shipped, or from its last stage's final draft
        meta = read_feature_draft_info(d)["metadata"]
        init = Path(meta["recipe"]["init"])
        assert init.name == d.name or init == Path(meta["lineage"][-1]["recipe"]["out_dir"]) / "final", init
    for tau, d in SHIPPED.items():
        card = (d / "README.md").read_text()
        assert "tempspec-train distill" in card and "alpha" in card
        info = read_draft_info(d)
        assert info["shares_target_embeddings"] and info["metadata"]["recipe"]["tau_kd"] == tau
        assert info["metadata"]["final"] is True
        assert info["metadata"]["recipe"]["divergence"] == "jsd"  # the divergence that won the comparison


@pytest.mark.parametrize("spec", ["feature:0", "feature:0.5", "feature:1", "feature:mix"])
def test_feature_specs_load_on_the_target_shape(spec):
    """Each shipped head loads by its spec onto a target of the default's shape (random weights, 2 layers), sharing
    the target's embedding."""
    from tempspec_engine.models.draft import make_draft
    from tempspec_engine.models.feature_draft import read_feature_draft_info
    from tempspec_engine.models.loading import LoadedModel

    tau = MIX if spec.endswith(MIX) else float(spec.split(":")[1])
    info = read_feature_draft_info(shipped_drafts(FEATURE_FORMAT)[tau])
    c = info["config"]
    target = Transformer(ModelConfig(vocab_size=c["vocab_size"], dim=c["dim"], n_layers=2, n_heads=c["n_heads"],
                                     n_kv_heads=c["n_kv_heads"], head_dim=c["head_dim"], intermediate_size=64,
                                     tie_embeddings=True)).to(torch.bfloat16)
    head = make_draft(spec, LoadedModel(target, None, (), "t"), "cpu", torch.bfloat16).model
    assert head.embed_tokens is target.embed_tokens and head.d2t.shape == (c["draft_vocab"],)


def test_distilled_spec_loads_on_the_target_shape():
    """The shipped weights load onto a target of the default's shape (random weights: no download needed)."""
    info = read_draft_info(SHIPPED[0.5])
    c = ModelConfig(**info["config"])
    target = Transformer(dataclasses.replace(c, n_layers=2, intermediate_size=64)).to(torch.bfloat16)
    from tempspec_engine.models.draft import make_draft
    from tempspec_engine.models.loading import LoadedModel

    draft = make_draft("distilled:0.5", LoadedModel(target, None, (), "t"), "cpu", torch.bfloat16).model
    assert draft.embed_tokens is target.embed_tokens and draft.n_layers == c.n_layers
    logits = _logits(draft, torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, c.vocab_size) and torch.isfinite(logits).all()
