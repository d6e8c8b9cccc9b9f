"""Proposers: who proposes the draft tokens of a speculative step, and the state each of them keeps.

The engine's step reads propose -> verify -> accept -> commit (engine.py). A proposer
  start(reqs, features, caches): requests were just prefilled, together (features: the target's final features of
      prompt[:-1] [len(reqs), T, width], right-padded, given to a proposer with `needs_features`, followed by the
      outputs of its blocks `feature_taps` when it names any; caches: its models' caches, rows of these requests);
  propose(ctx, caches, forwards, k_max) -> Proposal, or None when no row has anything to propose or no draft
      length pays (ctx.choose_k answers 0; the engine then runs a plain target step): k tokens per row and the
      distribution each was drawn from (one-hot for lookup), so that the acceptance stays lossless; a model draft
      picks k before drafting (ctx.choose_k) or, given a DraftChain (ctx.draft_chain), stops when its own confidence
      says one more draft does not pay (draft_tokens);
      a model draft also names, per draft position, `ctx.alternatives` more of its likely tokens: the target reads
      them in the same verification forward, so that a correction token equal to one of them comes with one more
      token (the engine's module docstring);
  commit(ctx, proposal, accepted, features, received): told how many of each row's proposals were accepted and how
      many tokens each row received (and, with `needs_features`, given the target's features [B, T, width] of the
      verified tokens that produced them, in order: features[i, :received[i]]), it updates its own state;
  skipped(ctx, features, received): a step in which it proposed nothing (a plain target step, or another proposer's
      step in a hybrid): the same features and counts, for the tokens committed without it.
`models` are the models whose KV caches the engine allocates for it (with CUDA graphs where the engine uses them);
their caches and forwards come back, in that order, to propose().

Sequence lengths have one source of truth, the request's committed tokens (len(req.seq)); a model proposer keeps,
per request, how many leading tokens its own cache holds (`cached`), which can fall behind (after lookup steps) and
is caught up by re-reading a window before it drafts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from tempspec_engine.adaptive_k import DraftChain
from tempspec_engine.models.lookup_draft import NgramIndex
from tempspec_engine.ops import sample
from tempspec_engine.sampling import StepSettings

LOOKUP, MODEL = "lookup", "model"  # proposal sources: each has its own acceptance estimates (adaptive_k.py)


def pad_logits(logits: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Logits [..., V_model] -> [..., vocab] of `dtype`, vocab the target's: padded with -inf (ids the model lacks),
    or cut (ids of a draft whose vocabulary extends the target's: it never proposes a token the target cannot read,
    and q is the distribution it draws from, so the acceptance stays lossless)."""
    logits = logits[..., :vocab].to(dtype)
    if logits.shape[-1] < vocab:
        logits = F.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
    return logits


@dataclasses.dataclass
class StepContext:
    """What a proposer sees of one step. reqs: the batch rows (idle rows hold a stand-in request); live: indices of
    the real ones; lengths: committed tokens per row; choose_k(source, rows=None): the lookahead for proposals from
    `source` to `rows` (indices of reqs; default: every live row; the other live rows are verified too, with one token
    expected of each), 0 where no draft pays this step (call it once per step);
    draft_chain(source): a DraftChain when drafts from `source` stop on confidence, else None; alternatives: the
    alternative tokens a model draft names per draft position (0: none)."""

    reqs: list
    live: List[int]
    lengths: List[int]
    settings: StepSettings
    filter_draft: bool
    generator: torch.Generator
    choose_k: Callable[[str], int]
    draft_chain: Callable[[str], Optional[DraftChain]]
    alternatives: int
    vocab: int
    dtype: torch.dtype
    device: torch.device
    backend: str
    static_shapes: bool

    def pad(self, logits: torch.Tensor) -> torch.Tensor:
        return pad_logits(logits, self.vocab, self.dtype)

    def draft_filters(self) -> dict:
        """The filters the draft samples with (none when only the target is filtered)."""
        return self.settings.filters if self.filter_draft else {}


class Proposal(NamedTuple):
    """tokens [B, k] int64; logits [B, k, V] (q, in the engine dtype); source[b]: LOOKUP, MODEL or None (an idle row,
    or a row padded without a proposal of its own: no estimator learns from it); confidence[b]: the confidences of
    row b's k model drafts (DraftChain) for the calibration of its estimator, or None (not measured, idle row);
    alternatives [B, k, s] int64 or None: at draft position i, s more tokens of the draft's (not tokens[b, i]; -1:
    none), each read by the target after tokens[b, :i]."""

    tokens: torch.Tensor
    logits: torch.Tensor
    source: List[Optional[str]]
    confidence: Optional[List[Optional[List[float]]]] = None
    alternatives: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return self.tokens.shape[1]


