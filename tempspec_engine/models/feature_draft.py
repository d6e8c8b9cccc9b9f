"""EAGLE-style feature draft heads: a small decoder that extrapolates the target's final hidden states.

The head reads what the target computes anyway. Row b, index t of its input sits at sequence position
p = positions[b, t] and combines

  * the target's feature f_p: the final hidden state AFTER the final norm at position p (the output head's input,
    `Transformer.forward(..., return_features=True)`), which produced token x_{p+1}, and
  * the embedding of tokens[b, t] = x_{p+1} (the target's own frozen embedding),

through fc = Linear(2 dim -> dim), then n_layers Llama decoder blocks (RoPE at `positions`, its own KVCache with
the target's write/mask conventions) and a final RMSNorm, and predicts f_{p+1}: the target's output head on it gives
the distribution of x_{p+2}. Drafting k tokens runs it k times, each step feeding its own prediction back as the next
position's feature (see FeatureDraft's docstring).

Taps (EAGLE-3's multi-level features, optional): with config.taps = (i, j, ...) the target also hands over the outputs
of its blocks i, j, ... at p (`feature_taps=`), and `read` fuses them with f_p (Linear((1 + n) dim -> dim) on f_p and
the RMS-normalized tap outputs) into the head's input feature; a head's own predictions need no fusing. The fuse
starts as the identity on f_p (zero weight on the taps), so a head given taps starts as the head without them.

An optional restricted draft vocabulary (draft_vocab = N; EAGLE-3 / FR-Spec) computes only N rows of the head:
`d2t` (int64 [N]) holds the target ids it covers (the most frequent response tokens of the training data, or the first
N ids); the other logits are -inf (still lossless: the acceptance rule corrects the draft).

A saved head is a directory like a draft checkpoint's (models/draft_checkpoint.py): `tempspec_draft.json` with its
own format string FORMAT, the config, the target (name, vocab, width) and metadata, and `model.safetensors` with the
head's weights and the token map `d2t`, without the target's embedding and head, which `load_feature_draft` attaches.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tempspec_engine.kv_cache import KVCache
from tempspec_engine.linear import Linear, linear
from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.draft_checkpoint import (DRAFT_FILE, WEIGHTS_FILE, check_weights_fit, draft_format,
                                                     read_info, read_weights, weights_path)
from tempspec_engine.models.llama import (Block, RMSNorm, Transformer, UnrolledKeys, rope_inv_freq, run_layers,
                                          unrolled_mask)
from tempspec_engine.results import write_json

FORMAT = "tempspec-feature-draft/1"
KIND = "eagle-feature-head"


def check_taps(taps, where: str, n_layers: Optional[int] = None) -> Tuple[int, ...]:
    """taps (EAGLE-3's tapped target blocks) as a tuple of distinct block indices >= 0, each < n_layers when given;
    ValueError starting with `where` otherwise."""
    if not isinstance(taps, (list, tuple)) or any(not isinstance(i, int) or isinstance(i, bool) or i < 0
                                                  for i in taps) or len(set(taps)) != len(taps):
        raise ValueError(f"{where} must be distinct target block indices >= 0, got {taps!r}")
    if n_layers is not None and any(i >= n_layers for i in taps):
        raise ValueError(f"{where} {list(taps)} must be block indices of the target, 0..{n_layers - 1}")
    return tuple(taps)


@dataclasses.dataclass
class FeatureDraftConfig:
    """Shapes of a feature head. dim, vocab_size: the target's width and vocabulary (the head reads the target's
    features, embeddings and output head); draft_vocab: None (the full vocabulary) or N (a token map of N ids);
    taps: target blocks whose outputs the head reads besides the final features (EAGLE-3), () for the final only.
    rope_scaling: the target's (positions are the target's positions), None or its Hugging Face dict."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    n_layers: int = 1
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 4096
    draft_vocab: Optional[int] = None
    rope_scaling: Optional[dict] = None
    taps: Tuple[int, ...] = ()

    def __post_init__(self):
        self.taps = check_taps(self.taps, "feature draft config: taps")
        for name in ("dim", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "vocab_size", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"feature draft config: {name} must be an integer >= 1, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"feature draft config: n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads}")
        if self.draft_vocab is not None and not (isinstance(self.draft_vocab, int)
                                                 and 1 <= self.draft_vocab <= self.vocab_size):
            raise ValueError(f"feature draft config: draft_vocab must be None or lie in 1..{self.vocab_size}, got "
                             f"{self.draft_vocab!r}")

    @classmethod
    def for_target(cls, target: ModelConfig, n_layers: int = 1, intermediate_size: Optional[int] = None,
                   draft_vocab: Optional[int] = None, taps: Sequence[int] = ()) -> "FeatureDraftConfig":
        """A head with the target's width, attention shapes, RoPE and (by default) MLP width."""
        return cls(dim=target.dim, n_heads=target.n_heads, n_kv_heads=target.n_kv_heads, head_dim=target.head_dim,
                   intermediate_size=intermediate_size or target.intermediate_size, vocab_size=target.vocab_size,
                   n_layers=n_layers, rms_eps=target.rms_eps, rope_theta=target.rope_theta,
                   max_position=target.max_position, draft_vocab=draft_vocab, rope_scaling=target.rope_scaling,
                   taps=tuple(taps))

    @property
    def feature_width(self) -> int:
        """The width of the target features the head reads: dim per tap plus the final features."""
        return (1 + len(self.taps)) * self.dim

    def block_config(self) -> ModelConfig:
        """The ModelConfig of its decoder blocks (llama.Block, no biases)."""
        return ModelConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                           intermediate_size=self.intermediate_size, rms_eps=self.rms_eps, rope_theta=self.rope_theta,
                           rope_scaling=self.rope_scaling, max_position=self.max_position)


