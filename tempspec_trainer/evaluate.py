"""Evaluating drafts: expected acceptance on data (no decoding) and measured acceptance / speedup by decoding.

expected_acceptance_on_data: teacher-forced over generated rows, per temperature, the mean of 1 - TVD(p, q)
    (argmax agreement at T = 0): what alpha would be if the draft saw the target's own contexts. A feature head
    (EAGLE-style) is scored at its first draft position: fed the target's features and the data's tokens.
measure_drafts: decodes a prompt set with the target alone and with each draft at each temperature through the
    engine (tempspec_engine.sweep.run_sweep) and returns its results dict (alpha, tokens/s, speedup).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import torch

from tempspec_engine.models.draft import make_draft
from tempspec_engine.models.feature_draft import FeatureDraft, is_feature_draft_dir, load_feature_draft
from tempspec_engine.models.loading import LoadedModel
from tempspec_trainer.data import make_batch, read_rows, token_sequences
from tempspec_trainer.divergences import expected_acceptance


@torch.no_grad()
def expected_acceptance_on_data(target: LoadedModel, draft_spec: str, data_file: str,
                                temperatures: Sequence[float], n_rows: Optional[int] = 64, seq_len: int = 256,
                                batch_size: int = 8) -> Dict[str, float]:
    """{"alpha@T": mean expected acceptance over the response tokens of the first n_rows rows} for each T."""
    device = target.model.embed_tokens.weight.device
    dtype = target.model.embed_tokens.weight.dtype
    if is_feature_draft_dir(draft_spec):
        draft = load_feature_draft(draft_spec, target.model, device, dtype)
    else:
        draft = make_draft(draft_spec, target, device, dtype).model
    seqs = list(token_sequences(read_rows(data_file)[:n_rows], seq_len))
    if not seqs:
        raise ValueError(f"{data_file} holds no rows with a response")
    return expected_acceptance_over(draft, target.model, seqs, temperatures, batch_size, device)


@torch.no_grad()
def expected_acceptance_over(draft, target, seqs, temperatures: Sequence[float], batch_size: int, device,
                             draft_context=contextlib.nullcontext) -> Dict[str, float]:
    """{"alpha@T": expected acceptance averaged over the response tokens of `seqs`} (see make_batch), teacher-forced:
    1 - TVD at T (argmax agreement at T = 0). draft_context() wraps the draft's forwards (e.g. autocast).
    A FeatureDraft is scored by feature_acceptance_over."""
    if isinstance(draft, FeatureDraft):
        return feature_acceptance_over(draft, target, seqs, temperatures, batch_size, device, draft_context)
    sums, n = {t: 0.0 for t in temperatures}, 0
    for i in range(0, len(seqs), batch_size):
        tokens, mask = make_batch(seqs[i:i + batch_size], device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        with draft_context():
            q = draft(tokens, positions, None)[mask].float()
        p = target(tokens, positions, None)[mask].float()
        for t in temperatures:
            sums[t] += float(expected_acceptance(q, p, t).sum())
        n += int(mask.sum())
    return {f"alpha@{t:g}": s / n for t, s in sums.items()}


@torch.no_grad()
def feature_acceptance_over(head: FeatureDraft, target, seqs, temperatures: Sequence[float], batch_size: int, device,
                            draft_context=contextlib.nullcontext) -> Dict[str, float]:
    """Like expected_acceptance_over for a feature head at its first draft position, teacher-forced: one target
    forward gives logits and features; head index t reads the target's feature at t and token t+1, and its logits
    (full vocabulary, -inf outside a draft vocabulary) are compared with the target's at t+1 over the positions where
    token t+2 is a response token."""
    sums, n = {t: 0.0 for t in temperatures}, 0
    for i in range(0, len(seqs), batch_size):
        tokens, mask = make_batch(seqs[i:i + batch_size], device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        logits, feats = target(tokens, positions, None, return_features=True)
        m = mask[:, 1:]
        if not bool(m.any()):
            continue
        with draft_context():
            q = head.logits(head(feats[:, :-1], tokens[:, 1:], positions[:, :-1], None)[m]).float()
        p = logits[:, 1:][m].float()
        for t in temperatures:
            sums[t] += float(expected_acceptance(q, p, t).sum())
        n += int(m.sum())
    if n == 0:
        raise ValueError("no held-out position to score a feature head on: its responses need >= 2 tokens")
    return {f"alpha@{t:g}": s / n for t, s in sums.items()}


def measure_drafts(target, drafts: Sequence[str], prompts: Sequence[str], temperatures: Sequence[float], *,
                   max_new_tokens: int = 64, batch_size: int = 1, device=None, dtype=None, k="auto", seed: int = 0,
                   progress: bool = True) -> dict:
    """Decoding measurement of each draft against the target alone (see tempspec_engine.sweep.run_sweep)."""
    from tempspec_engine.run_meta import collect_meta
    from tempspec_engine.sweep import run_sweep

    results = run_sweep(target, list(drafts), list(prompts), list(temperatures), max_new_tokens, device=device,
                        dtype=dtype, k=k, batch_size=batch_size, seed=seed, progress=progress)
    results["meta"].update(collect_meta(torch.device(results["meta"].get("device", "cpu"))))
    return results
