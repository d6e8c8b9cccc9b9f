"""Drafts: trained ones (shipped, or saved by tempspec_trainer) and ones that need no training: a subset of the
target's layers (sharing its weights), n-gram lookup, or a random small model.

Draft specs (CLI `--draft` and SpeculativeEngine(draft=...)):
  "default"                    "lookup+feature:1" for the default target, "lookup" for any other (default_draft)
  "layers:0,14,29"             the target's layers 0, 14 and 29 with its embeddings, final norm and head
  "layers:0-3,29"              ranges are inclusive
  "layers:0,14,29/vocab:8192"  the head restricted to the first 8192 token ids (BPE ids are roughly in frequency
                               order, so this keeps the common tokens and cuts the head's cost; still lossless)
  "random" / "random:2"        a randomly initialized 2-layer model with the target's vocabulary (tests only)
  "lookup" / "lookup:4"        no model: n-gram lookup in the request's own tokens (models/lookup_draft.py)
  "lookup+distilled:1"         hybrid: lookup proposes for a row whose last 2-3 tokens occurred earlier, the model
                               after the "+" (any spec below) for the others (it runs only when some row needs it)
  "distilled:0.5"              the shipped draft distilled at KD temperature 0.5 (tempspec_engine/drafts/)
  "feature:1"                  the shipped EAGLE-style feature head distilled at KD temperature 1 ("feature:mix":
                               the one distilled on the temperature mixture)
  a tempspec draft directory   a draft saved by tempspec_trainer (models/draft_checkpoint.py), or an EAGLE-style
                               feature head (models/feature_draft.py: it reads the target's own features)
  "distilled:1/vocab:8192"     any of the two above with its head restricted likewise
  a Hugging Face model directory  (checked for the same tokenizer)
  a hub id                     only with allow_download=True (CLI --allow-download) and HF_HUB_OFFLINE unset
Anything else is refused at once with the list of these forms (models/loading.py:model_source).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.draft_checkpoint import MIX, is_draft_dir, load_draft, shipped_draft
from tempspec_engine.models.feature_draft import FORMAT as FEATURE_FORMAT
from tempspec_engine.models.feature_draft import is_feature_draft_dir, load_feature_draft, read_feature_draft_info
from tempspec_engine.models.llama import Transformer
from tempspec_engine.models.loading import LoadedModel, check_tokenizers, load_hf, model_source, place

# The default draft: for the default target, the fastest at T=0.7 on a 2-core CPU, and at T=0, 0.5 and 1 too (README,
# "The heads after their sixth stage" has the measurement, the earlier heads' runs before it); the heads fit only that
# target, so any other target gets n-gram lookup (layer subsets of a target are accepted almost never:
# benchmarks/draft_search.py).
DEFAULT_DRAFT = "lookup+feature:1"
FALLBACK_DRAFT = "lookup"
# the forms of a draft spec that are not paths, for error messages
SPEC_FORMS = ("a draft spec (default, none, lookup[:N], lookup+<model spec>, layers:<ids>[/vocab:N], "
              "distilled:<T>[/vocab:N], feature:<T>, feature:mix, random[:N]) nor a tempspec draft directory[/vocab:N]")


def layer_subset_draft(target: Transformer, layer_ids: Sequence[int], vocab_limit: Optional[int] = None) -> Transformer:
    """A Transformer whose blocks are the target's blocks `layer_ids` (same objects: no memory, no training)."""
    n = target.n_layers
    ids = list(layer_ids)
    if not ids or any(i < 0 or i >= n for i in ids):
        raise ValueError(f"layer ids {ids} must be a non-empty subset of 0..{n - 1}")
    config = dataclasses.replace(target.config, n_layers=len(ids))
    draft = Transformer(config, embed_tokens=target.embed_tokens, layers=[target.layers[i] for i in ids],
                        norm=target.norm, lm_head=target.lm_head, vocab_limit=vocab_limit)
    return draft.eval()


