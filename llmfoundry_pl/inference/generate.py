"""Autoregressive generation with a KV cache, and the sampling strategies that pick each next token.

Prefill runs the whole prompt once and fills the cache; each decode step then runs the model on one new token.
When the context is full (``max_seq_len``), generation goes on with a sliding window recomputed each step, as
a model without a cache would. Sampling uses its own ``torch.Generator``, so printing a sample during training
never moves the global RNG that dropout and resumed runs depend on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.inference.kv_cache import new_kv_cache
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Sampling: each step reshapes the next-token logits (V,), then one token is drawn
# ---------------------------------------------------------------------------------------------------------------
def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
                   repetition_penalty: float) -> None:
    """One-line errors for sampling settings that cannot work."""
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be 1 or more (or null for no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (or null for no limit)")
    if min_p is not None and not 0 <= min_p < 1:
        raise ConfigError(f"min_p={min_p} must be in [0, 1) (or null)")
    if repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty={repetition_penalty} must be positive (1 = no penalty)")


def apply_repetition_penalty(logits: torch.Tensor, previous: Sequence[int], penalty: float) -> torch.Tensor:
    """Make tokens already present less likely (Keskar et al., 2019 — CTRL; Hugging Face's rule): a positive logit
    is divided by ``penalty``, a negative one multiplied by it."""
    if penalty == 1.0 or not previous:
        return logits
    ids = torch.tensor(sorted(set(previous)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (ties at the k-th value kept), the rest become -inf."""
    if k >= logits.numel():
        return logits
    kth_best = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of most likely tokens whose probability
    mass reaches ``p``."""
    probs, order = torch.softmax(logits, dim=-1).sort(descending=True)
    mass_before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop = order[mass_before >= p]  # the set already reached p without these
    return logits.index_fill(0, drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al., 2024): keep tokens at least ``min_p`` times as likely as the most likely
    one — a cut that tightens when the model is sure and loosens when it is not."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def sample_next(
    logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
    previous: Sequence[int] = (),
) -> int:
    """One token id from next-token logits (V,): penalty, then greedy or temperature → top-k → top-p → min-p."""
    logits = apply_repetition_penalty(logits.float(), previous, repetition_penalty)
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    if min_p:
        logits = filter_min_p(logits, min_p)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Continue ``prompt`` (token ids) by up to ``max_new_tokens`` tokens; returns only the new tokens.
    Takes the options of :func:`generate_stream`."""
    return list(generate_stream(model, prompt, max_new_tokens, **kwargs))


@torch.no_grad()
def generate_stream(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield the new token ids continuing ``prompt``, one at a time, up to ``max_new_tokens``.

    Stops early at ``eos_id`` (or when the caller stops reading). ``use_cache=False`` recomputes the whole
    context every step (slow; the reference the cached path is tested against)."""
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    context = model.config.max_seq_len
    if not 0 < len(prompt) <= context:
        raise ConfigError(f"the prompt is {len(prompt)} tokens; it must be 1 to {context} (the model's context)")
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:  # restore train mode even when the caller stops reading early
        tokens = list(prompt)
        cache = new_kv_cache(model, batch_size=1) if use_cache else None
        logits = model(torch.tensor([tokens], device=device), cache, 0)[0, -1]  # prefill: the whole prompt at once
        cached = len(tokens)
        for step in range(max_new_tokens):
            next_id = sample_next(logits, generator, temperature, top_k, top_p, min_p, repetition_penalty, tokens)
            if next_id == eos_id:
                break
            tokens.append(next_id)
            yield next_id
            if step == max_new_tokens - 1:
                break
            if cache is not None and cached < context:  # decode: one new token, earlier ones from the cache
                logits = model(torch.tensor([[next_id]], device=device), cache, cached)[0, -1]
                cached += 1
            else:  # no cache, or the context is full: recompute a sliding window of the last max_seq_len tokens
                logits = model(torch.tensor([tokens[-context:]], device=device))[0, -1]
    finally:
        model.train(was_training)

class TextStreamer:
    """Turns token ids, pushed one at a time, into text deltas that join up to exactly the decoded text.

    A character outside the vocabulary arrives as several byte tokens; until its last byte is in, decoding shows
    U+FFFD, so the streamer holds back a trailing U+FFFD and never emits half a character (Chinese, emoji)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        """What is left at the end (a genuinely unfinished byte sequence comes out as U+FFFD)."""
        return self._delta(self.tokenizer.decode(self.ids))

    def _delta(self, text: str) -> str:
        if not text.startswith(self.emitted):  # decoding is prefix-stable with this tokenizer; guard anyway
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


def stream_text(
    model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, stop: Sequence[str] = (), **kwargs
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text deltas while it is generated (see :class:`TextStreamer`),
    ending just before the first of the ``stop`` strings. Generation starts after ``<s>``, as every training
    document does. Takes the sampling options of :func:`generate_stream`."""
    streamer, emitted, held = TextStreamer(tokenizer), "", ""
    ids = generate_stream(model, tokenizer.encode(prompt, bos=True), max_new_tokens, eos_id=tokenizer.eos_id, **kwargs)
    for token_id in ids:
        text = emitted + held + streamer.push(token_id)
        cut = _first_stop(text, stop)
        if cut is not None:
            ids.close()  # stop generating
            break
        # Hold back a tail that may be the start of a stop string, until the next tokens tell.
        keep = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        held = text[len(text) - keep :]
        if out := text[len(emitted) : len(text) - keep]:
            yield out
            emitted += out
    else:
        text = emitted + held + streamer.flush()
        cut = _first_stop(text, stop)
    if tail := text[len(emitted) : cut]:
        yield tail


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, if any is there."""
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """The decoded continuation of ``prompt`` (the prompt itself not included): :func:`stream_text`, joined."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))