class FeatureDraft(nn.Module):
    """EAGLE-style head (module docstring). Its own parameters: fc, layers, norm, fuse (with taps); buffer d2t
    (restricted vocabulary only). The target's embedding and output head are held by reference (`attach`), NOT
    registered as submodules: they are not in parameters(), state_dict() or .to() (so casting the head never touches
    the target).

    Inference (positions are sequence positions, shared with the target). Committed tokens x_0..x_n, where x_n was
    just sampled from the target's logits at position n-1, so the target's features f_0..f_{n-1} are known. The
    head's cache holds positions 0..m-1 (m <= n-1; m = n-1 after the prompt's prefill, where the head reads every
    prompt feature but the last in one pass from position 0):
      1. extend: features f_m..f_{n-1} (positions m..n-1) with tokens x_{m+1}..x_n (the token each feature produced):
             pred = head(head.read(f), x, positions, cache, kv_len=n);  d_1 ~ head.logits(pred[:, -1:])
             (the distribution of x_{n+1})
         Batched rows with different n or m: kv_len = the largest n, each row's d_1 from its last real index, and the
         shorter rows padded with positions continuing past their end (those entries are overwritten by the draft
         steps before any of the row's queries can see them).
      2. for j = 2..k: pred = head(pred_{j-1}, d_{j-1}, positions n+j-2, cache, kv_len=n+j-1) -> d_j ~
         head.logits(pred) (pred_{j-1} [B, 1, dim]: the previous step's output, d_{j-1} [B, 1]). last_query=True
         (no mask) only when every row sits at position kv_len - 1 (B = 1 or equal lengths).
      3. the target verifies [x_n, d_1..d_k] at positions n..n+k with return_features=True (features f_n..f_{n+k}).
         With a drafts accepted and the correction/bonus token x_{n+a+1}: the head's valid length is n again (its
         entries n..n+k-2 hold predicted features and are overwritten), and the next round's step 1 feeds the target
         features f_n..f_{n+a} with tokens x_{n+1}..x_{n+a+1} (a+1 entries per row).
    So k drafts cost one extension pass (a+1 queries) plus k-1 single-query passes, and the only target output the
    head needs beyond the logits is the features of the verified positions it accepts.
    """

    def __init__(self, config: FeatureDraftConfig, embed_tokens: Optional[nn.Embedding] = None,
                 lm_head: Optional[nn.Linear] = None, d2t: Optional[torch.Tensor] = None):
        super().__init__()
        self.config = config
        block_cfg = config.block_config()
        self.fc = Linear(2 * config.dim, config.dim, bias=False)
        # with taps: the target's final features and its tapped block outputs (each RMS-normalized) -> dim, starting
        # as [I, 0] (built without drawing random numbers: a seeded head draws the same weights with taps as without)
        self.fuse = None
        if config.taps:
            fuse = Linear(config.feature_width, config.dim, bias=False, device="meta")
            self.fuse = fuse.to_empty(device=self.fc.weight.device)
            if not self.fuse.weight.is_meta:
                self.reset_fuse()
        self.layers = nn.ModuleList([Block(block_cfg) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.rms_eps)
        if config.draft_vocab is not None:
            if d2t is None:
                d2t = torch.arange(config.draft_vocab)
            self.register_buffer("d2t", check_token_map(d2t, config.draft_vocab, config.vocab_size))
        else:
            if d2t is not None:
                raise ValueError("a token map d2t needs config.draft_vocab")
            self.d2t = None
        self._shared: List[Optional[nn.Module]] = [None, None]  # the target's (embedding, head or None when tied)
        self._rows_cache = None  # (key, gathered head rows) for an arbitrary token map
        self._inv_freq = rope_inv_freq(block_cfg)  # fp32 on purpose: not a buffer, so .to(dtype) leaves it alone
        if embed_tokens is not None:
            self.attach(embed_tokens, lm_head)

    # ------------------------------------------------------------------ shared tensors
    def attach(self, embed_tokens: nn.Embedding, lm_head: Optional[nn.Linear] = None) -> "FeatureDraft":
        """Uses the target's embedding and head (lm_head None: tied, the embedding is the head); no copy."""
        if tuple(embed_tokens.weight.shape) != (self.config.vocab_size, self.config.dim):
            raise ValueError(f"the target's embedding {tuple(embed_tokens.weight.shape)} does not fit this head "
                             f"(vocab {self.config.vocab_size}, width {self.config.dim})")
        if lm_head is not None and tuple(lm_head.weight.shape) != (self.config.vocab_size, self.config.dim):
            raise ValueError(f"the target's output head {tuple(lm_head.weight.shape)} does not fit this head "
                             f"(vocab {self.config.vocab_size}, width {self.config.dim})")
        self._shared = [embed_tokens, lm_head]
        self._rows_cache = None
        return self

    @property
    def embed_tokens(self) -> nn.Embedding:
        if self._shared[0] is None:
            raise RuntimeError("this feature draft has no target attached (load_feature_draft or attach())")
        return self._shared[0]

    def output_weight(self) -> torch.Tensor:
        """The target's output head weight [V, dim] (the shared tensor itself)."""
        head = self._shared[1]
        return self.embed_tokens.weight if head is None else head.weight

    def head_rows(self) -> torch.Tensor:
        """The head rows of the draft vocabulary [N, dim]: a view for the first-N map, else a gathered copy (detached:
        the head is frozen) kept until the target's weight changes (storage, dtype, device or in-place version)."""
        w = self.output_weight()
        if self.d2t is None:
            return w
        n = self.d2t.shape[0]
        key = (w.data_ptr(), w.dtype, w.device, w._version, self.d2t.data_ptr(), self.d2t._version)
        if self._rows_cache is None or self._rows_cache[0] != key:
            d2t = self.d2t.to(w.device)
            first = bool(torch.equal(d2t.cpu(), torch.arange(n)))
            with torch.inference_mode(False):  # a normal tensor even under inference: the CPU kernel packs it once
                rows = None if first else w.detach().index_select(0, d2t)
            self._rows_cache = (key, rows)
        rows = self._rows_cache[1]
        return w[:n] if rows is None else rows

    # ------------------------------------------------------------------ forward
    def read(self, target_features: torch.Tensor) -> torch.Tensor:
        """The target's features [..., feature_width] (Transformer.forward(..., return_features=True,
        feature_taps=config.taps)) -> the head's input features [..., dim] in the head's dtype. Without taps this is
        a cast; with taps, fuse(final features, RMS-normalized tap outputs): the raw residual stream of a middle
        block is on another scale than the final-norm features. Zero rows stay zero (padding)."""
        x = target_features.to(self.fc.weight.dtype)
        if self.fuse is None:
            return x
        d = self.config.dim
        taps = x[..., d:].unflatten(-1, (len(self.config.taps), d))
        taps = F.rms_norm(taps, (d,), eps=self.config.rms_eps).flatten(-2)
        return self.fuse(torch.cat((x[..., :d], taps), dim=-1))

    @torch.no_grad()
    def reset_fuse(self) -> "FeatureDraft":
        """fuse := [I, 0, ..., 0]: read() returns the final features, the taps get weight 0 (a start that equals the
        head without taps; training then learns what the taps add)."""
        if self.fuse is not None:
            d = self.config.dim
            self.fuse.weight.zero_()
            self.fuse.weight[:, :d].copy_(torch.eye(d))
        return self

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                cache: Optional[KVCache], kv_len: Optional[int] = None, last_query: bool = False,
                from_start: bool = False) -> torch.Tensor:
        """features [B, T, dim] (any float dtype: read() of the target's features at positions[b, t], or the head's
        own predictions), tokens [B, T] int64 (tokens[b, t] = x_{p+1}, the token that feature produced), positions
        [B, T] int64. With a cache: writes its T keys per layer at `positions` and attends over [0, kv_len)
        (default: the whole cache) where key position <= query position (last_query=True: one query per row at
        kv_len - 1, no mask; from_start=True: positions 0..T-1 in every row and kv_len == T, a prefill: causal, no
        mask); the caller tracks how many positions are valid. cache=None: causal over the T inputs (positions in
        order; training); an UnrolledKeys: step j of training's unroll (llama.unrolled_mask says what it sees).
        Returns the predicted features of positions p + 1, [B, T, dim] in the head's dtype (after its final norm:
        feed them to logits() or back into forward)."""
        dtype = self.fc.weight.dtype
        emb = self.embed_tokens(tokens)
        x = self.fc(torch.cat((features.to(dtype), emb.to(dtype)), dim=-1))
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        x, _ = run_layers(self.layers, x, self._inv_freq, positions, cache, kv_len, last_query,
                          from_start=from_start)
        return self.norm(x)

    def unroll(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, steps: int) -> list:
        """The head's first `steps` draft steps at every index of whole sequences, teacher-forced, as drafting
        computes them (EAGLE-3's training-time test, and the scoring of later draft positions). features [B, T,
        feature_width] (the target's, as read() takes them), tokens [B, T], positions [B, T] (in order) ->
        [pred_1, ..., pred_steps], each [B, T, dim]: step 1 reads the target's features; step j > 1 reads at index t
        the step j-1 prediction of index t-1 (index 0 keeps the target's feature: no prediction of it exists), with
        the same tokens, and attends to the step-1 keys up to the chain's start t - j + 1 and to the chain's own keys
        of steps 2..j (llama.unrolled_mask), so that pred_j[t] is the j-th draft of the chain that starts there."""
        preds, x = [], self.read(features)
        first = x[:, :1]
        keys = UnrolledKeys(len(self.layers))
        for j in range(1, steps + 1):
            keys.mask = unrolled_mask(x.shape[1], j, x.device)
            pred = self(x, tokens, positions, keys)
            preds.append(pred)
            x = torch.cat((first.to(pred.dtype), pred[:, :-1]), dim=1)
        return preds

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary [..., N] (N = draft_vocab; index i is target id d2t[i]) or, without a
        token map, over the full vocabulary [..., V], in the target head's dtype. Only these N head rows are
        computed (sample here and map with d2t when only the draft's proposal is needed)."""
        w = self.head_rows()
        return linear(features.to(w.dtype), w)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's output head on predicted features [..., dim] -> logits [..., V_target] in the head weight's
        dtype; with a token map, the N computed logits are scattered to ids d2t and all other ids are -inf."""
        sub = self.draft_logits(features)
        if self.d2t is None:
            return sub
        full = sub.new_full(sub.shape[:-1] + (self.config.vocab_size,), float("-inf"))
        return full.index_copy(-1, self.d2t.to(sub.device), sub)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty KVCache for this head: n_layers layers of [batch, n_kv_heads, max_len, head_dim]."""
        p = self.fc.weight
        c = self.config
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, dtype or p.dtype, device or p.device)


