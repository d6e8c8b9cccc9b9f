"""The decode loop on the device: a whole speculative step as one CUDA graph, its state on the device, and the host
reading that state once every `sync_every` steps (sooner near a wave's end).

SpeculativeEngine(..., device_loop=True) decodes through a DeviceLoop. It runs one wave of requests at a time (they
start together; a finished row idles until the wave ends) with a fixed lookahead k, and a step reads, as the
engine's own (engine.py):
  propose   the draft's k tokens and their distributions q: a Transformer draft re-reads the row's last two committed
            tokens, then drafts; a feature head (models/feature_draft.py) reads the target features it has not read
            yet, then drafts on its own predicted features; n-gram lookup (models/lookup_draft.py's rule, searched on
            the device) proposes what followed the row's tail where it occurred earlier, with one-hot q: alone, a row
            without a match proposes its last token k times; in front of a model ("lookup+..."), the model drafts
            for every row (a graph has no branches) and the rows with a match take the lookup's proposal; no draft:
            the target alone, one token per step;
  verify    the target reads [pending, d1..dk] at positions L-1..L-1+k (L: the row's committed tokens);
  accept    `speculative_sample` (lossless for the row's settings; reference.py states the semantics);
  commit    the received tokens join `seq` up to the row's first EOS and its max_new_tokens, L grows, the proposer
            keeps the verified features (a feature head) or nothing (a Transformer draft re-reads its window).
Nothing in a step reads device memory on the host, so every shape is fixed (the caches and the whole-cache
attention of static shapes) and the step is captured once per (batch, k, draft) and replayed. The host reads the
state every `sync_every` steps, or sooner near a wave's end: never later than the step at which the row that needs the
most tokens could be done (each step gives a row at most k+1), so a wave runs no step after its last row is done
unless a row ended at EOS. The random numbers of a wave are drawn up front from the seeded generator, [steps, B, 2k+1]
(k for the drafts, k+1 for the acceptance), and each step picks its row by the device step counter: the same seed
gives the same text, captured or eager.
Draft positions whose keys a step writes beyond a row's length are masked and rewritten before they are read, as in
the engine (kv_cache.py).
"""
from __future__ import annotations

import dataclasses
import time
from typing import List, Optional

import torch

from tempspec_engine.measure import charge_prefill, sync_device
from tempspec_engine.models.feature_draft import FeatureDraft
from tempspec_engine.models.lookup_draft import LookupDraft
from tempspec_engine.ops import sample, speculative_sample
from tempspec_engine.proposers import NONFINITE_MESSAGE, NonFiniteFlag, pad_logits
from tempspec_engine.sampling import StepSettings

DEFAULT_SYNC_EVERY = 8  # decode steps between the host's reads of the loop state


@dataclasses.dataclass
class WaveTiming:
    """How the latest wave's decode steps (prefill excluded) spent their time: `steps` steps in `wall_s` seconds, of
    which `syncs` host reads of the loop state (one per sync_every steps, or sooner near the wave's end)."""

    steps: int = 0
    wall_s: float = 0.0
    syncs: int = 0


class _State:
    """The loop's device tensors for B rows. seq [B, max_len + 1] int64: the committed tokens (column max_len takes the
    writes that land nowhere); length, prompt_len, max_new [B] int64; done [B] bool; step [1] int64 (the uniforms row
    of the next step); the per-row counters steps, drafted (the steps with a proposal: lookup alone proposes only
    where a tail matched), accepted, rejections [B] int64 and, per draft position, position_accepted and
    position_reached [B, k] int64 (RequestStats' meaning); uniforms [max_len, B, width] fp32."""

    def __init__(self, batch: int, max_len: int, k: int, device: torch.device):
        z = dict(dtype=torch.int64, device=device)
        self.seq = torch.zeros(batch, max_len + 1, **z)
        self.length, self.prompt_len, self.max_new = (torch.zeros(batch, **z) for _ in range(3))
        self.steps, self.drafted, self.accepted, self.rejections = (torch.zeros(batch, **z) for _ in range(4))
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.position_accepted, self.position_reached = torch.zeros(batch, k, **z), torch.zeros(batch, k, **z)
        self.step = torch.zeros(1, **z)
        self.uniforms = torch.zeros(max_len, batch, 2 * k + 1, dtype=torch.float32, device=device)

    def tensors(self) -> List[torch.Tensor]:
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]