NONFINITE_MESSAGE = ("a model produced NaN or +inf logits during generation (overflow in this dtype? try "
                     "dtype=fp32): the outputs would be invalid")


class NonFiniteFlag:
    """A 0-dim bool on the device, or-ed with every model output (no host synchronization); the engine reads it with
    each step's results."""

    def __init__(self, device: torch.device):
        self.value = torch.zeros((), dtype=torch.bool, device=device)

    def reset(self) -> None:
        self.value.zero_()

    def check(self, logits: torch.Tensor) -> None:
        """NaN or +inf anywhere in `logits` (-inf masks tokens and is allowed): one reduction, as max propagates
        NaN."""
        top = logits.amax()
        self.value |= top.isnan() | top.isposinf()


def draw(ctx: StepContext, logits: torch.Tensor, flag: NonFiniteFlag):
    """One draft position: q = logits [B, V_model] padded to the engine's vocabulary and dtype (checked for NaN /
    +inf), and d [B] int64 drawn from it with each row's settings by the fused sampler. Returns (q, d)."""
    q = ctx.pad(logits)
    flag.check(q)
    # a row of NaN logits samples an arbitrary id (the step then raises FloatingPointError): keep it in range so that
    # the next draft forward cannot index outside the embedding
    d = sample(q, ctx.settings.temperature, generator=ctx.generator, backend=ctx.backend, validate=False,
               **ctx.draft_filters()).clamp_(0, q.shape[-1] - 1)
    return q, d


def top_probability(logits: torch.Tensor) -> List[float]:
    """The largest probability of softmax(logits) per row, logits [B, V] -> B host floats (a draft's confidence).
    (softmax's fused kernel: on the CPU, exp(amax - logsumexp) took 2-4x as long over a draft vocabulary padded with
    -inf.)"""
    return logits.float().softmax(-1).amax(-1).tolist()


def other_top_tokens(logits: torch.Tensor, drawn: torch.Tensor, n: int) -> torch.Tensor:
    """The n highest-scoring ids of logits [B, V] other than drawn [B], best first: int64 [B, n]."""
    top = logits.topk(n + 1, dim=-1).indices
    others = top != drawn.unsqueeze(1)
    first = torch.argsort((~others).to(torch.int8), dim=1, stable=True)[:, :n]  # the n first ids that are not drawn
    return top.gather(1, first)


def draft_tokens(ctx: StepContext, logits: torch.Tensor, advance: Callable[[torch.Tensor, int], torch.Tensor],
                 flag: NonFiniteFlag, k: int) -> Proposal:
    """A model draft's proposal, one position at a time: logits [B, V_model] give draft 1; advance(d, i) feeds draft
    i + 1 (d [B] int64) back into the model and returns the logits of the next position. With a DraftChain the draft
    stops when one more token does not pay (at most its k_max), else after k >= 1 tokens (ctx.choose_k(MODEL)). With
    ctx.alternatives = s > 0, each position also names the s most likely tokens of q other than the drawn one."""
    chain = ctx.draft_chain(MODEL)
    k = chain.k_max if chain is not None else k
    draft_logits, draft_tokens_, alternatives = [], [], []
    for i in range(k):
        q, d = draw(ctx, logits, flag)
        draft_logits.append(q)
        draft_tokens_.append(d)
        if ctx.alternatives:
            alternatives.append(other_top_tokens(q, d, ctx.alternatives))
        more = True
        if chain is not None:  # one host read of B floats per draft: free on the CPU
            top = top_probability(q)
            more = chain.extend([top[b] for b in ctx.live])
        if i == k - 1 or not more:
            break
        logits = advance(d, i)
    live = set(ctx.live)
    confidence = None
    if chain is not None:
        confidence = [None] * len(ctx.reqs)
        for r, b in enumerate(ctx.live):
            confidence[b] = chain.confidences[r]
    return Proposal(torch.stack(draft_tokens_, dim=1), torch.stack(draft_logits, dim=1),
                    [MODEL if i in live else None for i in range(len(ctx.reqs))], confidence,
                    torch.stack(alternatives, dim=1) if alternatives else None)


