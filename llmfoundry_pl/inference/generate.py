"""Autoregressive sampling, the plain way: run the whole context through the model for every new token.

Simple and exactly right; it costs O(T²) per token, which a KV cache (the inference engine) removes.
Sampling uses its own ``torch.Generator``, so printing a sample during training never moves the global RNG
that dropout and resumed runs depend on.
"""

from __future__ import annotations

import torch

from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """Continue ``prompt`` (token ids) by up to ``max_new_tokens`` tokens; stop early at ``eos_id``.

    temperature 0 picks the most likely token (greedy); otherwise logits / temperature are sampled, among the
    ``top_k`` most likely tokens when given. Returns only the new tokens."""
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = tokens[:, -model.config.max_seq_len :]  # the model sees at most max_seq_len tokens
        logits = model(context)[0, -1]  # (V,) next-token logits
        next_id = sample_next(logits, temperature, top_k, generator)
        if next_id == eos_id:
            break
        new.append(next_id)
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    model.train(was_training)
    return new


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from next-token logits (V,)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth_best = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """The decoded continuation of ``prompt`` (the prompt itself not included). Generation starts after ``<s>``,
    as every training document does."""
    ids = generate(model, tokenizer.encode(prompt, bos=True), max_new_tokens, eos_id=tokenizer.eos_id, **kwargs)
    return tokenizer.decode(ids)
