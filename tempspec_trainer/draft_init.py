"""Initial drafts for distillation, built from the target (a Llama-family tempspec Transformer).

Init specs:
  "layers:0,29"            copies of the target's layers 0 and 29 (trainable), its final norm (trainable) and its
                           token embeddings / head (frozen, shared: not saved with the draft)
  "layers:0,29/mlp:1024"   the same with each MLP pruned to its 1024 strongest channels (smaller, faster)
  "fresh:dim=256,layers=4" a fresh small model with its own tied embeddings (other keys: heads, kv_heads, mlp)
Returns (draft in fp32, shares_target_embeddings).

Feature heads (EAGLE-style, tempspec_engine/models/feature_draft.py), built by init_feature_draft:
  "feature"                      one decoder layer of the target's shapes on (target feature, next token embedding)
  "feature:layers=2,mlp=512"     two layers, MLP width 512 (default: the target's)
  "feature/vocab:8192"           a draft vocabulary of the 8192 most frequent response tokens of the training data
  "feature/vocab:first:8192"     ... or of the first 8192 token ids
  "feature:1", "feature:mix"     warm start: a copy of a shipped head (its shapes, token map and weights), trained on
  DIR                            ... or of the feature head saved in DIR (a `tempspec-train distill` output)
The head shares the target's frozen embedding and output head (the same tensors, never stored with it). Any of them
also reads the outputs of chosen target blocks with `taps` (DistillConfig.feature_taps, `--feature-taps 2,15`).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.draft import parse_layer_ids, shipped_feature_dir
from tempspec_engine.models.feature_draft import (FeatureDraft, FeatureDraftConfig, check_taps, is_feature_draft_dir,
                                                  load_feature_draft, read_feature_draft_info,
                                                  token_map_from_counts)
from tempspec_engine.models.llama import Block, Transformer


def prune_mlp(block: Block, keep: int) -> None:
    """Keeps the `keep` intermediate channels of block.mlp with the largest |gate| * |up| * |down| norms."""
    mlp = block.mlp
    n = mlp.gate_proj.weight.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"mlp width {keep} must lie in [1, {n}]")
    score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
    idx = score.topk(keep).indices.sort().values
    for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
        w = lin.weight.detach().index_select(dim, idx).clone()
        lin.weight = torch.nn.Parameter(w)
        lin.in_features, lin.out_features = w.shape[1], w.shape[0]


def _fresh(target_config: ModelConfig, options: str, seed: int) -> Transformer:
    opts = {"dim": 256, "layers": 4, "heads": 4, "kv_heads": 2, "mlp": 688}
    for part in filter(None, options.split(",")):
        key, _, value = part.partition("=")
        if key not in opts or not value.isdigit():
            raise ValueError(f"fresh draft option {part!r}: use key=int with keys {sorted(opts)}")
        opts[key] = int(value)
    if opts["dim"] % opts["heads"] or opts["heads"] % opts["kv_heads"]:
        raise ValueError(f"dim must be a multiple of heads and heads of kv_heads, got {opts}")
    config = ModelConfig(vocab_size=target_config.vocab_size, dim=opts["dim"], n_layers=opts["layers"],
                         n_heads=opts["heads"], n_kv_heads=opts["kv_heads"], head_dim=opts["dim"] // opts["heads"],
                         intermediate_size=opts["mlp"], rms_eps=target_config.rms_eps,
                         rope_theta=target_config.rope_theta, tie_embeddings=True,
                         max_position=target_config.max_position)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model


def init_draft(target: Transformer, spec: str, seed: int = 0) -> Tuple[Transformer, bool]:
    """A trainable fp32 draft from the target per `spec` (module docstring); the target is left untouched."""
    if not isinstance(target, Transformer):
        raise ValueError("drafts are initialized from a Llama-family target (a tempspec Transformer)")
    if spec.startswith("fresh"):
        return _fresh(target.config, spec.partition(":")[2], seed), False
    if is_feature_init(spec):
        raise ValueError(f"draft init {spec!r} is a feature head: build it with init_feature_draft")
    if not spec.startswith("layers:"):
        raise ValueError(f"unknown draft init {spec!r}: use 'layers:0,29', 'layers:0,29/mlp:1024', "
                         "'fresh:dim=256,layers=4' or 'feature[:layers=N,mlp=M][/vocab:N]'")
    body, _, mlp = spec[len("layers:"):].partition("/mlp:")
    ids = parse_layer_ids(body, target.n_layers)
    blocks = [copy.deepcopy(target.layers[i]).float() for i in ids]
    if mlp:
        for b in blocks:
            prune_mlp(b, int(mlp))
    width = int(mlp) if mlp else target.config.intermediate_size
    config = dataclasses.replace(target.config, n_layers=len(ids), intermediate_size=width)
    embed = copy.deepcopy(target.embed_tokens).float().requires_grad_(False)
    head = copy.deepcopy(target.lm_head).float().requires_grad_(False) if target.lm_head is not None else None
    norm = copy.deepcopy(target.norm).float()
    draft = Transformer(config, embed_tokens=embed, layers=blocks, norm=norm, lm_head=head)
    for p in draft.parameters():
        if p is not embed.weight and (head is None or p is not head.weight):
            p.requires_grad_(True)
    return draft, True


FEATURE_USAGE = ("use 'feature', 'feature:layers=N,mlp=M', with '/vocab:N' or '/vocab:first:N' after it, or a saved "
                 "head to start from: 'feature:T', 'feature:mix' or its directory")


def is_feature_init(spec: str) -> bool:
    """Whether an init spec asks for an EAGLE-style feature head ("feature..." or a saved head's directory)."""
    return isinstance(spec, str) and (spec == "feature" or spec.startswith(("feature:", "feature/"))
                                      or is_feature_draft_dir(spec))


def warm_start_dir(spec: str) -> Optional[Path]:
    """The saved head a feature init starts from: a shipped one ('feature:T', 'feature:mix') or a feature-draft
    directory; None for a fresh head ('feature', 'feature:layers=N,...', '/vocab:N'). ValueError for a shipped name
    that does not exist."""
    if is_feature_draft_dir(spec):
        return Path(spec)
    if spec.startswith("feature:") and "=" not in spec and "/" not in spec:
        return shipped_feature_dir(spec)
    return None


def warm_start_lineage(spec: str, _seen: Optional[set] = None) -> list:
    """The training stages behind a feature init, oldest first: [] for a fresh head; else the stages of the head it
    warm-starts from plus that head's own stage, {"recipe": its recipe, "step": its steps}. A head saved with a
    "lineage" in its metadata gives it; an older one's init is resolved now (a directory that is gone ends the
    lineage). A new head records this in its metadata, so that its card names every stage even after a shipped head
    it started from is replaced."""
    try:
        start = warm_start_dir(spec) if is_feature_init(spec) else None
    except ValueError:  # a shipped name that no longer exists
        return []
    seen = set() if _seen is None else _seen
    if start is None or start.resolve() in seen:
        return []
    seen.add(start.resolve())
    meta = read_feature_draft_info(start).get("metadata") or {}
    recipe = meta.get("recipe") or {}
    earlier = meta["lineage"] if "lineage" in meta else warm_start_lineage(str(recipe.get("init", "feature")), seen)
    return list(earlier) + [{"recipe": recipe, "step": meta.get("step")}]


def parse_feature_init(spec: str, vocab_size: Optional[int] = None) -> dict:
    """'feature:layers=2,mlp=512/vocab:8192' -> {"layers": 2, "mlp": 512 or None, "vocab": 8192 or None,
    "vocab_from": "data" | "first"}; a warm start -> {"from": its directory}; ValueError naming the spec for anything
    else (vocab checked against vocab_size when given)."""
    if not is_feature_init(spec):
        raise ValueError(f"draft init {spec!r} is not a feature head: {FEATURE_USAGE}")
    start = warm_start_dir(spec)
    if start is not None:
        return {"from": str(start)}
    body, _, vocab = spec.partition("/vocab:")
    if "/" in body:
        raise ValueError(f"draft init {spec!r}: {FEATURE_USAGE}")
    opts = {"layers": 1, "mlp": None, "vocab": None, "vocab_from": "data"}
    for part in filter(None, body[len("feature"):].lstrip(":").split(",")):
        key, _, value = part.partition("=")
        if key not in ("layers", "mlp") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"draft init {spec!r}: option {part!r} must be layers=N or mlp=N with N >= 1 "
                             f"({FEATURE_USAGE})")
        opts[key] = int(value)
    if "/vocab:" in spec:
        if vocab.startswith("first:"):
            opts["vocab_from"], vocab = "first", vocab[len("first:"):]
        if not vocab.isdigit() or int(vocab) < 1 or (vocab_size is not None and int(vocab) > vocab_size):
            limit = f"1..{vocab_size}" if vocab_size is not None else ">= 1"
            raise ValueError(f"draft init {spec!r}: the draft vocabulary N of '/vocab:N' must be an integer in "
                             f"{limit}")
        opts["vocab"] = int(vocab)
    return opts