class LookupProposer:
    """n-gram lookup in each row's own tokens (models/lookup_draft.py). It needs no cache; per request it keeps an
    NgramIndex of the request's tokens (`indices`, keyed by request index: those of the current rows only), so that a
    step's lookup does not rescan the context."""

    models: Sequence = ()
    needs_features = False
    feature_taps = ()

    def __init__(self, lookup):
        self.lookup = lookup
        self.indices: Dict[int, NgramIndex] = {}

    def start(self, reqs, features=None, caches=()) -> None:
        pass

    def skipped(self, ctx: StepContext, features=None, received=None) -> None:
        """Nothing to do: each index catches up with the committed tokens at the next lookup."""

    def matches(self, ctx: StepContext, k_max: int) -> List[List[int]]:
        """Each row's proposal of up to k_max tokens ([] without a match). A request's index follows its token list
        (a new list, as in a new generate() call, gets a new index); those of requests that left the batch go."""
        indices = {}
        for r in ctx.reqs:
            index = self.indices.get(r.index)
            indices[r.index] = index if index is not None and index.seq is r.seq else NgramIndex(self.lookup, r.seq)
        self.indices = indices
        return [indices[r.index].propose(k_max) for r in ctx.reqs]

    def from_matches(self, ctx: StepContext, found: List[List[int]], rows: Sequence[int], k: int) -> Proposal:
        """Proposals of `rows` (shorter matches repeat their last token; a row without one repeats its last token)."""
        padded = [(found[i] + [found[i][-1] if found[i] else ctx.reqs[i].seq[-1]] * k)[:k] for i in rows]
        tokens = torch.tensor(padded, device=ctx.device)
        return Proposal(tokens, self.lookup.draft_logits(tokens, ctx.vocab, ctx.dtype),
                        [LOOKUP if found[i] and i in ctx.live else None for i in rows])

    def propose(self, ctx: StepContext, caches, forwards, k_max: int) -> Optional[Proposal]:
        return self.from_all_matches(ctx, self.matches(ctx, k_max))

    def from_all_matches(self, ctx: StepContext, found: List[List[int]]) -> Optional[Proposal]:
        """Every row's proposal, k no longer than the longest match; None when no live row has a match or no
        lookahead pays (ctx.choose_k(LOOKUP) is 0)."""
        matched = [i for i in ctx.live if found[i]]
        if not matched:
            return None
        k = min(ctx.choose_k(LOOKUP, matched), max(len(found[i]) for i in matched))
        return self.from_matches(ctx, found, range(len(ctx.reqs)), k) if k else None

    def commit(self, ctx: StepContext, proposal: Proposal, accepted: List[int], features=None, received=None) -> None:
        pass


class ModelProposer:
    """A draft model with its own KV cache; `cached[request index]`: leading tokens of the request its cache holds."""

    needs_features = False
    feature_taps = ()

    def __init__(self, draft, flag: NonFiniteFlag):
        self.draft = draft  # a LoadedModel
        self.models = (draft.model,)
        self.flag = flag
        self.cached: Dict[int, int] = {}

    def start(self, reqs, features=None, caches=()) -> None:
        """Requests just prefilled (prompt[:-1] in every cache)."""
        for r in reqs:
            self.cached[r.index] = len(r.seq) - 1

    def propose(self, ctx: StepContext, caches, forwards, k_max: int) -> Optional[Proposal]:
        """Catches the cache up, then drafts k tokens with the fused sampler (from the draft's filtered distribution
        unless only the target is filtered); None, before any forward, when no draft length pays.

        Every row re-reads a window of W >= 2 committed tokens ending at its pending token, covering what the cache
        lacks: its last two tokens after a model step, more after lookup steps. A row shorter than W is padded at its
        end (keys beyond a row's length are overwritten before anything attends to them)."""
        k = ctx.choose_k(MODEL)
        if k == 0:
            return None
        (cache,), (forward,) = caches, forwards
        reqs, lengths, dev = ctx.reqs, ctx.lengths, ctx.device
        kv_len = max(lengths) + k_max
        W = max(2, max(n - self.cached.get(r.index, n - 1) for r, n in zip(reqs, lengths)))
        rounded = 1 << (W - 1).bit_length()  # the next power of two
        if ctx.static_shapes and rounded <= max(lengths):
            W = rounded  # few distinct shapes (one captured graph each)
        starts = [max(n - W, 0) for n in lengths]
        window = torch.tensor([(r.seq[s:n] + [0] * W)[:W] for r, s, n in zip(reqs, starts, lengths)], device=dev)
        positions = torch.tensor(starts, device=dev).unsqueeze(1) + torch.arange(W, device=dev)
        last = torch.tensor([n - 1 - s for s, n in zip(starts, lengths)], device=dev)
        logits = forward(window, positions, cache, kv_len, last)
        L = torch.tensor(lengths, device=dev)

        def advance(d: torch.Tensor, i: int) -> torch.Tensor:
            return forward(d.unsqueeze(1), (L + i).unsqueeze(1), cache, kv_len, None)[:, 0]

        return draft_tokens(ctx, logits[:, 0], advance, self.flag, k)

    def commit(self, ctx: StepContext, proposal: Proposal, accepted: List[int], features=None, received=None) -> None:
        """The cache holds each row's committed tokens up to the last two (its window re-reads them), or, for a row
        whose proposal the lookup replaced, up to its window's end (tokens received beyond the accepted drafts and
        the correction are re-read by the next window too)."""
        for i in ctx.live:
            n = ctx.lengths[i]
            self.cached[ctx.reqs[i].index] = n if proposal.source[i] == LOOKUP else max(n + accepted[i] - 1, 0)

    def skipped(self, ctx: StepContext, features=None, received=None) -> None:
        """A step without this draft: nothing to do (the next window re-reads what was missed)."""


