"""Trained draft checkpoints: a directory with `model.safetensors` and `tempspec_draft.json`.

A draft may share the target's token embeddings (and output head): those are not stored, and loading takes them
from the target, so a 2-layer draft of a 135M target is ~10 MB instead of ~70 MB. The JSON holds the draft's
ModelConfig, whether it shares the target's embeddings, the target it was made for (name, vocab size, width) and
free-form metadata (the trainer writes its recipe and measured acceptance there).

The weights may instead be stored xz-compressed as `model.safetensors.xz` (PACKED_FILE, `pack_weights`): bf16
weights shrink by about 30%, which keeps the drafts shipped with the package under their size budget; loading reads
either.

Drafts shipped with the package live in tempspec_engine/drafts/<name>/; `distilled:<tau>` picks the one distilled
at KD temperature tau for the default target.
"""
from __future__ import annotations

import dataclasses
import json
import lzma
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.llama import Transformer
from tempspec_engine.results import write_json

DRAFT_FILE = "tempspec_draft.json"
WEIGHTS_FILE = "model.safetensors"
PACKED_FILE = WEIGHTS_FILE + ".xz"
FORMAT = "tempspec-draft/1"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "drafts"
SHARED_KEYS = ("embed_tokens.weight", "lm_head.weight")


def draft_format(path) -> Optional[str]:
    """The "format" of the tempspec_draft.json in `path` (None when there is none or it is unreadable; never
    raises): FORMAT for a draft model, models/feature_draft.py's for a feature head."""
    try:
        info = json.loads((Path(path) / DRAFT_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError, TypeError):
        return None
    return info.get("format") if isinstance(info, dict) else None


def is_draft_dir(path) -> bool:
    """A directory with a tempspec_draft.json (of any format: a broken one is reported when it is loaded)."""
    return (Path(path) / DRAFT_FILE).is_file()


def save_draft(model: Transformer, directory, *, shares_target_embeddings: bool, target_name: str,
               target_vocab: int, metadata: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Writes `model` (weights cast to `dtype`, default their own; shared embeddings left out) and its JSON
    description."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype=dtype or v.dtype, device="cpu").contiguous() for k, v in model.state_dict().items()
             if not (shares_target_embeddings and k in SHARED_KEYS)}
    save_file(state, str(out / WEIGHTS_FILE))
    info = {"format": FORMAT, "config": dataclasses.asdict(model.config),
            "shares_target_embeddings": bool(shares_target_embeddings),
            "target": {"name": target_name, "vocab_size": int(target_vocab)},
            "metadata": metadata or {}}
    write_json(info, out / DRAFT_FILE, indent=2)  # standard JSON: a diverged run's nan loss is written as null
    return out


def read_info(directory, expected_format: str = FORMAT, what: str = "draft") -> dict:
    """The parsed tempspec_draft.json of a draft directory of `expected_format`; ValueError naming the file when it
    is broken."""
    path = Path(directory) / DRAFT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a tempspec {what} directory (no {DRAFT_FILE})")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != expected_format:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{path}: unknown {what} format {found!r} (expected {expected_format})")
    if not isinstance(info.get("config"), dict):
        raise ValueError(f"{path}: 'config' must be a JSON object")
    return info


def read_draft_info(directory) -> dict:
    """The parsed tempspec_draft.json of a draft-model directory (see read_info)."""
    info = read_info(directory)
    if not isinstance(info.get("shares_target_embeddings"), bool):
        raise ValueError(f"{Path(directory) / DRAFT_FILE}: 'shares_target_embeddings' must be a JSON boolean")
    return info


def _config(info: dict, directory) -> ModelConfig:
    try:
        return ModelConfig(**info["config"])
    except TypeError as exc:
        raise ValueError(f"{Path(directory) / DRAFT_FILE}: 'config' does not describe a model ({exc})") from None


def weights_path(directory) -> Path:
    """The weights file of a draft directory: model.safetensors, else model.safetensors.xz when only that exists."""
    plain, packed = Path(directory) / WEIGHTS_FILE, Path(directory) / PACKED_FILE
    return packed if packed.is_file() and not plain.is_file() else plain