def random_draft(target_config: ModelConfig, n_layers: int = 1, seed: int = 0, device=None, dtype=None) -> Transformer:
    """A randomly initialized small Llama with the target's vocabulary (for tests: low acceptance, still lossless)."""
    dim = 64
    config = ModelConfig(vocab_size=target_config.vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                         head_dim=16, intermediate_size=128, tie_embeddings=True,
                         max_position=target_config.max_position)
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval()


def parse_layer_ids(text: str, n_layers: int) -> list:
    """'0,14,29' or '0-3,29' (inclusive ranges) -> layer ids; ValueError unless a non-empty subset of 0..n-1."""
    ids = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                ids.extend(range(int(lo), int(hi) + 1))
            elif part:
                ids.append(int(part))
    except ValueError:
        raise ValueError(f"layer list {text!r}: use comma-separated ids and inclusive ranges, e.g. '0-3,29'") from None
    if not ids or any(i < 0 or i >= n_layers for i in ids):
        raise ValueError(f"layer ids {ids} must be a non-empty subset of 0..{n_layers - 1}")
    return ids


def _vocab_limit(text: str, vocab_size: int) -> int:
    """The N of a '/vocab:N' suffix: the draft's head covers token ids [0, N) only."""
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"'/vocab:{text}': N must be an integer") from None
    if not 1 <= n <= vocab_size:
        raise ValueError(f"'/vocab:{n}' must lie in 1..{vocab_size} (the vocabulary size)")
    return n


def _spec_number(spec: str, default, cast=int, minimum=1, usage: str = ""):
    """The number after the ':' of a spec like "lookup:4" (default without one); a ValueError naming the spec."""
    _, colon, text = spec.partition(":")
    if not colon:
        return default
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or (minimum is not None and value < minimum):
        raise ValueError(f"draft {spec!r}: {usage}")
    return value


def make_lookup(spec: str, vocab_size: int, min_ngram: int = 1):
    """A LookupDraft from "lookup" or "lookup:N" (N: the longest n-gram matched, default 3)."""
    from tempspec_engine.models.lookup_draft import LookupDraft

    max_ngram = _spec_number(spec, 3, usage="use 'lookup' or 'lookup:N' with an integer N >= 1")
    return LookupDraft(vocab_size, max_ngram, min(min_ngram, max_ngram))


def split_hybrid(spec):
    """'lookup+distilled:1' -> ('lookup', 'distilled:1'); any other spec or object -> (None, spec)."""
    if isinstance(spec, str) and spec.startswith("lookup") and "+" in spec:
        lookup, _, model = spec.partition("+")
        if not model or model.startswith("lookup"):
            raise ValueError(f"draft {spec!r}: after 'lookup+' comes a model draft spec, e.g. lookup+distilled:1")
        return lookup, model
    return None, spec


def check_spec_form(spec, allow_download: bool = False) -> None:
    """Refuses a draft string that is none of the forms of the module docstring, before any model is loaded."""
    if not isinstance(spec, str) or spec in ("default", "none"):
        return
    _, spec = split_hybrid(spec)
    body = spec.partition("/vocab:")[0]
    if body in ("lookup", "random") or body.split(":")[0] in ("lookup", "random", "layers", "distilled", "feature"):
        return
    if not is_draft_dir(body):
        model_source(body, "draft", SPEC_FORMS, allow_download)


def default_draft(target: LoadedModel) -> str:
    """The spec "default" stands for: DEFAULT_DRAFT when the shipped feature head it names was made for this target
    (same name, vocabulary and width: the default target), else FALLBACK_DRAFT (n-gram lookup fits any target)."""
    made_for = read_feature_draft_info(shipped_draft(1.0, FEATURE_FORMAT, "feature"))["target"]
    config = getattr(target.model, "config", None)
    fits = (isinstance(target.model, Transformer) and target.name == made_for["name"]
            and (config.vocab_size, config.dim) == (made_for["vocab_size"], made_for["dim"]))
    return DEFAULT_DRAFT if fits else FALLBACK_DRAFT