def tap_columns(features: torch.Tensor, have: Sequence[int], want: Sequence[int], dim: int) -> torch.Tensor:
    """Target features [..., (1 + len(have)) dim] (final features, then blocks `have`) -> [..., (1 + len(want)) dim]
    (final features, then blocks `want`, each in `have`): one target forward with the union of several heads' taps
    serves each of them."""
    idx = [0] + [1 + list(have).index(i) for i in want]
    return features.unflatten(-1, (1 + len(have), dim))[..., idx, :].flatten(-2)


def check_token_map(d2t: torch.Tensor, n: int, vocab_size: int, where: str = "token map d2t") -> torch.Tensor:
    """d2t as int64 [n] of distinct ids in [0, vocab_size); ValueError (prefixed with `where`) otherwise."""
    d2t = torch.as_tensor(d2t)
    if d2t.dtype not in (torch.int64, torch.int32) or tuple(d2t.shape) != (n,):
        raise ValueError(f"{where}: must be an integer tensor of shape ({n},), got {d2t.dtype} {tuple(d2t.shape)}")
    if d2t.device.type != "meta":
        if n and (int(d2t.min()) < 0 or int(d2t.max()) >= vocab_size):
            raise ValueError(f"{where}: ids must lie in [0, {vocab_size})")
        if torch.unique(d2t).numel() != n:
            raise ValueError(f"{where}: ids must be distinct")
    return d2t.to(torch.int64)


