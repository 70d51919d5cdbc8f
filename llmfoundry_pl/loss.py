"""The training loss through the output head, a chunk of tokens at a time: the (tokens, vocab) logits never exist.

For a model with a large vocabulary the logits are the largest activation of a training step: B·T·V numbers, kept
for backward in fp32 (8 × 512 tokens × a 32,000 vocabulary is 0.5 GB, and its gradient as much again), more than a
small model's blocks keep together. :func:`linear_cross_entropy` computes the same mean cross-entropy, but per chunk
of tokens: the chunk's logits, its share of the loss and, right away, its gradients for the hidden states and the
head's weight — so only one chunk's logits are ever alive. This is the "fused linear cross-entropy" of Liger-Kernel
and of torchtune/Unsloth-style fine-tuning, written in PyTorch ops (Liger's is Triton, CUDA only) so the same code
runs on a CPU, a GPU and a Mac. The FLOPs are the plain path's (one matmul forward, two for the gradients).

Because the gradients are computed in forward, backward only scales them by the incoming gradient: the loss must be
the last thing the graph does with the head (true of a training step, whose loss is what backward starts from).
Without gradients (validation) the chunks compute the loss only; there the full logits are no smaller either
(B·T·V in the matmul dtype, then copied to fp32 for the softmax), and would outgrow a chunked training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmfoundry_pl.data.datamodule import IGNORE_INDEX
from llmfoundry_pl.model import Transformer

# One chunk's fp32 logits take at most about this much memory (at least one token per chunk). On a 2-core CPU
# (dim 384, a 32k vocabulary: 262 tokens per chunk, eager bf16) 32 MiB was the fastest of 16 to 128 MiB, as fast as
# the full logits or faster; smaller chunks cost matmul efficiency, larger ones memory. Not tuned on a GPU.
CHUNK_LOGITS_BYTES = 32 * 2**20


def next_token_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor,
                    segment_ids: torch.Tensor | None = None, *, chunked: bool, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``model``'s predictions for ``tokens`` (B, T) against ``targets`` (B, T), skipping
    ``IGNORE_INDEX``: the pretraining and fine-tuning loss ("mean" over the counted tokens; "none" for validation:
    each token's nats, flattened, 0 where skipped). ``chunked`` takes it from the hidden states a chunk of tokens
    at a time (:func:`linear_cross_entropy`), else from the full logits; the two agree to rounding. A quantized
    head (``lfpl-eval quantize=...``) is always run whole: its weight is packed for its own kernels, not a matrix
    the chunks could multiply by."""
    # (LoRA never adapts the head, config.LORA_TARGETS: in training it is a plain nn.Linear)
    if chunked and _is_plain_linear(model.output):
        hidden = model.hidden_states(tokens, segment_ids=segment_ids)  # (B, T, D)
        return linear_cross_entropy(hidden.flatten(0, 1), model.output.weight, targets.flatten(), reduction)
    logits = model(tokens, segment_ids=segment_ids)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


def _is_plain_linear(head: torch.nn.Module) -> bool:
    """Whether ``head`` multiplies by an ordinary weight tensor (not a quantized module or a packed tensor subclass,
    such as torch.ao's int8 ``Linear`` or torchao's ``Int8Tensor``)."""
    weight = getattr(head, "weight", None)
    return type(weight) in (torch.Tensor, torch.nn.Parameter)  # (a Parameter of a subclass has the subclass's type)


def uses_chunked_loss(setting: str, compiled: bool) -> bool:
    """Whether the training loss goes through :func:`linear_cross_entropy` under ``model.logits=setting``.

    ``auto`` chunks unless the step is compiled. Eager, the chunks need far less memory at the same speed (ref16m
    with a 32k vocabulary, 8 × 256 tokens, 2-core CPU: 1.4 instead of 2.5 GB). Compiled (model and loss as one
    graph), Inductor fuses the full logits' softmax and its gradient and keeps only half-precision logits, while
    the chunks run eagerly after the compiled blocks: there the full logits were 1.16× faster and no larger at
    that size; the chunks pay off only where the logits outgrow the rest (large batches, activation
    checkpointing). Figures in docs/benchmarks.md."""
    return setting == "chunked" or (setting == "auto" and not compiled)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: as many as keep one chunk's fp32 logits within :data:`CHUNK_LOGITS_BYTES`."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))


