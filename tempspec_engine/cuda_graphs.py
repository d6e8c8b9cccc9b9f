"""CUDA-graph replay of decoder forwards with static shapes (the draft's steps and the verification).

A GraphedDecoder captures model.forward once per (batch, T, logits_index given, keyword options such as
return_features and feature_taps) over one persistent KVCache and the whole cache length (kv_len = max_len, so shapes
never change), then replays it: per call only device-to-device copies into static input buffers and one graph launch,
no host synchronization. Outputs are cloned (the next replay overwrites the static output); a forward that returns
(logits, features) gives both.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class GraphedDecoder:
    """Callable like model(tokens, positions, cache, kv_len, logits_index) for one fixed cache (its full rows)."""

    def __init__(self, model: torch.nn.Module, cache, pool=None, warmup: int = 2):
        self.model, self.cache, self.pool, self.warmup = model, cache, pool, warmup
        self.graphs: Dict[Tuple, tuple] = {}

    def _capture(self, key, tokens, positions, logits_index, kw):
        static = {"tokens": tokens.clone(), "positions": positions.clone(),
                  "logits_index": None if logits_index is None else logits_index.clone()}

        def run():
            return self.model(static["tokens"], static["positions"], self.cache, kv_len=None,
                              logits_index=static["logits_index"], **kw)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: real forwards on the real inputs (they write the same keys)
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        self.graphs[key] = (graph, static, out)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache=None, kv_len: Optional[int] = None,
                 logits_index: Optional[torch.Tensor] = None, **kw):
        """kw: keyword options of model.forward that fix the graph's work (return_features=True, feature_taps=...)."""
        key = (tuple(tokens.shape), logits_index is not None,
               tuple(sorted((name, tuple(v) if isinstance(v, (list, tuple)) else v) for name, v in kw.items())))
        if key not in self.graphs:
            self._capture(key, tokens, positions, logits_index, kw)
        graph, static, out = self.graphs[key]
        static["tokens"].copy_(tokens)
        static["positions"].copy_(positions)
        if logits_index is not None:
            static["logits_index"].copy_(logits_index)
        graph.replay()
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
