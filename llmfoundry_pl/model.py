"""The whole Llama-style transformer in one file: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Pure PyTorch: no Lightning, no Hydra, no torch.distributed. Module and parameter names follow Meta's Llama
(``tok_embeddings``, ``layers.N.attention.wq``, ``feed_forward.w1``, ``norm``, ``output``), and the math is
exactly Hugging Face's ``LlamaForCausalLM``, so weights map one-to-one (see ``tests/test_model.py``).

Shapes in comments: B = batch, T = sequence length, D = dim, H = n_heads, K = n_kv_heads, Hd = head_dim,
V = vocab_size.

    tokens → tok_embeddings → n_layers × block → norm → output → logits (B, T, V)

    block:  x ─┬─ RMSNorm ─ attention (RoPE, GQA) ─(+)─┬─ RMSNorm ─ SwiGLU ─(+)─→
               └─────────────── residual ───────────┘  └───── residual ─────┘
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmfoundry_pl.config import ModelConfig

try:  # optional GPU extra: pip install "llmfoundry-pl[gpu]"
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): x / rms(x) * weight.

    Unlike LayerNorm it neither subtracts the mean nor adds a bias: cheaper, and works as well for transformers.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x²) + eps), computed in fp32 even under bf16 autocast: the mean of squares is where low
        # precision hurts. F.rms_norm is that formula in one kernel call (fewer small ops per generated token).
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)


def precompute_rope(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of rotary position embeddings (Su et al., 2021 — RoFormer), each (max_seq_len, head_dim).

    Channel i of the first half is paired with channel i of the second half (Hugging Face's "rotate_half"
    convention, rather than Meta's interleaved pairs), and rotated by the angle position · theta^(-2i/head_dim).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (Hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, Hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Hd): both channels of a pair share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (B, T, heads, Hd) by its position's angle; cos and sin are the tables' rows
    for those positions, shaped (T, 1, Hd) — or (B, T, 1, Hd) when each sequence has its own positions — so they
    broadcast over the heads.

    Because a rotation by angle(m) dotted with a rotation by angle(n) depends only on m - n, the attention score
    q_m · k_n sees relative positions only — no learned position table, and nothing to extrapolate but angles.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al., 2023).

    n_kv_heads < n_heads shrinks the key/value projections and, at inference, the KV cache; each group of
    n_heads / n_kv_heads query heads attends with the same key/value head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout, self.attention = cfg.dropout, cfg.attention
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCacheLayer | None = None,
        start_pos: int | torch.Tensor = 0, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mask`` None is plain causal attention (training, a prompt from position 0); generation passes which
        cached key slots each new query may see (see :func:`attention_mask`)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, Hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, Hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            # Generation: keep this step's keys/values and attend over every slot so far (B, S, K, Hd).
            k, v = kv_cache.update(start_pos, k, v)
        dropout_p = self.dropout if self.training else 0.0
        kernel = attention_kernel(self.attention, q.device.type, q.dtype, k.shape[1], masked=mask is not None,
                                  compiled=torch.compiler.is_compiling())
        if kernel == "flash_attn":
            # flash-attn takes (B, T, heads, Hd) and handles grouped KV heads natively.
            out = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        elif kernel == "math":  # the formula written out, on SDPA's (B, heads, T, Hd) layout
            out = math_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout_p)
            out = out.transpose(1, 2)
        else:
            # SDPA wants (B, heads, T, Hd); enable_gqa lets K < H heads broadcast without copying them.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                dropout_p=dropout_p, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads,
            ).transpose(1, 2)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)


def attention_mask(
    T: int, start_pos: int, left_pad: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Which key slots the T new queries (slots start_pos ..) may attend to: (1 or B, 1, T, start_pos + T) bool.

    Query slot i sees key slots 0 .. i (causal), except a row's ``left_pad`` leading padding slots — the filler
    that lines up prompts of different lengths in one batch. A padding query sees itself only, so its (unused)
    softmax is never over an empty set. None when plain causal attention already says it all.
    """
    if start_pos == 0 and left_pad is None:
        return None
    query = torch.arange(start_pos, start_pos + T, device=device)[:, None]  # (T, 1)
    key = torch.arange(start_pos + T, device=device)[None, :]  # (1, S)
    if left_pad is None:
        return (key <= query)[None, None]  # (1, 1, T, S)
    real_key = key >= left_pad[:, None, None]  # (B, 1, S)
    return ((key <= query) & real_key | (key == query))[:, None]  # (B, 1, T, S)


