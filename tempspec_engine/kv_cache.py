"""Preallocated per-layer KV cache with per-row lengths (gpt-fast style).

Each layer owns k and v buffers [B, H_kv, max_len, D]. Row b holds valid keys at positions [0, lengths[b]).
A forward writes its T new keys at per-row positions and attends with a mask built from those positions, so
rolling back a rejected draft is only moving `lengths` back: the stale entries beyond it are masked out and
overwritten later. No copies.
"""
from __future__ import annotations

import torch


class KVCache:
    """k[l], v[l]: [B, H_kv, max_len, D] of `dtype`; lengths: [B] int64 (number of valid positions per row)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.max_len = max_len

    @classmethod
    def _from_parts(cls, k, v, lengths, max_len) -> "KVCache":
        obj = cls.__new__(cls)
        obj.k, obj.v, obj.lengths, obj.max_len = k, v, lengths, max_len
        return obj

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop): writes through it (keys and lengths) land in this cache."""
        return KVCache._from_parts([k[start:stop] for k in self.k], [v[start:stop] for v in self.v],
                                   self.lengths[start:stop], self.max_len)

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Stores k_new, v_new [B, H_kv, T, D] at the per-row positions [B, T] (int64) of `layer`."""
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
        self.k[layer][rows, :, positions] = k_new.transpose(1, 2)
        self.v[layer][rows, :, positions] = v_new.transpose(1, 2)

    def rollback(self, lengths: torch.Tensor) -> None:
        """Sets the valid lengths [B] (int64); no data moves."""
        self.lengths.copy_(lengths)

    def compact(self, keep: torch.Tensor) -> None:
        """Moves rows `keep` (int64 [n], increasing) to rows [0, n), e.g. after requests finished."""
        n = keep.shape[0]
        for buf in self.k + self.v:
            buf[:n] = buf[keep]
        self.lengths[:n] = self.lengths[keep].clone()