def shipped_feature_dir(spec: str) -> Path:
    """The directory of a shipped feature head: 'feature:T' (a number T) or 'feature:mix'; ValueError otherwise."""
    tau = MIX if spec == f"feature:{MIX}" else _spec_number(
        spec, None, float, None, f"use 'feature:T' with a number T (e.g. feature:1) or 'feature:{MIX}'")
    return shipped_draft(tau, FEATURE_FORMAT, "feature")


def make_draft(spec, target: LoadedModel, device, dtype, allow_download: bool = False) -> LoadedModel:
    """Builds a draft from a spec string (see module docstring), a LoadedModel or a Transformer (these two are moved
    to `device` and `dtype` in place). A string that is none of the forms is refused at once (ValueError)."""
    if isinstance(spec, LoadedModel):
        check_tokenizers(target, spec)
        return place(spec, device, dtype)
    if isinstance(spec, torch.nn.Module):
        return place(LoadedModel(spec, target.tokenizer, target.eos_ids, "custom draft"), device, dtype)
    spec = default_draft(target) if spec in (None, "default") else str(spec)
    if split_hybrid(spec)[0] is not None:
        raise ValueError(f"draft {spec!r}: a lookup hybrid is built by the engine (SpeculativeEngine), not by "
                         "make_draft")
    if spec.startswith("layers:"):
        if not isinstance(target.model, Transformer):
            raise ValueError("layer-subset drafts need a Llama-family target")
        body, _, vocab = spec[len("layers:"):].partition("/vocab:")
        limit = _vocab_limit(vocab, target.model.config.vocab_size) if vocab else None
        model = layer_subset_draft(target.model, parse_layer_ids(body, target.model.n_layers), limit)
        return LoadedModel(model, target.tokenizer, target.eos_ids, spec)
    if spec == "lookup" or spec.startswith("lookup:"):
        return LoadedModel(make_lookup(spec, target.vocab_size), target.tokenizer, target.eos_ids, spec)
    if spec == "random" or spec.startswith("random:"):
        n_layers = _spec_number(spec, 1, usage="use 'random' or 'random:N' with an integer N >= 1 (layers)")
        model = random_draft(target.model.config, n_layers, device=device, dtype=dtype)
        return LoadedModel(model, target.tokenizer, target.eos_ids, spec)
    body, _, vocab = spec.rpartition("/vocab:") if "/vocab:" in spec else (spec, "", "")
    if body.startswith("feature:"):
        body = shipped_feature_dir(body)
    if is_feature_draft_dir(body):
        if vocab:
            raise ValueError(f"draft {spec!r}: a feature head's vocabulary is set when it is trained "
                             "(tempspec-train distill --init feature/vocab:N), not by a '/vocab:N' suffix")
        head = load_feature_draft(body, target.model, device, dtype)
        return LoadedModel(head, target.tokenizer, target.eos_ids, spec)
    if body.startswith("distilled:") or is_draft_dir(body):
        if not isinstance(target.model, Transformer):
            raise ValueError("trained tempspec drafts need a Llama-family target")
        directory = (shipped_draft(_spec_number(body, None, float, None, "use 'distilled:T' with a number T, e.g. "
                                                "distilled:0.5")) if body.startswith("distilled:") else body)
        model = load_draft(directory, target.model, device, dtype)
        model.vocab_limit = _vocab_limit(vocab, model.config.vocab_size) if vocab else None
        return LoadedModel(model, target.tokenizer, target.eos_ids, spec)
    if vocab:
        raise ValueError(f"draft {spec!r}: '/vocab:N' follows a layer subset, distilled:T or a tempspec draft "
                         f"directory, and {body!r} is none of them")
    draft = load_hf(model_source(spec, "draft", SPEC_FORMS, allow_download), device, dtype,
                    allow_download=allow_download)
    check_tokenizers(target, draft)
    return draft
