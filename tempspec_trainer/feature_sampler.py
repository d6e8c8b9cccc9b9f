"""On-policy samples of an EAGLE-style feature head: the head writes the response on its own predicted features.

A feature head cannot write alone: it reads the target's features. Its own samples, the DistillSpec "on-policy"
data of a feature draft, are what it would propose if it drafted the whole response in one go:
  1. the target reads the prompt x_0..x_{P-1} once (features f_0..f_{P-1}) and draws the first response token x_P
     from its own distribution at position P-1 (in speculative decoding that token is always the target's);
  2. the head reads f_0..f_{P-1} with tokens x_1..x_P, predicts f_P and draws x_{P+1} from its distribution;
  3. then, for as long as the response runs, the head reads its own prediction with the token just drawn.
That is FeatureDraft's drafting recipe (models/feature_draft.py) with k = the whole response and no verification.

FeatureDraftSampler offers what tempspec_trainer.data.generate_dataset uses of an engine (encode, generate,
max_len, lookahead), so `tempspec-train gen-data --generator feature:1` writes the head's samples like any other data.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from tempspec_engine.engine import GenerationOutput
from tempspec_engine.ops import sample


class FeatureDraftSampler:
    """Samples responses from the feature head of `engine` (a SpeculativeEngine whose draft is a feature head, e.g.
    SpeculativeEngine(target, "feature:1")). name: the generator name written into each row."""

    lookahead = 0  # nothing beyond the response: a prompt fits when prompt + max_new_tokens + 1 <= max_len

    def __init__(self, engine, name: str):
        from tempspec_engine.models.feature_draft import FeatureDraft

        head = engine.draft_model.model if engine.draft_model is not None else None
        if not isinstance(head, FeatureDraft) or engine.lookup is not None:
            raise ValueError(f"{name}: the feature-head sampler needs a feature draft alone (no lookup)")
        self.engine, self.head, self.name = engine, head, name
        self.max_len = engine.max_len

    def encode(self, prompt, chat_template: bool = False) -> List[int]:
        return self.engine.encode(prompt, chat_template)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0, max_new_tokens: int = 128, *,
                 speculative: bool = False, batch_size: int = 16, seed: Optional[int] = None
                 ) -> List[GenerationOutput]:
        """One response per prompt (token-id lists), drawn at `temperature` (0: greedy), in prompt order. Rows of a
        batch are independent of each other (same text alone or batched at T = 0). speculative: ignored (the head
        samples alone; the argument keeps the engine's signature)."""
        gen = torch.Generator(device=self.engine.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        outputs = []
        for start in range(0, len(prompts), batch_size):
            outputs += self._batch([list(p) for p in prompts[start:start + batch_size]], float(temperature),
                                   max_new_tokens, gen)
        return outputs

    def _batch(self, prompts: List[List[int]], temperature: float, max_new: int, gen) -> List[GenerationOutput]:
        eng, head = self.engine, self.head
        dev = eng.device
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) + max_new + 1 > self.max_len:
            raise ValueError(f"prompts must hold 1..{self.max_len - max_new - 1} tokens for {max_new} new tokens")
        B, P = len(prompts), max(lengths)
        rows = torch.arange(B, device=dev)
        last = torch.tensor(lengths, device=dev) - 1
        tokens = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=dev)
        positions = torch.arange(P, device=dev).expand(B, P)
        # 1. the target reads the prompts (causal, right padding) and draws x_P at each row's last position
        target = eng.target.model
        _, features = target(tokens, positions, None, compute_logits=False, return_features=True,
                             feature_taps=head.config.taps)
        final = features[rows, last, :head.config.dim]  # (with taps, the tapped block outputs follow)
        drawn = sample(target.head_logits(final).float(), temperature, generator=gen,
                       backend=eng.backend)
        # 2. the head reads f_0..f_{P-1} with x_1..x_P: row b's tokens shift left by one, its drawn token at its end
        shifted = torch.cat([tokens[:, 1:], tokens.new_zeros(B, 1)], dim=1)
        shifted[rows, last] = drawn
        cache = head.new_cache(B, self.max_len, dev, eng.dtype)
        pred = head(head.read(features), shifted, positions, cache, kv_len=P)[rows, last].unsqueeze(1)
        out = [drawn]
        # 3. its own predictions from then on (position of step j: the row's length + j - 1)
        for j in range(1, max_new):
            drawn = sample(head.logits(pred[:, 0]).float(), temperature, generator=gen, backend=eng.backend)
            out.append(drawn)
            if j < max_new - 1:
                pred = head(pred, drawn.unsqueeze(1), (last + j).unsqueeze(1), cache, kv_len=P + j)
        return [self._output(p, ids) for p, ids in zip(prompts, torch.stack(out, dim=1).tolist())]

    def _output(self, prompt: List[int], ids: List[int]) -> GenerationOutput:
        """The response up to its first EOS (included) or max_new_tokens."""
        eos = set(self.engine.target.eos_ids)
        end = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
        ids = ids[:end] if end is not None else ids
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True) if self.engine.tokenizer else ""
        return GenerationOutput(text, ids, prompt, "eos" if end is not None else "length", None)