def read_weights(directory) -> Dict[str, torch.Tensor]:
    """The tensors of model.safetensors (or its .xz); ValueError naming the file when it is missing, empty or
    truncated."""
    from safetensors.torch import load, load_file

    path = weights_path(directory)
    if not path.is_file():
        raise ValueError(f"{path} is missing: the draft directory is incomplete")
    try:
        return load(lzma.decompress(path.read_bytes())) if path.name == PACKED_FILE else load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for empty or truncated files
        raise ValueError(f"{path}: cannot read the weights ({' '.join(str(exc).split())}); the file is empty, "
                         "truncated or not safetensors") from None


def pack_weights(directory) -> Path:
    """Replaces the directory's model.safetensors by model.safetensors.xz (the same bytes, xz-compressed)."""
    plain = Path(directory) / WEIGHTS_FILE
    packed = plain.with_name(PACKED_FILE)
    packed.write_bytes(lzma.compress(plain.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    plain.unlink()
    return packed


def check_weights_fit(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Size], directory) -> None:
    """ValueError naming the weights file unless `state` has exactly the keys and shapes of `expected`."""
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(state[k].shape)} instead of {tuple(expected[k])}" for k in wrong[:2]]
        raise ValueError(f"{weights_path(directory)}: the weights do not fit the config in {DRAFT_FILE} "
                         f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}, shapes {shapes})")


def load_draft(directory, target: Optional[Transformer] = None, device=None, dtype=None) -> Transformer:
    """Builds the draft saved in `directory`. A draft that shares the target's embeddings needs `target` (the same
    vocabulary and width); its embedding and head are then the target's own tensors (no copy), and it takes the
    target's device and dtype. Other drafts are cast to `device` / `dtype` (default: as saved)."""
    info = read_draft_info(directory)
    config = _config(info, directory)
    shared = info["shares_target_embeddings"]
    if shared:
        if target is None:
            raise ValueError(f"draft {directory} shares the target's embeddings: pass the target model")
        tc = target.config
        if (tc.vocab_size, tc.dim) != (config.vocab_size, config.dim):
            raise ValueError(f"draft {directory} was made for a target with vocab {config.vocab_size} and width "
                             f"{config.dim}; this target has vocab {tc.vocab_size} and width {tc.dim}")
        device, dtype = target.embed_tokens.weight.device, target.embed_tokens.weight.dtype
    with torch.device("meta"):
        model = Transformer(config)
    state = read_weights(directory)
    check_weights_fit(state, {k: v.shape for k, v in model.state_dict().items()
                              if not (shared and k in SHARED_KEYS)}, directory)
    model.load_state_dict(state, strict=False, assign=True)
    if shared:  # attach the target's own modules after the cast, so the target is never modified
        model.embed_tokens, model.lm_head = torch.nn.Identity(), None
        model = model.to(device=device, dtype=dtype)
        model.embed_tokens, model.lm_head = target.embed_tokens, target.lm_head
        return model.eval()
    return model.to(device=device, dtype=dtype).eval()


MIX = "mix"  # the shipped-draft key (and spec suffix, e.g. feature:mix) of a draft trained on a temperature mixture


def shipped_drafts(expected_format: str = FORMAT) -> Dict[Union[float, str], Path]:
    """{key: directory} of the drafts of `expected_format` (draft models by default) shipped in
    tempspec_engine/drafts/ (empty when none): key = the recipe's tau_kd, or MIX for a recipe with a tau_mix."""
    found = {}
    if SHIPPED_DIR.is_dir():
        for d in sorted(SHIPPED_DIR.iterdir()):
            if draft_format(d) == expected_format:
                recipe = read_info(d, expected_format).get("metadata", {}).get("recipe", {})
                if recipe.get("tau_mix"):
                    found[MIX] = d
                elif recipe.get("tau_kd") is not None:
                    found[float(recipe["tau_kd"])] = d
    return found


def shipped_draft(tau: Union[float, str], expected_format: str = FORMAT, spec: str = "distilled") -> Path:
    """The shipped draft of `expected_format` distilled at KD temperature `tau` (or MIX: on a temperature mixture);
    ValueError listing the ones that exist otherwise."""
    drafts = shipped_drafts(expected_format)
    key = tau if tau == MIX else float(tau)
    if key not in drafts:
        names = [f"{spec}:{t:g}" for t in sorted(t for t in drafts if t != MIX)] + [f"{spec}:{MIX}"] * (MIX in drafts)
        raise ValueError(f"no shipped draft distilled at tau_kd={tau} ({spec}:T); shipped: "
                         f"{', '.join(names) or 'none'}")
    return drafts[key]