class _TransformerDraft:
    """A Transformer draft with its own cache. Between steps the cache holds each row's committed tokens but the last
    two, which the next propose re-reads (positions L-2, L-1) before drafting. It reads no target features
    (feature_taps None) and keeps no device state of its own beside its cache."""

    feature_taps = None

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def tensors(self) -> List[torch.Tensor]:
        return []

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, features, last: torch.Tensor) -> None:
        self.model(tokens, positions, self.cache, kv_len=None, compute_logits=False)

    def first_logits(self, s: _State) -> torch.Tensor:
        positions = (s.length - 2).unsqueeze(1) + torch.arange(2, device=s.length.device)
        return self.model(s.seq.gather(1, positions), positions, self.cache, kv_len=None)[:, -1]

    def next_logits(self, d: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.model(d.unsqueeze(1), position.unsqueeze(1), self.cache, kv_len=None)[:, 0]

    def commit(self, features, received: torch.Tensor) -> None:
        pass


class _Lookup:
    """n-gram lookup in each row's committed tokens on the device, with LookupDraft's rule (models/lookup_draft.py):
    the longest tail of max_ngram down to min_ngram tokens that occurred earlier, latest occurrence first; up to k
    tokens that followed it, a shorter run repeating its last token. No state."""

    def __init__(self, lookup):
        self.max_ngram, self.min_ngram = lookup.max_ngram, lookup.min_ngram

    def propose(self, s: _State, k: int):
        """found [B] bool (a tail matched) and tokens [B, k] int64 (a row without a match: its last token k times)."""
        seq, length = s.seq[:, :-1], s.length  # (the last column takes the writes that land nowhere)
        width, device = seq.shape[1], seq.device
        found = torch.zeros_like(length, dtype=torch.bool)
        after = length - 1  # where the proposal starts: a row without a match repeats its last token
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            tail = seq.gather(1, (length - n).clamp(min=0).unsqueeze(1) + torch.arange(n, device=device))
            starts = torch.arange(width - n + 1, device=device)
            # an earlier occurrence ends before the tail does: start <= L - n - 1 (and a tail needs n <= L - 1)
            hit = (seq.unfold(1, n, 1) == tail.unsqueeze(1)).all(dim=-1) & \
                (starts <= (length - n - 1).unsqueeze(1))
            latest = torch.where(hit, starts, -1).amax(dim=1)
            new = ~found & (latest >= 0)
            after = torch.where(new, latest + n, after)
            found |= new
        index = torch.minimum(after.unsqueeze(1) + torch.arange(k, device=device), (length - 1).unsqueeze(1))
        return found, seq.gather(1, index)


class _FeatureHead:
    """An EAGLE-style head (FeatureDraft) with its own cache and the target features it has not read yet: unread
    [B, k+1, width] of which the first n_unread [B] are valid, the features that produced the row's last n_unread
    committed tokens. Its cache holds the positions before them. feature_taps: the target blocks whose outputs it
    reads beside the final features (the target's forwards return features whenever this is not None)."""

    def __init__(self, head: FeatureDraft, cache, batch: int, k: int, dtype: torch.dtype, device: torch.device):
        self.head, self.cache = head, cache
        self.feature_taps = head.config.taps
        self.unread = torch.zeros(batch, k + 1, head.config.feature_width, dtype=dtype, device=device)
        self.n_unread = torch.ones(batch, dtype=torch.int64, device=device)
        self.pred = None  # the head's latest predicted features [B, 1, dim], fed back while drafting

    def tensors(self) -> List[torch.Tensor]:
        return [self.unread, self.n_unread]

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, features: torch.Tensor,
                last: torch.Tensor) -> None:
        """features [B, T, width] of prompt[:-1] (tokens [B, T], right-padded; every prompt has 2+ tokens): the head
        reads all but each row's last feature (index last [B] int64), which stays unread for the first step."""
        if tokens.shape[1] > 1:
            self.head(self.head.read(features[:, :-1]), tokens[:, 1:], positions[:, :-1], self.cache, kv_len=None)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.unread[:, 0] = features[rows, last]
        self.n_unread.fill_(1)

    def first_logits(self, s: _State) -> torch.Tensor:
        """Reads the unread features f_m..f_(L-2) with tokens x_(m+1)..x_(L-1) (m = L-1-n_unread, padded to k+1)."""
        k1 = self.unread.shape[1]
        start = s.length - 1 - self.n_unread
        positions = start.unsqueeze(1) + torch.arange(k1, device=start.device)
        tokens = s.seq.gather(1, positions + 1)
        pred = self.head(self.head.read(self.unread), tokens, positions, self.cache, kv_len=None)
        self.pred = pred.gather(1, (self.n_unread - 1).view(-1, 1, 1).expand(-1, 1, pred.shape[-1]))
        return self.head.logits(self.pred[:, 0])

    def next_logits(self, d: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.pred = self.head(self.pred, d.unsqueeze(1), (position - 1).unsqueeze(1), self.cache, kv_len=None)
        return self.head.logits(self.pred[:, 0])

    def commit(self, features: torch.Tensor, received: torch.Tensor) -> None:
        """features [B, k+1, width]: the target's at the verified tokens; a row that received n tokens reads the
        first n next step (a finished row, n = 0, keeps its state)."""
        took = received > 0
        self.unread.copy_(torch.where(took.view(-1, 1, 1), features.to(self.unread.dtype), self.unread))
        self.n_unread.copy_(torch.where(took, received, self.n_unread))


class DeviceLoop:
    """Decodes waves of requests for a SpeculativeEngine (engine.device_loop), captured as CUDA graphs when
    engine.cuda_graphs, else eagerly with the same code and the same random numbers."""

    def __init__(self, engine, sync_every: int = 8):
        self.engine = engine
        self.sync_every = sync_every
        self.timing = WaveTiming()
        self._decoders = {}  # (batch, speculative) -> _Decoder, kept for graph replay across calls

    def run(self, reqs, batch: int, speculative: bool, gen: torch.Generator) -> None:
        """Decodes every request (engine _Request objects, filled in place), `batch` at a time."""
        short = next((r.index for r in reqs if len(r.seq) < 2), None)
        if short is not None:
            raise ValueError(f"prompt {short}: device_loop needs prompts of at least 2 tokens")
        key = (batch, speculative)
        if key not in self._decoders:
            self._decoders[key] = _Decoder(self.engine, batch, speculative)
        decoder = self._decoders[key]
        self.timing = WaveTiming()
        for start in range(0, len(reqs), batch):
            decoder.wave(reqs[start:start + batch], gen, self.sync_every, self.timing)

    @torch.inference_mode()  # (the loop's state tensors were made under generate()'s inference mode)
    def step_seconds(self, batch: int, speculative: bool, repeats: int = 50) -> float:
        """The device time of one captured step of this width (after a generate() call captured it): `repeats`
        replays back to back between two CUDA events, so no host work stands between them. Leaves the loop state
        of the latest wave changed (its outputs were already read)."""
        decoder = self._decoders.get((batch, speculative))
        if decoder is None or decoder.graph is None:
            raise ValueError(f"no captured step for batch {batch} (speculative={speculative}): run generate() on "
                             "CUDA with cuda_graphs first")
        decoder.state.step.zero_()  # (replays index the uniforms by the step counter: stay within them)
        repeats = max(1, min(repeats, decoder.state.uniforms.shape[0] - 2))
        decoder.graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            decoder.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / repeats


class _Decoder:
    """Caches, state and (captured) step of one batch width."""

    def __init__(self, engine, batch: int, speculative: bool):
        e = self.engine = engine
        self.batch, self.device, self.dtype = batch, e.device, e.dtype
        self.k = e.k if speculative else 0
        self.target = e.target.model
        self.target_cache = self.target.new_cache(batch, e.max_len, e.device, e.dtype)
        self.draft = None
        self.lookup = _Lookup(e.lookup) if speculative and e.lookup is not None else None
        if speculative and e.draft_model is not None:
            model = e.draft_model.model
            cache = model.new_cache(batch, e.max_len, e.device, e.dtype)
            self.draft = (_FeatureHead(model, cache, batch, self.k, e.dtype, e.device)
                          if isinstance(model, FeatureDraft) else _TransformerDraft(model, cache))
        taps = None if self.draft is None else self.draft.feature_taps
        # what the target's forwards are asked for beside the logits: a feature head's features
        self.feature_kw = {} if taps is None else {"return_features": True, "feature_taps": taps}
        self.state = _State(batch, e.max_len, self.k, e.device)
        self.eos = torch.tensor(list(e.target.eos_ids) or [-1], dtype=torch.int64, device=e.device)
        self.flag = NonFiniteFlag(e.device)
        self.every_row = torch.ones(batch, dtype=torch.bool, device=e.device)  # _propose's rows with a proposal
        self.settings = None  # StepSettings of the wave (captured: same tensors for every wave, refilled)
        self.graph = None
        self.filter_draft = None  # the engine's filter_draft of the captured step (the step branches on it)
        # torch.compile fuses the step's elementwise work (norms, RoPE, the sampler's preparation) into fewer kernels;
        # the compiled step is what the graph captures
        self.run_step = torch.compile(self.step, dynamic=False) if e.device_loop_compile else self.step

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """propose -> verify -> accept -> commit for every row, on device tensors only."""
        s, k, settings, e = self.state, self.k, self.settings, self.engine
        u = s.uniforms.index_select(0, s.step)[0]  # [B, 2k+1]
        pending_at = (s.length - 1).unsqueeze(1)
        pending = s.seq.gather(1, pending_at)
        if not self.k:
            logits = pad_logits(self.target(pending, pending_at, self.target_cache, kv_len=None)[:, 0], e.vocab,
                                self.dtype)
            self.flag.check(logits)
            token = sample(logits, settings.temperature, uniforms=u[:, 0], backend=e.backend, validate=False,
                           **settings.filters)
            self._commit(torch.zeros_like(token), token.unsqueeze(1))
        else:
            draft_logits, drafts, proposed = self._propose(u[:, :k])
            positions = pending_at + torch.arange(k + 1, device=self.device)
            out = self.target(torch.cat([pending, drafts], dim=1), positions, self.target_cache, kv_len=None,
                              **self.feature_kw)
            logits, features = out if self.feature_kw else (out, None)
            logits = pad_logits(logits, e.vocab, self.dtype)
            self.flag.check(logits)
            if not e._filter_draft:
                logits = settings.filter_target_only(logits)
            result = speculative_sample(draft_logits, logits, drafts, settings.temperature, uniforms=u[:, k:],
                                        backend=e.backend, validate=False, **self._draft_filters(),
                                        **settings.lenience)
            received = self._commit(result.accepted, result.tokens, proposed)
            if self.draft is not None:
                self.draft.commit(features, received)
        s.step += 1

    def _draft_filters(self) -> dict:
        return self.settings.filters if self.engine._filter_draft else {}

    def _propose(self, u: torch.Tensor):
        """k drafts per row: q [B, k, V] (engine dtype, padded to its vocabulary), d [B, k] int64, the lookup's where
        a row's tail matched (q one-hot), the model's elsewhere, and proposed [B] bool: the rows with a proposal (lookup
        alone: where a tail matched; the others verify a filler of their last token, counted as a plain step)."""
        if self.lookup is None:
            return (*self._draft(u), self.every_row)
        found, tokens = self.lookup.propose(self.state, self.k)
        one_hot = LookupDraft.draft_logits(tokens, self.engine.vocab, self.dtype)
        if self.draft is None:
            return one_hot, tokens, found
        q, d = self._draft(u)
        return torch.where(found.view(-1, 1, 1), one_hot, q), torch.where(found.view(-1, 1), tokens, d), self.every_row

    def _draft(self, u: torch.Tensor):
        """The model draft's k tokens per row, as _propose returns them."""
        s, e = self.state, self.engine
        logits = self.draft.first_logits(s)
        qs, ds = [], []
        for i in range(self.k):
            q = pad_logits(logits, e.vocab, self.dtype)
            self.flag.check(q)
            d = sample(q, self.settings.temperature, uniforms=u[:, i], backend=e.backend, validate=False,
                       **self._draft_filters()).clamp_(0, q.shape[-1] - 1)
            qs.append(q)
            ds.append(d)
            if i < self.k - 1:
                logits = self.draft.next_logits(d, s.length + i)
        return torch.stack(qs, dim=1), torch.stack(ds, dim=1)

    def _commit(self, accepted: torch.Tensor, tokens: torch.Tensor, proposed: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """tokens [B, n] (the op's: accepted drafts, then one more, then -1): each live row takes its first
        accepted + 1, fewer at its first EOS or its max_new_tokens; the acceptance counters count the rows that
        proposed (proposed [B] bool; None: none did). Returns the tokens each row received [B]."""
        s = self.state
        live = ~s.done
        j = torch.arange(tokens.shape[1], device=self.device)
        n = torch.minimum(accepted + 1, s.max_new - (s.length - s.prompt_len))
        eos = (tokens.unsqueeze(-1) == self.eos).any(dim=-1) & (j < n.unsqueeze(1))
        hit = eos.any(dim=1)
        n = torch.where(hit, eos.to(torch.int8).argmax(dim=1) + 1, n) * live
        nowhere = s.seq.shape[1] - 1
        slots = torch.where(j < n.unsqueeze(1), s.length.unsqueeze(1) + j, nowhere)
        # (a row of NaN logits draws an arbitrary id, and the host hears of it only at its next read: keep ids in the
        # embedding's range until then, so that no forward indexes outside it)
        s.seq.scatter_(1, slots, tokens.clamp(0, self.engine.target.vocab_size - 1))
        s.length += n
        s.done |= live & (hit | (s.length - s.prompt_len >= s.max_new))
        s.steps += live
        if proposed is not None:
            counted = live & proposed
            s.drafted += counted
            s.accepted += accepted * counted
            s.rejections += counted & (accepted < self.k)
            position = torch.arange(self.k, device=self.device)
            s.position_accepted += (position < accepted.unsqueeze(1)) & counted.unsqueeze(1)
            s.position_reached += (position <= accepted.unsqueeze(1)) & counted.unsqueeze(1)
        return n

    # ------------------------------------------------------------------ a wave
    def wave(self, reqs, gen: torch.Generator, sync_every: int, timing: WaveTiming) -> None:
        """Decodes up to `batch` requests (their settings for the whole wave); fills each request in place."""
        e, s, B = self.engine, self.state, self.batch
        rows = list(reqs) + [e._dead] * (B - len(reqs))  # idle rows: a stand-in request, done from the start
        now = time.perf_counter()
        for r in reqs:
            r.start = now
        steps = max(r.max_new for r in reqs)  # (every live row gains a token per step)
        width = self._load(rows, len(reqs), steps, gen)
        prefill_start = time.perf_counter()
        self._prefill(width - 1)
        sync_device(self.device)  # (one wait per wave: the prefill's seconds, apart from the steps')
        charge_prefill([r.stats for r in reqs], [len(r.seq) - 1 for r in reqs], time.perf_counter() - prefill_start)
        if e.cuda_graphs and self.graph is None:
            self._capture()
        t0, ran, needed = time.perf_counter(), 0, steps
        while needed > 0 and ran < steps:
            # a step gives a live row 1 to k+1 tokens: the row that needs the most cannot be done (but by EOS) within
            # fewer than ceil(needed / (k+1)) steps, so the host reads no later than that, nor sync_every steps on
            n = min(sync_every, -(-needed // (self.k + 1)), steps - ran)
            for _ in range(n):
                self.graph.replay() if self.graph is not None else self.run_step()
            ran += n
            timing.syncs += 1
            needs = torch.where(s.done, 0, s.max_new - (s.length - s.prompt_len))
            needed, bad = torch.stack([needs.max(), self.flag.value.to(torch.int64)]).tolist()  # the host's one read
            if bad:
                raise FloatingPointError(NONFINITE_MESSAGE)
        timing.steps += ran
        timing.wall_s += time.perf_counter() - t0
        self._store(reqs)

    def _load(self, rows, n_live: int, steps: int, gen: torch.Generator) -> int:
        """The wave's rows into the loop state, the uniforms of its `steps` steps and its settings; returns the longest
        prompt's length."""
        s, B = self.state, self.batch
        lengths = [max(len(r.seq), 2) for r in rows]  # (an idle row's stand-in has one token)
        s.seq.zero_()
        s.seq[:, :max(lengths)] = torch.tensor([r.seq + [0] * (max(lengths) - len(r.seq)) for r in rows])
        for t, values in ((s.length, lengths), (s.prompt_len, lengths), (s.max_new, [r.max_new for r in rows])):
            t.copy_(torch.tensor(values))
        s.done.copy_(torch.arange(B) >= n_live)
        for t in (s.step, s.steps, s.drafted, s.accepted, s.rejections, s.position_accepted, s.position_reached):
            t.zero_()
        s.uniforms[:steps] = torch.rand((steps,) + tuple(s.uniforms.shape[1:]), generator=gen, device=self.device)
        self.flag.reset()
        settings = StepSettings([r.settings for r in rows], self.device)
        same_kernels = self.graph is not None and settings.filters.keys() == self.settings.filters.keys() and \
            settings.lenience.keys() == self.settings.lenience.keys() and \
            self.filter_draft == self.engine._filter_draft
        if same_kernels:  # the captured step reads these very tensors: refill them
            self.settings.temperature.copy_(settings.temperature)
            for mine, theirs in ((self.settings.filters, settings.filters), (self.settings.lenience, settings.lenience)):
                for name in mine:
                    mine[name].copy_(theirs[name])
        else:  # (other filters run other kernels: capture again)
            self.graph = None
            self.settings, self.filter_draft = settings, self.engine._filter_draft
        return max(lengths)

    def _prefill(self, T: int) -> None:
        """prompt[:-1] of every row (T: the longest) through the target and the draft (right-padded, whole-cache
        attention)."""
        tokens = self.state.seq[:, :T]
        positions = torch.arange(T, device=self.device).expand(self.batch, T)
        out = self.target(tokens, positions, self.target_cache, kv_len=None, compute_logits=False, **self.feature_kw)
        if self.draft is not None:
            last = self.state.prompt_len - 2
            self.draft.prefill(tokens, positions, out[1] if self.feature_kw else None, last)

    def _capture(self) -> None:
        """Captures step(): warm-up steps on a side stream, then the capture; the loop state is restored after (the
        warm-up advanced it; what it wrote into the caches lies beyond every row's length)."""
        tensors = self.state.tensors() + (self.draft.tensors() if self.draft is not None else [])
        saved = [t.clone() for t in tensors]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run_step()
        for t, v in zip(tensors, saved):
            t.copy_(v)
        self.flag.reset()
        self.graph = graph

    def _store(self, reqs) -> None:
        """The wave's tokens and counters into the requests (read once the wave has ended)."""
        s, eos = self.state, set(self.engine.target.eos_ids)
        n = len(reqs)
        seq, length, steps, drafted, accepted, rejections, taken, reached = (
            t[:n].tolist() for t in (s.seq, s.length, s.steps, s.drafted, s.accepted, s.rejections,
                                     s.position_accepted, s.position_reached))
        now = time.perf_counter()
        for r, row, L, st, dr, a, rj, tk, rc in zip(reqs, seq, length, steps, drafted, accepted, rejections, taken,
                                                    reached):
            r.seq = row[:L]
            generated = r.generated
            r.finish = "eos" if generated and generated[-1] in eos else "length"
            stats = r.stats
            stats.new_tokens, stats.steps, stats.accepted, stats.rejections = len(generated), st, a, rj
            stats.plain_steps = st - dr
            if self.k:
                stats.position_proposed, stats.position_accepted, stats.position_reached = [dr] * self.k, tk, rc
            stats.wall_time_s = now - r.start
