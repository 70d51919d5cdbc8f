"""Key/value cache: generation computes each token's keys and values once, instead of once per new token.

Without a cache, producing token t re-runs attention over all t previous tokens: O(T²) work per token. With it,
a step runs the model on the one new token and attends over the stored keys/values of the earlier ones.
Memory per layer: 2 · batch · max_len · n_kv_heads · head_dim numbers — which is why GQA's fewer KV heads matter.
"""

from __future__ import annotations

import torch
from torch import nn

from llmfoundry_pl.model import Transformer


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, (B, max_len, K, Hd) each."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys/values of positions start_pos .. start_pos+T and return those of 0 .. start_pos+T.

        With a (B,) tensor ``start_pos`` (continuous batching), row b stores at its own start_pos[b]; the B rows
        are the cache's first B, and the slots returned run to the furthest row's end (the attention mask hides,
        for each row, the slots past its own)."""
        B, T = k.shape[:2]
        end = int(start_pos.max()) + T if isinstance(start_pos, torch.Tensor) else start_pos + T
        if end > self.k.size(1):
            raise ValueError(f"the KV cache holds {self.k.size(1)} positions; position {end - 1} does not fit")
        if isinstance(start_pos, torch.Tensor):
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            slots = start_pos[:, None] + torch.arange(T, device=k.device)  # (B, T)
            self.k[rows, slots], self.v[rows, slots] = k, v
            return self.k[:B, :end], self.v[:B, :end]
        self.k[:, start_pos:end] = k
        self.v[:, start_pos:end] = v
        return self.k[:, :end], self.v[:, :end]


def new_kv_cache(model: Transformer, batch_size: int, max_len: int | None = None) -> list[KVCache]:
    """One cache per layer, sized to ``max_len`` positions (default: the model's max_seq_len)."""
    cfg = model.config
    weight = model.tok_embeddings.weight
    size = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    return [KVCache(batch_size, size, cfg.n_kv_heads, cfg.head_dim, weight.dtype, weight.device)
            for _ in range(cfg.n_layers)]