class HybridProposer:
    """Lookup where a row's last 2+ tokens occurred earlier, the model (or feature) draft elsewhere. When every live
    row has a match the model does not run (it catches up later); otherwise the model drafts for all rows and the
    matched rows take the lookup's proposals, or, where no model draft pays, the matched rows alone propose. Each
    row's q is the distribution its proposal was drawn from, so every row stays lossless."""

    def __init__(self, lookup: LookupProposer, model):
        self.lookup, self.model = lookup, model
        self.models = model.models
        self.needs_features, self.feature_taps = model.needs_features, model.feature_taps

    def start(self, reqs, features=None, caches=()) -> None:
        self.model.start(reqs, features, caches)

    def propose(self, ctx: StepContext, caches, forwards, k_max: int) -> Optional[Proposal]:
        found = self.lookup.matches(ctx, k_max)
        matched = [i for i in ctx.live if found[i]]
        if len(matched) == len(ctx.live):
            return self.lookup.from_all_matches(ctx, found)
        proposal = self.model.propose(ctx, caches, forwards, k_max)
        if proposal is None:  # no model draft pays: the matched rows' lookups, if those pay, or the target alone
            return self.lookup.from_all_matches(ctx, found)
        if matched:
            rows = self.lookup.from_matches(ctx, found, matched, proposal.k)
            idx = torch.tensor(matched, device=ctx.device)
            proposal.tokens[idx], proposal.logits[idx] = rows.tokens, rows.logits
            if proposal.alternatives is not None:
                proposal.alternatives[idx] = -1  # a lookup proposal names no alternatives
            for i in matched:
                proposal.source[i] = LOOKUP
                if proposal.confidence is not None:
                    proposal.confidence[i] = None  # (the model's confidence in a token it did not propose)
        return proposal

    def commit(self, ctx: StepContext, proposal: Proposal, accepted: List[int], features=None, received=None) -> None:
        if any(s == MODEL for s in proposal.source):  # the model ran this step
            self.model.commit(ctx, proposal, accepted, features, received)
        else:
            self.model.skipped(ctx, features, received)

    def skipped(self, ctx: StepContext, features=None, received=None) -> None:
        self.model.skipped(ctx, features, received)


