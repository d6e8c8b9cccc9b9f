"""The distillation loop: one draft, one target (the teacher), generated data, a divergence at tau_kd.

online:  loss = divergence(softmax(target/tau), softmax(draft/tau)) per response token (teacher forward each step)
offline: loss = cross-entropy of the generated response tokens (sequence-level KD: the data carries the teacher)
feature heads (init "feature...", EAGLE-style, tempspec_engine/models/feature_draft.py): the target's final-norm
    features of a batch come from one teacher forward, or from a teacher cache (teacher_cache.py: computed once, no
    target forward afterwards); the target's logits are its head on them. The head, fed the target's feature at
    position t and token t+1, predicts the feature of t+1: loss = (online) the divergence at tau_kd between the target
    head on it and the target's logits at t+1, or (offline) the cross-entropy of the data's token t+2, + feature_weight
    * smooth L1 against the target's feature at t+1, averaged over `unroll` steps (EAGLE-3's training-time test: step
    j > 1 feeds the head's own step j-1 predictions, shifted one position, in place of the target's features). With a
    draft vocabulary (/vocab:N) the divergence compares the head with the target renormalized over those N ids (the
    best the restricted head can do), and the cross-entropy skips tokens outside them. With feature_taps the head
    also reads those target blocks' outputs at t (its fuse; the features it predicts are still the final ones).
tau_mix (online, any draft): the divergence averaged over several temperatures in place of tau_kd alone (a
    temperature mixture).

AdamW with linear warmup and cosine decay, gradient accumulation, bf16 autocast over fp32 weights where the device
multiplies bf16 fast (precision "auto": fp32 elsewhere, resolve_precision), checkpoints
(draft in safetensors + optimizer state) that `resume=True` continues from exactly, the lineage of a warm start (the
stages behind the head it starts from, for its model card), a progress bar with loss and tokens/s, and periodic
expected acceptance (1 - TVD; argmax agreement at tau 0) on held-out rows, plus, with `eval_prompts`, the acceptance
measured by decoding a few prompts through the engine. Under torchrun
(WORLD_SIZE > 1) the draft is wrapped in DistributedDataParallel (nccl on GPUs, gloo on CPUs); each rank takes every
world-th micro-batch and rank 0 evaluates and writes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from tempspec_engine.linear import torch_bf16_matmul_is_fast
from tempspec_engine.models.draft_checkpoint import save_draft
from tempspec_engine.models.feature_draft import FeatureDraft, check_taps, save_feature_draft
from tempspec_engine.models.loading import LoadedModel, load_target, place, resolve_device
from tempspec_engine.results import write_json
from tempspec_trainer.data import make_batch, read_prompt_file, read_rows, token_sequences
from tempspec_trainer.divergences import get_divergence
from tempspec_trainer.evaluate import expected_acceptance_over
from tempspec_trainer.draft_init import (init_draft, init_feature_draft, is_feature_init, parse_feature_init,
                                        warm_start_lineage)
from tempspec_trainer.teacher_cache import open_teacher_cache

CHECKPOINTS = "checkpoints"
FINAL = "final"
INIT = "init"  # the draft before training, saved for comparisons
STATE_FILE = "trainer_state.pt"
PRECISIONS = ("auto", "bf16", "fp32")
# the config fields a resume may change (a run extended to more steps, evaluated or saved on another rhythm, moved to
# another device); every other field must be the checkpoint's, and a resume takes it from there unless given (the
# data's paths may change too, where the checkpoint holds the data's SHA-256: the bytes must be the same)
MAY_CHANGE_ON_RESUME = ("out_dir", "steps", "eval_every", "save_every", "eval_prompts", "eval_decode_prompts",
                        "eval_decode_tokens", "eval_temperatures", "device", "precision", "teacher_cache")


@dataclasses.dataclass
class DistillConfig:
    """One distillation run. `data`: generated JSONL files (gen-data / mix); rows keep their own temperature."""

    data: List[str]
    out_dir: str
    # The defaults are the recipe of the shipped drafts (README, "The trainer"; their model cards): online JSD(0.5)
    # from the target's layers 0 and 1 with MLPs pruned to 1024 channels, 800 steps of 16 sequences, lr 1e-3.
    tau_kd: float = 1.0
    mode: str = "online"  # "online" (token-level divergence at tau_kd) or "offline" (cross-entropy on the data)
    divergence: str = "jsd"  # fkl | rkl | jsd | tvd (online only)
    jsd_beta: float = 0.5
    init: str = "layers:0,1/mlp:1024"  # see draft_init.py
    target: str = "default"
    steps: int = 800
    batch_size: int = 16  # sequences per micro-batch (per rank)
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"  # bf16 autocast (and a bf16 teacher), fp32, or auto (resolve_precision)
    eval_rows: int = 64  # rows held out of `data` for the periodic acceptance estimate (at most a quarter; 0: none)
    eval_every: int = 200
    eval_temperatures: Tuple[float, ...] = (0.0, 0.5, 1.0)
    eval_prompts: Optional[str] = None  # JSONL prompts: also measure alpha by decoding them at each evaluation
    eval_decode_prompts: int = 4  # how many of them
    eval_decode_tokens: int = 32  # new tokens per prompt
    save_every: int = 200
    seed: int = 0
    device: str = "auto"
    # feature heads (init "feature..."): weight of the smooth-L1 feature regression (0: off) and training-time-test
    # steps (1: teacher-forced only)
    feature_weight: float = 0.1
    unroll: int = 2
    # feature heads: uniform noise U(-a, a) added to the target's features the head reads in training (EAGLE's
    # augmentation against the drift of its own predicted features; 0: off); never to the features it predicts
    feature_noise: float = 0.0
    # temperature mixture: the online divergence averaged over these temperatures instead of tau_kd alone
    tau_mix: Tuple[float, ...] = ()
    # feature heads: a file of the target's features for the training rows (teacher_cache.py), made on first use
    teacher_cache: Optional[str] = None
    # feature heads: target blocks whose outputs the head also reads (EAGLE-3's multi-level features); () keeps a
    # warm-started head's own (none for a fresh head); a warm start without taps gains them (fused as the identity)
    feature_taps: Tuple[int, ...] = ()

    def validate(self) -> None:
        if not self.data:
            raise ValueError("no data files given")
        for path in self.data:
            if not Path(path).is_file():
                raise ValueError(f"data file {path} does not exist (make it with `tempspec-train gen-data`)")
        if not (self.tau_kd >= 0.0) or not math.isfinite(self.tau_kd):
            raise ValueError(f"tau_kd must be a finite number >= 0, got {self.tau_kd!r}")
        if self.mode not in ("online", "offline"):
            raise ValueError(f"mode must be 'online' or 'offline', got {self.mode!r}")
        get_divergence(self.divergence)
        if self.mode == "online" and self.divergence == "rkl" and self.tau_kd == 0.0 and not self.tau_mix:
            raise ValueError("reverse KL against a greedy (tau_kd = 0) target is infinite: use fkl, jsd or tvd")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_prompts is not None and not Path(self.eval_prompts).is_file():
            raise ValueError(f"eval prompt file {self.eval_prompts} does not exist")
        if not self.eval_temperatures or any(not (t >= 0.0) or not math.isfinite(t) for t in self.eval_temperatures):
            raise ValueError(f"eval temperatures must be one or more finite numbers >= 0, got {self.eval_temperatures}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not (value > 0.0) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if not (self.weight_decay >= 0.0) or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (0.0 < self.jsd_beta < 1.0):
            raise ValueError(f"jsd_beta must lie in (0, 1), got {self.jsd_beta!r}")
        if self.eval_decode_prompts < 1 or self.eval_decode_tokens < 1:
            raise ValueError("eval_decode_prompts and eval_decode_tokens must be >= 1, got "
                             f"{self.eval_decode_prompts}, {self.eval_decode_tokens}")
        if is_feature_init(self.init):
            parse_feature_init(self.init)
        for name in ("feature_weight", "feature_noise"):
            value = getattr(self, name)
            if not (value >= 0.0) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.feature_noise > 0 and not is_feature_init(self.init):
            raise ValueError("feature_noise is for feature heads (init 'feature...')")
        if any(not (t >= 0.0) or not math.isfinite(t) for t in self.tau_mix):
            raise ValueError(f"tau_mix temperatures must be finite numbers >= 0, got {self.tau_mix}")
        if self.tau_mix and self.mode != "online":
            raise ValueError("tau_mix averages the online divergence: it needs mode 'online' (offline data carries "
                             "its temperatures in its rows: mix generated files with `tempspec-train mix`)")
        if self.divergence == "rkl" and 0.0 in self.tau_mix:
            raise ValueError("reverse KL against a greedy (tau 0) target is infinite: drop 0 from tau_mix or use "
                             "fkl, jsd or tvd")
        if self.feature_taps and not is_feature_init(self.init):
            raise ValueError("feature_taps are for feature heads (init 'feature...')")
        check_taps(self.feature_taps, "feature_taps")
        if self.teacher_cache is not None and not is_feature_init(self.init):
            raise ValueError("teacher_cache holds the target's features for feature heads (init 'feature...')")
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.warmup_steps < 0 or self.eval_rows < 0:
            raise ValueError(f"warmup_steps and eval_rows must be >= 0, got {self.warmup_steps}, {self.eval_rows}")
        if self.warmup_steps >= self.steps:
            warnings.warn(f"warmup_steps {self.warmup_steps} covers all {self.steps} steps: the learning rate never "
                          "reaches its cosine decay (lower --warmup-steps)")

    def recipe(self) -> dict:
        return dataclasses.asdict(self)

    def temperatures(self) -> Tuple[float, ...]:
        """The temperatures the online divergence is averaged over: tau_mix, or tau_kd alone."""
        return tuple(self.tau_mix) or (self.tau_kd,)

    def tau_label(self) -> str:
        """'tau=1' or 'tau_mix=0,0.5,1' (the progress bar)."""
        if self.tau_mix:
            return "tau_mix=" + ",".join(f"{t:g}" for t in self.tau_mix)
        return f"tau={self.tau_kd:g}"


# ----------------------------------------------------------------------------------------------------- batches
class BatchSchedule:
    """Micro-batch g (global index, all ranks) -> rows: epoch e = g // per_epoch shuffles the rows with seed + e.
    A pure function of g, so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, seqs: list, batch_size: int, seed: int):
        if len(seqs) < batch_size:
            raise ValueError(f"{len(seqs)} training sequences are fewer than batch_size {batch_size}")
        self.seqs, self.batch_size, self.seed = seqs, batch_size, seed
        self.per_epoch = len(seqs) // batch_size

    def __call__(self, g: int) -> list:
        epoch, j = divmod(g, self.per_epoch)
        order = list(range(len(self.seqs)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return [self.seqs[i] for i in order[j * self.batch_size:(j + 1) * self.batch_size]]


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_sequences(cfg: DistillConfig, vocab_size: int) -> Tuple[list, list]:
    """(train, held-out) token sequences from cfg.data; ValueError for ids outside the target's vocabulary."""
    rows = [r for path in cfg.data for r in read_rows(path)]
    if not rows:
        raise ValueError(f"no rows in {cfg.data}")
    seqs = list(token_sequences(rows, cfg.seq_len))
    if not seqs:
        raise ValueError(f"no row of {cfg.data} has a response that fits seq_len {cfg.seq_len} after its prompt")
    if len(seqs) < len(rows):  # said, not silently dropped
        warnings.warn(f"{len(rows) - len(seqs)} of {len(rows)} rows are not trained on: their response is empty or "
                      f"their prompt fills seq_len {cfg.seq_len}")
    top = max(max(ids) for ids, _ in seqs)
    if min(min(ids) for ids, _ in seqs) < 0:
        raise ValueError("the data holds negative token ids")
    if top >= vocab_size:
        raise ValueError(f"the data holds token id {top}, outside the target's vocabulary of {vocab_size}: it was "
                         "generated with another tokenizer")
    random.Random(cfg.seed).shuffle(seqs)
    n_eval = min(cfg.eval_rows, len(seqs) // 4)
    return seqs[n_eval:], seqs[:n_eval]


# -------------------------------------------------------------------------------------------------- the loop
class Distiller:
    """Holds the target, the draft, the optimizer and the data of one run; `run()` trains to cfg.steps."""

    def __init__(self, cfg: DistillConfig, target: Optional[LoadedModel] = None, progress: bool = True):
        cfg.validate()
        self.rank, self.world, self.device = _distributed_setup(cfg.device)
        # the precision this run trains in, as its recipe (model card, checkpoints) records it
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, self.device))
        self.cfg, self.progress = cfg, progress
        teacher_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        # a target passed in keeps its dtype and moves to this run's device
        self.target = place(target, self.device) if target is not None else load_target(cfg.target, self.device,
                                                                                        teacher_dtype)
        self.teacher = self.target.model.eval().requires_grad_(False)
        train, self.eval_seqs = load_sequences(cfg, self.teacher.config.vocab_size)
        self.feature = is_feature_init(cfg.init)
        torch.manual_seed(cfg.seed)
        if self.feature:  # shares the teacher's embedding and head (frozen), trains the rest
            counts = response_token_counts(train, self.teacher.config.vocab_size)
            self.draft = init_feature_draft(self.teacher, cfg.init, cfg.seed, counts, cfg.feature_taps)
            self.shared = True
            self.lineage = warm_start_lineage(cfg.init)  # the stages before this run, for its model card
        else:
            self.draft, self.shared = init_draft(self.teacher, cfg.init, cfg.seed)
            self.lineage = []
        self.draft.to(self.device).train()
        self._build_t2d()
        self.teacher_cache = None
        if cfg.teacher_cache is not None:  # rank 0 computes a missing cache, the others then read it
            if self.rank == 0:
                self.teacher_cache = open_teacher_cache(cfg.teacher_cache, self.teacher, self.target.name, train,
                                                        cfg.batch_size, self.device, progress, self.draft.config.taps)
            _barrier(self.world)
            if self.rank != 0:
                self.teacher_cache = open_teacher_cache(cfg.teacher_cache, self.teacher, self.target.name, train,
                                                        cfg.batch_size, self.device, False, self.draft.config.taps)
        # a feature head runs `unroll` times per loss: one module call, so that DDP sees one forward per backward
        self.model = Unrolled(self.draft) if self.feature else self.draft
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.schedule = BatchSchedule(train, cfg.batch_size, cfg.seed)
        self.decode_prompts = ([p for _, p in read_prompt_file(cfg.eval_prompts, cfg.eval_decode_prompts)]
                               if cfg.eval_prompts else [])
        self.step, self.history, self.saved_step = 0, [], None
        self.out = Path(cfg.out_dir)
        self.data_sha256 = files_sha256(cfg.data)

    # ------------------------------------------------------------------ pieces
    def _build_t2d(self) -> None:
        """A restricted head's token map as a table: target id -> draft-vocabulary index, -100 outside it (the
        offline loss's labels), or None."""
        self.t2d = None
        if self.feature and self.draft.d2t is not None:
            d2t = self.draft.d2t.to(self.device)
            self.t2d = torch.full((self.draft.config.vocab_size,), -100, dtype=torch.int64, device=self.device)
            self.t2d[d2t] = torch.arange(d2t.shape[0], device=self.device)

    def _autocast(self):
        enabled = self.cfg.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _logits(self, model, tokens) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None)

    def loss(self, seqs: list, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean loss over the masked positions of one micro-batch (seqs: its (ids, n_prompt) rows, tokens and mask
        from make_batch)."""
        if self.feature:
            return self.feature_loss(tokens, mask, self.teacher_features(seqs, tokens))
        with self._autocast():
            student = self._logits(self.model, tokens)[mask]
        if self.cfg.mode == "offline":
            targets = tokens[:, 1:][mask[:, :-1]]
            return F.cross_entropy(student.float(), targets)
        with torch.no_grad():
            teacher = self._logits(self.teacher, tokens)[mask]
        return self.divergence(student, teacher)

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean divergence between student and teacher logits [N, V], averaged over cfg.temperatures()."""
        cfg = self.cfg
        fn = get_divergence(cfg.divergence)
        kwargs = {"beta": cfg.jsd_beta} if cfg.divergence == "jsd" else {}
        taus = cfg.temperatures()
        return sum(fn(student, teacher, tau, **kwargs).mean() for tau in taus) / len(taus)

    def feature_loss(self, tokens: torch.Tensor, mask: torch.Tensor, t_feats: torch.Tensor) -> torch.Tensor:
        """A feature head's loss on one micro-batch (module docstring): head index t reads the target's feature at
        position t and token t+1 and is compared at the target's position t+1 (mask[:, 1:]: token t+2 is a response
        token), averaged over the unrolled steps. t_feats [B, T, feature_width]: the target's features
        (teacher_features); the first dim columns, its final features, are what the head predicts."""
        cfg = self.cfg
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        m = mask[:, 1:]
        want_feats = t_feats[:, 1:, :self.draft.config.dim][m]
        offline = cfg.mode == "offline"
        with torch.no_grad():
            if offline:  # the data's token t+2 as an index of the draft vocabulary (-100: outside it, skipped)
                labels = self.draft_index(torch.cat((tokens[:, 2:], tokens[:, :1]), dim=1)[m])
            else:  # the target's logits over the draft vocabulary: its head on its features
                want_logits = self.draft.draft_logits(want_feats)
        want_feats = want_feats.float()
        read = t_feats[:, :-1]
        if cfg.feature_noise > 0:  # on what the head reads, not on what it predicts
            read = read + (torch.rand_like(read) * 2 - 1) * cfg.feature_noise
        with self._autocast():
            preds = self.model(read, tokens[:, 1:], positions[:, :-1], cfg.unroll)
        total = 0.0
        for pred in preds:
            if not bool(m.any()):  # no position to train (all responses of one token): a zero that keeps the graph
                total = total + pred.sum() * 0.0
                continue
            got = pred[m]
            with self._autocast():
                student = self.draft.draft_logits(got)
            if offline:
                step = (F.cross_entropy(student.float(), labels, ignore_index=-100) if bool((labels >= 0).any())
                        else student.sum() * 0.0)
            else:
                step = self.divergence(student, want_logits)
            if cfg.feature_weight > 0:
                step = step + cfg.feature_weight * F.smooth_l1_loss(got.float(), want_feats)
            total = total + step
        return total / len(preds)

    def draft_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> indices of the head's draft vocabulary (int64, same shape; -100 for ids outside it)."""
        return ids if self.t2d is None else self.t2d[ids]

    @torch.no_grad()
    def teacher_features(self, seqs: list, tokens: torch.Tensor) -> torch.Tensor:
        """The target's final-norm features [B, T, dim] of a micro-batch, followed by the head's taps (the outputs of
        those target blocks): [B, T, feature_width], from the teacher cache, or one forward."""
        if self.teacher_cache is not None:
            return self.teacher_cache.batch(seqs, tokens.device)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.teacher(tokens, positions, None, compute_logits=False, return_features=True,
                            feature_taps=self.draft.config.taps)[1]

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Expected acceptance per eval temperature on the held-out rows (token-weighted); with eval_prompts, also
        the acceptance measured by decoding."""
        if not self.eval_seqs:
            return {}
        self.draft.eval()
        result = expected_acceptance_over(self.draft, self.teacher, self.eval_seqs, self.cfg.eval_temperatures,
                                          self.cfg.batch_size, self.device, draft_context=self._autocast)
        if self.decode_prompts:
            result.update(self.measure_by_decoding())
        self.draft.train()
        return result

    @torch.no_grad()
    def measure_by_decoding(self) -> Dict[str, Optional[float]]:
        """Measured acceptance {"measured_alpha@T": accepted / (accepted + rejections)} of the current draft (cast to
        the target's dtype) decoding the eval prompts with the engine, k = 4, at each eval temperature."""
        from tempspec_engine.engine import SpeculativeEngine

        dtype = self.teacher.embed_tokens.weight.dtype
        shared = {id(m): m for m in (self.teacher.embed_tokens, self.teacher.lm_head) if m is not None}
        draft = copy.deepcopy(self.draft, memo=shared).to(dtype).eval()  # a feature head keeps the target's own
        engine = SpeculativeEngine(self.target, draft, device=self.device, dtype=dtype, k=4,
                                   max_batch_size=len(self.decode_prompts))
        chat = self.target.tokenizer is not None and getattr(self.target.tokenizer, "chat_template", None) is not None
        out = {}
        for t in self.cfg.eval_temperatures:
            stats = [o.stats for o in engine.generate(self.decode_prompts, t, self.cfg.eval_decode_tokens,
                                                      chat_template=chat, seed=self.cfg.seed)]
            n = sum(s.accepted + s.rejections for s in stats)
            out[f"measured_alpha@{t:g}"] = sum(s.accepted for s in stats) / n if n else None
        return out

    # ------------------------------------------------------------------ checkpoints
    def _metadata(self, final: bool) -> dict:
        return {"recipe": self.cfg.recipe(), "step": self.step, "final": final, "history": self.history,
                "teacher": self.target.name, "eval_rows_held_out": len(self.eval_seqs), "lineage": self.lineage,
                "world_size": self.world}

    def _save(self, directory: Path, final: bool, dtype: Optional[torch.dtype] = None) -> Path:
        if self.feature:
            return save_feature_draft(self.draft, directory, target_name=self.target.name,
                                      metadata=self._metadata(final), dtype=dtype)
        return save_draft(self.draft, directory, shares_target_embeddings=self.shared, target_name=self.target.name,
                          target_vocab=self.teacher.config.vocab_size, metadata=self._metadata(final), dtype=dtype)

    def save_checkpoint(self) -> Path:
        """Saves the draft and the trainer's state at this step. The state file is written last and atomically, so a
        checkpoint directory with a state file is complete; the two newest are kept."""
        directory = self.out / CHECKPOINTS / f"step-{self.step:06d}"
        self._save(directory, False)
        tmp = directory / (STATE_FILE + ".tmp")
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "history": self.history,
                    "lineage": self.lineage, "config": self.cfg.recipe(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                    "data_sha256": self.data_sha256, "world_size": self.world}, tmp)
        os.replace(tmp, directory / STATE_FILE)
        self.saved_step = self.step
        for old in sorted((self.out / CHECKPOINTS).glob("step-*"))[:-2]:  # keep the two newest
            shutil.rmtree(old)
        return directory

    def resume(self) -> bool:
        """Loads the newest readable checkpoint under out_dir (an older one when the newest is damaged, with a
        warning); False when there is none. ValueError when the run differs from the checkpoint's: another recipe
        (beyond MAY_CHANGE_ON_RESUME), changed data files or another number of processes."""
        from safetensors.torch import load_file

        for ckpt, state in readable_checkpoints(self.out):
            try:
                weights = load_file(str(ckpt / "model.safetensors"))
            except Exception as exc:  # noqa: BLE001 - a damaged file, whatever the reader's error type
                warnings.warn(f"skipping {ckpt}: its weights cannot be read ({type(exc).__name__})")
                continue
            self._check_resumable(ckpt, state)
            self.draft.load_state_dict(weights, strict=False)
            self._build_t2d()  # the token map came with the weights
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.history = state["step"], state["history"]
            self.saved_step = self.step
            self.lineage = state.get("lineage", self.lineage)  # as when the run started, should a shipped head change
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and self.device.type == "cuda":  # the noise of feature_noise
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            return True
        return False

    def _check_resumable(self, ckpt: Path, state: dict) -> None:
        saved, now = state["config"], self.cfg.recipe()
        defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}  # fields newer than a checkpoint
        free = MAY_CHANGE_ON_RESUME + (("data",) if "data_sha256" in state else ())  # the bytes are compared below
        changed = [k for k in now if k not in free and saved.get(k, defaults.get(k)) != now[k]]
        if changed:
            raise ValueError(f"cannot resume {ckpt}: the run's {changed} differ from the checkpoint's "
                             f"({[saved.get(k, defaults.get(k)) for k in changed]}); leave them out to keep the "
                             "checkpoint's, or use another out_dir")
        if state.get("data_sha256", self.data_sha256) != self.data_sha256:
            raise ValueError(f"cannot resume {ckpt}: the data files changed since it was saved (rows appended?), so "
                             "the held-out rows and the batches would differ; use another out_dir")
        if state.get("world_size", self.world) != self.world:
            raise ValueError(f"cannot resume {ckpt}: it was trained by {state['world_size']} processes, this run has "
                             f"{self.world} (each step's batch would change); resume with the same number")

    def save_final(self) -> Path:
        directory = self.out / FINAL
        self._save(directory, True, torch.bfloat16)
        write_json(self._metadata(True), self.out / "train_log.json", indent=2)
        return directory

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        """Trains from the current step to cfg.steps; returns the final draft directory (on rank 0)."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"distill {cfg.mode} {cfg.divergence} {cfg.tau_label()}",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        if self.step == 0 and self.rank == 0:  # the undistilled draft: the baseline every result is compared with
            self.history.append({"step": 0, **self.evaluate()})
            self._save(self.out / INIT, False, torch.bfloat16)
        t0, tokens_seen = time.perf_counter(), 0
        with StopRequests() as stop:
            try:
                self._train_until_done(bar, t0, tokens_seen, stop)
            except KeyboardInterrupt:  # a second interrupt: stop inside the step, whose work is not saved
                bar.close()
                newest = next(readable_checkpoints(self.out), None)
                raise KeyboardInterrupt("stopped inside a step; " + (
                    f"the newest checkpoint is {newest[0]}; continue with --resume" if newest else
                    "no checkpoint was saved")) from None
        bar.close()
        if self.step < cfg.steps:  # stopped at a step's end: the checkpoint holds every step done
            if self.rank == 0 and self.step > 0 and self.saved_step != self.step:
                self.save_checkpoint()
            _barrier(self.world)
            where = f"saved {self.out / CHECKPOINTS / f'step-{self.step:06d}'} at step {self.step}; continue " \
                    "with --resume" if self.step > 0 else "no step was done"
            raise KeyboardInterrupt(where if stop.reason == "interrupted" else f"{stop.reason}; {where}")
        final = self.save_final() if self.rank == 0 else self.out / FINAL
        _barrier(self.world)
        return final

    def _train_until_done(self, bar, t0: float, tokens_seen: int, stop: "StopRequests") -> None:
        """Trains to cfg.steps, or until a stop is requested (checked between steps, by every rank alike)."""
        cfg = self.cfg
        while self.step < cfg.steps and not stop.agreed(self.world, self.device):
            total = 0.0
            for a in range(cfg.grad_accum):
                g = (self.step * cfg.grad_accum + a) * self.world + self.rank
                seqs = self.schedule(g)
                tokens, mask = make_batch(seqs, self.device)
                sync = a == cfg.grad_accum - 1 or self.world == 1
                ctx = self.model.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    loss = self.loss(seqs, tokens, mask) / cfg.grad_accum
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}; lower the lr")
                    loss.backward()
                total += float(loss.detach())
                tokens_seen += int(mask.sum()) * self.world
            if self.world > 1:  # the logged loss is the mean over ranks, as the gradient is
                import torch.distributed as dist

                mean = torch.tensor([total], dtype=torch.float64, device=self.device)
                dist.all_reduce(mean)
                total = float(mean) / self.world
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.draft.parameters() if p.requires_grad],
                                                  cfg.grad_clip)
            if not torch.isfinite(norm):  # a step on NaN gradients would poison every weight: keep the last good ones
                raise FloatingPointError(f"non-finite gradient norm {float(norm)} at step {self.step}; lower the lr")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            elapsed = time.perf_counter() - t0
            rate = tokens_seen / elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{rate:.0f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.rank == 0:
                entry = {"step": self.step, "loss": total, "train_tokens_per_s": rate, "elapsed_s": elapsed}
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    entry.update(self.evaluate())
                    bar.write(f"step {self.step}: " + ", ".join(
                        f"{k} {'n/a' if v is None else format(v, '.4f')}" for k, v in entry.items() if k != "step"))
                self.history.append(entry)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:  # the last one: runs can be extended
                    self.save_checkpoint()
            _barrier(self.world)


class Unrolled(torch.nn.Module):
    """A feature head run `steps` times on one sequence (EAGLE-3's training-time test: FeatureDraft.unroll), as one
    module call, so that DDP sees one forward per backward.

    forward(features [B, T, feature_width], tokens [B, T], positions [B, T], steps) -> [pred_1, ..., pred_steps]."""

    def __init__(self, head: FeatureDraft):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, steps: int) -> list:
        return self.head.unroll(features, tokens, positions, steps)


def response_token_counts(seqs, vocab_size: int) -> torch.Tensor:
    """counts [V] int64 of the response tokens of (ids, n_prompt) sequences (the token map of /vocab:N)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids, n_prompt in seqs:
        if len(ids) > n_prompt:
            counts += torch.bincount(torch.tensor(ids[n_prompt:], dtype=torch.int64), minlength=vocab_size)
    return counts


class StopRequests:
    """Turns Ctrl-C (SIGINT), SIGTERM (a scheduler's or `kill`'s) and SIGHUP (a closed terminal) into a request to
    stop at the end of the running step, so that the checkpoint saved then holds whole steps only; a second signal
    raises KeyboardInterrupt at once. Installed only in the main thread (signals reach no other), and not over a
    signal the process ignores."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.reason, self._old = None, {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:  # a signal the process ignores (nohup's SIGHUP, a background job's SIGINT) stays so
                if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN:
                    self._old[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for name, handler in self._old.items():
            signal.signal(getattr(signal, name), handler)

    def _handle(self, signum, frame) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        sys.stderr.write(f"\n{self.reason}: stopping after this step (again to stop at once, losing it)\n")

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether any rank was asked to stop (one all-reduce per step under DDP, so that all stop at one step)."""
        if world == 1:
            return self.reason is not None
        import torch.distributed as dist

        flag = torch.tensor([self.reason is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag)
        if flag.item() and self.reason is None:
            self.reason = "stopped by another rank"
        return bool(flag.item())


def readable_checkpoints(out: Path) -> Iterator[Tuple[Path, dict]]:
    """(directory, trainer state) of the checkpoints under out whose state file reads, newest first; each state is
    read when the iteration reaches it, and a damaged one is skipped with a warning."""
    for ckpt in sorted((Path(out) / CHECKPOINTS).glob("step-*"), reverse=True):
        if not (ckpt / STATE_FILE).is_file():
            continue
        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a truncated file, whatever the reader's error type
            warnings.warn(f"skipping {ckpt}: its {STATE_FILE} cannot be read ({type(exc).__name__})")
            continue
        yield ckpt, state


def files_sha256(paths) -> str:
    """One SHA-256 over the bytes of the files, in order (the data a run trains on)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resume_config(out_dir: str, given: Dict[str, object]) -> DistillConfig:
    """The config of a resumed run: the newest checkpoint's recipe under out_dir, with the fields in `given` (what
    the user set) in place of its own; DistillConfig(**given) when out_dir holds no checkpoint (distill then says
    there is nothing to resume)."""
    newest = next(readable_checkpoints(Path(out_dir)), None)
    if newest is None:
        return DistillConfig(**given)
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    saved = {k: tuple(v) if isinstance(v, list) and k != "data" else v
             for k, v in newest[1]["config"].items() if k in names}
    return DistillConfig(**{**saved, **given})


def distill(cfg: DistillConfig, resume: bool = False, target: Optional[LoadedModel] = None,
            progress: bool = True) -> Path:
    """Runs (or resumes) one distillation; returns the directory of the final draft."""
    d = Distiller(cfg, target=target, progress=progress)
    if resume:
        if not d.resume():
            what = "a final draft but no checkpoint" if (d.out / FINAL).exists() else "no checkpoint"
            raise ValueError(f"nothing to resume: {d.out} holds {what} (run without --resume to start)")
    elif (d.out / CHECKPOINTS).exists() or (d.out / FINAL).exists():
        raise ValueError(f"{d.out} already holds a run: pass resume=True (--resume) or choose another out_dir")
    return d.run()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32" for `precision` on `device`: "auto" is bf16 where the device multiplies bf16 matrices fast (a
    GPU with bf16, a CPU with oneDNN's bf16 product: AVX-512 BF16 or AMX) and fp32 elsewhere. On an AVX2-only CPU
    torch's bf16 products (autocast's, and their gradients) run several times slower than fp32: a feature head's
    steps ran 5.5x faster in fp32 on a 2-core Zen 1 EPYC (README, "The trainer")."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and torch_bf16_matmul_is_fast() else "fp32"


# ------------------------------------------------------------------------------------------------ distributed
def _distributed_setup(device: str):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) joins the process group; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")
    if device == "auto":
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    return 0, 1, resolve_device(device)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
