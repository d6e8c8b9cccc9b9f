"""Evaluating drafts: expected acceptance on data (no decoding) and measured acceptance / speedup by decoding.

row_acceptance_on_data / acceptance_by_row: teacher-forced over generated rows, per row and temperature, the summed
    1 - TVD(p, q) (argmax agreement at T = 0): what alpha would be if the draft saw the target's own contexts.
    summarize turns them into the mean with its standard error over rows, or, given the difference of two drafts'
    sums on the same rows, their paired difference. A feature head (EAGLE-style) is scored at its first draft
    position: fed the target's features and the data's tokens.
measure_drafts: decodes a prompt set with the target alone and with each draft at each temperature through the
    engine (tempspec_engine.sweep.run_sweep) and returns its results dict (alpha, tokens/s, speedup).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tempspec_engine.measure import clustered_ratio_se
from tempspec_engine.models.draft import make_draft
from tempspec_engine.models.feature_draft import FeatureDraft, is_feature_draft_dir, load_feature_draft
from tempspec_engine.models.loading import LoadedModel
from tempspec_trainer.data import make_batch, read_rows, token_sequences
from tempspec_trainer.divergences import expected_acceptance


def row_acceptance_on_data(target: LoadedModel, draft_spec: str, data_file: str, temperatures: Sequence[float],
                           n_rows: Optional[int] = 64, seq_len: int = 256, batch_size: int = 8, position: int = 1
                           ) -> Tuple[torch.Tensor, torch.Tensor, List[Optional[str]]]:
    """acceptance_by_row over the first n_rows rows of a generated file, at draft `position`: (sums [R,
    len(temperatures)] float64, counts [R] int64, the `category` of each of those R rows or None) for the R of them
    with a response."""
    device = target.model.embed_tokens.weight.device
    dtype = target.model.embed_tokens.weight.dtype
    if is_feature_draft_dir(draft_spec):
        draft = load_feature_draft(draft_spec, target.model, device, dtype)
    else:
        draft = make_draft(draft_spec, target, device, dtype).model
    if not Path(data_file).is_file():
        raise ValueError(f"{data_file}: no such file (a generated JSONL of tempspec-train gen-data)")
    scored = [(row.get("category"), seq) for row in read_rows(data_file)[:n_rows]
              for seq in token_sequences([row], seq_len)]
    if not scored:
        raise ValueError(f"{data_file} holds no rows with a response")
    sums, counts = acceptance_by_row(draft, target.model, [seq for _, seq in scored], temperatures, batch_size,
                                     device, position=position)
    return sums, counts, [category for category, _ in scored]


def ratio_se(sums: torch.Tensor, counts: torch.Tensor) -> Tuple[float, float]:
    """(sum(sums) / sum(counts), its standard error) for per-row sums [R] and counts [R]: the ratio estimator with
    rows as clusters (tokens of one row are not independent: measure.clustered_ratio_se); the error is nan for one
    row."""
    sums, counts = sums.double(), counts.double()
    ratio = float(sums.sum()) / float(counts.sum())
    if sums.shape[0] < 2:
        return ratio, float("nan")
    return ratio, clustered_ratio_se(list(zip(sums.tolist(), counts.tolist())))


def summarize(sums: torch.Tensor, counts: torch.Tensor, temperatures: Sequence[float]) -> Dict[str, float]:
    """{"alpha@T": mean, "alpha@T_se": standard error} per temperature from acceptance_by_row's output; for the
    difference of two drafts on the same rows pass the difference of their sums (a paired comparison)."""
    out = {}
    for i, t in enumerate(temperatures):
        out[f"alpha@{t:g}"], out[f"alpha@{t:g}_se"] = ratio_se(sums[:, i], counts)
    return out


def summarize_by_category(sums: torch.Tensor, counts: torch.Tensor, categories: Sequence[Optional[str]],
                          temperatures: Sequence[float]) -> Dict[str, Dict[str, float]]:
    """summarize() of each category's rows, in order of first appearance, each with "tokens" (positions scored); {}
    when no row has a category."""
    out = {}
    for c in dict.fromkeys(c for c in categories if c is not None):
        idx = torch.tensor([i for i, ci in enumerate(categories) if ci == c])
        out[c] = {**summarize(sums[idx], counts[idx], temperatures), "tokens": int(counts[idx].sum())}
    return out


@torch.no_grad()
def expected_acceptance_over(draft, target, seqs, temperatures: Sequence[float], batch_size: int, device,
                             draft_context=contextlib.nullcontext, position: int = 1) -> Dict[str, float]:
    """{"alpha@T": expected acceptance averaged over the response tokens of `seqs`} (see make_batch), teacher-forced:
    1 - TVD at T (argmax agreement at T = 0), at draft `position` (acceptance_by_row). draft_context() wraps the
    draft's forwards (e.g. autocast)."""
    sums, counts = acceptance_by_row(draft, target, seqs, temperatures, batch_size, device, draft_context, position)
    n = int(counts.sum())
    return {f"alpha@{t:g}": float(sums[:, i].sum()) / n for i, t in enumerate(temperatures)}


@torch.no_grad()
def acceptance_by_row(draft, target, seqs, temperatures: Sequence[float], batch_size: int, device,
                      draft_context=contextlib.nullcontext, position: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced expected acceptance per sequence: (sums [len(seqs), len(temperatures)] float64, the summed 1 -
    TVD at each T (argmax agreement at T = 0) over the sequence's scored positions; counts [len(seqs)] int64, how many
    positions). A draft model is scored at every response position; a FeatureDraft at its first draft position:
    one target forward gives logits and features, head index t reads the target's feature at t and token t+1, and
    its logits (full vocabulary, -inf outside a draft vocabulary) are compared with the target's at t+1 over the
    positions where token t+2 is a response token. position j > 1 (feature heads): the j-th draft of the chain that
    starts at t - j + 1, the earlier drafts being the data's tokens (FeatureDraft.unroll), at the same positions.
    ValueError when no position is scored."""
    feature = isinstance(draft, FeatureDraft)
    if position != 1 and not feature:
        raise ValueError(f"draft position {position}: later positions are scored for feature heads only")
    sums = torch.zeros(len(seqs), len(temperatures), dtype=torch.float64)
    counts = torch.zeros(len(seqs), dtype=torch.int64)
    for i in range(0, len(seqs), batch_size):
        tokens, mask = make_batch(seqs[i:i + batch_size], device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        if feature:
            logits, feats = target(tokens, positions, None, return_features=True, feature_taps=draft.config.taps)
            m = mask[:, 1:]
            with draft_context():
                if position == 1:
                    pred = draft(draft.read(feats[:, :-1]), tokens[:, 1:], positions[:, :-1], None)
                else:
                    pred = draft.unroll(feats[:, :-1], tokens[:, 1:], positions[:, :-1], position)[-1]
                q = draft.logits(pred[m]).float()
            p = logits[:, 1:][m].float()
        else:
            m = mask
            with draft_context():
                q = draft(tokens, positions, None)[m].float()
            p = target(tokens, positions, None)[m].float()
        rows = m.nonzero()[:, 0].cpu() + i  # the sequence of each scored position (row-major, as [m] orders them)
        counts.index_add_(0, rows, torch.ones_like(rows))
        for j, t in enumerate(temperatures):
            sums[:, j].index_add_(0, rows, expected_acceptance(q, p, t).double().cpu())
    if int(counts.sum()) == 0:
        raise ValueError("no held-out position to score: the rows have no response tokens within the sequence length")
    return sums, counts


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