# Not compiled: traced by Dynamo, the chunk loop runs slower and keeps more memory than eagerly (2-core CPU).
@torch.compiler.disable
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, without the full logits in memory.

    ``hidden`` (N, D) are the final (normalised) hidden states, ``weight`` (V, D) the output head's weight,
    ``targets`` (N,) token ids with ``IGNORE_INDEX`` where nothing is learnt. Equals
    ``F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)``
    ("mean" over the counted tokens, "sum", or "none": each token's, 0 where ignored), gradients included. Under
    autocast the matmuls run in the autocast dtype, as the plain output head's would; the softmax is in fp32.
    Without gradients (validation, under no_grad) only the loss is computed: no gradient buffers, a third of the
    FLOPs; "none" is for that case only.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    counted = targets != IGNORE_INDEX
    # The mean divides by the counted tokens; a batch with nothing to learn gives 0 loss and 0 gradients (not NaN).
    divisor = counted.sum().clamp(min=1) if reduction == "mean" else 1
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad and reduction == "none":
        raise ValueError("reduction='none' computes no gradients: call it under torch.no_grad(), as Lightning's "
                         "validation does")
    if grad:
        return _LinearCrossEntropy.apply(hidden, weight, targets, counted, divisor, dtype)
    nats = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.autocast(device_type, enabled=False):  # the dtypes are chosen by hand
        for start, _, labels, keep, log_probs in _chunk_log_probs(hidden, weight.to(dtype), targets, counted):
            nats[start : start + labels.shape[0]] = -(log_probs.gather(1, labels) * keep)[:, 0]
    return nats if reduction == "none" else nats.sum() / divisor


def _chunk_log_probs(hidden: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor):
    """For each chunk of tokens: its first row, its hidden states in ``w``'s dtype, its labels (N, 1), which rows
    count (N, 1), and its fp32 log-probabilities (N, V), the one (chunk, V) buffer a chunk needs."""
    chunk = chunk_tokens(w.shape[0])
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].to(w.dtype)
        labels = targets[start : start + chunk].clamp(min=0)[:, None]  # ignored rows: any valid index
        keep = counted[start : start + chunk, None]
        yield start, h, labels, keep, torch.log_softmax((h @ w.t()).float(), dim=-1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor,
                divisor: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(dtype)
        # Only the gradients asked for: a frozen head (LoRA's) needs no V×D weight gradient, a matmul per chunk
        # (~30% of the loss's time) and an fp32 buffer the size of the head.
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None  # summed in fp32
        nats = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen by hand
            for start, h, labels, keep, log_probs in _chunk_log_probs(hidden, w, targets, counted):
                nats -= (log_probs.gather(1, labels) * keep).sum()
                # d(nats)/d(logits) = softmax − one-hot at the label, zero on ignored rows; built in place in the
                # log-probabilities' memory
                minus_one = torch.full_like(labels, -1, dtype=torch.float32)
                grad_logits = log_probs.exp_().scatter_add_(1, labels, minus_one).mul_(keep).to(dtype)
                if wants_hidden:
                    grad_hidden[start : start + h.shape[0]] = grad_logits @ w
                if not wants_weight:
                    continue
                if dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:  # the product in half precision, as autocast's would be, summed in fp32
                    grad_weight += grad_logits.t() @ h
        # Kept on ctx rather than by save_for_backward: they are no inputs or outputs, and backward scales them in
        # place instead of allocating a copy of each (so the graph can be backpropagated once only, as a loss is).
        ctx.grad_hidden = grad_hidden.div_(divisor) if wants_hidden else None
        ctx.grad_weight = grad_weight.div_(divisor).to(weight.dtype) if wants_weight else None
        return nats / divisor

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None,
                                                         None]:
        grads = ctx.grad_hidden, ctx.grad_weight
        del ctx.grad_hidden, ctx.grad_weight  # a second backward fails here instead of scaling twice
        return *(g.mul_(grad_loss) if g is not None else None for g in grads), None, None, None, None