def token_map_from_counts(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The n most frequent ids of counts [V] (ties: the smaller id first), sorted: d2t int64 [n]. Ids never seen
    fill the map in increasing order when fewer than n were seen."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    v = counts.shape[0]
    if not 1 <= n <= v:
        raise ValueError(f"draft vocabulary {n} must lie in 1..{v}")
    order = sorted(range(v), key=lambda i: (-float(counts[i]), i))
    return torch.tensor(sorted(order[:n]), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------- save / load
def is_feature_draft_dir(path) -> bool:
    """True when `path` holds a tempspec_draft.json of the feature-draft format (never raises)."""
    return draft_format(path) == FORMAT


def save_feature_draft(head: FeatureDraft, directory, *, target_name: str, metadata: Optional[dict] = None,
                       dtype: Optional[torch.dtype] = None) -> Path:
    """Writes the head's own weights (floating tensors cast to `dtype`, default their own), its token map (int64) and
    tempspec_draft.json; the target's embedding and head are not stored."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(device="cpu", dtype=(dtype or v.dtype) if v.is_floating_point() else v.dtype)
             .contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    c = head.config
    info = {"format": FORMAT, "kind": KIND, "config": dataclasses.asdict(c), "shares_target_embeddings": True,
            "target": {"name": target_name, "vocab_size": int(c.vocab_size), "dim": int(c.dim)},
            "metadata": metadata or {}}
    write_json(info, out / DRAFT_FILE, indent=2)  # standard JSON: a diverged run's nan loss is written as null
    return out


def read_feature_draft_info(directory) -> dict:
    """The parsed tempspec_draft.json of a feature-draft directory; ValueError naming the file when it is broken."""
    info = read_info(directory, FORMAT, "feature draft")
    if not isinstance(info.get("target"), dict):
        raise ValueError(f"{Path(directory) / DRAFT_FILE}: 'target' must be a JSON object")
    return info


def _config(info: dict, directory) -> FeatureDraftConfig:
    try:
        return FeatureDraftConfig(**info["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{Path(directory) / DRAFT_FILE}: 'config' does not describe a feature draft ({exc})") \
            from None


def load_feature_draft(directory, target: Transformer, device=None, dtype=None) -> FeatureDraft:
    """The head saved in `directory`, in eval mode, on `device` / `dtype` (default: the target's), with the target's
    own embedding and output head attached (no copy). ValueError naming the file for a broken directory, and for a
    target that is not a tempspec (Llama-family) Transformer or whose vocabulary or width differ."""
    if not isinstance(target, Transformer):
        raise ValueError(f"feature draft {directory} needs a Llama-family target (a tempspec Transformer), got "
                         f"{type(target).__name__}")
    info = read_feature_draft_info(directory)
    config = _config(info, directory)
    tc = target.config
    if (tc.vocab_size, tc.dim) != (config.vocab_size, config.dim):
        raise ValueError(f"{Path(directory) / DRAFT_FILE}: the feature draft was made for a target with vocab "
                         f"{config.vocab_size} and width {config.dim}; this target has vocab {tc.vocab_size} and "
                         f"width {tc.dim}")
    check_taps(config.taps, f"{Path(directory) / DRAFT_FILE}: the feature draft's taps", target.n_layers)
    with torch.device("meta"):
        head = FeatureDraft(config)
    state = read_weights(directory)
    check_weights_fit(state, {k: v.shape for k, v in head.state_dict().items()}, directory)
    if config.draft_vocab is not None:
        check_token_map(state["d2t"], config.draft_vocab, config.vocab_size, f"{weights_path(directory)}: d2t")
    head.load_state_dict(state, strict=True, assign=True)
    w = target.embed_tokens.weight
    head = head.to(device=device or w.device, dtype=dtype or w.dtype)
    return head.attach(target.embed_tokens, target.lm_head).eval()
