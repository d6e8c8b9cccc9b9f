"""The target's final-norm features for a fixed set of training sequences, computed once and reused.

A feature head trains on what the target computes for its data: the final hidden states after the final norm (the
output head's input). The target's logits follow from them exactly (logits = features @ W_head^T), so with the
features on disk a run needs no target forward at all, and every later run on the same rows (heads at other tau_kd,
other divergences, longer schedules) reuses them. A teacher cache is one safetensors file:

  tokens   int32 [N]      the sequences' token ids, concatenated
  offsets  int64 [S + 1]  sequence s is tokens[offsets[s]:offsets[s + 1]]
  features <dtype> [N, W] the target's features at those tokens, in the target's dtype: W = D (its final features),
                         or (1 + n) D with a head's n taps (the outputs of those target blocks follow)

and metadata (target name and weights fingerprint, width D, dtype, taps, format). Sequences are found by their token
ids, so a cache made from other data or another seq_len is refused rather than misread.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

FORMAT = "tempspec-teacher-cache/1"

Seq = Tuple[List[int], int]  # (token ids, number of prompt tokens), as data.token_sequences yields


def _key(ids: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(i) for i in ids)


class TeacherCache:
    """features of token sequences; `batch(seqs)` pads them like data.make_batch pads the tokens."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, features: torch.Tensor):
        if tokens.dim() != 1 or offsets.dim() != 1 or features.dim() != 2 or features.shape[0] != tokens.shape[0] \
                or int(offsets[0]) != 0 or int(offsets[-1]) != tokens.shape[0]:
            raise ValueError("teacher cache: tokens, offsets and features do not describe the same sequences")
        self.tokens, self.features, self.offsets = tokens, features, offsets
        starts = offsets.tolist()
        flat = tokens.tolist()
        self.index: Dict[Tuple[int, ...], int] = {_key(flat[a:b]): s for s, (a, b) in
                                                  enumerate(zip(starts[:-1], starts[1:]))}

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def missing(self, seqs: Sequence[Seq]) -> int:
        """How many of `seqs` the cache does not hold."""
        return sum(_key(ids) not in self.index for ids, _ in seqs)

    def batch(self, seqs: Sequence[Seq], device) -> torch.Tensor:
        """features [B, T, D] (T = the longest sequence; zeros past a row's end) of the cache's dtype on `device`."""
        T = max(len(ids) for ids, _ in seqs)
        out = self.features.new_zeros(len(seqs), T, self.dim)
        for b, (ids, _) in enumerate(seqs):
            s = self.index.get(_key(ids))
            if s is None:
                raise KeyError("teacher cache: a training sequence is not in the cache")
            a, e = int(self.offsets[s]), int(self.offsets[s + 1])
            out[b, : e - a] = self.features[a:e]
        return out.to(device)

    def save(self, path, metadata: Dict[str, str]) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"tokens": self.tokens.to(torch.int32).contiguous(), "offsets": self.offsets.contiguous(),
                   "features": self.features.contiguous()}, str(tmp), metadata={"format": FORMAT, **metadata})
        tmp.replace(path)  # never a half-written cache under the real name
        return path


@torch.no_grad()
def compute_teacher_cache(teacher, seqs: Sequence[Seq], batch_size: int, device, progress: bool = True,
                          taps: Sequence[int] = ()) -> TeacherCache:
    """One forward of `teacher` (a tempspec Transformer) per batch of sequences (sorted by length, so little padding),
    keeping its features (no logits; with the outputs of blocks `taps` after them) on the CPU."""
    from tqdm.auto import tqdm

    unique = list({_key(ids): None for ids, _ in seqs})
    order = sorted(range(len(unique)), key=lambda s: len(unique[s]))
    lengths = torch.tensor([len(unique[s]) for s in range(len(unique))], dtype=torch.int64)
    offsets = torch.zeros(len(unique) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    dtype = teacher.embed_tokens.weight.dtype
    features = torch.zeros(int(offsets[-1]), (1 + len(taps)) * teacher.config.dim, dtype=dtype)
    bar = tqdm(total=int(offsets[-1]), desc="teacher cache (target features)", unit="tok", disable=not progress,
               dynamic_ncols=True)
    for i in range(0, len(order), batch_size):
        group = order[i:i + batch_size]
        T = max(len(unique[s]) for s in group)
        tokens = torch.zeros(len(group), T, dtype=torch.int64)
        for b, s in enumerate(group):
            tokens[b, : len(unique[s])] = torch.tensor(unique[s])
        tokens = tokens.to(device)
        positions = torch.arange(T, device=device).expand_as(tokens)
        _, feats = teacher(tokens, positions, None, compute_logits=False, return_features=True, feature_taps=taps)
        feats = feats.cpu()
        for b, s in enumerate(group):
            features[offsets[s]:offsets[s + 1]] = feats[b, : len(unique[s])]
        bar.update(sum(len(unique[s]) for s in group))
    bar.close()
    flat = torch.tensor([t for ids in unique for t in ids], dtype=torch.int32)
    return TeacherCache(flat, offsets, features)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 over every parameter's and buffer's name, shape, dtype and bytes: the same on any device, and
    different for another model of the same name and shape, however few of its values differ (a fine-tuned,
    re-quantized or patched one). About 0.2 s for the default target's 270 MB on a CPU."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(p.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


def _taps_text(taps: Sequence[int]) -> str:
    return ",".join(str(int(i)) for i in taps)


def load_teacher_cache(path, target_name: str, dim: int, dtype: torch.dtype, taps: Sequence[int] = (),
                       weights: str = "") -> TeacherCache:
    """The cache in `path`; ValueError naming the file when it is broken or was made by another target (its name or
    its weights' fingerprint), dtype or taps (a cache from before taps, or fingerprints, existed has none)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("tokens", "offsets", "features")}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"teacher cache {path} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                         "recompute it") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"teacher cache {path}: format {meta.get('format')!r} is not {FORMAT!r}")
    want = {"target": target_name, "dim": str(dim), "dtype": str(dtype).replace("torch.", ""),
            "taps": _taps_text(taps), "weights": weights}
    got = {k: meta.get(k, "" if k == "taps" else None) for k in want}
    got["weights"] = meta.get("weights", weights)  # a cache older than fingerprints: its name must do
    if got != want:
        raise ValueError(f"teacher cache {path} was made for {got}, not this run's {want}: delete it or pass "
                         "another --teacher-cache")
    return TeacherCache(tensors["tokens"], tensors["offsets"], tensors["features"])


def open_teacher_cache(path, teacher, target_name: str, seqs: Sequence[Seq], batch_size: int, device,
                       progress: bool = True, taps: Sequence[int] = ()) -> TeacherCache:
    """The cache in `path` when it exists (it must hold every one of `seqs`, with the same taps), else computed from
    `teacher` and saved there."""
    dtype = teacher.embed_tokens.weight.dtype
    weights = weights_fingerprint(teacher)
    if Path(path).exists():
        cache = load_teacher_cache(path, target_name, teacher.config.dim, dtype, taps, weights)
        missing = cache.missing(seqs)
        if missing:
            raise ValueError(f"teacher cache {path} lacks {missing} of the {len(seqs)} training sequences: it was "
                             "made from other data, another seq_len or another held-out split (--seed, "
                             "--eval-rows); delete it or pass another --teacher-cache")
        return cache
    cache = compute_teacher_cache(teacher, seqs, batch_size, device, progress, taps)
    cache.save(path, {"target": target_name, "dim": str(teacher.config.dim),
                      "dtype": str(dtype).replace("torch.", ""), "taps": _taps_text(taps), "weights": weights})
    return cache
