"""Scoring text instead of generating it: the log-probability of a sequence, and multiple-choice accuracy.

Multiple choice by log-likelihood is how lm-evaluation-harness scores tasks such as HellaSwag or ARC: each allowed
answer is appended to the prompt as the assistant's reply, the model's log-probabilities of its tokens are summed,
and the most likely answer is the model's pick. Nothing is sampled, so the score is exact and reproducible, and a
model that has not learnt the task scores chance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry_pl.chat import ChatFormat
from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.data.datamodule import IGNORE_INDEX
from llmfoundry_pl.data.demo_task import Question


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over t of log p(labels[b, t]) under logits[b, t], for the positions whose label is not IGNORE_INDEX.

    logits (B, T, V), labels (B, T) → (B,). The labels are already aligned: labels[:, t] is the token that position
    t predicts (the input shifted left by one). Differentiable (DPO trains through it); computed in fp32."""
    B, T, V = logits.shape
    # cross_entropy is -log softmax at the label, fused, and 0 where the label is ignore_index
    nll = F.cross_entropy(logits.float().reshape(B * T, V), labels.reshape(B * T), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(B, T).sum(dim=-1)


@torch.inference_mode()
def choice_accuracy(model: nn.Module, chat: ChatFormat, questions: Sequence[Question], batch_size: int = 32) -> dict:
    """Multiple-choice accuracy by log-likelihood: each choice is scored as the assistant's reply (its tokens and
    the closing ``<|end|>``) after the question's messages; the choice with the highest total log-probability is
    the model's answer (ties go to the earlier choice).

    Returns {"accuracy", "chance" (the mean of 1/number of choices), "questions", "truncated" (questions cut to
    fit the model's context, see below)}. ``batch_size`` is the number of (question, choice) sequences per forward
    pass. ``model`` maps tokens (B, T) to logits (B, T, V) and has ``config.max_seq_len``; it is put in eval mode.
    """
    if not questions:
        raise ValueError("choice_accuracy needs at least one question")
    model.eval()
    device = next(model.parameters()).device
    limit = model.config.max_seq_len + 1  # a sequence of L tokens is L-1 inputs, each predicting the next token
    rows: list[tuple[list[int], list[int]]] = []  # (inputs, labels) of every (question, choice), question-major
    truncated = 0
    for question in questions:
        cut = False
        for choice in question.choices:
            ids, trained = chat.encode_to_last_reply([*question.messages, {"role": "assistant", "content": choice}])
            if sum(trained) >= limit:
                raise ConfigError(f"the reply {choice!r} alone is longer than the model's context "
                                  f"(max_seq_len={model.config.max_seq_len})")
            if len(ids) > limit:
                # Too long: keep the last tokens, as lm-evaluation-harness does — the reply, the end of the
                # question and the passage's last lines stay; the start of the prompt is cut (and counted).
                ids, trained, cut = ids[-limit:], trained[-limit:], True
            labels = [t if is_trained else IGNORE_INDEX for t, is_trained in zip(ids[1:], trained[1:], strict=True)]
            rows.append((ids[:-1], labels))
        truncated += cut

    # Longest first in each batch, so that padding is small; right padding does not change a causal model's
    # scores of the real tokens (no real token attends to a later one), and padded labels are ignored.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    scores = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(rows[batch[0]][0])
        inputs = torch.zeros(len(batch), width, dtype=torch.long)  # pad with token 0: its logits are never read
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(batch):
            x, y = rows[i]
            inputs[r, : len(x)], labels[r, : len(y)] = torch.tensor(x), torch.tensor(y)
        logits = model(inputs.to(device))  # (B, T, V)
        scores[batch] = sequence_log_probs(logits, labels.to(device)).double().cpu()

    correct, chance, row = 0, 0.0, 0
    for question in questions:
        n = len(question.choices)
        best = int(torch.argmax(scores[row : row + n]))  # argmax returns the first of equal maxima
        correct += question.choices[best] == question.answer
        chance += 1 / n
        row += n
    return {"accuracy": correct / len(questions), "chance": chance / len(questions), "questions": len(questions),
            "truncated": truncated}
