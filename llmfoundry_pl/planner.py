"""How much memory and time a training run needs, before running it (``lfpl-plan``; also printed by ``lfpl-bench``).

Memory is counted tensor by tensor from what this project's model keeps for the backward pass — not from a rule
of thumb — so that the estimate can be checked: ``tests/test_planner.py`` compares the activation count with the
bytes autograd actually saves (``torch.autograd.graph.saved_tensors_hooks``) and ``lfpl-bench`` prints the plan
next to the measured peak.

Per transformer block and token, the backward pass needs (D = dim, Q = n_heads·head_dim, K = n_kv_heads·head_dim,
F = hidden_dim):

    attention:  block input, its RMS-normalised form, the normalised·gain input of wq/wk/wv (D each),
                RoPE-rotated q (Q) and k (K), v (K), attention output (Q), the residual sum (D)
    MLP:        its normalised form and input (D each), gate w1·x, silu(gate), up w3·x and their product (F each)

That is attention by a fused kernel (SDPA, flash-attn), which keeps one log-sum-exp per head instead of the scores.
The written-out math that ``model.attention`` picks on a CPU in bf16 keeps a row of T scores per head and token
instead (memory quadratic in the sequence length), with the key/value heads repeated to all query heads.

In fp32 everything is 4 bytes. Under mixed precision (autocast) the residual stream and the norms stay fp32, matmul
outputs are 2 bytes, and each matmul saves its own half-precision copy of its input (autocast casts per call: three
copies for wq/wk/wv, two for w1/w3). After the last block: the final norm's tensors and the log-probabilities
(vocab floats per token, fp32), plus, at the start of the backward pass, the loss's two vocab-sized gradient
buffers — usually the largest single item.

That count is the peak of PyTorch's allocator: on a CPU it matched ``torch.profiler``'s allocation events and
PyTorch's ``MemTracker`` to the MiB, and on an H100 ``torch.cuda.max_memory_allocated`` within 1%. A CPU process
holds more than its tensors, though (see :data:`CPU_RESIDENT_FACTOR`).

``compile=true`` (Inductor, model and loss compiled as one graph) saves less: it recomputes the normalised values
and silu(gate) in the backward pass instead of keeping them, and keeps the logits (in the matmul dtype) instead of
fp32 log-probabilities. Per block and token: the block input and the residual sum (D each, residual dtype), the
normalised inputs of the attention and MLP matmuls (D each), RoPE-rotated q, k, v and the attention output
(2Q + 2K), gate, up and their product (3F); after the blocks, the final norm's input and output and the logits (in
the matmul dtype). Its fused loss gradient takes the logits' place, so the step peaks when the output head's weight
gradient is allocated on top of the saved tensors. Checked against the tensors Inductor saves
(``tests/test_planner.py``) and the CPU allocator's peak (ref16m, 8 × 256, fp32: 552.1 MB planned, 552.0 MB
measured).

The chunked loss (``model.logits``; what ``auto`` picks for an eager step, see ``llmfoundry_pl/loss.py``) keeps
no logits at all: after the blocks only the final norm's tensors and the hidden states' gradient (D per token),
plus the head weight's gradient (V·D, fp32) and one chunk's logits at a time. Checked against the CPU
allocator's peak, eager and compiled. Validation is not counted: it runs without gradients, in chunks under the
same setting (always eager, so under ``auto`` too), and stays below the training step (tested).

``model.dropout`` (0 in every preset) keeps what it dropped on the two residual branches and the attention
probabilities: a bool mask per value on CUDA and under Inductor, eager elsewhere the scaled noise itself. PyTorch
has no fused CPU kernel for SDPA with dropout, so there SDPA falls back to its own written-out math and keeps
the scores like ``attention=math`` (in fp32 eager, whatever the precision). Checked against what autograd saves,
eager and compiled (within 1%); ref16m, 8 × 256, fp32, dropout 0.1: planned +3% of the measured memory, where
the plan without dropout read −30%. The CUDA cases (fused kernels keep a random state, not a mask) are unmeasured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmfoundry_pl.callbacks import HALF_PRECISION
from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.loss import chunk_tokens, uses_chunked_loss
from llmfoundry_pl.model import Transformer, attention_kernel

# Resident memory of a CPU training process above its tensors' peak: glibc's heap and the math libraries'
# workspaces. Measured with the ref16m preset at micro-batches 8 and 16 (with and without keep_freed_memory, plain
# loop and Lightning step): 1.43–1.53 × the allocator's peak.
CPU_RESIDENT_FACTOR = 1.45
MIXED = ("bf16-mixed", "16-mixed")  # fp32 weights, autocast to half for matmuls
TRUE_HALF = ("bf16-true", "16-true")  # everything, weights and optimizer state included, in half precision
FULL = ("32-true", "32")


def _bytes(precision: str) -> tuple[int, int, int]:
    """Sizes of (a weight, a matmul output, a residual-stream/norm value) under ``precision``."""
    if precision in MIXED:
        return 4, 2, 4
    if precision in TRUE_HALF:
        return 2, 2, 2
    if precision in FULL:
        return 4, 4, 4
    raise ConfigError(f"trainer.precision={precision} has no memory model here: pick one of "
                      f"{', '.join(FULL + MIXED + TRUE_HALF)}")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one training step at a micro-batch of ``batch_size`` sequences."""

    batch_size: int
    attention: str  # what computes attention: "flash_attn", "math" or "sdpa" (model.attention, see attention_kernel)
    logits: str  # how the loss meets the output head: "full" or "chunked" (model.logits, see uses_chunked_loss)
    weights: int  # parameters, plus autocast's half-precision copies of the matmul weights
    gradients: int  # all of them: alive at the peak when micro-batches accumulate, or when they outweigh activations
    optimizer: int  # AdamW's two moments
    saved: int  # what autograd keeps for the backward pass
    saved_checkpointed: int  # the same with model.activation_checkpointing=true, one block re-run at a time
    # Allocated on top of the saved tensors when the backward pass peaks: eager, the loss's two vocab-sized
    # gradients; compiled, the output head's weight gradient (the fused loss gradient reuses the logits' place);
    # chunked loss, the head weight's gradient and one chunk's logits.
    backward_buffers: int
    accumulate: int

    @property
    def activations(self) -> int:
        return self.saved + self.backward_buffers

    @property
    def activations_checkpointed(self) -> int:
        return self.saved_checkpointed + self.backward_buffers

    def resident(self, checkpointing: bool, device_type: str) -> int:
        """What the device holds at the peak: the tensors on a GPU, more on a CPU (:data:`CPU_RESIDENT_FACTOR`)."""
        return int(self.peak(checkpointing) * (CPU_RESIDENT_FACTOR if device_type == "cpu" else 1))

    def peak(self, checkpointing: bool) -> int:
        """Estimated peak bytes of a training step's tensors: at the start of the backward pass, when every saved tensor
        and the loss's gradients are alive — plus all gradients when they accumulate over micro-batches. Without
        accumulation they are freed after each step and appear as the activations go, so the peak is the larger of
        the activations and the gradients, which are all there once the pass ends (and for the optimizer's step):
        counted without them, a small micro-batch (or checkpointed blocks) planned below weights, gradients and
        AdamW's state alone (model=base in fp32, micro-batch 1: 1.55 GB where those take 1.99)."""
        act = self.activations_checkpointed if checkpointing else self.activations
        if self.accumulate > 1:
            return self.weights + self.optimizer + self.gradients + act
        return self.weights + self.optimizer + max(act, self.gradients)


