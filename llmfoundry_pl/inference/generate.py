"""Autoregressive generation with a KV cache, one prompt or a batch of prompts of different lengths.

Prefill runs the whole prompt once and fills the cache; each decode step then runs the model on one new token
per sequence. A batch lines its prompts up on the right (left padding, ``Transformer.forward(left_pad=...)``):
padding slots are masked out and each row counts its positions from its own first token, so every row's tokens
are the ones it would get alone. When the context is full (``max_seq_len``), generation goes on with a sliding
window recomputed each step, as a model without a cache would. Sampling uses its own ``torch.Generator``, so
printing a sample during training never moves the global RNG that dropout and resumed runs depend on.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch

from llmfoundry_pl.config import ConfigError, check_sampling
from llmfoundry_pl.inference.kv_cache import new_kv_cache
from llmfoundry_pl.inference.sampling import check_finite, sample_next, seeded_generator
from llmfoundry_pl.model import Transformer


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Continue ``prompt`` (token ids) by up to ``max_new_tokens`` tokens; returns only the new tokens.
    Takes the options of :func:`generate_stream`."""
    return list(generate_stream(model, prompt, max_new_tokens, **kwargs))


EndIds = int | Collection[int] | None  # what ends a generation: one token id, any of several, or none


def end_ids(eos_id: EndIds) -> frozenset[int]:
    """``eos_id`` as a set: a chat reply ends at ``<|end|>`` or at ``</s>`` (see ``ChatFormat.stop_ids``)."""
    if eos_id is None:
        return frozenset()
    return frozenset([eos_id] if isinstance(eos_id, int) else eos_id)


def generate_stream(
    model: Transformer, prompt: list[int], max_new_tokens: int, eos_id: EndIds = None, **kwargs
) -> Iterator[int]:
    """Yield the new token ids continuing ``prompt``, one at a time, up to ``max_new_tokens``; stops early at
    ``eos_id`` (one id or several) or when the caller stops reading. Takes the sampling options of
    :func:`generate_steps`."""
    ends = end_ids(eos_id)
    for step in generate_steps(model, [prompt], max_new_tokens, **kwargs):
        if int(step[0]) in ends:
            return
        yield int(step[0])


def generate_batch(
    model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: EndIds = None, **kwargs
) -> list[list[int]]:
    """Continue each prompt of a batch (different lengths welcome); each row ends at an ``eos_id`` (one id or
    several; not included) or after ``max_new_tokens``. With greedy decoding in fp32, row i is exactly
    ``generate(model, prompts[i], ...)``; in half precision the padded batch rounds otherwise (another attention
    kernel, other matmul shapes), and a near tie may go the other way. Takes the sampling options of
    :func:`generate_steps`."""
    ends = end_ids(eos_id)
    end_tensor = torch.tensor(sorted(ends), dtype=torch.long)  # the ids generate_steps yields are longs
    outputs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    steps = generate_steps(model, prompts, max_new_tokens, **kwargs)
    for step in steps:
        step = step.cpu()
        for row in (~done).nonzero().flatten().tolist():
            if int(step[row]) not in ends:
                outputs[row].append(int(step[row]))
        done |= torch.isin(step, end_tensor)
        if done.all():
            steps.close()
            break
    return outputs


@torch.no_grad()
def generate_steps(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    seen_before: Sequence[int] = (),
) -> Iterator[torch.Tensor]:
    """The engine under the functions above: yields, for each of ``max_new_tokens`` steps, the next token id of
    every prompt, (B,). It never stops early: end-of-text is the caller's business.

    ``use_cache=False`` recomputes the whole context every step (slow; the reference the cached path is tested
    against). ``seen_before``: tokens the repetition penalty counts as seen besides each prompt's own, the text
    before a prompt cut to the context (speculative decoding goes on so once the text fills the context)."""
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    context = model.config.max_seq_len
    for prompt in prompts:
        if not 0 < len(prompt) <= context:
            raise ConfigError(f"the prompt is {len(prompt)} tokens; it must be 1 to {context} (the model's context)")
    device = model.tok_embeddings.weight.device
    generator = seeded_generator(device, seed)
    seqs = [list(p) for p in prompts]  # each row's prompt + new tokens: the sliding window reads them
    seen = None  # (B, V): which tokens each row holds, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(seqs), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, seq in enumerate(seqs):
            seen[row, [*seen_before, *seq]] = True
    with eval_mode(model):
        tokens, left_pad = _left_padded(seqs, context, device)
        cache = new_kv_cache(model, batch_size=len(seqs)) if use_cache else None
        logits = model(tokens, cache, 0, left_pad)[:, -1]  # prefill: every prompt at once, (B, V)
        check_finite(logits, model)  # once: a model with NaN weights shows it at the first token
        cached = tokens.size(1)  # slots filled in the cache (the same for every row)
        for step in range(max_new_tokens):
            next_ids = sample_next(logits, generator, temperature, top_k, top_p, min_p, repetition_penalty, seen)
            yield next_ids
            if step == max_new_tokens - 1:
                break
            for seq, token_id in zip(seqs, next_ids.tolist(), strict=True):
                seq.append(token_id)
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
            if cache is not None and cached < context:  # decode: one new token per row, the rest from the cache
                logits = model(next_ids[:, None], cache, cached, left_pad)[:, -1]
                cached += 1
            else:  # no cache, or the context is full: recompute a sliding window of each row's last tokens
                window, window_pad = _left_padded(seqs, context, device)
                logits = model(window, None, 0, window_pad)[:, -1]


def _left_padded(
    seqs: Sequence[Sequence[int]], context: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last ``context`` tokens of each row, aligned on the right: (B, T) ids and (B,) padding counts (None
    when no row needs padding, which keeps the plain causal path)."""
    rows = [list(seq[-context:]) for seq in seqs]
    width = max(len(row) for row in rows)
    pad = [width - len(row) for row in rows]
    tokens = torch.tensor([[0] * n + row for n, row in zip(pad, rows, strict=True)], device=device)
    return tokens, (torch.tensor(pad, device=device) if any(pad) else None)


@contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """``models`` in eval mode (no dropout) for the block, then back in the mode each was in: a sample drawn in the
    middle of training leaves the model training, even when its caller stops reading the tokens early."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was_training, strict=True):
            m.train(training)
