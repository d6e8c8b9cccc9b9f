"""Tiny offline building blocks for the trainer tests: a random Llama-family target, a word-level HF tokenizer with a
chat template, and JSONL prompt files. Everything is built locally in well under a second (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.llama import Transformer
from tempspec_engine.models.loading import LoadedModel

SPECIALS = ["<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ("the a an one two three four five six seven eight nine ten cat dog bird fish tree house car road sun moon "
         "star sky sea red blue green big small old new fast slow good bad hot cold is are was be go run eat see "
         "say make take give what why how who where when and or").split()
TOKENS = SPECIALS + WORDS  # token id = position in this list (64 entries)
VOCAB = 64  # the target's vocabulary (>= the tokenizer's)
EOS_ID = TOKENS.index("<eos>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

PROMPTS = ["what is the red car", "how do two cats run", "the sun is hot and the moon is cold",
           "give me one good dog", "where is the big house", "say something new", "why is the sky blue",
           "make a small tree", "who can see the star", "eat the fish"]


def tiny_config(vocab: int = VOCAB) -> ModelConfig:
    """2 layers, width 32, 4 query / 2 key-value heads of 8, MLP 64, tied embeddings."""
    return ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                       intermediate_size=64, tie_embeddings=True, max_position=512)


def tiny_transformer(seed: int = 0, vocab: int = VOCAB) -> Transformer:
    """A random fp32 Transformer (fixed seed). Embeddings ~ N(0, 1), linear weights ~ N(0, 4 / fan_in), final norm
    weight 0.5: logits spread over a few units (mean top-1 probability ~0.45), the model rarely just repeats its
    input token, and a one-layer draft cut from it is clearly worse than it (forward KL ~2 nats)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(tiny_config(vocab))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                std = 1.0 if "embed" in name else 2.0 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        model.norm.weight.fill_(0.5)
    return model.float().eval()


def word_tokenizer():
    """PreTrainedTokenizerFast: WordLevel over TOKENS (whitespace split, unknown words -> <unk>) with CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_target(seed: int = 0, vocab: int = VOCAB, tokenizer=True) -> LoadedModel:
    """The tiny target as the engine and the trainer take it: LoadedModel named "tiny-target", EOS = <eos>."""
    tok = word_tokenizer() if tokenizer else None
    return LoadedModel(tiny_transformer(seed, vocab), tok, (EOS_ID,), "tiny-target")


def write_prompt_file(path, prompts: Iterable[str] = PROMPTS, kind: str = "instruction") -> Path:
    """A JSONL prompt file with one row per prompt in the given format: "instruction" (Alpaca), "turns" (Spec-Bench)
    or "question" (GSM8K)."""
    rows = []
    for p in prompts:
        if kind == "instruction":
            rows.append({"instruction": p, "input": "", "output": "ignored"})
        elif kind == "turns":
            rows.append({"question_id": len(rows), "category": "demo", "turns": [p, "a second turn"]})
        elif kind == "question":
            rows.append({"question": p, "answer": "#### 4"})
        else:
            raise ValueError(f"unknown prompt file kind {kind!r}")
    return write_jsonl(path, rows)


def write_jsonl(path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sampled_rows(target: LoadedModel, n: int, prompt_len: int = 6, response_len: int = 12, temperature: float = 1.0,
                 seed: int = 0, vocab: Optional[int] = None) -> List[dict]:
    """Generated-data rows without the engine: random prompt ids, responses sampled from the target (plain
    full-sequence forwards, fp32). Much faster than the engine for training data."""
    gen = torch.Generator().manual_seed(seed)
    hi = vocab or target.vocab_size
    model = target.model
    rows = []
    with torch.no_grad():
        ids = torch.randint(len(SPECIALS), hi, (n, prompt_len), generator=gen)
        for _ in range(response_len):
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            logits = model(ids, pos, None)[:, -1].float()
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    for i in range(n):
        row = ids[i].tolist()
        rows.append({"index": i, "source": "synthetic", "prompt": "", "prompt_ids": row[:prompt_len],
                     "response_ids": row[prompt_len:], "response": "", "temperature": float(temperature),
                     "finish_reason": "length", "generator": target.name})
    return rows


def one_thread():
    """Generator for a module-scoped autouse fixture: torch on one thread (these models are far too small to gain
    from more; on a busy machine extra threads only spin), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