def fsdp_shards(strategy: str, devices: int) -> int:
    """How many slices weights, gradients and optimizer state are cut into under ``trainer.strategy``: the devices
    under FSDP, else 1 (each DDP rank holds them whole)."""
    return devices if strategy == "fsdp" else 1


def plan_memory(
    cfg: ModelConfig, batch_size: int, seq_len: int, precision: str, accumulate: int = 1, shards: int = 1,
    compiled: bool = False, *, device_type: str,
) -> MemoryPlan:
    """Memory of one training step of ``cfg`` per device of type ``device_type`` ("cpu", "cuda", "mps").

    ``shards`` > 1 is FSDP over that many devices: weights, gradients and optimizer state are split between them
    (plus one block gathered whole at a time), activations are not. ``compiled``: the step runs under
    ``compile=true``, which saves fewer tensors (see the module's docstring). The device type and precision decide
    which attention runs (``model.attention``), and the written-out math keeps more than the fused kernels."""
    weight_b, matmul_b, stream_b = _bytes(precision)
    mixed = precision in MIXED
    D, F, V, L = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_layers
    with torch.device("meta"):  # the counts come from the model itself; on the meta device it takes no memory
        network = Transformer(cfg)
    params, matmul_params = network.num_params(), network.matmul_params()
    block_params = sum(p.numel() for p in network.layers[0].parameters())

    # Per token, + fp32 statistics: each norm's 1/rms; int64 inputs and targets.
    stats = 4 * 2
    kernel = attention_kernel(cfg.attention, device_type, HALF_PRECISION.get(precision, torch.float32), seq_len,
                              compiled=compiled)
    attention = _attention_saved(cfg, seq_len, kernel, compiled, matmul_b, device_type)
    # model.dropout on the two residual branches keeps what it dropped: a bool mask per value (CUDA's fused kernel,
    # Inductor), or eager elsewhere the scaled noise, in the branch output's dtype.
    if cfg.dropout:
        stats += 2 * D * (1 if compiled or device_type == "cuda" else matmul_b)
    tokens = batch_size * seq_len
    if compiled:  # the stream (D, twice), the matmuls' normalised inputs (D, twice), attention, gate up product
        per_block = 2 * D * stream_b + (2 * D + 3 * F) * matmul_b + attention + stats
    else:
        # Mixed: the norms' input and output and the residual sum in fp32, a half copy per matmul input. Otherwise
        # the matmul inputs are the norms' outputs themselves.
        norms = 4 * D * stream_b + 5 * D * matmul_b if mixed else 6 * D * stream_b
        per_block = norms + 4 * F * matmul_b + attention + stats
    # After the blocks, per token (+ the int64 inputs and targets), and what the backward pass allocates on top.
    chunked = uses_chunked_loss(cfg.logits, compiled)
    if chunked:
        # The chunked loss (llmfoundry_pl/loss.py) keeps no logits. The final norm keeps its input (compiled: and
        # 1/rms only; eager: and its normalised form), the loss the hidden states' gradient and the head weight's
        # (summed in fp32). During the loss's forward one chunk's logits come and go (two fp32 copies at most)
        # and, in half precision, each chunk's share of the weight gradient before it is added up.
        outside_blocks = (2 if compiled else 3) * D * stream_b + 4 + 2 * 8
        chunk = min(chunk_tokens(V), tokens)
        backward_buffers = V * D * 4 + chunk * V * 8 + (V * D * matmul_b if matmul_b < 4 else 0)
    elif compiled:
        # The final norm's input and output and the logits (all in the matmul dtype), three fp32 statistics (the
        # norm's 1/rms, the loss's row max and log-sum-exp).
        outside_blocks = (2 * D + V) * matmul_b + 3 * 4 + 2 * 8
        backward_buffers = V * D * weight_b  # the output head's weight gradient
    else:
        final_norm = (2 * D * stream_b + D * matmul_b if mixed else 3 * D * stream_b) + 4
        outside_blocks = final_norm + 4 * V + 2 * 8  # fp32 log-probabilities
        # The loss's two fp32 vocab-sized gradients per token; mixed: + their half copy.
        backward_buffers = tokens * (2 * 4 * V + (matmul_b * V if mixed else 0))
    # FSDP: each rank holds its shard, and one block gathered whole for its forward and backward. AdamW's moments
    # are never gathered: its step updates the shard.
    shard = math.ceil(params / shards)
    gathered = params if shards == 1 else shard + block_params
    return MemoryPlan(
        batch_size=batch_size,
        attention=kernel,
        logits="chunked" if chunked else "full",
        weights=gathered * weight_b + (2 * matmul_params if mixed else 0),
        gradients=gathered * weight_b,
        optimizer=2 * shard * weight_b,
        saved=tokens * (L * per_block + outside_blocks),
        saved_checkpointed=tokens * (L * D * stream_b + per_block + outside_blocks),
        backward_buffers=backward_buffers,
        accumulate=accumulate,
    )


