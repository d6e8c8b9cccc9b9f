"""Prompt sets: the one reader of JSONL prompt files (used by the sweep, the benchmarks and the trainer) and the
built-in prompts that a default run uses, so that it needs no external data.

A row's prompt is Spec-Bench `turns[0]`, Alpaca `instruction` (+ `input`), GSM8K `question` or `prompt`. Every
mistake in a file raises one ValueError naming the file and line: text that is not JSON, a row that is not an
object, a row without a prompt, a prompt that is not a string.
"""
from __future__ import annotations

import json
from typing import List, Optional, Tuple

# short instructions of the kinds Spec-Bench covers (writing, roleplay, reasoning, math, coding, extraction, STEM,
# humanities, translation, summarization, QA)
BUILTIN_PROMPTS = [
    "Write a short poem about the sea at night.",
    "Explain in simple terms how a rainbow forms.",
    "Give three tips for staying focused while studying.",
    "A train travels 60 km in 45 minutes. What is its average speed in km per hour?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Translate into French: 'The library opens at nine in the morning.'",
    "What are the main differences between a virus and a bacterium?",
    "Pretend you are a tour guide in Rome and welcome a group of visitors.",
    "List the planets of the solar system in order from the Sun.",
    "Tom has 12 apples. He gives a third of them to Anna and eats two. How many apples are left?",
    "Write a polite email asking a colleague to review a report by Friday.",
    "Why did the Roman Empire decline? Give two reasons.",
    "Extract the names of the people in this sentence: 'Maria met John and Priya at the station.'",
    "Describe the water cycle step by step.",
    "Suggest a healthy breakfast that takes less than ten minutes to prepare.",
]


def _string(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__} {value!r}")
    return value


def prompt_text(row) -> str:
    """The prompt of one parsed JSONL row (see the module docstring); ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise ValueError(f"'turns' must be a non-empty list of strings, got {turns!r}")
        return turns[0]
    if "instruction" in row:
        text = _string(row, "instruction")
        extra = _string(row, "input") if row.get("input") is not None else ""
        return f"{text}\n\n{extra}" if extra else text
    for key in ("question", "prompt"):
        if key in row:
            return _string(row, key)
    raise ValueError(f"the row has none of turns/instruction/question/prompt: keys {sorted(row)}")


def read_prompt_objects(path: str) -> List[Tuple[int, str, dict]]:
    """(line index, prompt text, the parsed row) for every non-blank line of a JSONL prompt file, for readers that
    also want a row's other fields; ValueError naming path:line."""
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip())
                out.append((line_no, prompt_text(row), row))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no + 1}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no + 1}: {exc}") from None
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def read_prompt_rows(path: str) -> List[Tuple[int, str]]:
    """(line index, prompt text) for every non-blank line of a JSONL prompt file; ValueError naming path:line."""
    return [(i, text) for i, text, _ in read_prompt_objects(path)]


def read_prompts(path: Optional[str], n: Optional[int]) -> List[str]:
    """n prompts evenly spaced over a JSONL file (Spec-Bench is sorted by category: this spans all of them), or the
    n built-in prompts evenly spaced when path is None. n None: all of them."""
    texts = list(BUILTIN_PROMPTS) if path is None else [t for _, t in read_prompt_rows(path)]
    n = len(texts) if n is None else n
    if n < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {n}")
    return texts[:: max(1, len(texts) // n)][:n]
