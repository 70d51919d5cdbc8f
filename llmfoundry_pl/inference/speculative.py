"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a small draft model guesses the next few
tokens one by one, and the large target model checks all the guesses in ONE forward pass.

Why it is faster: a decode step of the target costs about the same for 1 token as for 5 (it is bound by reading
the weights and by per-call overhead, not by arithmetic), so every accepted guess is a target step saved.
Why it is exact: guess x, drafted with probability q(x), is kept with probability min(1, p(x) / q(x)), where p is
the target's distribution; at the first rejection the token is drawn from the leftover max(0, p - q),
renormalised. Every emitted token is then distributed exactly as the target alone would draw it. With greedy
decoding p and q are one-hot, the rule keeps a guess iff it is the target's argmax, and the output is token for
token the target's own greedy output: exactly so in fp32. In bf16 or fp16, a pass over several tokens rounds
otherwise than one per token, as decoding with and without the KV cache do, and a near-tie may go the other way
after a few dozen tokens (1 prompt in 6 at token 41, in a review of a tiny bf16 model).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llmfoundry_pl.config import ConfigError, check_sampling
from llmfoundry_pl.inference.generate import EndIds, end_ids, eval_mode, generate_stream
from llmfoundry_pl.inference.kv_cache import new_kv_cache
from llmfoundry_pl.inference.sampling import check_finite, draw, next_token_probs, seeded_generator
from llmfoundry_pl.model import Transformer


@dataclass
class SpeculativeStats:
    """Counts of one speculative run: how many draft tokens were proposed and how many the target kept."""

    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def accept_draft(
    p: torch.Tensor, q: torch.Tensor, draft_ids: list[int], generator: torch.Generator
) -> list[int]:
    """The tokens one speculative round emits: the accepted prefix of ``draft_ids`` plus one token from the target.

    ``p`` (k+1, V): the target's next-token distributions after each prefix of the k guesses; ``q`` (k, V): the
    draft's distributions the guesses were drawn from. Always emits 1 to k+1 tokens."""
    for j, x in enumerate(draft_ids):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[j, x] >= p[j, x]:  # rejected (u ≥ p/q, written without dividing by a zero q)
            leftover = (p[j] - q[j]).clamp(min=0)
            if leftover.sum() <= 0:  # p == q at float precision: any draw from p is right
                leftover = p[j]
            return draft_ids[:j] + [int(draw(leftover / leftover.sum(), generator))]
    return draft_ids + [int(draw(p[-1], generator))]  # every guess kept: a bonus token from the target


@torch.no_grad()
def speculative_stream(
    model: Transformer,
    draft_model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    draft_tokens: int = 4,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: EndIds = None,
    seed: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[int]:
    """Yield the tokens continuing ``prompt`` as :func:`~llmfoundry_pl.inference.generate.generate_stream` does
    with ``model`` alone, guessing ``draft_tokens`` at a time with ``draft_model`` (which must share the
    tokenizer). ``stats`` (optional) is filled in as it goes. The context is the target's: once the text fills the
    draft's shorter one, the target decodes alone (with its cache), and once it fills the target's, the rest is
    plain decoding with a sliding window (its repetition penalty seeing the whole text), as without a draft.
    Greedy output equals plain decoding's in fp32 and unquantized; a model quantized to ``int8`` scores the k + 1
    tokens of a pass with one activation scale, so it may not (``lfpl-generate`` refuses that pair)."""
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    if draft_tokens < 1:
        raise ConfigError(f"draft_tokens={draft_tokens} must be 1 or more")
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the model's "
            f"({model.config.vocab_size}); speculative decoding needs a draft with the same tokenizer"
        )
    context, draft_context = model.config.max_seq_len, draft_model.config.max_seq_len
    if not 0 < len(prompt) <= context:
        raise ConfigError(f"the prompt is {len(prompt)} tokens; it must be 1 to {context} (the model's context)")
    stats = stats if stats is not None else SpeculativeStats()
    device = model.tok_embeddings.weight.device
    generator = seeded_generator(device, seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty)
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    seen[prompt] = True

    def probs(logits: torch.Tensor, guesses: list[int]) -> torch.Tensor:
        """The next-token distribution after the text so far plus ``guesses`` (the penalty sees them too)."""
        row_seen = seen.clone().index_fill_(0, torch.tensor(guesses, device=device), True) if guesses else seen
        return next_token_probs(logits, seen=row_seen if repetition_penalty != 1.0 else None, **sampling)

    tokens, ends = list(prompt), end_ids(eos_id)
    # The caches lag behind the text (the target has not seen the token it emitted last, the draft maybe not its
    # own last guess); each round feeds what is missing together with the new work, so nothing is recomputed.
    target_cached = draft_cached = 0
    target_cache, draft_cache = new_kv_cache(model, 1), new_kv_cache(draft_model, 1)
    with eval_mode(model, draft_model):
        produced = 0
        while produced < max_new_tokens:
            if len(tokens) > context:  # the target's context is full: finish with plain decoding (a sliding window)
                seed = int(torch.randint(2**62, (), generator=generator, device=device))
                yield from generate_stream(model, tokens[-context:], max_new_tokens - produced, eos_id=eos_id,
                                           seed=seed, seen_before=tokens[:-context], **sampling)
                return
            # 0 guesses: the target's token only (the last token asked for, or the draft's context is full)
            room = min(context, draft_context) - len(tokens)
            k = max(0, min(draft_tokens, max_new_tokens - produced - 1, room))
            # 1. The draft guesses k tokens, one forward pass each.
            guesses, q = [], []
            feed = tokens[draft_cached:]
            for _ in range(k):
                logits = draft_model(torch.tensor([feed], device=device), draft_cache, draft_cached)[0, -1]
                check_finite(logits, draft_model)
                draft_cached += len(feed)
                q.append(probs(logits, guesses))
                guesses.append(int(draw(q[-1], generator)))
                feed = guesses[-1:]
            # 2. The target scores the last token and all k guesses in one pass: k + 1 distributions.
            feed = tokens[target_cached:] + guesses
            logits = model(torch.tensor([feed], device=device), target_cache, target_cached)[0, -(k + 1) :]
            check_finite(logits, model)  # NaN weights: greedy took token 0 every time, as plain decoding does not
            p = torch.stack([probs(logits[j], guesses[:j]) for j in range(k + 1)])
            # 3. Keep the guesses the target agrees with, plus one token of its own.
            new = accept_draft(p, torch.stack(q) if q else p[:0], guesses, generator)
            stats.proposed += k
            stats.accepted += len(new) - 1
            stats.target_calls += 1
            target_cached = len(tokens) + len(new) - 1  # its keys of the accepted guesses are right, not later ones
            draft_cached = min(draft_cached, target_cached)  # the draft never fed its last guess
            for token_id in new:
                if token_id in ends:
                    return
                tokens.append(token_id)
                seen[token_id] = True
                produced += 1
                yield token_id