def _attention_saved(
    cfg: ModelConfig, seq_len: int, kernel: str, compiled: bool, matmul_b: int, device_type: str
) -> int:
    """Bytes per token and block that attention by ``kernel`` keeps for the backward pass (its input projections
    excluded), with ``model.dropout`` on the probabilities when it is set."""
    Q, K, H, T = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_heads, seq_len
    dropout = cfg.dropout > 0
    compute_b = matmul_b  # the bytes of the values attention multiplies
    if kernel != "math":
        if not dropout or device_type == "cuda":
            # The fused kernels (SDPA, flash-attn): RoPE-rotated q and k, v, the output, and a log-sum-exp per
            # head. With dropout, CUDA's regenerate the mask in the backward pass from a saved random state.
            return (2 * Q + 2 * K) * matmul_b + 4 * H
        # PyTorch has no fused CPU kernel with dropout: SDPA falls back to its own written-out math, which keeps
        # what the math below keeps. Eager, in fp32 (autocast runs SDPA in fp32 on a CPU), all but the output.
        compute_b = compute_b if compiled else 4
    # The written-out math: q, the key and value heads repeated to all H query heads, the output — and a row of T
    # scores per head, so memory grows with the square of the sequence length. Eager keeps the fp32 softmax output
    # (+ its half copy for the product with v); Inductor keeps half-precision scores and probabilities and the
    # softmax's row max and sum (in fp32, only the probabilities).
    # Dropout on the probabilities keeps what it dropped — eager off CUDA the scaled noise (a value per score),
    # else a bool mask — and the dropped probabilities for the product with v (in place of the half copy).
    half = compute_b < 4
    if compiled and dropout:
        scores = 2 * H * T * compute_b + 2 * 4 * H + H * T
    elif compiled:
        scores = 2 * H * T * compute_b + 2 * 4 * H if half else 4 * H * T
    elif dropout:
        scores = H * T * (4 + (1 if device_type == "cuda" else compute_b) + compute_b)
    else:
        scores = H * T * (4 + (compute_b if half else 0))
    return 3 * Q * compute_b + Q * matmul_b + scores


def largest_batch(
    cfg: ModelConfig, seq_len: int, precision: str, memory_bytes: float, checkpointing: bool, device_type: str,
    accumulate: int = 1, shards: int = 1, compiled: bool = False,
) -> int:
    """The largest micro-batch whose planned peak fits in ``memory_bytes`` (0 if not even one sequence fits).
    Memory grows with the batch, but not in one straight line: the chunked loss's chunk stops growing once a batch
    holds chunk_tokens(V) tokens, so a line through batches 1 and 2 overshot (ref16m, 2 GB: 30 where 44 fits).
    Plans are arithmetic, so a doubling then bisecting search costs nothing."""

    def fits(batch_size: int) -> bool:
        plan = plan_memory(cfg, batch_size, seq_len, precision, accumulate, shards, compiled, device_type=device_type)
        return plan.resident(checkpointing, device_type) <= memory_bytes

    if not fits(1):
        return 0
    low, high = 1, 2  # fits(low), and high is the first power of two tried that does not
    while fits(high) and high < 2**40:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