def packed_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) and attention mask (B, 1, T, T) for rows that pack several examples side by side.

    ``segment_ids`` (B, T) is constant along each example (e.g. 0 0 0 1 1 2 2 2). A token sees the earlier tokens
    of its own example only (causal and block-diagonal), and its position counts from its example's first token:
    packing saves the compute wasted on padding without letting examples read each other.
    """
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts_here = torch.ones_like(segment_ids, dtype=torch.bool)
    starts_here[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    example_start = torch.where(starts_here, index, 0).cummax(dim=1).values  # (B, T): where each token's example began
    same_example = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return index - example_start, (same_example & causal)[:, None]


def row_positions_and_mask(start_pos: torch.Tensor, T: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) and mask (B, 1, T, end) when row b holds its own sequence, continuing at start_pos[b]: its
    queries see its slots up to their own position, and none of the slots beyond (left from a longer sequence that
    used the row before, or not yet written)."""
    positions = start_pos[:, None] + torch.arange(T, device=start_pos.device)  # (B, T)
    keys = torch.arange(end, device=start_pos.device)  # (S,)
    return positions, (keys[None, None, :] <= positions[:, :, None])[:, None]


class KVCacheLayer(Protocol):
    """What attention needs from a KV cache (see llmfoundry_pl/inference/kv_cache.py)."""

    def update(
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# Longest key span for which ``attention="auto"`` writes attention out on a CPU in bf16 (see attention_kernel).
MATH_ATTENTION_MAX_KEYS = 512


def attention_kernel(
    setting: str, device_type: str, dtype: torch.dtype, keys: int, masked: bool = False, compiled: bool = False
) -> str:
    """Which implementation computes attention: "flash_attn", "math" (:func:`math_attention`) or "sdpa" (PyTorch's
    ``scaled_dot_product_attention``, which picks a fused kernel itself).

    ``setting`` is ``model.attention``; anything but "auto" is obeyed. "auto" decides from where attention runs —
    its device type, dtype, number of ``keys`` (key/value positions), whether an explicit mask is ``masked`` and
    whether torch.compile is tracing it (``compiled``):

    - flash-attn, when installed, on CUDA in fp16/bf16 for plain causal attention;
    - the written-out math on a CPU in bf16, eager, up to :data:`MATH_ATTENTION_MAX_KEYS` keys. PyTorch's fused CPU
      kernel computes in fp32 whatever the input, while the math's two matmuls run as bf16 GEMMs, which a CPU with
      AVX512-BF16 multiplies twice as fast as fp32 (the cpu profile trains in bf16 only there): eager training
      steps 1.05-1.08x faster on a 2-core AMD EPYC (tiny and ref16m, T = 256 and 512); past 512 keys, computing
      and storing the masked half of the (T, T) scores costs more than the fused kernel's fp32 arithmetic (0.96x
      at T = 1024, measured compiled). Not when compiled, although it was 1.10-1.17x faster there: torch 2.13's
      Inductor generates a wrong CPU kernel for its backward whenever head_dim is a multiple of 32 (the gradient of
      wk comes out NaN or garbage; ref16m's head_dim 64 diverged at its second step, the tiny preset's 48 escaped);
    - SDPA everywhere else (fp32 CPUs included: there the two measured the same).
    """
    if setting != "auto":
        return setting
    if masked:
        return "sdpa"
    if flash_attn_func is not None and device_type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash_attn"
    if device_type == "cpu" and dtype == torch.bfloat16 and keys <= MATH_ATTENTION_MAX_KEYS and not compiled:
        return "math"
    return "sdpa"


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q·kᵀ / √Hd, masked)·v written out, step by step — what the fused kernels compute without ever
    storing the scores. q: (B, H, T, Hd); k, v: (B, K, S, Hd); ``mask`` (B or 1, 1, T, S) bool, True where a query
    may look, or None for causal attention (query t sits at slot S - T + t). Returns (B, H, T, Hd).

    It keeps the (B, H, T, S) scores and probabilities for the backward pass: memory quadratic in the sequence
    length, which is why ``attention="auto"`` uses it for short sequences only."""
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    # Grouped-query attention: query head h reads key/value head h // (H / K), so repeat each K head H / K times.
    k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in fp32 (bf16 keeps 8 bits of mantissa: a long row's small probabilities would round away); the
    # product with v is back in the input's dtype, so it runs as a bf16 matmul. Compiled (torch 2.13), Inductor
    # keeps all this as two batched matmuls around one fused masked softmax: it does not swap in the fused kernel.
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer, 2020): w2(silu(w1 x) * w3 x). The gate w1 decides, per channel, how much of the
    linear path w3 passes — consistently better than a plain GELU MLP at equal parameter count."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down projection
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: normalise, transform, add back to the residual stream — twice."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCacheLayer | None = None,
        start_pos: int | torch.Tensor = 0, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos, mask))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    """The decoder-only language model: token ids (B, T) → next-token logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is null: set it to the tokenizer's vocabulary size before building")
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = precompute_rope(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Buffers follow .to(device) but are derived, so they stay out of checkpoints (persistent=False).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; the two projections that write into the residual stream
        (attention.wo, feed_forward.w2) get init_std / sqrt(2 · n_layers), as in GPT-2, so the stream's variance
        stays the same whatever the depth. Norm weights start at 1."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self, tokens: torch.Tensor, kv_cache: list[KVCacheLayer] | None = None, start_pos: int | torch.Tensor = 0,
        left_pad: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for ``tokens`` (B, T).

        For generation, ``kv_cache`` holds one cache per layer and ``start_pos`` is the slot of ``tokens[:, 0]``:
        earlier slots come from the cache instead of being recomputed. ``left_pad`` (B,) batches prompts of
        different lengths: row b starts with that many padding slots, which nobody attends to, and its positions
        count from its first real token — so each row computes exactly what it would alone.

        For continuous batching, ``start_pos`` may be a (B,) tensor: row b is a sequence of its own that continues at
        slot start_pos[b] of its cache row and attends to its own slots 0 .. start_pos[b] + T - 1 only (see
        :func:`row_positions_and_mask`); sequences of any lengths then share one forward pass.

        For training on packed rows, ``segment_ids`` (B, T) numbers the examples packed side by side in each row:
        a token attends only to earlier tokens of its own example, and positions restart at 0 for each example —
        so each example computes exactly what it would alone (see :func:`packed_positions_and_mask`)."""
        h = self.hidden_states(tokens, kv_cache, start_pos, left_pad, segment_ids)
        return self.output(h).float()  # (B, T, V); fp32 logits keep the softmax exact under autocast

    def hidden_states(
        self, tokens: torch.Tensor, kv_cache: list[KVCacheLayer] | None = None, start_pos: int | torch.Tensor = 0,
        left_pad: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What :meth:`forward` feeds the output head: the final normalised hidden states (B, T, D). The training
        loss can take it from here a chunk of tokens at a time (:func:`llmfoundry_pl.loss.linear_cross_entropy`)."""
        B, T = tokens.shape
        end = int(start_pos.max()) + T if isinstance(start_pos, torch.Tensor) else start_pos + T
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens is longer than model.max_seq_len={self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, T, D)
        if segment_ids is not None:
            positions, mask = packed_positions_and_mask(segment_ids)
        elif isinstance(start_pos, torch.Tensor):
            positions, mask = row_positions_and_mask(start_pos, T, end)
        elif left_pad is not None:  # each row's own positions: slot minus its padding
            positions = (torch.arange(start_pos, start_pos + T, device=tokens.device) - left_pad[:, None]).clamp(min=0)
            mask = attention_mask(T, start_pos, left_pad, tokens.device)
        else:  # every row at slots start_pos .. start_pos+T-1
            positions, mask = None, attention_mask(T, start_pos, None, tokens.device)
        if positions is None:
            cos, sin = self.rope_cos[start_pos : start_pos + T, None], self.rope_sin[start_pos : start_pos + T, None]
        else:
            cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]  # (B, T, 1, Hd)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (h, cos, sin, None if kv_cache is None else kv_cache[i], start_pos, mask)
            # Activation checkpointing (Chen et al., 2016): store the block's input only and run it again during
            # backward. Same gradients (dropout masks are replayed from the saved RNG state), far less memory.
            h = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return self.norm(h)

    # ---------------------------------------------------------------------------------------------------------
    # Helpers: size and cost
    # ---------------------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once). ``non_embedding`` leaves out the token embedding and,
        if untied, the output head: the count that scaling laws (Kaplan et al., 2020) use."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_embeddings.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.output.weight.numel()
        return total

    def matmul_params(self) -> int:
        """Weights used in matmuls: the blocks' projections and the output head. The embedding lookup is not a
        matmul; the output head is, even when tied to it. Counted from the shape, not from the parameters: under
        FSDP with several ranks each rank holds a slice of them (its MFU read 30% low on two ranks). LoRA's
        adapters are left out (1.8% more weights on the tiny model at the default rank and targets)."""
        cfg = self.config
        q_and_out, k_and_v = 2 * cfg.dim * cfg.n_heads * cfg.head_dim, 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
        swiglu = 3 * cfg.dim * cfg.hidden_dim  # w1, w2, w3
        return cfg.n_layers * (q_and_out + k_and_v + swiglu) + cfg.vocab_size * cfg.dim

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: 2 · (weights used in matmuls) + 4 · n_layers · dim · seq_len for the attention
        scores and values (a multiply and an add per weight, and per query-key and weight-value pair)."""
        return 2 * self.matmul_params() + 4 * self.config.n_layers * self.config.dim * seq_len

    def flops_per_token(self, seq_len: int, weights_trained: bool = True) -> int:
        """Training FLOPs per token (forward + backward), PaLM's formula (Chowdhery et al., 2022, appendix B):
        6 · (weights used in matmuls) + 12 · n_layers · dim · seq_len. The backward pass takes the gradient of
        each matmul's two inputs, each as costly as the forward product: 3 forwards. With ``weights_trained=False``
        (LoRA: the weights frozen, only the adapters train) no weight gradient is computed, so 4 per weight; counted
        as 6 they overstated LoRA's MFU by 1.39x on the tiny model. The adapters are left out, as in
        :meth:`matmul_params`, and so is the first block's input gradient, which a frozen embedding does not need."""
        frozen = 0 if weights_trained else 2 * self.matmul_params()
        return 3 * self.forward_flops_per_token(seq_len) - frozen