def init_feature_draft(target: Transformer, spec: str, seed: int = 0,
                       token_counts: Optional[torch.Tensor] = None, taps: Sequence[int] = ()) -> FeatureDraft:
    """A trainable fp32 feature head for `target` per `spec` (module docstring), attached to the target's own
    embedding and head (frozen, shared). token_counts [V]: response-token frequencies of the training data, from which
    '/vocab:N' takes its N most frequent ids (required for it). fc and the block weights ~ N(0, 1/fan_in); the final
    norm starts as the target's, so predicted features start on the target features' scale. A warm start (a shipped
    head or a directory) loads that head instead (load_feature_draft: refused for another target's vocabulary or
    width). taps: target blocks the head also reads (EAGLE-3), its fuse starting as the identity on the final
    features; a warm start keeps its own taps when none are given, and gains them when it has none."""
    if not isinstance(target, Transformer):
        raise ValueError("feature heads are built for a Llama-family target (a tempspec Transformer)")
    taps = check_taps(tuple(taps), "feature taps", target.n_layers)
    opts = parse_feature_init(spec, target.config.vocab_size)
    if "from" in opts:  # warm start: the saved head's shapes, token map and weights, in fp32
        head = load_feature_draft(opts["from"], target, device=target.embed_tokens.weight.device,
                                  dtype=torch.float32)
        if taps and head.config.taps != taps:
            if head.config.taps:
                raise ValueError(f"draft init {spec!r} reads taps {list(head.config.taps)}, not {list(taps)}: "
                                 "leave the taps out to keep its own")
            tapped = FeatureDraft(dataclasses.replace(head.config, taps=taps), d2t=head.d2t)
            tapped = tapped.to(device=head.fc.weight.device, dtype=torch.float32)
            tapped.load_state_dict(head.state_dict(), strict=False)  # all but the new fuse
            head = tapped.reset_fuse().attach(target.embed_tokens, target.lm_head)
        return head.requires_grad_(True)
    d2t = None
    if opts["vocab"] is not None:
        if opts["vocab_from"] == "first":
            d2t = torch.arange(opts["vocab"])
        elif token_counts is None:
            raise ValueError(f"draft init {spec!r}: a frequency token map needs the training data's token counts")
        else:
            d2t = token_map_from_counts(token_counts, opts["vocab"])
    config = FeatureDraftConfig.for_target(target.config, n_layers=opts["layers"], intermediate_size=opts["mlp"],
                                           draft_vocab=opts["vocab"], taps=taps)
    torch.manual_seed(seed)
    head = FeatureDraft(config, d2t=d2t)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.dim() > 1 and not name.startswith("fuse."):  # (a fuse starts as [I, 0])
                p.normal_(0.0, p.shape[1] ** -0.5)
        head.norm.weight.copy_(target.norm.weight.detach().float())
    head.attach(target.embed_tokens, target.lm_head)
    return head.float()
