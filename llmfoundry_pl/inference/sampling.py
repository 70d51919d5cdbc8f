"""Sampling: how next-token logits become the next token.

Every function works on logits shaped (..., V) — one row per sequence of a batch — so a batch samples in a few
tensor ops rather than a Python loop. The order is the usual one (Hugging Face, vLLM): repetition penalty, then
temperature, then the filters top-k → top-p → min-p, then a draw (or the argmax when greedy).
"""

from __future__ import annotations

import torch

from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.model import Transformer

# A temperature under this samples greedily, as vLLM does: dividing the logits by one much smaller overflows fp32
# (from ~1e-38 on, the softmax holds inf and NaN and the draw fails), and near it the draw is the argmax anyway.
GREEDY_BELOW = 1e-5


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The sampler's own random stream: repeatable from ``seed``, or seeded from the OS when it is None (as an
    OpenAI request without a seed samples anew each time). Drawing tokens never moves the global RNG that dropout
    and resumed training depend on."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh generator starts from one fixed seed: every unseeded draw would be the same
    else:
        generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Make tokens already present less likely (Keskar et al., 2019 — CTRL; Hugging Face's rule): a positive logit
    is divided by ``penalty``, a negative one multiplied by it. ``seen`` (..., V) marks the tokens present."""
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (ties at the k-th value kept), the rest become -inf."""
    if k >= logits.size(-1):
        return logits
    kth_best = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of most likely tokens whose probability
    mass reaches ``p``; at least the most likely one (as Hugging Face's min_tokens_to_keep=1): a ``p`` that rounds
    to 0 in fp32 (1e-300) dropped every token, and the draw failed on NaN."""
    probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the set already reached p without these
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al., 2024): keep tokens at least ``min_p`` times as likely as the most likely
    one — a cut that tightens when the model is sure and loosens when it is not."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def next_token_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    min_p: float | None = None, repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distribution the next token is drawn from, (..., V). Greedy (temperature 0) is the one-hot of the
    argmax — which lets speculative decoding treat greedy and sampling with one rule."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature < GREEDY_BELOW:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    if min_p:
        logits = filter_min_p(logits, min_p)
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of ``probs`` (..., V) → (...)."""
    try:
        return torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:-1])
    except RuntimeError:
        check_finite(probs)  # looked at only after a failure: no extra GPU sync per token
        raise


def check_finite(scores: torch.Tensor, model: Transformer | None = None) -> None:
    """A one-line error if the ``scores`` (logits or probabilities) of ``model`` hold NaN or inf: its weights do, or,
    in float16, its activations outgrew the format's range (65504; bfloat16 has float32's), and whatever it generates
    is garbage (greedy decoding would pick token 0 every time)."""
    if torch.isfinite(scores).all():
        return
    if model is not None and model.tok_embeddings.weight.dtype == torch.float16:  # logits come out in fp32
        raise ConfigError("the model's next-token scores are NaN or infinite: in float16 its activations outgrew "
                          "the format's range, or its weights hold NaN or inf; use precision=bf16-true or 32-true "
                          "(lfpl-train: trainer.precision=), and "
                          "if that fails too, a checkpoint saved before the run diverged")
    raise ConfigError("the model's next-token scores are NaN or infinite: its weights hold NaN or inf (saved by "
                      "a run that diverged?); use a checkpoint saved before that")


def sample_next(
    logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token id of each row of ``logits`` (..., V) → (...): greedy argmax, or a draw from
    :func:`next_token_probs`."""
    if temperature < GREEDY_BELOW:  # the argmax directly: no one-hot, no draw
        return apply_repetition_penalty(logits.float(), seen, repetition_penalty).argmax(-1)
    probs = next_token_probs(logits, temperature, top_k, top_p, min_p, repetition_penalty, seen)
    return draw(probs, generator)
