"""Distillation data: prompt files in, generated responses out (JSONL, one row per prompt), resumable.

Prompt files are JSONL; each row's prompt is Spec-Bench `turns[0]`, Alpaca `instruction` (+ `input`), GSM8K
`question` or `prompt` (tempspec_engine.prompts). Generated rows are

    {"index": i, "source": "<prompt file>", "prompt": str, "prompt_ids": [int], "response_ids": [int],
     "response": str, "temperature": tau, "finish_reason": "eos"|"length"|"stop", "generator": "<model name>"}

plus the prompt row's "category" when it has one (Spec-Bench's), so that evaluations can report per category.

`index` is the prompt's row number in the source file: a restart skips the indices already written, and each chunk
of prompts is sampled with a seed derived from its first index, so an interrupted run that is resumed writes the
same rows as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from tempspec_engine.prompts import read_prompt_objects


def read_prompt_file(path: str, limit: Optional[int] = None, offset: int = 0) -> List[Tuple[int, str]]:
    """(row index, prompt text) for rows [offset, offset + limit) of a JSONL prompt file (the engine's reader,
    tempspec_engine.prompts: a ValueError names the file and line of a broken row)."""
    return [(i, text) for i, text, _ in _prompt_objects(path, limit, offset)]


def _prompt_objects(path: str, limit: Optional[int], offset: int) -> List[Tuple[int, str, dict]]:
    """read_prompt_file's (row index, prompt text), each with its parsed row (for the row's other fields)."""
    if offset < 0 or (limit is not None and limit < 1):
        raise ValueError(f"offset must be >= 0 and limit >= 1, got offset={offset}, limit={limit}")
    out = [row for row in read_prompt_objects(path) if row[0] >= offset][:limit]
    if not out:
        raise ValueError(f"{path} holds no prompts in rows [{offset}, {offset + (limit or 0)})")
    for i, _, row in out:
        if not isinstance(row.get("category", ""), (str, type(None))):
            raise ValueError(f"{path}:{i + 1}: 'category' must be a string, got {row['category']!r}")
    return out


def category_of(source_row: dict) -> dict:
    """{"category": the prompt row's category} when it carries one (Spec-Bench's; _prompt_objects checked that it is
    a string), else {}."""
    category = source_row.get("category")
    return {} if category is None else {"category": category}


def read_rows(path: str, missing_ok: bool = False) -> List[dict]:
    """Rows of a generated JSONL file; a truncated last line (an interrupted write) is ignored. A missing file is a
    ValueError, or no rows with missing_ok (an output file not yet written)."""
    rows = []
    p = Path(path)
    if not p.exists():
        if missing_ok:
            return rows
        raise ValueError(f"{path} does not exist")
    with open(p) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the write of the last row was cut short; it is generated again
            raise ValueError(f"{path}:{i + 1}: corrupt row in the middle of the file")
    return rows


def _drop_partial_tail(path: Path, n_good: int) -> None:
    """Rewrites `path` with its first n_good complete rows (removes a half-written last line)."""
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if len(lines) != n_good:
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in lines[:n_good]))


def _check_output(out: Path, prompt_file: str) -> None:
    """Refuses to write generated rows into the prompt file they are made from."""
    if out.exists() and out.resolve() == Path(prompt_file).resolve():
        raise ValueError(f"--out {out} is the prompt file itself: write the generated rows to another file")


def _existing_rows(out: Path, temperature: Optional[float], generator: str, max_new_tokens: int) -> List[dict]:
    """The rows an earlier run wrote to `out` (its half-written last line removed), checked to be of the same kind as
    this run's, so that resuming never mixes two kinds of data in one file: the same temperature (None for fixed
    data), the same generator, and no response longer than max_new_tokens or cut at another length."""
    existing = read_rows(str(out), missing_ok=True)
    if out.exists():
        _drop_partial_tail(out, len(existing))
    for row in existing:
        old_t = row.get("temperature")
        if (old_t is None) != (temperature is None) or (old_t is not None and float(old_t) != float(temperature)):
            raise ValueError(f"{out} already holds rows at temperature {old_t}, not {temperature}: write each "
                             "temperature to its own file and combine them with `mix`")
        if row.get("generator") != generator:
            raise ValueError(f"{out} already holds rows of generator {row.get('generator')!r}, not {generator!r}: "
                             "write each generator to its own file and combine them with `mix`")
        n = len(row.get("response_ids", ()))
        if n > max_new_tokens or (row.get("finish_reason") == "length" and n != max_new_tokens):
            raise ValueError(f"{out} already holds rows cut at {n} new tokens, not --max-new-tokens {max_new_tokens}: "
                             "resume with the same --max-new-tokens or write to another file")
    return existing


def dataset_responses(engine, prompt_file: str, out_path: str, *, limit: Optional[int] = None, offset: int = 0,
                      max_new_tokens: int = 128, chat_template: bool = True) -> dict:
    """Fixed data (DistillSpec's third kind, beside target-generated and on-policy): the prompt file's own responses
    (Alpaca `output`), tokenized and cut to max_new_tokens (an EOS ends the uncut ones), written as generated rows with
    "temperature": null and "generator": "data". Rows without an output are skipped and counted. Like
    generate_dataset, it appends to `out_path` and skips the prompts already there.
    Returns {"written", "skipped" (already there), "no_output", "path"}."""
    prompts = _prompt_objects(prompt_file, limit, offset)  # the file is read once: prompts and outputs
    out = Path(out_path)
    _check_output(out, prompt_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {int(r["index"]) for r in _existing_rows(out, None, "data", max_new_tokens)}
    written = missing = 0
    with open(out, "a") as f:
        for i, text, source_row in prompts:
            if i in done:
                continue
            answer = source_row.get("output")
            if not isinstance(answer, str) or not answer.strip():
                missing += 1
                continue
            response = list(engine.tokenizer.encode(answer, add_special_tokens=False))[:max_new_tokens]
            eos = list(engine.target.eos_ids[:1]) if len(response) < max_new_tokens else []
            row = {"index": i, "source": Path(prompt_file).name, "prompt": text,
                   "prompt_ids": engine.encode(text, chat_template), "response_ids": response + eos,
                   "response": answer, "temperature": None, "finish_reason": "eos" if eos else "length",
                   "generator": "data", **category_of(source_row)}
            f.write(json.dumps(row) + "\n")
            written += 1
    if missing:
        warnings.warn(f"{missing} prompts of {prompt_file} have no output to use: skipped")
    return {"written": written, "skipped": sum(1 for i, _, _ in prompts if i in done), "no_output": missing,
            "path": str(out)}


def generate_dataset(engine, prompt_file: str, out_path: str, temperature: float, *, limit: Optional[int] = None,
                     offset: int = 0, max_new_tokens: int = 128, batch_size: int = 16, chunk: int = 64,
                     seed: int = 0, chat_template: bool = True, progress: bool = True,
                     generator_name: Optional[str] = None) -> dict:
    """Samples one response per prompt from `engine`'s target (target-only decoding) at `temperature` and appends
    the rows to `out_path`, skipping prompts already there and prompts too long for the engine's KV cache (with a
    warning). Returns {"written", "skipped" (already there), "too_long", "path"}.

    engine: a tempspec_engine SpeculativeEngine (its target is the generator: pass the draft as the target for
    on-policy data), or a feature_sampler.FeatureDraftSampler (a feature head's own samples). generator_name: the
    `generator` of each row (default: the engine's target's name). chunk: prompts per flush to disk (the unit of work
    lost on interruption).
    """
    if not (temperature >= 0.0):
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if chunk < 1 or batch_size < 1:
        raise ValueError(f"chunk and batch_size must be >= 1, got chunk={chunk}, batch_size={batch_size}")
    objects = _prompt_objects(prompt_file, limit, offset)
    prompts = [(i, text) for i, text, _ in objects]
    categories = {i: category_of(row) for i, _, row in objects}
    out = Path(out_path)
    _check_output(out, prompt_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = generator_name or engine.target.name
    done = {int(r["index"]) for r in _existing_rows(out, temperature, generator, max_new_tokens)}
    # a prompt that cannot fit the engine's KV cache with its response is skipped (and counted), not fatal
    room = engine.max_len - max_new_tokens - engine.lookahead - 1
    prompt_ids = {i: engine.encode(p, chat_template) for i, p in prompts}  # tokenized once: checked, then generated
    too_long = {i for i, ids in prompt_ids.items() if len(ids) > room}
    if too_long - done:
        warnings.warn(f"{len(too_long - done)} of {len(prompts)} prompts of {prompt_file} are longer than the {room} "
                      f"tokens that the KV cache (max_len {engine.max_len}) leaves beside {max_new_tokens} new "
                      "tokens: skipped (raise --max-len to keep them)")
    # chunks sit at fixed positions of the prompt list and are sampled with a seed from their first index, so a
    # chunk cut short by an interruption is sampled again whole and only its missing rows are written
    chunks = [(prompts[c][0], [(i, p) for i, p in prompts[c:c + chunk] if i not in too_long])
              for c in range(0, len(prompts), chunk)]
    todo = sum(1 for i, _ in prompts if i not in done and i not in too_long)
    written = 0
    bar = _progress(todo, f"gen-data T={temperature:g}", progress)
    with open(out, "a") as f:
        for first, part in chunks:
            if all(i in done for i, _ in part):  # also an empty chunk (all its prompts too long)
                continue
            outputs = engine.generate([prompt_ids[i] for i, _ in part], temperature=temperature,
                                      max_new_tokens=max_new_tokens, speculative=False, batch_size=batch_size,
                                      seed=seed * 1_000_003 + first)
            missing = [(i, p, o) for (i, p), o in zip(part, outputs) if i not in done]
            for index, prompt, o in missing:
                row = {"index": index, "source": str(prompt_file), "prompt": prompt, "prompt_ids": o.prompt_ids,
                       "response_ids": o.token_ids, "response": o.text, "temperature": float(temperature),
                       "finish_reason": o.finish_reason, "generator": generator,
                       **categories[index]}
                f.write(json.dumps(row) + "\n")
            f.flush()
            written += len(missing)
            bar.update(len(missing))
    bar.close()
    return {"written": written, "skipped": sum(1 for i, _ in prompts if i in done),
            "too_long": len(too_long - done), "path": str(out)}


def mix_datasets(sources: Sequence[Tuple[str, float]], out_path: str, total: Optional[int] = None,
                 seed: int = 0) -> Dict[str, int]:
    """Writes a mixture of generated files: `sources` = [(path, proportion), ...] (proportions are normalized).

    total: rows in the mixture (default: the largest total that every source can supply at its proportion).
    Rows are drawn without replacement from each source and shuffled; each keeps its own `temperature`.
    Returns rows taken per source.
    """
    if not sources:
        raise ValueError("mix needs at least one source")
    weights = [float(w) for _, w in sources]
    if any(not (0 <= w < math.inf) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"proportions must be finite numbers >= 0 with a positive sum, got {weights}")
    out = Path(out_path)
    for p, _ in sources:
        if out.exists() and out.resolve() == Path(p).resolve():
            raise ValueError(f"--out {out_path} is also a source: write the mixture to another file")
    shares = [w / sum(weights) for w in weights]
    tables = [read_rows(p) for p, _ in sources]
    for (p, _), rows in zip(sources, tables):
        if not rows:
            raise ValueError(f"{p} holds no generated rows")
    feasible = min(int(len(rows) / s) for rows, s in zip(tables, shares) if s > 0)
    total = feasible if total is None else total
    if total > feasible:
        raise ValueError(f"a mixture of {total} rows needs more rows than the sources hold (at most {feasible})")
    rng = random.Random(seed)
    counts = _apportion(total, shares)
    mixed, taken = [], {}
    for (p, _), rows, n in zip(sources, tables, counts):
        picked = rng.sample(rows, min(n, len(rows)))
        mixed.extend(picked)
        taken[p] = len(picked)
    rng.shuffle(mixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in mixed:
            f.write(json.dumps(row) + "\n")
    return taken


def _apportion(total: int, shares: Sequence[float]) -> List[int]:
    """Whole row counts in proportion to `shares` that sum to exactly `total` (largest remainders; ties to the
    earlier source)."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def token_sequences(rows: Sequence[dict], max_len: int) -> Iterator[Tuple[List[int], int]]:
    """(prompt_ids + response_ids truncated to max_len, number of prompt tokens) per row with a response."""
    for row in rows:
        for key in ("prompt_ids", "response_ids"):
            if key not in row:
                raise ValueError(f"generated row {row.get('index')} has no {key!r}: is this a gen-data file?")
        ids = list(row["prompt_ids"]) + list(row["response_ids"])
        n_prompt = len(row["prompt_ids"])
        if row["response_ids"] and n_prompt < max_len:
            yield ids[:max_len], n_prompt


def make_batch(seqs: Sequence[Tuple[List[int], int]], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] int64 (right-padded with 0) and mask [B, T] bool: position t is trained iff token t+1 exists and
    belongs to the response (so logits[t] predicts a generated token)."""
    T = max(len(ids) for ids, _ in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.int64)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(seqs):
        tokens[b, : len(ids)] = torch.tensor(ids)
        mask[b, max(n_prompt - 1, 0): len(ids) - 1] = True
    return tokens.to(device), mask.to(device)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