class FeatureProposer:
    """An EAGLE-style feature head (models/feature_draft.py): it reads the target's own final features, which the
    engine's prefill and verification forwards hand over (`needs_features`), and drafts by feeding the head its own
    predicted features. Per request it keeps `unread`, the target features [c, feature_width] it has not read yet
    (those of the tokens committed since it last read; with taps, the tapped block outputs follow the final features);
    what its cache holds follows from them (`cached`). The recipe, position by position, is in FeatureDraft's
    docstring."""

    needs_features = True

    def __init__(self, head, flag: NonFiniteFlag):
        self.head = head  # a FeatureDraft
        self.feature_taps = head.config.taps
        self.models = (head,)
        self.flag = flag
        self.unread: Dict[int, torch.Tensor] = {}

    def cached(self, index: int, length: int) -> int:
        """The leading positions of live request `index` (`length` committed tokens) that its cache holds between
        steps: the target's features were read up to the first unread one."""
        return length - 1 - self.unread[index].shape[0]

    def start(self, reqs, features: Optional[torch.Tensor] = None, caches=()) -> None:
        """Requests just prefilled together: features [len(reqs), T, feature_width] of prompt[:-1] (row b valid on
        its first n = len(seq) - 1; None when every prompt has one token). The head's own prefill: it reads
        (f_p, x_{p+1}) for p < n - 1 into its cache now, in one pass from position 0 (right-padded rows: the padding
        keys lie beyond a row's cached positions and are overwritten before anything attends to them), and leaves
        f_{n-1} unread for the first step. So a step's extension reads a few features per row, never a whole prompt
        padded to the batch's longest."""
        n = [len(r.seq) - 1 for r in reqs]
        T = max(n) - 1
        if T > 0:
            (cache,) = caches
            dev = features.device
            tokens = torch.tensor([(r.seq[1:m] + [0] * T)[:T] for r, m in zip(reqs, n)], device=dev)
            positions = torch.arange(T, device=dev).expand(len(reqs), T)
            self.head(self.head.read(features[:, :T]), tokens, positions, cache, kv_len=T, from_start=True)
        none_yet = self.head.fc.weight.new_zeros(0, self.head.config.feature_width)  # a one-token prompt has none
        for b, (r, m) in enumerate(zip(reqs, n)):
            self.unread[r.index] = features[b, m - 1:m].clone() if m > 0 else none_yet

    def propose(self, ctx: StepContext, caches, forwards, k_max: int) -> Optional[Proposal]:
        k = ctx.choose_k(MODEL)
        if k == 0:  # no draft length pays: the unread features wait for the next step that drafts
            return None
        (cache,) = caches
        reqs, lengths, dev = ctx.reqs, ctx.lengths, ctx.device
        kv_len = max(lengths) + k_max
        # 1. extend: each row reads its unread features f_m..f_{n-1} with tokens x_{m+1}..x_n (right-padded)
        unread = [self.unread.get(r.index) for r in reqs]
        counts = [u.shape[0] if u is not None else 0 for u in unread]
        W = max(1, max(counts))
        feats = torch.zeros(len(reqs), W, self.head.config.feature_width, dtype=ctx.dtype, device=dev)
        tokens, positions, last = [], [], []
        for b, (r, u, c, n) in enumerate(zip(reqs, unread, counts, lengths)):
            m = n - 1 - c  # the first unread position: cached(r.index, n)
            if c:
                feats[b, :c] = u
            tokens.append((r.seq[m + 1:n] + [0] * W)[:W])
            # the padding (past the row's c) is never attended and is overwritten later; it stays inside the cache
            positions.append([min(p, cache.max_len - 1) for p in range(m, m + W)])
            last.append(max(c - 1, 0))
        rows = torch.arange(len(reqs), device=dev)
        pred = self.head(self.head.read(feats), torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                         cache, kv_len)[rows, torch.tensor(last, device=dev)].unsqueeze(1)
        # 2. draft: d_1 from the extension, then the head on its own predicted features
        L = torch.tensor(lengths, device=dev)

        def advance(d: torch.Tensor, i: int) -> torch.Tensor:
            nonlocal pred
            pred = self.head(pred, d.unsqueeze(1), (L - 1 + i).unsqueeze(1), cache, kv_len)
            return self.head.logits(pred[:, 0])

        return draft_tokens(ctx, self.head.logits(pred[:, 0]), advance, self.flag, k)

    def commit(self, ctx: StepContext, proposal: Proposal, accepted: List[int],
               features: Optional[torch.Tensor] = None, received: Optional[List[int]] = None) -> None:
        """features [B, T, feature_width]: the target's features that produced each row's received tokens, in order
        (features[i, :received[i]]); they are the head's next unread ones (its cache stays valid up to n - 1: the
        draft steps' entries hold predicted features and are overwritten next round)."""
        for i in ctx.live:
            self.unread[ctx.reqs[i].index] = features[i, :received[i]]

    def skipped(self, ctx: StepContext, features=None, received=None) -> None:
        """A step without this head (a plain target step, or a lookup step): the features of the tokens it committed
        join the unread ones."""
        for i in ctx.live:
            r = ctx.reqs[i]
            self.unread[r.index] = torch.cat([self.unread[r.index], features[i, :received[i]]])
